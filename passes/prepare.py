"""Prepare, the pass's first step: refuse what it cannot take before any work, and read the opset it emits for.

Nothing is canonicalized: the matcher (:mod:`tardis_onnx.passes.gelu`, :mod:`tardis_onnx.passes.ffn`) reads
every exporter's spelling as it is.
"""

from __future__ import annotations

import onnx

from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import METADATA_VERSION
from tardis_onnx.emit import MIN_OPSET
from tardis_onnx.errors import TardisError
from tardis_onnx.subgraphs import walk


def prepare(model: onnx.ModelProto, config: TardisConfig) -> int:
    """The model's standard opset; a :class:`TardisError` for a model already rewritten, an opset the
    fallback cannot be written in, or ``--quantize int8`` on a float16 model."""
    if is_rewritten(model):
        raise TardisError("the model was already rewritten by tardis-onnx: nothing to do")
    if config.quantize == "int8" and _has_float16_weights(model):
        raise TardisError(
            "--quantize int8 needs a float32 model (onnxruntime's quantize_dynamic cannot quantize float16 "
            "MatMuls); --quantize int4 takes float16 models"
        )
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise TardisError(f"the model uses opset {opset}; tardis-onnx needs opset >= {MIN_OPSET}")
    return opset


def _has_float16_weights(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT16 for _, g in walk(model.graph) for t in g.initializer)


def is_rewritten(model: onnx.ModelProto) -> bool:
    return any(p.key == METADATA_VERSION for p in model.metadata_props)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
