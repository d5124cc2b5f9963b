"""ONNX Runtime sessions with the ``ai.tardis`` custom-op library registered.

The library is built by ``python custom_ops/build.py`` (or ``pip install .``) into
``tardis_onnx/lib``: ``libtardis_ops.so`` (CPU kernels) and, where nvcc was found,
``libtardis_ops_cuda.so`` (CPU and CUDA kernels). ``$TARDIS_OPS_LIBRARY`` overrides the path.

onnxruntime is imported only when a session or session options are made, so this module
imports without it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnxruntime

LIB_DIR = Path(__file__).resolve().parent / "lib"
CPU_LIBRARY = "libtardis_ops.so"
CUDA_LIBRARY = "libtardis_ops_cuda.so"
LIBRARY_ENV = "TARDIS_OPS_LIBRARY"
BUILD_COMMAND = "python custom_ops/build.py"
CUDA_PROVIDER = "CUDAExecutionProvider"

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


class LibraryNotBuiltError(FileNotFoundError):
    """The custom-op library has not been built (or ``$TARDIS_OPS_LIBRARY`` points nowhere)."""


def library_path(cuda: bool = False) -> Path:
    """Path of the custom-op library; ``cuda=True`` asks for the one with CUDA kernels.

    Raises :class:`LibraryNotBuiltError` (a ``FileNotFoundError``) saying how to build it.
    """
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LibraryNotBuiltError(f"${LIBRARY_ENV}={override} is not a file")
        return path
    path = LIB_DIR / (CUDA_LIBRARY if cuda else CPU_LIBRARY)
    if not path.is_file():
        what = "CUDA custom-op library (needs nvcc)" if cuda else "custom-op library"
        raise LibraryNotBuiltError(
            f"tardis-onnx {what} not built: {path} is missing; run `{BUILD_COMMAND}` in the repository "
            "(or reinstall with `pip install .`)"
        )
    return path


def library_available(cuda: bool = False) -> bool:
    """Whether :func:`library_path` would find the library."""
    try:
        library_path(cuda)
    except FileNotFoundError:
        return False
    return True


def _optimization_level(ort: Any, optimization: str) -> Any:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    return levels[optimization]


def session_options(
    threads: int | None = None, optimization: str = "all", cuda: bool = False, custom_ops: bool = True
) -> onnxruntime.SessionOptions:
    """``SessionOptions`` with the custom-op library registered.

    ``threads``: intra-op threads (``None``: ONNX Runtime's default, one per physical core).
    ``optimization``: ``'disable'``, ``'basic'``, ``'extended'`` or ``'all'`` (ONNX Runtime's own
    default). Run the TARDIS pass on unoptimised models: EXTENDED/ALL fuse GELU. ``cuda``: register
    the library with CUDA kernels (needed when the session uses the CUDA execution provider).
    ``custom_ops=False``: plain options, without the library.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = _optimization_level(ort, optimization)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        so.intra_op_num_threads = threads
    if custom_ops:
        so.register_custom_ops_library(str(library_path(cuda)))
    return so


def make_session(
    model: str | os.PathLike[str] | bytes,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    threads: int | None = None,
    optimization: str = "all",
) -> onnxruntime.InferenceSession:
    """An ``InferenceSession`` for a model path or serialized bytes, with the custom ops registered.

    The CUDA-capable library is registered when ``providers`` names the CUDA execution provider.
    """
    import onnxruntime as ort

    providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    so = session_options(threads=threads, optimization=optimization, cuda=CUDA_PROVIDER in names)
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, sess_options=so, providers=providers)
