"""ONNX Runtime sessions for our own runs (calibration, verify, evaluation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from tardis_onnx.errors import TardisError

# Protobuf cannot serialise a model over 2 GiB; such models go through a file with external data.
_PROTO_LIMIT = 2**31 - 2**24


def create_session(model: onnx.ModelProto | str | Path, optimization: str = "disable", threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on the CPU, with the ``ai.tardis`` library registered when built.

    Graph optimisations are off by default so ONNX Runtime cannot fuse or hide
    what the pass produced.
    """
    import onnxruntime as ort

    from tardis_onnx import runtime

    options = runtime.session_options(threads or None, optimization, custom_ops=runtime.library_available())
    if isinstance(model, onnx.ModelProto) and _uses_tardis_ops(model) and not runtime.library_available():
        raise TardisError("the model uses ai.tardis custom ops but the library is not built (run `make lib`)")
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    if _weight_bytes(model) < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="tardis-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)


def _uses_tardis_ops(model: onnx.ModelProto) -> bool:
    return any(node.domain == "ai.tardis" for node in model.graph.node)


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
