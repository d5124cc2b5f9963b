"""``--quantize int8``: fold first, then run the rewritten model's MatMuls in int8, as ONNX Runtime's own
``quantize_dynamic`` does for the original (QInt8 weights, activations rounded at run time).

With the custom-op fallback (float32 models) the rewrite is emitted in int8 itself
(:meth:`tardis_onnx.emit.CustomFallback.int8_in_op`): the folded map is a ``DynamicQuantizeMatMul`` with a scale
per column, shared with the int8 predictor (one product ``x·[Wf | W1]``, split after), and the fallback op reads
its W1ᵀ/W2 rows as int8 with a scale per row (:func:`quantize_rows`), a quarter of the bytes a flagged neuron
costs in float32. The rest of the model (attention, embeddings' projections; with the portable fallback, the
folded map too) then goes through ``quantize_dynamic`` (:func:`quantize_int8`). With the never-slower check,
each FFN's rewrite is timed against the original FFN quantized by ``quantize_dynamic``, so the result is never
slower than ``quantize_dynamic`` alone.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.io import EXTERNAL_DATA_THRESHOLD, model_bytes
from tardis_onnx.predictor import quantize_int8 as quantize_columns

QUANTIZE_CHOICES = ("none", "int8")
# The fallback's int8 rows: symmetric per row. The op computes in float (each row converted, then
# dotted or added), so the full int8 range is safe (no integer pair sums that could saturate).
ROW_LIMIT = 127


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


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [h, d]`` as int8 rows ``q`` and per-row scales ``s`` (float32): the int8 predictor's quantizer
    (:func:`tardis_onnx.predictor.quantize_int8`, a block of rows at a time) on ``wᵀ`` with ``s = max|w| / 127``;
    :func:`tardis_onnx.reference.int8_rows` reads them back."""
    q, scales = quantize_columns(np.asarray(w).T, ROW_LIMIT)
    return np.ascontiguousarray(q.T), scales.astype(np.float32)
