"""setuptools hook: build the ``ai.tardis`` custom-op library into the package.

Metadata lives in pyproject.toml; this file only makes ``build_py`` (used by ``pip install .``
and ``pip install -e .``) run ``custom_ops/build.py`` first, so that ``tardis_onnx/lib/*.so``
exists when package data is collected, and marks the wheel as platform-specific.

Environment:
- ``TARDIS_CUSTOM_OPS``: ``auto`` (default: build; if the build fails, warn and install without
  the library, whose absence ``tardis_onnx.runtime`` reports), ``require`` (a failed build fails
  the install) or ``skip`` (do not build).
- ``TARDIS_NO_CUDA=1``: build only the CPU library even where nvcc exists.
- ``ORT_INCLUDE_DIR``: ONNX Runtime C/C++ headers to build against (see custom_ops/README.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIB_DIR = ROOT / "tardis_onnx" / "lib"


class BuildPyWithCustomOps(build_py):
    def run(self) -> None:
        self.build_custom_ops()
        super().run()
        # Package data may have been listed before the libraries existed: copy them explicitly.
        target = Path(self.build_lib) / "tardis_onnx" / "lib"
        for library in sorted(LIB_DIR.glob("*.so")):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(library, target / library.name)

    def build_custom_ops(self) -> None:
        mode = os.environ.get("TARDIS_CUSTOM_OPS", "auto")
        if mode not in ("auto", "require", "skip"):
            raise SystemExit(f"TARDIS_CUSTOM_OPS must be auto, require or skip; got {mode!r}")
        if mode == "skip":
            print("[tardis-ops] skipped (TARDIS_CUSTOM_OPS=skip)")
            return
        command = [sys.executable, str(ROOT / "custom_ops" / "build.py"), "--out", str(LIB_DIR)]
        if os.environ.get("TARDIS_NO_CUDA", "") not in ("", "0"):
            command.append("--no-cuda")
        result = subprocess.run(command, cwd=ROOT)
        if result.returncode == 0:
            return
        if mode == "require":
            raise SystemExit("building the tardis-onnx custom-op library failed (TARDIS_CUSTOM_OPS=require)")
        print(
            "WARNING: the tardis-onnx custom-op library was not built (see the error above); installing without "
            "it. The portable fallback still works; run `python custom_ops/build.py` later for the fast op.",
            file=sys.stderr,
        )


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithCustomOps}, distclass=BinaryDistribution)
