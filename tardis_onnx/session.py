"""ONNX Runtime sessions for our own runs (calibration, verify, evaluation)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from tardis_onnx.contract import DOMAIN
from tardis_onnx.errors import TardisError, external_error, is_onnxruntime_error
from tardis_onnx.files import model_file_bytes
from tardis_onnx.io import has_external_data, save_model
from tardis_onnx.subgraphs import walk

# Protobuf cannot serialise a model over 2 GiB; such models go through a file with external data.
_PROTO_LIMIT = 2**31 - 2**24


def create_session(
    model: onnx.ModelProto | str | Path,
    optimization: str = "disable",
    threads: int | None = None,
    weights_dir: Path | None = None,
):
    """An ``onnxruntime.InferenceSession`` on the CPU, with the ``ai.tardis`` library registered when built.

    Graph optimisations are off by default so ONNX Runtime cannot fuse or hide
    what the pass produced. ``weights_dir``: where a graph-only ``model`` (:func:`tardis_onnx.io.open_model`)
    keeps its external data. A model with external data runs memory-frugal (:func:`frugal`); a model file among
    them keeps ONNX Runtime's prepacking where its weights fit in memory three times (:func:`prepacking_fits`).
    """
    import onnxruntime as ort

    from tardis_onnx import runtime

    label = "the model" if isinstance(model, onnx.ModelProto) else f"{model}"
    proto = model if isinstance(model, onnx.ModelProto) else _graph_only(Path(model))
    if proto is not None and uses_tardis_ops(proto) and not runtime.library_available():
        raise TardisError(f"{label} uses ai.tardis custom ops but their library is not built (run `make lib`)")
    try:
        options = runtime.session_options(threads or None, optimization, custom_ops=runtime.library_available())
    except (OSError, ValueError) as exc:
        raise TardisError(f"cannot set up ONNX Runtime ({exc})") from None
    providers = ["CPUExecutionProvider"]
    if proto is not None and has_external_data(proto):
        frugal(options, prepack=not isinstance(model, onnx.ModelProto) and prepacking_fits(Path(model)))
    if weights_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
    try:
        if not isinstance(model, onnx.ModelProto):
            # An absolute path: ONNX Runtime finds external data beside the model file, whatever the cwd.
            return ort.InferenceSession(os.path.abspath(model), options, providers=providers)
        if weights_dir is not None or _weight_bytes(model) < _PROTO_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="tardis-") as folder:
            path = Path(folder) / "model.onnx"
            save_model(model, path)  # with external data (onnx.save_model's would look for it in the cwd)
            return ort.InferenceSession(str(path), options, providers=providers)
    except TardisError:
        raise
    except Exception as exc:
        if is_onnxruntime_error(exc) or isinstance(exc, RuntimeError | ValueError):
            raise external_error(exc, f"ONNX Runtime cannot load {label}") from None
        raise


def frugal(options, prepack: bool = False) -> None:
    """Session options that keep a large model's memory near its weights: ONNX Runtime memory-maps external
    data (4 KiB-aligned), and here it also frees each temporary at once (no arena), runs nodes in priority order,
    so an fp16 weight cast to fp32 for a CPU kernel exists just before its use instead of all at once, and,
    unless ``prepack``, does not prepack weights into copies. Without prepacking ONNX Runtime's quantized
    products take a slow path: at d = 4544, h = 18176, one token, ``MatMulNBits`` (int4, ``accuracy_level=4``)
    ran 251 ms against 1.6 ms prepacked, int8 ``MatMulInteger`` 5.1 ms against 3.3 ms."""
    import onnxruntime as ort

    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")


def prepacking_fits(path: Path) -> bool:
    """Whether the model file's weights (its external data included) fit in this machine's memory three times:
    mapped, prepacked into copies (float32 MatMuls copy every weight) and room to run."""
    return 3 * model_file_bytes(path) <= physical_memory()


def physical_memory() -> int:
    """This machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_session(session, names: list[str] | None, feeds: dict, label: str = "the model") -> list:
    """``session.run(names, feeds)``; ONNX Runtime's failures (wrong feeds, out-of-range indices, ...) as a
    one-line :class:`TardisError`."""
    try:
        return session.run(names, feeds)
    except Exception as exc:
        if is_onnxruntime_error(exc) or isinstance(exc, RuntimeError | ValueError | TypeError):
            raise external_error(exc, f"ONNX Runtime cannot run {label}") from None
        raise


def _graph_only(path: Path) -> onnx.ModelProto | None:
    """The model at ``path`` without its weights, or None when it cannot be read (ONNX Runtime says why)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return None


def uses_tardis_ops(model: onnx.ModelProto) -> bool:
    """Whether the graph or a subgraph has ``ai.tardis`` nodes (it needs the op library to load)."""
    return any(node.domain == DOMAIN for _, graph in walk(model.graph) for node in graph.node)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
