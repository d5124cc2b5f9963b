"""``--quantize int8``: fold first, then run the rewritten model's MatMuls in int8, as ONNX Runtime's own
``quantize_dynamic`` does for the original (QInt8 weights, activations rounded at run time).

The folded map and the rest of the model (attention, embeddings' projections) become
``DynamicQuantizeMatMul``/``MatMulInteger``; the outlier fallback keeps its W2 rows in the model's
float type (the residuals it adds are what the fold could not approximate; rounding them too would
undo part of the fallback) and the int8 predictor is already int8. With the never-slower check, each
FFN's rewrite is timed against the original FFN quantized the same way, so the result is never
slower than ``quantize_dynamic`` alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from tardis_onnx.io import EXTERNAL_DATA_THRESHOLD, model_bytes

QUANTIZE_CHOICES = ("none", "int8")


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its MatMuls quantized by ``onnxruntime.quantization.quantize_dynamic`` (QInt8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = model_bytes(model) >= EXTERNAL_DATA_THRESHOLD  # past protobuf's 2 GB limit: external data
    with tempfile.TemporaryDirectory(prefix="tardis-quantize-") as folder:
        out = Path(folder) / "quantized.onnx"
        # The custom op has no schema ONNX Runtime's quantizer sees: tensors it cannot type are float. The
        # MatMuls inside If/Loop branches (Optimum's merged decoders) are quantized too.
        options = {"DefaultTensorType": onnx.TensorProto.FLOAT, "EnableSubgraph": True}
        quantize_dynamic(model, out, weight_type=QuantType.QInt8, use_external_data_format=large, extra_options=options)
        return onnx.load(out)
