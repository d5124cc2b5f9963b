#!/usr/bin/env python3
"""Build Triton's ONNX Runtime backend (``libtriton_onnxruntime.so``) for a CPU-only machine.

    .venv/bin/python deploy/triton/build_backend.py [--sources TARBALL] [--force] [--verbose]

Sources: the r24.10 ``git archive`` of four Triton repositories (``--sources``, else
``$TARDIS_TRITON_SOURCES``, else ``../shared/vendor/triton-r24.10-src.tar.gz`` beside the repository),
unpacked into ``build/triton/src`` and patched there (the tarball is never changed). ONNX Runtime:
the C headers that ``custom_ops/build.py`` finds or fetches, and the pip wheel's ``libonnxruntime.so``.
Server: the ``tritonserver`` 2.51.0 inside ``nvidia-pytriton==0.7.0``, whose renamed
``libtritonserver-*.so`` the built backend is patched to need.

Result: ``build/triton/backends/onnxruntime/libtriton_onnxruntime.so`` with a ``libonnxruntime.so.1``
link beside it (rpath ``$ORIGIN``). The backend folder to pass to ``--backend-directory`` is printed
last. An up-to-date backend is not rebuilt. Exit status 0 on success, 1 when the build fails (the log
is in ``build/triton/build.log``), 2 when something it needs is missing (with how to get it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "triton"
SRC = BUILD / "src"
CMAKE_DIR = BUILD / "cmake"
ORT_LIB_DIR = BUILD / "ort-lib"
BACKENDS = BUILD / "backends"
BACKEND_DIR = BACKENDS / "onnxruntime"
BACKEND = BACKEND_DIR / "libtriton_onnxruntime.so"
STAMP = BUILD / "backend.stamp"
LOG = BUILD / "build.log"
DEFAULT_SOURCES = ROOT.parent / "shared" / "vendor" / "triton-r24.10-src.tar.gz"
REPOS = ("onnxruntime_backend", "backend", "core", "common")

# Fix 1: common/src adds a unit-test folder that needs GTest; the backend does not use it.
TEST_SUBDIR = "add_subdirectory(test)"
TEST_SUBDIR_FIX = "# add_subdirectory(test)  # tardis: unit tests need GTest, not needed for the backend"
# Fix 2: Debian's rapidjson 1.1 uses deprecated std::iterator, which trips the trees' -Werror.
CXX_FLAGS = "-Wno-deprecated-declarations"
# Fix 3 (after the build): the wheel's libtritonserver.so is renamed by auditwheel; see install().

RAPIDJSON_CONFIGS = (
    "/usr/share/cmake/RapidJSON/RapidJSONConfig.cmake",
    "/usr/lib/cmake/RapidJSON/RapidJSONConfig.cmake",
    "/usr/local/lib/cmake/RapidJSON/RapidJSONConfig.cmake",
    "/usr/local/share/cmake/RapidJSON/RapidJSONConfig.cmake",
)


class Missing(RuntimeError):
    """Something the build needs is not there; the message says how to get it."""


class BuildFailed(RuntimeError):
    """A build step failed; the output is in the log."""


def step(message: str) -> None:
    print(f"[triton-backend] {message}", flush=True)


# ---- what the build needs -----------------------------------------------------------------


def package_dir(name: str) -> Path | None:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_sources(option: str | None) -> Path:
    path = Path(option or os.environ.get("TARDIS_TRITON_SOURCES") or DEFAULT_SOURCES).expanduser().resolve()
    if not path.is_file():
        raise Missing(
            f"Triton sources {path} not found: pass --sources or set TARDIS_TRITON_SOURCES to "
            "triton-r24.10-src.tar.gz (see /work/shared/vendor/README.md)"
        )
    return path


def find_tritonserver_lib() -> Path:
    """The wheel's renamed libtritonserver (nvidia_pytriton.libs/libtritonserver-<hash>.so)."""
    pytriton = package_dir("pytriton")
    if pytriton is None:
        raise Missing("nvidia-pytriton is not installed: .venv/bin/pip install --no-deps nvidia-pytriton==0.7.0")
    folder = pytriton.parent / "nvidia_pytriton.libs"
    libs = sorted(folder.glob("libtritonserver*.so*"))
    if len(libs) != 1:
        raise Missing(
            f"expected one libtritonserver*.so in {folder}, found {len(libs)}: reinstall nvidia-pytriton==0.7.0"
        )
    return libs[0]


