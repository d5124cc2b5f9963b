#!/usr/bin/env python3
"""Build the ``ai.tardis`` ONNX Runtime custom-op library.

    python custom_ops/build.py [--out DIR] [--no-cuda] [--force] [--verbose]

Outputs (default ``tardis_onnx/lib``):

- ``libtardis_ops.so``: CPU kernels; needs only g++ (or ``$CXX``).
- ``libtardis_ops_cuda.so``: CPU and CUDA kernels plus the ``tardis_ffn_fallback_cuda_*`` C entry
  points; built when nvcc is found (``--no-cuda`` skips it). cudart is linked statically, so the
  library also loads on machines without CUDA.

ONNX Runtime's C/C++ headers are in no wheel. They come from ``$ORT_INCLUDE_DIR`` when set,
else from Debian 13's ``libonnxruntime-dev`` package, downloaded once with ``apt-get download``
(private apt lists and cache under ``build/``, nothing on the system changes) and unpacked with
``dpkg -x`` into ``build/ort-headers``.

Each step prints one line; an up-to-date library is not rebuilt. Exit status 0 on success,
1 on a build error (with a one-line reason on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "custom_ops"
DEFAULT_OUT = ROOT / "tardis_onnx" / "lib"
BUILD_DIR = ROOT / "build"
HEADER_CACHE = BUILD_DIR / "ort-headers"
FETCHED_HEADERS = HEADER_CACHE / "usr" / "include" / "onnxruntime"
OBJECT_DIR = BUILD_DIR / "custom_ops"

CPU_LIBRARY = "libtardis_ops.so"
CUDA_LIBRARY = "libtardis_ops_cuda.so"

DEBIAN_SOURCE = "deb http://deb.debian.org/debian trixie main"
DEBIAN_PACKAGE = "libonnxruntime-dev"
# The API entries the sources use; a header set without them cannot build the library.
REQUIRED_API = (
    "KernelContext_ParallelFor",
    "KernelContext_GetGPUComputeStream",
    "CreateCustomOpDomain",
    "KernelInfoGetConstantInput_tensor",
)
HEADERS = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h", "onnxruntime_float16.h")

CXX_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-Wall",
    "-Wextra",
    "-Wno-psabi",  # 32-byte vector types in internal inline helpers: no ABI boundary is crossed
]
LINK_FLAGS = ["-shared", f"-Wl,--version-script={SOURCES / 'exports.map'}", "-Wl,-z,defs", "-Wl,-O1"]
CPU_SOURCES = ("tardis_ops.cc", "ffn_fallback_cpu.cc")
SHARED_HEADERS = ("ffn_fallback.h", "tardis_math.h", "exports.map")
CUDA_SOURCE = "ffn_fallback_cuda.cu"
# sm_75 (Turing) is nvcc 13's oldest target; sm_90 is the H100/H200. PTX of the newest one
# lets later GPUs JIT-compile. Override with TARDIS_CUDA_ARCHS="75;80;90".
DEFAULT_CUDA_ARCHS = ("75", "80", "86", "89", "90")


class BuildError(RuntimeError):
    """A build step failed; the message is one line for the user."""


def step(message: str) -> None:
    print(f"[tardis-ops] {message}", flush=True)


def run(command: list[str], verbose: bool, cwd: Path | None = None) -> None:
    if verbose:
        step("$ " + " ".join(str(c) for c in command))
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise BuildError(f"command failed ({result.returncode}): {' '.join(str(c) for c in command[:3])} ...")
    if verbose and (result.stdout or result.stderr):
        sys.stderr.write(result.stdout + result.stderr)


# ---- ONNX Runtime headers -------------------------------------------------------------------


def header_api_version(include_dir: Path) -> int:
    """ORT_API_VERSION of a header directory, after checking it has what the sources use."""
    missing_files = [h for h in HEADERS if not (include_dir / h).is_file()]
    if missing_files:
        raise BuildError(f"{include_dir} lacks {', '.join(missing_files)}")
    c_api = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    missing = [name for name in REQUIRED_API if name not in c_api]
    if missing:
        raise BuildError(f"ONNX Runtime headers in {include_dir} are too old: no {', '.join(missing)}")
    match = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", c_api)
    if not match:
        raise BuildError(f"no ORT_API_VERSION in {include_dir / 'onnxruntime_c_api.h'}")
    return int(match.group(1))


def user_headers(path: str) -> Path:
    """$ORT_INCLUDE_DIR: the directory itself or its onnxruntime/ subdirectory."""
    base = Path(path).expanduser()
    for candidate in (base, base / "onnxruntime"):
        if (candidate / "onnxruntime_c_api.h").is_file():
            return candidate
    raise BuildError(f"ORT_INCLUDE_DIR={path} holds no onnxruntime_c_api.h (ONNX Runtime C/C++ headers)")


def headers_at_hand() -> Path | None:
    """The headers the build uses without fetching: $ORT_INCLUDE_DIR's (BuildError if it holds none),
    else an earlier fetch's, else None."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        return user_headers(env)
    return FETCHED_HEADERS if (FETCHED_HEADERS / "onnxruntime_c_api.h").is_file() else None


