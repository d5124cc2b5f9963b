"""The package installs like one: the sdist carries the custom-op sources and no prebuilt binary; a wheel
built from it has the library, and installed in a fresh venv its ``tardis-onnx optimize`` writes a custom-op
model that runs there; the command line answers --help and --version."""

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from ffn_graphs import D, ffn_model
from native_build import ort_headers

import tardis_onnx
from tardis_onnx import runtime
from tardis_onnx.__main__ import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, built once by ``setup.py sdist`` from this checkout (without building the op library)."""
    pytest.importorskip("setuptools", reason="building an sdist needs setuptools")
    out = tmp_path_factory.mktemp("sdist")
    command = [sys.executable, "setup.py", "-q", "sdist", "-d", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={"TARDIS_CUSTOM_OPS": "skip"})
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = out.glob("*.tar.gz")
    return archive


def test_the_sdist_carries_the_op_sources_and_no_binary(sdist):
    with tarfile.open(sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames() if "/" in n}
    assert {"custom_ops/build.py", "custom_ops/tardis_ops.cc", "custom_ops/ffn_fallback_cpu.cc"} <= names
    assert {"custom_ops/ffn_fallback.h", "custom_ops/tardis_math.h", "custom_ops/exports.map", "setup.py"} <= names
    assert "passes/ffn.py" in names and "tardis_onnx/optimize.py" in names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


# Run by the fresh venv's python: the rewritten model in a session with the installed package's options.
RUN_IN_VENV = """
import json, sys
import numpy as np, onnxruntime as ort, tardis_onnx
model, inputs, outputs = sys.argv[1:]
session = ort.InferenceSession(model, tardis_onnx.session_options(), providers=["CPUExecutionProvider"])
np.save(outputs, session.run(None, {"x": np.load(inputs)})[0])
print(json.dumps({"package": tardis_onnx.__file__, "library": str(tardis_onnx.library_path())}))
"""


def test_a_wheel_from_the_sdist_installs_in_a_fresh_venv_and_optimizes_with_the_custom_op(sdist, tmp_path):
    """The packaging promise: a wheel built from the sdist compiles the op library, and installed in a fresh venv
    (dependencies from this environment, never this checkout) its ``tardis-onnx optimize``, run outside the
    repository, writes an ``ai.tardis`` model that the installed package's session options run; at coverage 0
    every neuron falls back, so it matches the original model."""
    pytest.importorskip("pip", reason="building and installing a wheel needs pip")
    ort = pytest.importorskip("onnxruntime")
    headers = ort_headers()
    if headers is None:
        pytest.skip("no ONNX Runtime headers: set ORT_INCLUDE_DIR or run `python custom_ops/build.py` (fetches them)")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("building the op library needs g++ (or $CXX)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", runtime.LIBRARY_ENV)}

    def run(*command, **extra_env) -> str:
        command = [str(c) for c in command]
        result = subprocess.run(command, cwd=tmp_path, env={**env, **extra_env}, capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        return result.stdout

    # CPU library only: nvcc, where present, would take minutes. The unpacked sdist has no fetched headers.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    build_env = {"TARDIS_CUSTOM_OPS": "require", "TARDIS_NO_CUDA": "1", "ORT_INCLUDE_DIR": str(headers)}
    run(*pip_wheel, "--no-cache-dir", "-w", tmp_path / "wheels", sdist, **build_env)
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert f"tardis_onnx/lib/{runtime.CPU_LIBRARY}" in archive.namelist()

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip()).resolve()
    # Plain path lines put this environment's packages (pip, numpy, onnx, onnxruntime...) on the venv's path
    # without running the .pth files there, among them the editable install's finder that maps to this checkout.
    (purelib / "outer_environment.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    # pip sees the editable tardis-onnx through that path: --ignore-installed neither uninstalls nor keeps it.
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", "--no-cache-dir", wheel)

    model, rewritten = tmp_path / "model.onnx", tmp_path / "model.tardis.onnx"
    onnx.save(ffn_model("erf_div"), model)
    console = venv / "bin" / "tardis-onnx"
    run(console, "optimize", model, "-o", rewritten, "--coverage", "0", "--fallback", "custom", "-q")
    assert "ai.tardis" in {node.domain for node in onnx.load(rewritten).graph.node}

    x = np.random.default_rng(0).standard_normal((2, 7, D)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    installed = json.loads(run(python, "-c", RUN_IN_VENV, rewritten, tmp_path / "x.npy", tmp_path / "y.npy"))
    assert Path(installed["package"]).resolve().is_relative_to(purelib), installed
    assert Path(installed["library"]).resolve().is_relative_to(purelib), installed
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-4, atol=1e-4)


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("optimize", "verify", "inspect", "diff"))
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tardis-onnx {tardis_onnx.__version__}"


def test_subcommand_help_names_the_command_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tardis_onnx optimize ")
    assert "(default: 0.2)" in out and "(default: accurate)" in out and "(default: auto)" in out
    assert "(default: None)" not in out
