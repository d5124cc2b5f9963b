"""Online outlier predictors: what computes ``z_hat ≈ x·W1 + b1`` cheaply for the fallback's flag test.

exact: ``x·W1 + b1`` itself (reads all of W1: the oracle outlier set).
int4:  ONNX Runtime's ``com.microsoft::MatMulNBits`` on a 4-bit, block-32 copy of W1
       (1/8 of W1's fp32 bytes plus one scale per block).
int2:  ``MatMulNBits`` on a 2-bit, block-32 copy of W1 rounded GPTQ-style on the calibration inputs
       (3/5 of int4's bytes; pre-activation error ~0.24 of each neuron's spread on MiniLM, int4's ~0.1).
int8:  ONNX Runtime's ``com.microsoft::DynamicQuantizeMatMul`` on an int8 copy of W1 (one scale per
       neuron; the activations rounded to uint8 per tensor at run time, as ``quantize_dynamic`` does):
       1/4 of W1's fp32 bytes, and accurate enough (pre-activation error ~2-8% of each neuron's spread
       on MiniLM) that the fallback takes the flagged neurons' residuals from it and reads no W1 row.
lowrank: ``(x·U)·V`` with ``U [d, r]``, ``V [r, h]`` fitted on calibration inputs: the rank-r map
       closest to W1 on the data, each neuron's error measured in units of its pre-activation spread
       (``r·(d + h)`` weights: rank 64 of a 1024→4096 FFN reads 8% of W1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from tardis_onnx import parallel
from tardis_onnx.reference import NeuronLines, gelu, outside_window, residual
from tardis_onnx.reference import fold as fold_weights

# A predictor that stands for the pre-activation (int8: flagged residuals taken from it) is a candidate
# only where that raises the FFN's error on the checked tokens by at most this factor over the exact
# residuals of the same flagged neurons (at coverage 0, where the exact error is nil, never). On
# MiniLM the int8 residuals raised it by 2-10% per FFN (held-out tokens, one tensor of 4,096 tokens)
# and STS-B dev from 86.71 (int4, exact residuals) to 86.60, for the speed that made every FFN pay.
MAX_PREDICTED_RESIDUAL_ERROR = 1.25
INT4_BLOCK = 32
# ORT 1.32 runs 2-bit MatMulNBits with int8 activations (accuracy_level 4) for blocks of 32 and more; a
# block of 16 falls back to its fp32 dequantizing path. Block 64 ran 35% faster here (d = 1024, h = 4096,
# one token) but raised the MiniLM error ~7%, where recall is already short.
INT2_BLOCK = 32
# The 2-bit copy's per-block scale: the signed scale of the ``(q − 2)·s`` grid, ``s = ±α·max|w|``, with the
# least error over these α (MatMulNBits' own symmetric quantizer takes α = 1/2 only).
INT2_SCALE_STEPS = np.linspace(0.25, 1.0, 16)
# GPTQ's damping of the inputs' second-moment matrix, in units of its mean diagonal.
INT2_DAMPING = 0.01
# Tokens each predictor's error scale (the flag windows' narrowing) is measured on: the first ones; for a large
# FFN (fitted in float32) as many, evenly spaced, as give each neuron's error spread within ~2% (at 7B: flag
# rate 8.03% → 8.01%, recall 0.9977 → 0.9974 against all 3,277 fit tokens, and 8 s less per FFN).
ERROR_SCALE_TOKENS = 8192
ERROR_SCALE_TOKENS_LARGE = 1024
# The low-rank fit takes an exact SVD up to this many rows or columns, a randomized one beyond.
LOWRANK_EXACT_SVD = 1024
# MatMulNBits computes with int8 activations (VNNI/AVX2 on CPU): ~3x faster than its fp32 dequantizing path
# at one token, d = 1024, h = 4096; the predictor only flags, so the rounding costs nothing exact.
INT4_ACCURACY_LEVEL = 4


class Predictor:
    """What computes an FFN's ``z_hat − b1`` for the fallback's flag test. One subclass per kind holds
    everything about it: the float64 reference (:meth:`predict`), the bytes it reads per token, the
    nodes that compute it in the rewritten graph (:meth:`emit`); adding a predictor is adding a class
    to ``PREDICTOR_CLASSES``. Its ``kind`` names it on the command line and in the report only."""

    kind: ClassVar[str]
    # The fallback takes a flagged neuron's residual from z_hat (no W1 row read): the prediction must
    # be close to the pre-activation (checked per FFN, MAX_PREDICTED_RESIDUAL_ERROR).
    residual_from_prediction: ClassVar[bool] = False
    # ONNX Runtime contrib domain its node needs in the custom-op form (declared in the model's opsets).
    contrib_domain: ClassVar[str | None] = None
    # Its portable form multiplies by a dequantized float copy of W1: no cheaper than the exact predictor,
    # so ``auto`` tries it only with the custom-op fallback.
    dense_when_portable: ClassVar[bool] = False
    # ``auto`` tries it (a predictor it would never pick only costs fitting time).
    in_auto: ClassVar[bool] = True
    rank = 0

    @classmethod
    def fit(cls, x: np.ndarray, w1: np.ndarray, rank: int) -> Predictor:
        """The predictor for ``w1 [d, h]`` fitted on calibration inputs ``x [n, d]`` (most need no fit)."""
        return cls()

    @classmethod
    def bytes_per_token(cls, d: int, h: int, itemsize: int, rank: int = 0) -> int:
        """Weight bytes it reads per token (in the custom-op form)."""
        raise NotImplementedError

    def read_bytes(self, d: int, h: int, itemsize: int) -> int:
        return self.bytes_per_token(d, h, itemsize, self.rank)

    def prepare(self, w1: np.ndarray) -> np.ndarray | None:
        """What :meth:`predict` multiplies by: W1 as the predictor reads it (``w1`` itself, in the FFN's precision;
        a quantized predictor's own copy, dequantized), made once per FFN when given to :meth:`predict` as
        ``weights``."""
        return w1

    def _z(self, x: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def predict(
        self, x: np.ndarray, w1: np.ndarray, b1: np.ndarray | None, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """``z_hat`` in float64 (a quantized predictor's, without ``b1``: in :func:`product_dtype` of ``w1``): the
        reference for the emitted graph; ``weights``: :meth:`prepare`'s, when made."""
        weights = self.prepare(np.asarray(w1)) if weights is None else weights
        z = self._z(np.asarray(x, dtype=np.float64), weights)
        return z if b1 is None else z + b1

    def emit(self, b, ffn, standard_only: bool) -> str:
        """Nodes computing ``z_hat − b1`` from ``ffn.x`` through builder ``b`` (``b.constant``, ``b.op``);
        ``standard_only``: standard ONNX ops only (the portable form). Returns the output's name."""
        raise NotImplementedError


class ExactPredictor(Predictor):
    """``x·W1`` itself: the exact outlier set; reads all of W1."""

    kind = "exact"

    @classmethod
    def bytes_per_token(cls, d, h, itemsize, rank=0):
        return d * h * itemsize

    def _z(self, x, weights):
        return x @ weights

    def emit(self, b, ffn, standard_only):
        return b.op("MatMul", [ffn.x, b.constant("w1", ffn.w1)], "Predictor/MatMul")


class Int4Predictor(Predictor):
    """``MatMulNBits`` on a 4-bit, block-32 copy of W1 with int8 activations (``accuracy_level=4``)."""

    kind = "int4"
    contrib_domain = "com.microsoft"
    dense_when_portable = True

    def __init__(self, packed: np.ndarray, scales: np.ndarray, d: int) -> None:
        self.packed, self.scales, self.d = packed, scales, d  # quantized once: ranked, then emitted

    @classmethod
    def fit(cls, x, w1, rank):
        return cls(*quantize_int4(w1), w1.shape[0])

    @classmethod
    def bytes_per_token(cls, d, h, itemsize, rank=0):
        return matmul_weight_bytes(d, h, "int4", itemsize)

    def prepare(self, w1):
        return dequantize_nbits(self.packed, self.scales, self.d, 4, product_dtype(w1))

    def _z(self, x, weights):
        return quantized_product(quantize_activations_int8(x), weights)

    def emit(self, b, ffn, standard_only):
        if standard_only:  # the same dequantized matrix as a standard MatMul
            w1q = dequantize_nbits(self.packed, self.scales.astype(ffn.dtype), self.d, 4)
            return b.op("MatMul", [ffn.x, b.constant("w1_int4_dequantized", w1q)], "Predictor/MatMul")
        return emit_matmulnbits(b, ffn, self.packed, self.scales, 4, self.contrib_domain)


class Int2Predictor(Predictor):
    """``MatMulNBits`` on a 2-bit, block-32 copy of W1 (:func:`quantize_int2`, fitted on the calibration
    inputs) with int8 activations (``accuracy_level=4``). Its error is ~2.4× int4's, which the flag
    windows' narrowing (the error scale) pays for in flags."""

    kind = "int2"
    contrib_domain = "com.microsoft"
    dense_when_portable = True
    # Not in ``auto``: on MiniLM it misses the recall floor at the default uncertainty (0.94), and where
    # a wider uncertainty lifts it to int4's recall it flags enough more to read as many bytes as int4;
    # nor is it faster: ORT 1.32's 2-bit kernel took as long as the 4-bit one here (120 vs 126 µs,
    # d = 1024, h = 4096, one token), reading its fewer bytes at 13 GB/s against 21.
    in_auto = False

    def __init__(self, packed: np.ndarray, scales: np.ndarray, d: int) -> None:
        self.packed, self.scales, self.d = packed, scales, d

    @classmethod
    def fit(cls, x, w1, rank):
        return cls(*quantize_int2(w1, x), w1.shape[0])

    @classmethod
    def bytes_per_token(cls, d, h, itemsize, rank=0):
        blocks = -(-d // INT2_BLOCK)
        return h * blocks * (INT2_BLOCK // 4) + h * blocks * itemsize

    def prepare(self, w1):
        return dequantize_nbits(self.packed, self.scales, self.d, 2, product_dtype(w1))

    def _z(self, x, weights):
        return quantized_product(quantize_activations_int8(x), weights)

    def emit(self, b, ffn, standard_only):
        if standard_only:
            w1q = dequantize_nbits(self.packed, self.scales.astype(ffn.dtype), self.d, 2)
            return b.op("MatMul", [ffn.x, b.constant("w1_int2_dequantized", w1q)], "Predictor/MatMul")
        return emit_matmulnbits(b, ffn, self.packed, self.scales, 2, self.contrib_domain)


def product_dtype(w1: np.ndarray) -> np.dtype:
    """The precision a quantized predictor's product is emulated in: the FFN's (``w1`` as fitted). float64 for a
    small FFN, whose float32 windows then do not depend on the BLAS kernel's order of summation (golden graphs are
    the same on every CPU); float32 for a large one (half the time and memory at a 7B FFN; its ~1e-6 relative
    error is far below the rounding the predictor emulates)."""
    return np.dtype(np.float64) if np.asarray(w1).dtype == np.float64 else np.dtype(np.float32)


def quantized_product(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``x·weights`` for a quantized predictor's rounded inputs and dequantized weights, in the weights' precision
    (:func:`product_dtype`)."""
    return np.asarray(x, dtype=weights.dtype) @ weights


def emit_matmulnbits(b, ffn, packed: np.ndarray, scales: np.ndarray, bits: int, domain: str | None) -> str:
    """A ``MatMulNBits`` node (symmetric: the default zero point ``2^(bits−1)``, int8 activations) computing
    ``x·W1`` from ``bits``-bit ``packed`` blocks and their ``scales``."""
    d, h = ffn.w1_stored.shape
    inputs = [ffn.x, b.constant(f"w1_int{bits}", packed, np.uint8), b.constant(f"w1_int{bits}_scales", scales)]
    block = packed.shape[2] * 8 // bits
    attributes = {"K": d, "N": h, "bits": bits, "block_size": block, "accuracy_level": INT4_ACCURACY_LEVEL}
    return b.op("MatMulNBits", inputs, "Predictor/MatMulNBits", domain=domain, **attributes)


class Int8Predictor(Predictor):
    """``DynamicQuantizeMatMul`` on an int8 copy of W1 (a scale per neuron), activations rounded to uint8
    per tensor at run time; close enough to the pre-activation that residuals are taken from it."""

    kind = "int8"
    contrib_domain = "com.microsoft"
    residual_from_prediction = True
    dense_when_portable = True

    def __init__(self, weights: np.ndarray, scales: np.ndarray) -> None:
        self.weights, self.scales = weights, scales  # quantized once: ranked, then emitted

    @classmethod
    def fit(cls, x, w1, rank):
        return cls(*quantize_int8(w1))

    @classmethod
    def bytes_per_token(cls, d, h, itemsize, rank=0):
        return d * h + h * itemsize

    def prepare(self, w1):
        dequantized = np.empty(self.weights.shape, dtype=product_dtype(w1))

        def dequantize(cols: slice) -> None:  # float64 temporaries a block of neurons at a time
            dequantized[:, cols] = self.weights[:, cols] * self.scales[cols]

        parallel.map_each(dequantize, neuron_slices(*self.weights.shape))
        return dequantized

    def _z(self, x, weights):
        return quantized_product(quantize_activations_uint8(x), weights)

    def emit(self, b, ffn, standard_only):
        weights, scales = self.weights, self.scales
        if standard_only:
            return b.op("MatMul", [ffn.x, b.constant("w1_int8_dequantized", weights * scales)], "Predictor/MatMul")
        # DynamicQuantizeMatMul computes in float32 only: an fp16 model's activations go through Casts.
        fp32 = np.dtype(ffn.dtype) == np.float32
        x = ffn.x if fp32 else b.op("Cast", [ffn.x], "Predictor/CastToFloat", to=onnx.TensorProto.FLOAT)
        inputs = [x, b.constant("w1_int8", weights, np.int8), b.constant("w1_int8_scales", scales, np.float32)]
        z_hat = b.op("DynamicQuantizeMatMul", inputs, "Predictor/DynamicQuantizeMatMul", domain=self.contrib_domain)
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ffn.dtype))
        return z_hat if fp32 else b.op("Cast", [z_hat], "Predictor/CastBack", to=to)


class LowRankPredictor(Predictor):
    """``(x·U)·V`` of rank r fitted on the calibration inputs (:func:`fit_lowrank`); in the custom-op form
    the code ``x·U`` rides along the folded MatMul and the op multiplies by V itself."""

    kind = "lowrank"
    # Not in ``auto``: of the 119 FFNs ``auto`` chose for in the real-model runs recorded (MiniLM, GPT-2 124M,
    # the self-trained GPT, Whisper-base, the Falcon-7B-shaped stack) it won none (int8 73, int4 30, exact 16),
    # its recall being short on real weights, and its fit took 24 s of a 7B-shaped FFN's 207 (12%).
    in_auto = False

    def __init__(self, u: np.ndarray, v: np.ndarray) -> None:
        self.u, self.v = u, v  # [d, r], [r, h]
        self.rank = int(u.shape[1])

    @classmethod
    def fit(cls, x, w1, rank):
        return cls(*fit_lowrank(x, w1, rank))

    @classmethod
    def bytes_per_token(cls, d, h, itemsize, rank=0):
        return rank * (d + h) * itemsize

    def prepare(self, w1):
        return None

    def _z(self, x, weights):
        return (x @ self.u) @ self.v

    def emit(self, b, ffn, standard_only):
        t = b.op("MatMul", [ffn.x, b.constant("predictor_u", self.u)], "Predictor/LowRankDown")
        return b.op("MatMul", [t, b.constant("predictor_v", self.v)], "Predictor/LowRankUp")


# Every predictor, in the order ``auto`` fits them (then ranked by bytes read).
PREDICTOR_CLASSES: dict[str, type[Predictor]] = {
    cls.kind: cls for cls in (LowRankPredictor, Int2Predictor, Int4Predictor, Int8Predictor, ExactPredictor)
}
PREDICTORS = tuple(sorted(PREDICTOR_CLASSES))  # the kinds, as the command line lists them


def predictor_class(kind: str) -> type[Predictor]:
    """The predictor class named ``kind`` (the command line's and the report's name for it)."""
    if kind not in PREDICTOR_CLASSES:
        raise ValueError(f"unknown predictor {kind!r}; expected one of {PREDICTORS}")
    return PREDICTOR_CLASSES[kind]


def matmul_weight_bytes(k: int, n: int, quantize: str, itemsize: int) -> int:
    """Bytes a ``[k, n]`` MatMul weight reads per token under ``--quantize quantize``: ``itemsize`` a weight; one
    (int8, ``quantize_dynamic``); half a byte a weight and a scale of ``itemsize`` bytes (the model's float type)
    per block of ``INT4_BLOCK`` inputs (int4, ``MatMulNBits``, as the int4 predictor)."""
    if quantize == "int8":
        return k * n
    if quantize == "int4":
        blocks = -(-k // INT4_BLOCK)
        return n * blocks * (INT4_BLOCK // 2 + itemsize)
    return k * n * itemsize


def predictor_candidates(choice: str, standard_only: bool) -> tuple[type[Predictor], ...]:
    """The predictors ``--predictor choice`` tries: the one named, or for ``auto`` those ``in_auto``, but
    those whose portable form is dense where the fallback uses standard ONNX ops only."""
    if choice != "auto":
        return (predictor_class(choice),)
    return tuple(
        cls for cls in PREDICTOR_CLASSES.values() if cls.in_auto and not (standard_only and cls.dense_when_portable)
    )


def flag_windows(lines: NeuronLines, error_scale: np.ndarray, uncertainty: float) -> NeuronLines:
    """The windows the flag test uses: each neuron's window narrowed by ``uncertainty`` times the
    predictor's error scale, so a prediction that is near an edge is flagged too (the residual added
    for a flagged neuron is exact, so extra flags cost only time). An emptied window always flags."""
    shrink = uncertainty * np.asarray(error_scale, dtype=np.float64)
    return NeuronLines(lines.slope, lines.intercept, lines.lo + shrink, lines.hi - shrink)


def quantize_int4(w1: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``MatMulNBits`` layout of ``w1 [d, h]``: packed ``uint8 [h, blocks, block/2]`` and scales ``[h·blocks]``.

    Symmetric per block: ``q = round(w / s) + 8`` in 0..15 with ``s = max|w| / 7``; the default zero point 8.
    """
    d, h = w1.shape
    blocks = -(-d // block)
    packed, scales = np.empty((h, blocks, block // 2), dtype=np.uint8), np.empty((h, blocks))

    def quantize(cols: slice) -> None:
        padded = np.zeros((cols.stop - cols.start, blocks * block))
        padded[:, :d] = np.asarray(w1[:, cols], dtype=np.float64).T
        grouped = padded.reshape(-1, blocks, block)
        scale = np.abs(grouped).max(axis=2) / 7.0
        scale[scale == 0] = 1.0
        packed[cols] = pack_nbits(np.clip(np.rint(grouped / scale[..., None]) + 8, 0, 15).astype(np.uint8), 4)
        scales[cols] = scale

    parallel.map_each(quantize, neuron_slices(d, h))
    return packed, scales.reshape(-1)


def neuron_slices(d: int, h: int) -> list[slice]:
    """Blocks of neurons (columns of a ``[d, h]`` W1) of about 2^22 weights: quantizing one block at a time keeps
    the temporaries small (a 7B FFN's W1 is 660 MB in float64, and so is each temporary of a whole-matrix pass)."""
    width = max(1, (1 << 22) // max(d, 1))
    return [slice(start, min(start + width, h)) for start in range(0, h, width)]


def pack_nbits(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit ``codes [..., block]`` packed into bytes along the last axis, low bits first (MatMulNBits)."""
    per_byte = 8 // bits
    packed = np.zeros((*codes.shape[:-1], codes.shape[-1] // per_byte), dtype=np.uint8)
    for j in range(per_byte):
        packed |= codes[..., j::per_byte].astype(np.uint8) << (bits * j)
    return packed


def quantize_activations_int8(x: np.ndarray, block: int = INT4_BLOCK) -> np.ndarray:
    """``x`` as ``MatMulNBits`` with ``accuracy_level=4`` sees it: rounded to int8 per block of ``block``
    inputs (scale ``max|x| / 127``). Emulated in float64: within ~15% of ONNX Runtime's own rounding
    error of it (MLAS's kernel differs in details), against ~7× that without emulating it."""
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[-1]
    padded = np.zeros((*x.shape[:-1], -(-d // block) * block))
    padded[..., :d] = x
    grouped = padded.reshape(*x.shape[:-1], -1, block)
    scale = np.abs(grouped).max(axis=-1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return (np.rint(grouped / scale) * scale).reshape(padded.shape)[..., :d]


# The int8 predictor's weights use [-64, 64], not [-127, 127]: x86 CPUs without VNNI (AVX2 and plain AVX-512:
# AMD Zen 1-3, Intel before Ice Lake) multiply uint8 activations by int8 weights in pairs summed into int16
# (vpmaddubsw), which saturates once 255·|w1| + 255·|w2| > 32767; ONNX Runtime's DynamicQuantizeMatMul then
# misses by up to a tenth of its output's range (tests/test_predictor.py). At 64 no pair can saturate, so the
# reference below is what every CPU computes (ONNX Runtime's own ``reduce_range`` is this choice).
INT8_WEIGHT_LIMIT = 64


def quantize_int8(w1: np.ndarray, limit: int = INT8_WEIGHT_LIMIT) -> tuple[np.ndarray, np.ndarray]:
    """``w1 [d, h]`` as int8 with one scale per column (neuron): ``q = round(w / s)``, ``s = max|w| / limit``
    (``INT8_WEIGHT_LIMIT``, 64, for ONNX Runtime's integer products; a zero column gets scale 1)."""
    w1 = np.asarray(w1)
    q, scales = np.empty(w1.shape, dtype=np.int8), np.empty(w1.shape[1])

    def quantize(cols: slice) -> None:
        block = np.asarray(w1[:, cols], dtype=np.float64)
        scale = np.abs(block).max(axis=0, initial=0.0) / limit
        scale[scale == 0] = 1.0
        q[:, cols], scales[cols] = np.clip(np.rint(block / scale), -limit, limit), scale

    parallel.map_each(quantize, neuron_slices(*w1.shape))
    return q, scales


def quantize_activations_uint8(x: np.ndarray) -> np.ndarray:
    """``x`` as ``DynamicQuantizeMatMul`` sees it: rounded to uint8 over the whole tensor
    (``DynamicQuantizeLinear``: the range ``[min(x, 0), max(x, 0)]`` in 255 steps, zero point rounded).
    The rewritten model rounds each input batch as one tensor; the reference rounds all the tokens it
    is given as one, so its error is that of the widest batch."""
    x = np.asarray(x, dtype=np.float64)
    low, high = min(float(x.min(initial=0.0)), 0.0), max(float(x.max(initial=0.0)), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero = np.clip(np.rint(-low / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale


def dequantize_nbits(
    packed: np.ndarray, scales: np.ndarray, d: int, bits: int, dtype: np.dtype = np.float64
) -> np.ndarray:
    """The ``[d, h]`` matrix ``MatMulNBits`` multiplies by (float64, or rounded to ``dtype``): ``packed [h,
    blocks, block·bits/8]`` holds each block's codes low bits first, ``w = (q − 2^(bits−1))·scale`` (the
    reference for tests)."""
    h, blocks, width = packed.shape
    per_byte = 8 // bits
    scales = scales.reshape(h, blocks, 1)
    out = np.empty((d, h), dtype=dtype)

    def dequantize(cols: slice) -> None:
        codes = packed[cols]
        q = np.empty((codes.shape[0], blocks, width * per_byte))
        for j in range(per_byte):
            q[..., j::per_byte] = (codes >> (bits * j)) & ((1 << bits) - 1)
        out[:, cols] = ((q - (1 << (bits - 1))) * scales[cols]).reshape(codes.shape[0], -1)[:, :d].T

    parallel.map_each(dequantize, neuron_slices(blocks * width * per_byte, h))
    return out


def quantize_int2(w1: np.ndarray, x: np.ndarray, block: int = INT2_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``w1 [d, h]`` as 2-bit ``MatMulNBits`` blocks fitted on inputs ``x [n, d]``: packed ``uint8 [h, blocks,
    block/4]`` and scales ``[h·blocks]``, ``w ≈ (q − 2)·s`` with ``q`` in 0..3 (the default zero point 2).

    GPTQ: the inputs are quantized one at a time, and each one's rounding error ``e`` is spread over the
    inputs not yet quantized through ``C⁻¹``'s Cholesky factor (``C = xᵀx / n``, damped), which keeps
    ``x·W1`` rather than W1 close (held-out error ~0.24 of each neuron's spread on MiniLM, against ~0.38
    for plain rounding). A block's scale is chosen (:data:`INT2_SCALE_STEPS`) when the loop reaches it,
    on its updated weights, weighting each input by its second moment."""
    w = np.asarray(w1, dtype=np.float64)
    (d, h), blocks = w.shape, -(-w.shape[0] // block)
    x = np.asarray(x, dtype=np.float64)
    second = x.T @ x / max(x.shape[0], 1)
    second[np.diag_indices(d)] += INT2_DAMPING * max(float(np.trace(second)) / d, 1e-12)
    factor = np.linalg.cholesky(np.linalg.inv(second)).T  # upper: C⁻¹ = factorᵀ·factor
    w = np.concatenate([w, np.zeros((blocks * block - d, h))])  # the padded inputs are 0 and stay 0
    factor = np.pad(factor, (0, blocks * block - d))
    factor[np.arange(d, blocks * block), np.arange(d, blocks * block)] = 1.0
    q = np.empty((blocks * block, h), dtype=np.uint8)
    scales = np.empty((h, blocks))
    for start in range(0, blocks * block, block):
        end = start + block
        scale = _int2_scale(w[start:end], np.diag(second)[start : min(end, d)])
        scales[:, start // block] = scale
        errors = np.empty((block, h))
        for k in range(start, end):
            q[k] = np.clip(np.rint(w[k] / scale) + 2, 0, 3)
            errors[k - start] = (w[k] - (q[k] - 2.0) * scale) / factor[k, k]
            w[k + 1 : end] -= np.outer(factor[k, k + 1 : end], errors[k - start])
        w[end:] -= factor[start:end, end:].T @ errors
    return pack_nbits(q.T.reshape(h, blocks, block), 2), scales.reshape(-1)


def _int2_scale(w: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per column of ``w [block, h]``: the signed scale ``s = ±α·max|w|`` whose ``(q − 2)·s`` grid rounds it
    with the least error ``Σ_k weight_k·(w_k − ŵ_k)²`` (``weight``: the block's real inputs)."""
    weight = np.pad(weight, (0, w.shape[0] - weight.size))[:, None]
    peak = np.abs(w).max(axis=0)
    peak[peak == 0] = 1.0
    best, best_error = peak, np.full(w.shape[1], np.inf)
    for scale in (sign * step * peak for sign in (1.0, -1.0) for step in INT2_SCALE_STEPS):
        error = (weight * (w - (np.clip(np.rint(w / scale) + 2, 0, 3) - 2) * scale) ** 2).sum(axis=0)
        better = error < best_error
        best, best_error = np.where(better, scale, best), np.where(better, error, best_error)
    return best


def fit_lowrank(x: np.ndarray, w1: np.ndarray, rank: int, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``U [d, r]``, ``V [r, h]`` minimising ``Σ_tokens Σ_i ((x·W1 − x·U·V)_i / σ_i)²`` over samples ``x [n, d]``.

    ``σ_i`` is neuron ``i``'s pre-activation spread on ``x``. With the second-moment matrix
    ``C = xᵀx / n = E Λ Eᵀ``, the optimum is the truncated SVD of ``C^½ · W1 · diag(1/σ)`` mapped back.
    """
    x = np.asarray(x, dtype=np.float64)
    w1 = np.asarray(w1, dtype=np.float64)
    (n, d), h = x.shape, w1.shape[1]
    rank = min(rank, d, h)
    if n < d:  # fewer tokens than inputs (a 7B FFN): the same factors through the tokens' n × n Gram matrix
        rooted, inverse_root, variance = _token_space_roots(x, w1, ridge)
    else:
        second = x.T @ x / n
        # Each neuron's pre-activation spread from the second moments (d²h, not n·d·h, operations).
        variance = np.einsum("ki,kl,li->i", w1, second, w1, optimize=True) - (x.mean(axis=0) @ w1) ** 2
        eigenvalues, eigenvectors = np.linalg.eigh(second)
        eigenvalues = np.maximum(eigenvalues, ridge * max(eigenvalues.max(), 1e-30))
        rooted = (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T @ w1
        inverse_root_matrix = (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T

        def inverse_root(a):
            return inverse_root_matrix @ a

    sigma = np.maximum(np.sqrt(np.maximum(variance, 0.0)), 1e-12)
    left, singular, right = _top_singular(rooted / sigma, rank)
    u = inverse_root(left * singular)
    v = right * sigma
    return u, v


def _token_space_roots(x: np.ndarray, w1: np.ndarray, ridge: float):
    """For ``n < d`` tokens: ``C^½·W1``, ``a ↦ C^-½·a`` and the pre-activations' variance, as
    :func:`fit_lowrank` builds them from ``C = xᵀx / n`` but without a d × d eigendecomposition. ``C``'s
    nonzero eigenvalues are those of ``x·xᵀ / n`` (eigenvectors ``xᵀp / √(nλ)``); the other ``d − n`` are 0,
    raised to the floor like every eigenvalue below it: ``C^½ = E·diag(√λ − √floor)·Eᵀ + √floor·I``."""
    n = x.shape[0]
    z = x @ w1
    variance = (z * z).mean(axis=0) - z.mean(axis=0) ** 2
    eigenvalues, vectors = np.linalg.eigh(x @ x.T / n)
    floor = ridge * max(eigenvalues.max(), 1e-30)
    keep = eigenvalues > floor
    token_basis = vectors[:, keep] / np.sqrt(n * eigenvalues[keep])  # basis = xᵀ·token_basis
    basis = x.T @ token_basis
    scale, floor_scale = np.sqrt(eigenvalues[keep]), math.sqrt(floor)
    # basisᵀ·W1 = token_basisᵀ·z: an n × n × h product instead of a d × n × h one
    rooted = basis @ ((scale - floor_scale)[:, None] * (token_basis.T @ z)) + floor_scale * w1

    def inverse_root(a):
        return basis @ ((1.0 / scale - 1.0 / floor_scale)[:, None] * (basis.T @ a)) + a / floor_scale

    return rooted, inverse_root, variance


def _top_singular(m: np.ndarray, rank: int, oversample: int = 16, iterations: int = 3):
    """The top ``rank`` singular triplets of ``m``: an exact SVD for small matrices, else a randomized one
    (range found with power iterations; a 4544 × 18176 matrix takes seconds, not minutes)."""
    if min(m.shape) <= LOWRANK_EXACT_SVD:
        left, singular, right = np.linalg.svd(m, full_matrices=False)
        return left[:, :rank], singular[:rank], right[:rank]
    q = np.linalg.qr(m @ np.random.default_rng(0).standard_normal((m.shape[1], rank + oversample)))[0]
    for _ in range(iterations):
        q = np.linalg.qr(m @ (m.T @ q))[0]
    left, singular, right = np.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ left)[:, :rank], singular[:rank], right[:rank]


def predictor_quality(
    predictor: Predictor,
    ffn,
    x: np.ndarray,
    lines: NeuronLines,
    flags: NeuronLines,
    margin: float = 0.0,
    z: np.ndarray | None = None,
    z_hat: np.ndarray | None = None,
) -> tuple[float, float]:
    """On tokens ``x [n, d]``: the fraction of neurons the predictor flags (through the ``flags``
    windows), and its recall of the true outliers (outside the ``lines`` windows). ``z``, ``z_hat``: the
    pre-activations ``x·W1 + b1`` and the prediction when known."""
    flagged = hits = outliers = 0.0
    for start in range(0, x.shape[0], 4096):
        block = np.asarray(x[start : start + 4096], dtype=np.float64)
        bias = 0.0 if ffn.b1 is None else ffn.b1
        z_block = block @ ffn.w1 + bias if z is None else z[start : start + 4096]
        if z_hat is not None:
            z_hat_block = z_hat[start : start + 4096]
        elif isinstance(predictor, ExactPredictor):
            z_hat_block = z_block
        else:
            z_hat_block = predictor.predict(block, ffn.w1, ffn.b1)
        true = outside_window(z_block, lines)
        predicted = outside_window(z_hat_block, flags, margin)
        flagged += predicted.sum()
        hits += (predicted & true).sum()
        outliers += true.sum()
    total = x.shape[0] * ffn.hidden
    return float(flagged / max(total, 1)), float(hits / outliers) if outliers else 1.0


def predicted_residual_errors(
    predictor: Predictor,
    ffn,
    x: np.ndarray,
    lines: NeuronLines,
    flags: NeuronLines,
    fold: tuple[np.ndarray, np.ndarray] | None = None,
    margin: float = 0.0,
    z: np.ndarray | None = None,
    z_hat: np.ndarray | None = None,
    y: np.ndarray | None = None,
) -> tuple[float, float]:
    """On tokens ``x``: the rewritten FFN's error ``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` with the neurons the predictor
    flags getting their exact residual, and with their residual taken from the prediction (``z``, ``z_hat``,
    ``y``: the pre-activations ``x·W1 + b1``, the prediction and the true outputs when known). Residuals in the
    FFN's precision."""
    x = np.asarray(x, dtype=np.float64)
    form, precision = ffn.gelu.form, ffn.precision
    z = x @ ffn.w1 + (0.0 if ffn.b1 is None else ffn.b1) if z is None else z
    y = ffn.times_w2(gelu(z, form, precision)) + (0.0 if ffn.b2 is None else ffn.b2) if y is None else y
    wf, bf = fold if fold is not None else fold_weights(ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines)
    z_hat = predictor.predict(x, ffn.w1, ffn.b1) if z_hat is None else z_hat
    flagged = outside_window(z_hat, flags, margin)
    base = np.asarray(x, dtype=wf.dtype) @ wf + bf  # in the fold's precision (a large FFN's float32)
    spread = max(float(np.square(y - y.mean(axis=0)).sum()), 1e-300)
    errors = []
    for pre in (z, z_hat):
        y_hat = base + ffn.times_w2(np.where(flagged, residual(pre, lines, form, precision), 0.0))
        errors.append(float(np.square(y_hat - y).sum()) / spread)
    return errors[0], errors[1]


@dataclass
class PredictorChoice:
    """A fitted predictor, the flag windows it uses, and its measured flag rate and recall."""

    predictor: Predictor
    flags: NeuronLines
    flagged_fraction: float
    recall: float
    read_bytes: float  # per token: the predictor plus the flagged neurons' W1 (unless not read) and W2 rows


def rank_predictors(
    classes: tuple[type[Predictor], ...],
    ffn,
    fit_x: np.ndarray,
    check_x: np.ndarray,
    lines: NeuronLines,
    *,
    rank: int = 64,
    uncertainty: float = 1.0,
    margin: float = 0.0,
    min_recall: float = 0.95,
    fold: tuple[np.ndarray, np.ndarray] | None = None,
    z_fit: np.ndarray | None = None,
    z_check: np.ndarray | None = None,
    y_check: np.ndarray | None = None,
    rows_itemsize: int | None = None,
) -> list[PredictorChoice]:
    """The predictor ``classes`` fitted on ``fit_x`` and measured on ``check_x``, best first: those with
    recall ≥ ``min_recall`` (or, when none has it, those with the best recall) by bytes read per token;
    ``optimize`` takes the first, or with its never-slower check the first whose rewrite runs no slower.
    A predictor the residuals are taken from (int8) is left out where that raises the FFN's error on
    ``check_x`` by more than ``MAX_PREDICTED_RESIDUAL_ERROR`` (``fold``: the folded map, default the plain fold).
    ``z_fit``, ``z_check``: the pre-activations ``x·W1 + b1`` of the two token sets, when known; ``y_check``: the
    true outputs of the check tokens, when known. ``rows_itemsize``: the bytes of a fallback row's weight when not
    the model's (the int8 rows of ``--quantize``: 1)."""
    d, h = ffn.w1_stored.shape
    item = np.dtype(ffn.dtype).itemsize
    bias = 0.0 if ffn.b1 is None else ffn.b1
    # The exact pre-activations, computed once for all candidates (each is a tokens × d × h product).
    scale_rows = _error_scale_rows(fit_x.shape[0], getattr(ffn, "large", False))
    error_x = np.asarray(fit_x[scale_rows], dtype=np.float64)
    z_fit = error_x @ ffn.w1 if z_fit is None else z_fit[scale_rows] - np.asarray(bias, z_fit.dtype)
    z_check = np.asarray(check_x, dtype=np.float64) @ ffn.w1 + bias if z_check is None else z_check
    choices = []
    for cls in classes:
        predictor = cls.fit(fit_x, ffn.w1, rank)
        z_hat_fit, z_hat_check = _predictions(predictor, ffn, error_x, z_fit, check_x, z_check)
        flags = flag_windows(lines, (z_hat_fit - z_fit).std(axis=0), uncertainty)
        if predictor.residual_from_prediction and len(classes) > 1:  # asked for alone: taken as it is
            exact, predicted = predicted_residual_errors(
                predictor,
                ffn,
                check_x[:4096],
                lines,
                flags,
                fold,
                margin,
                z_check[:4096],
                z_hat_check[:4096],
                None if y_check is None else y_check[:4096],
            )
            if predicted > MAX_PREDICTED_RESIDUAL_ERROR * exact + 1e-9:
                continue
        flagged, recall = predictor_quality(predictor, ffn, check_x, lines, flags, margin, z_check, z_hat_check)
        rows = ffn.w2_stored.size if predictor.residual_from_prediction else ffn.w1_stored.size + ffn.w2_stored.size
        cost = predictor.read_bytes(d, h, item) + flagged * rows * (rows_itemsize or item)
        choices.append(PredictorChoice(predictor, flags, flagged, recall, cost))
    good = [c for c in choices if c.recall >= min_recall - 1e-12]
    if not good:
        best_recall = max(c.recall for c in choices)
        good = [c for c in choices if c.recall >= best_recall - 1e-12]
    return sorted(good, key=lambda c: c.read_bytes)


def _error_scale_rows(tokens: int, large: bool) -> slice:
    """The fit tokens the error scale is measured on (``ERROR_SCALE_TOKENS``)."""
    if not large:
        return slice(0, ERROR_SCALE_TOKENS)
    return slice(None, None, max(1, -(-tokens // ERROR_SCALE_TOKENS_LARGE)))


def _predictions(predictor: Predictor, ffn, error_x: np.ndarray, z_fit: np.ndarray, check_x, z_check: np.ndarray):
    """The predictor's ``z_hat − b1`` on the error-scale tokens (beside their ``z_fit = x·W1``) and its ``z_hat``
    on the check tokens (beside ``z_check = x·W1 + b1``, in blocks of 4096 tokens as
    :func:`predictor_quality` rounds them), from one quantized copy of W1."""
    if isinstance(predictor, ExactPredictor):
        return z_fit, z_check
    weights = predictor.prepare(ffn.w1)
    z_hat_fit = predictor.predict(error_x, ffn.w1, None, weights)
    blocks = range(0, check_x.shape[0], 4096)
    z_hat_check = [predictor.predict(check_x[start : start + 4096], ffn.w1, ffn.b1, weights) for start in blocks]
    return z_hat_fit, np.concatenate(z_hat_check) if z_hat_check else z_check