def fetch_debian_headers(verbose: bool) -> Path:
    """Download and unpack Debian's libonnxruntime-dev into build/ort-headers."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise BuildError(
                f"ONNX Runtime C/C++ headers not found and {tool} is missing to fetch Debian's {DEBIAN_PACKAGE}: "
                "set ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h"
            )
    step(f"headers: fetching Debian trixie {DEBIAN_PACKAGE} (apt-get download, private lists under build/apt)")
    apt_dir = BUILD_DIR / "apt"
    lists = apt_dir / "lists"
    cache = apt_dir / "cache"
    for d in (lists / "partial", cache / "archives" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    sources = apt_dir / "sources.list"
    sources.write_text(DEBIAN_SOURCE + "\n")
    options = [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State::Lists={lists}",
        f"-oDir::Cache={cache}",
        "-oAPT::Architecture=amd64",  # the headers are the same on every architecture
        "-oAPT::Architectures=amd64",
        "-oDebug::NoLocking=1",  # the lists and cache are private; take no system lock
        "-q",
    ]
    if os.geteuid() == 0:
        options.append("-oAPT::Sandbox::User=root")  # the private dirs are not readable by _apt
    try:
        run(["apt-get", *options, "update"], verbose)
        with tempfile.TemporaryDirectory(dir=apt_dir) as download:
            run(["apt-get", *options, "download", DEBIAN_PACKAGE], verbose, cwd=Path(download))
            debs = sorted(Path(download).glob("*.deb"))
            if not debs:
                raise BuildError(f"apt-get download {DEBIAN_PACKAGE} produced no .deb")
            staging = Path(tempfile.mkdtemp(dir=BUILD_DIR, prefix="ort-headers-"))
            try:
                run(["dpkg", "-x", str(debs[0]), str(staging)], verbose)
            except BuildError:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except BuildError as error:
        raise BuildError(
            f"ONNX Runtime C/C++ headers not found and fetching Debian's {DEBIAN_PACKAGE} failed ({error}): "
            "set ORT_INCLUDE_DIR to a directory holding onnxruntime_c_api.h"
        ) from None
    if HEADER_CACHE.exists():
        shutil.rmtree(HEADER_CACHE)
    staging.rename(HEADER_CACHE)
    shutil.rmtree(apt_dir, ignore_errors=True)  # the package lists (tens of MB) are no longer needed
    return FETCHED_HEADERS


def find_headers(verbose: bool) -> Path:
    include_dir = headers_at_hand() or fetch_debian_headers(verbose)
    version = header_api_version(include_dir)
    origin = ", from ORT_INCLUDE_DIR" if os.environ.get("ORT_INCLUDE_DIR") else ""
    step(f"headers: {include_dir} (ONNX Runtime API {version}{origin})")
    return include_dir


# ---- compilers ------------------------------------------------------------------------------


def find_cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler: install g++ or set CXX")
    return cxx


def find_nvcc() -> Path | None:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def cuda_library_dir(nvcc: Path) -> Path:
    """The CUDA toolkit's library directory (nvcc may be a wrapper script outside the toolkit)."""
    roots = [nvcc.parent.parent]
    probe = subprocess.run(
        [str(nvcc), "-dryrun", "-c", str(SOURCES / CUDA_SOURCE), "-o", os.devnull], capture_output=True, text=True
    )
    here = re.search(r"_HERE_=(\S+)", probe.stdout + probe.stderr)
    if here:
        roots.insert(0, Path(here.group(1)).parent)
    for root in roots:
        for candidate in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
            if (candidate / "libcudart_static.a").is_file():
                return candidate
    raise BuildError(f"no libcudart_static.a in the CUDA toolkit of {nvcc}")


def cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("TARDIS_CUDA_ARCHS", ";".join(DEFAULT_CUDA_ARCHS)).split(";")]
    archs = [a for a in archs if a]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [*flags, f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


# ---- up-to-date check -----------------------------------------------------------------------


def fingerprint(commands: list[list[str]], files: list[Path]) -> str:
    digest = hashlib.sha256()
    for command in commands:
        digest.update("\0".join(str(c) for c in command).encode())
    for f in files:
        digest.update(str(f).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


def stamp_file(output: Path) -> Path:
    """Where the fingerprint of `output`'s last build is kept (one per output path)."""
    where = hashlib.sha256(str(output.resolve()).encode()).hexdigest()[:12]
    return OBJECT_DIR / f"{output.name}.{where}.stamp"


def up_to_date(output: Path, key: str) -> bool:
    stamp = stamp_file(output)
    return output.is_file() and stamp.is_file() and stamp.read_text().strip() == key


def mark_built(output: Path, key: str) -> None:
    stamp_file(output).write_text(key + "\n")


def build_library(output: Path, commands: list[list[str]], inputs: list[Path], force: bool, verbose: bool) -> None:
    key = fingerprint(commands, inputs)
    if not force and up_to_date(output, key):
        step(f"up to date: {output}")
        return
    for command in commands:
        step(f"compile: {Path(command[-1]).name} ({Path(command[0]).name})")
        run(command, verbose)
    mark_built(output, key)
    step(f"built: {output}")


# ---- targets --------------------------------------------------------------------------------


def cpu_command(cxx: str, include_dir: Path, output: Path, extra: list[str]) -> list[str]:
    sources = [str(SOURCES / s) for s in CPU_SOURCES]
    return [cxx, *CXX_FLAGS, f"-I{include_dir}", *sources, *extra, *LINK_FLAGS, "-o", str(output)]


def build(out_dir: Path, cuda: bool, force: bool, verbose: bool) -> list[Path]:
    include_dir = find_headers(verbose)
    cxx = find_cxx()
    out_dir.mkdir(parents=True, exist_ok=True)
    OBJECT_DIR.mkdir(parents=True, exist_ok=True)
    header_files = [include_dir / h for h in HEADERS]
    cpu_inputs = [SOURCES / s for s in (*CPU_SOURCES, *SHARED_HEADERS)] + header_files

    cpu_out = out_dir / CPU_LIBRARY
    build_library(cpu_out, [cpu_command(cxx, include_dir, cpu_out, [])], cpu_inputs, force, verbose)
    built = [cpu_out]

    if not cuda:
        step(f"cuda: skipped (--no-cuda); {CUDA_LIBRARY} not built")
        return built
    nvcc = find_nvcc()
    if nvcc is None:
        step(f"cuda: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda); {CUDA_LIBRARY} not built")
        return built
    cuda_lib = cuda_library_dir(nvcc)
    cuda_object = OBJECT_DIR / "ffn_fallback_cuda.o"
    nvcc_command = [
        str(nvcc),
        "-std=c++17",
        "-O3",
        "-DNDEBUG",
        "-DUSE_CUDA",
        "--threads=0",
        "-Xcompiler=-fPIC,-fvisibility=hidden",
        *cuda_arch_flags(),
        "-c",
        str(SOURCES / CUDA_SOURCE),
        "-o",
        str(cuda_object),
    ]
    cuda_out = out_dir / CUDA_LIBRARY
    link_command = cpu_command(
        cxx,
        include_dir,
        cuda_out,
        ["-DUSE_CUDA", str(cuda_object), f"-L{cuda_lib}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"],
    )
    cuda_inputs = [*cpu_inputs, SOURCES / CUDA_SOURCE]
    build_library(cuda_out, [nvcc_command, link_command], cuda_inputs, force, verbose)
    built.append(cuda_out)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--no-cuda", action="store_true", help="build only the CPU library, even when nvcc exists")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--verbose", action="store_true", help="print the compiler commands and their output")
    args = parser.parse_args(argv)
    try:
        build(args.out.resolve(), cuda=not args.no_cuda, force=args.force, verbose=args.verbose)
    except BuildError as error:
        print(f"[tardis-ops] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