def find_onnxruntime_lib() -> Path:
    ort = package_dir("onnxruntime")
    if ort is None:
        raise Missing("onnxruntime is not installed in this Python: .venv/bin/pip install onnxruntime")
    libs = sorted((ort / "capi").glob("libonnxruntime.so.1.*"))
    if not libs:
        raise Missing(f"no libonnxruntime.so.1.* in {ort / 'capi'} (a pip onnxruntime wheel ships one)")
    return libs[-1]


def load_custom_ops_build():
    """custom_ops/build.py as a module: it knows how to find or fetch the ONNX Runtime C headers."""
    spec = importlib.util.spec_from_file_location("tardis_custom_ops_build", ROOT / "custom_ops" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_headers(verbose: bool) -> Path:
    ops = load_custom_ops_build()
    try:
        return ops.find_headers(verbose)
    except ops.BuildError as error:
        raise Missing(f"ONNX Runtime C headers: {error}") from None


def headers_at_hand() -> Path | None:
    ops = load_custom_ops_build()
    try:
        return ops.headers_at_hand()
    except ops.BuildError:
        return None


def check_tools() -> None:
    for tool, package in (("cmake", "cmake"), ("make", "make"), ("patchelf", "patchelf")):
        if shutil.which(tool) is None:
            raise Missing(f"{tool} not found: apt-get install -y {package}")
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        raise Missing("no C++ compiler: apt-get install -y g++")
    if not any(Path(p).is_file() for p in RAPIDJSON_CONFIGS):
        raise Missing("RapidJSON's CMake config not found: apt-get install -y rapidjson-dev")


# ---- up-to-date check ---------------------------------------------------------------------


def stamp_of(inputs: list[Path]) -> str:
    """What the backend was built from: paths, sizes and times of the inputs."""
    return json.dumps({str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in inputs}, sort_keys=True)


def up_to_date(inputs: list[Path]) -> bool:
    if not (BACKEND.is_file() and STAMP.is_file() and (BACKEND_DIR / "libonnxruntime.so.1").exists()):
        return False
    newest = max(p.stat().st_mtime for p in inputs)
    return BACKEND.stat().st_mtime >= newest and STAMP.read_text() == stamp_of(inputs)


# ---- build steps --------------------------------------------------------------------------


def run(command: list[str], verbose: bool, cwd: Path | None = None) -> str:
    if verbose:
        step("$ " + " ".join(str(c) for c in command))
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    with LOG.open("a") as log:
        log.write("$ " + " ".join(str(c) for c in command) + "\n" + result.stdout + "\n")
    if verbose:
        sys.stdout.write(result.stdout)
    if result.returncode != 0:
        if not verbose:
            sys.stderr.write("\n".join(result.stdout.splitlines()[-30:]) + "\n")
        raise BuildFailed(f"{Path(str(command[0])).name} failed ({result.returncode}); full log in {LOG}")
    return result.stdout


def extract(sources: Path) -> None:
    """Unpack the tarball into build/triton/src (fresh) and apply the source fix there."""
    step(f"extract: {sources} -> {SRC}")
    if SRC.exists():
        shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    with tarfile.open(sources) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(SRC, filter="data")
        else:  # Python < 3.11.4
            archive.extractall(SRC)
    missing = [r for r in REPOS if not (SRC / r / "CMakeLists.txt").is_file()]
    if missing:
        raise Missing(f"{sources} lacks {', '.join(missing)}: expected the r24.10 sources of {', '.join(REPOS)}")
    cmake_lists = SRC / "common" / "src" / "CMakeLists.txt"
    text = cmake_lists.read_text()
    if text.count(TEST_SUBDIR) != 1:
        raise BuildFailed(f"{cmake_lists}: expected one '{TEST_SUBDIR}' to disable (other sources than r24.10?)")
    cmake_lists.write_text(text.replace(TEST_SUBDIR, TEST_SUBDIR_FIX))
    step("fix: common/src/CMakeLists.txt: test subdirectory (needs GTest) disabled")


def link_onnxruntime(ort_lib: Path) -> None:
    """A folder where CMake's find_library(onnxruntime) finds the wheel's library."""
    ORT_LIB_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("libonnxruntime.so", "libonnxruntime.so.1"):
        link = ORT_LIB_DIR / name
        link.unlink(missing_ok=True)
        link.symlink_to(ort_lib)


def configure_and_build(headers: Path, verbose: bool) -> Path:
    if CMAKE_DIR.exists():
        shutil.rmtree(CMAKE_DIR)
    step(f"configure: cmake {SRC / 'onnxruntime_backend'} -> {CMAKE_DIR}")
    run(
        [
            "cmake",
            "-S",
            SRC / "onnxruntime_backend",
            "-B",
            CMAKE_DIR,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CXX_FLAGS={CXX_FLAGS}",
            "-DTRITON_ENABLE_GPU=OFF",
            "-DTRITON_ENABLE_ONNXRUNTIME_TENSORRT=OFF",
            "-DTRITON_ENABLE_ONNXRUNTIME_OPENVINO=OFF",
            "-DFETCHCONTENT_FULLY_DISCONNECTED=ON",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-COMMON={SRC / 'common'}",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-CORE={SRC / 'core'}",
            f"-DFETCHCONTENT_SOURCE_DIR_REPO-BACKEND={SRC / 'backend'}",
            f"-DTRITON_ONNXRUNTIME_INCLUDE_PATHS={headers}",
            f"-DTRITON_ONNXRUNTIME_LIB_PATHS={ORT_LIB_DIR}",
        ],
        verbose,
    )
    step(f"fix: CMAKE_CXX_FLAGS={CXX_FLAGS} (Debian rapidjson 1.1 vs -Werror)")
    jobs = str(os.cpu_count() or 1)
    step(f"build: triton-onnxruntime-backend (-j{jobs})")
    run(["cmake", "--build", CMAKE_DIR, "--target", "triton-onnxruntime-backend", "-j", jobs], verbose)
    built = CMAKE_DIR / "libtriton_onnxruntime.so"
    if not built.is_file():
        raise BuildFailed(f"the build produced no {built}; full log in {LOG}")
    return built


def install(built: Path, tritonserver_lib: Path, ort_lib: Path, verbose: bool) -> None:
    """Copy into the backend folder, point it at the wheel's libtritonserver, link libonnxruntime beside it."""
    BACKEND_DIR.mkdir(parents=True, exist_ok=True)
    staging = BACKEND.with_suffix(".so.tmp")
    shutil.copy2(built, staging)
    needed = run(["patchelf", "--print-needed", staging], verbose).split()
    if "libtritonserver.so" in needed:
        run(["patchelf", "--replace-needed", "libtritonserver.so", tritonserver_lib.name, staging], verbose)
        step(f"fix: patchelf --replace-needed libtritonserver.so {tritonserver_lib.name}")
    run(["patchelf", "--set-rpath", "$ORIGIN", staging], verbose)
    link = BACKEND_DIR / "libonnxruntime.so.1"
    link.unlink(missing_ok=True)
    link.symlink_to(ort_lib)
    os.utime(staging)  # newer than every input, whatever copy2 kept
    os.replace(staging, BACKEND)


def build(sources_option: str | None, force: bool, verbose: bool) -> Path:
    sources = find_sources(sources_option)
    tritonserver_lib = find_tritonserver_lib()
    ort_lib = find_onnxruntime_lib()
    at_hand = headers_at_hand()
    inputs = [sources, tritonserver_lib, ort_lib, Path(__file__).resolve()]
    if at_hand is not None:
        inputs.append(at_hand / "onnxruntime_c_api.h")
    if not force and at_hand is not None and up_to_date(inputs):
        step(f"up to date: {BACKEND}")
        return BACKENDS
    check_tools()
    headers = find_headers(verbose)
    if at_hand is None:
        inputs.append(headers / "onnxruntime_c_api.h")
    BUILD.mkdir(parents=True, exist_ok=True)
    LOG.write_text("")
    STAMP.unlink(missing_ok=True)
    started = time.monotonic()
    extract(sources)
    link_onnxruntime(ort_lib)
    built = configure_and_build(headers, verbose)
    install(built, tritonserver_lib, ort_lib, verbose)
    STAMP.write_text(stamp_of(inputs))
    step(f"built: {BACKEND} ({time.monotonic() - started:.0f} s)")
    return BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sources", help=f"the Triton r24.10 sources tarball (default $TARDIS_TRITON_SOURCES or {DEFAULT_SOURCES})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--verbose", action="store_true", help="print the commands and their output")
    args = parser.parse_args(argv)
    try:
        backends = build(args.sources, args.force, args.verbose)
    except Missing as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BuildFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(backends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
