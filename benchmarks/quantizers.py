"""What users would pick instead of TARDIS, built the way they would build it, for the benchmarks:

- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, activations rounded at run time),
  what a CPU user picks today; it takes float32 models only (an fp16 model comes out invalid);
- ``int4``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric, ``accuracy_level=4``: int8 activations),
  weight-only; fp32 and fp16 models.

A model past protobuf's 2 GB limit is written with external data beside ``target``.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from tardis_onnx.files import model_file_bytes

EXTERNAL_DATA_BYTES = 1 << 30


def quantize_int8(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = model_file_bytes(source) > EXTERNAL_DATA_BYTES
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, use_external_data_format=large)


def quantize_int4(source: Path, target: Path) -> None:
    """``--quantize int4``'s quantizer (``tardis_onnx.quantize.quantize_int4``) on the model at ``source``."""
    from tardis_onnx import quantize

    large = model_file_bytes(source) > EXTERNAL_DATA_BYTES
    quantized = quantize.quantize_int4(onnx.load(source))
    onnx.save(quantized, str(target), save_as_external_data=large, location=f"{Path(target).name}.data")
