"""``--quantize int8|int4``: fold first, then run the rewritten model's MatMuls quantized, as ONNX Runtime's own
quantizers do for the original: int8, ``quantize_dynamic`` (QInt8 weights, activations rounded at run time);
int4, ``MatMulNBitsQuantizer`` (4-bit weights, block 32, symmetric, ``accuracy_level=4``: int8 activations).

With the custom-op fallback (float32 models) the rewrite is emitted quantized itself
(:meth:`tardis_onnx.emit.CustomFallback.quantized_in_op`): the folded map is a ``DynamicQuantizeMatMul`` with a
scale per column (int8) or a ``MatMulNBits`` (int4), shared with the predictor of the same kind (one product
``x·[Wf | W1]``, split after), and the fallback op reads its W1ᵀ/W2 rows as int8 with a scale per row
(:func:`quantize_rows`), a quarter of the bytes a flagged neuron costs in float32. The rest of the model
(attention, embeddings' projections; with the portable fallback, the folded map too) then goes through the
quantizer (:func:`quantize_model`). With the never-slower check, each FFN's rewrite is timed against the
original FFN quantized the same way, so the result is never slower than the quantizer alone.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.contract import ffn_of
from tardis_onnx.files import model_file_bytes
from tardis_onnx.io import EXTERNAL_DATA_THRESHOLD, model_bytes
from tardis_onnx.predictor import INT4_ACCURACY_LEVEL, INT4_BLOCK
from tardis_onnx.predictor import quantize_int8 as quantize_columns
from tardis_onnx.subgraphs import walk

QUANTIZE_CHOICES = ("none", "int8", "int4")
# The fallback's int8 rows: symmetric per row. The op computes in float (each row converted, then
# dotted or added), so the full int8 range is safe (no integer pair sums that could saturate).
ROW_LIMIT = 127


def predictor_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes of the rewrites' predictors (``tardis/<ffn>/Predictor/…``, in subgraphs too): the quantizers leave
    them as they are, since a predictor's precision is its own (the exact predictor's ``x·W1`` stays exact: its
    flag windows were fitted for it; the int8 and int4 predictors are quantized already)."""
    return [n.name for _, g in walk(model.graph) for n in g.node if ffn_of(n.name) and "/Predictor/" in n.name]


@contextlib.contextmanager
def _quiet(logger: logging.Logger, keep: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """While inside: ``logger``'s records that ``keep`` refuses are dropped."""
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _not_pre_processing_advice(record: logging.LogRecord) -> bool:
    """``quantize_dynamic`` advises every model it is given, on the root logger, to run its pre-processing first
    (shape inference and ONNX Runtime's graph optimisations): a line per FFN timed and per model, of a step that is
    not our users' to take."""
    return not record.getMessage().startswith("Please consider to run pre-processing")


def quantize_int8(model: onnx.ModelProto | Path) -> onnx.ModelProto:
    """``model`` (or the model file at that path, external data beside it) with its MatMuls quantized by
    ``onnxruntime.quantization.quantize_dynamic`` (QInt8), but the rewrites' predictors (:func:`predictor_nodes`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if isinstance(model, Path):
        graph, folder = onnx.load(str(model), load_external_data=False), model.parent  # its temporaries beside it
        large = model_file_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    else:
        graph, folder, large = model, None, model_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix="tardis-quantize-", dir=folder) as temporary:
        out = Path(temporary) / "quantized.onnx"
        # The custom op has no schema ONNX Runtime's quantizer sees: tensors it cannot type are float. The
        # MatMuls inside If/Loop branches (Optimum's merged decoders) are quantized too.
        options = {"DefaultTensorType": onnx.TensorProto.FLOAT, "EnableSubgraph": True}
        with _quiet(logging.getLogger(), _not_pre_processing_advice):
            quantize_dynamic(
                str(model) if isinstance(model, Path) else model,
                out,
                weight_type=QuantType.QInt8,
                use_external_data_format=large,  # past protobuf's 2 GB limit: external data
                nodes_to_exclude=predictor_nodes(graph),
                extra_options=options,
            )
        return onnx.load(out)


def quantize_int4(model: onnx.ModelProto | Path) -> onnx.ModelProto:
    """``model`` (or the model file at that path) with its MatMuls quantized by ``onnxruntime.quantization``'s
    ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric, ``accuracy_level=4``: the int4 predictor's settings), the
    MatMuls inside If/Loop branches too, but the rewrites' predictors (:func:`predictor_nodes`); ``model`` unchanged.

    Its ``Gemm`` layers (GPT-2's exported Conv1D) are written as ``MatMul`` + ``Add`` first, as ``quantize_dynamic``
    does for int8: ``MatMulNBitsQuantizer`` takes MatMuls only, and would leave them in float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    if isinstance(model, Path):
        copy = onnx.load(str(model))  # read once, ours to change
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
    ONNXModel(copy).replace_gemm_with_matmul()  # in place, If/Loop branches too
    quantizer = MatMulNBitsQuantizer(
        copy,
        bits=4,
        block_size=INT4_BLOCK,
        is_symmetric=True,
        accuracy_level=INT4_ACCURACY_LEVEL,
        nodes_to_exclude=predictor_nodes(copy),
    )
    log = logging.getLogger(MatMulNBitsQuantizer.__module__)  # a line per node at INFO otherwise
    with _quiet(log, lambda record: record.levelno >= logging.WARNING):
        quantizer.process()
    return quantizer.model.model


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def quantize_model(model: onnx.ModelProto | Path, quantize: str) -> onnx.ModelProto:
    """``model`` (or the model file at that path) as ``--quantize int8|int4`` leaves it: ``quantize_dynamic`` (int8)
    or ``MatMulNBitsQuantizer`` (int4) of its float MatMuls."""
    return QUANTIZERS[quantize](model)


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w [h, d]`` as int8 rows ``q`` and per-row scales ``s`` (float32): the int8 predictor's quantizer
    (:func:`tardis_onnx.predictor.quantize_int8`, a block of rows at a time) on ``wᵀ`` with ``s = max|w| / 127``;
    :func:`tardis_onnx.reference.int8_rows` reads them back."""
    q, scales = quantize_columns(np.asarray(w).T, ROW_LIMIT)
    return np.ascontiguousarray(q.T), scales.astype(np.float32)
