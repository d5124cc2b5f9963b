"""Online outlier predictors: what computes ``z_hat ≈ x·W1 + b1`` cheaply for the fallback's flag test.

exact: ``x·W1 + b1`` itself (reads all of W1: the oracle outlier set).
int4:  ONNX Runtime's ``com.microsoft::MatMulNBits`` on a 4-bit, block-32 copy of W1
       (1/8 of W1's fp32 bytes plus one scale per block).
int8:  ONNX Runtime's ``com.microsoft::DynamicQuantizeMatMul`` on an int8 copy of W1 (one scale per
       neuron; the activations rounded to uint8 per tensor at run time, as ``quantize_dynamic`` does):
       1/4 of W1's fp32 bytes, and accurate enough (pre-activation error ~2-8% of each neuron's spread
       on MiniLM) that the fallback takes the flagged neurons' residuals from it and reads no W1 row.
lowrank: ``(x·U)·V`` with ``U [d, r]``, ``V [r, h]`` fitted on calibration inputs: the rank-r map
       closest to W1 on the data, each neuron's error measured in units of its pre-activation spread
       (``r·(d + h)`` weights: rank 64 of a 1024→4096 FFN reads 8% of W1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tardis_onnx.reference import NeuronLines, dense_ffn, outside_window, residual
from tardis_onnx.reference import fold as fold_weights

PREDICTORS = ("exact", "int4", "int8", "lowrank")
# A predictor that stands for the pre-activation (int8: flagged residuals taken from it) is a candidate
# only where that raises the FFN's error on the checked tokens by at most this factor over the exact
# residuals of the same flagged neurons (at coverage 0, where the exact error is nil, never). On
# MiniLM the int8 residuals raised it by 2-10% per FFN (held-out tokens, one tensor of 4,096 tokens)
# and STS-B dev from 86.71 (int4, exact residuals) to 86.60, for the speed that made every FFN pay.
MAX_PREDICTED_RESIDUAL_ERROR = 1.25
INT4_BLOCK = 32
# MatMulNBits computes with int8 activations (VNNI/AVX2 on CPU): ~3x faster than its fp32 dequantizing path
# at one token, d = 1024, h = 4096; the predictor only flags, so the rounding costs nothing exact.
INT4_ACCURACY_LEVEL = 4


@dataclass
class Predictor:
    """The predictor of one FFN: its kind and, for ``lowrank``, the fitted factors."""

    kind: str = "exact"
    u: np.ndarray | None = None  # [d, r]
    v: np.ndarray | None = None  # [r, h]

    def __post_init__(self) -> None:
        if self.kind not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.kind!r}; expected one of {PREDICTORS}")
        if self.kind == "lowrank" and (self.u is None or self.v is None):
            raise ValueError("a lowrank predictor needs its fitted factors u and v")

    @property
    def residual_from_prediction(self) -> bool:
        """Whether the fallback computes a flagged neuron's residual from ``z_hat`` (no W1 row read)."""
        return self.kind == "int8"

    @property
    def rank(self) -> int:
        return 0 if self.u is None else int(self.u.shape[1])

    def error_scale(self, x: np.ndarray, w1: np.ndarray) -> np.ndarray:
        """Per-neuron standard deviation of ``z_hat − z`` on inputs ``x [n, d]`` (zeros for ``exact``)."""
        if self.kind == "exact":
            return np.zeros(w1.shape[1])
        return (self.predict(x, w1, None) - np.asarray(x, dtype=np.float64) @ w1).std(axis=0)

    def predict(self, x: np.ndarray, w1: np.ndarray, b1: np.ndarray | None) -> np.ndarray:
        """``z_hat`` in float64 (the reference for the emitted graph)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "exact":
            z = x @ w1
        elif self.kind == "int4":
            packed, scales = quantize_int4(w1)
            z = quantize_activations_int8(x) @ dequantize_int4(packed, scales, w1.shape[0])
        elif self.kind == "int8":
            weights, scales = quantize_int8(w1)
            z = quantize_activations_uint8(x) @ (weights * scales)
        else:
            z = (x @ self.u) @ self.v
        return z if b1 is None else z + b1


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
    padded = np.zeros((h, blocks * block))
    padded[:, :d] = np.asarray(w1, dtype=np.float64).T
    grouped = padded.reshape(h, blocks, block)
    scale = np.abs(grouped).max(axis=2) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(grouped / scale[..., None]) + 8, 0, 15).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scale.reshape(-1)


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


def quantize_int8(w1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w1 [d, h]`` as int8 with one scale per column (neuron): ``q = round(w / s)``, ``s = max|w| / 127``."""
    w1 = np.asarray(w1, dtype=np.float64)
    scale = np.abs(w1).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.rint(w1 / scale), -127, 127).astype(np.int8), scale


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


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, d: int) -> np.ndarray:
    """The ``[d, h]`` float64 matrix ``MatMulNBits`` multiplies by (the reference for tests)."""
    h, blocks, half = packed.shape
    q = np.empty((h, blocks, half * 2))
    q[..., 0::2] = packed & 0x0F
    q[..., 1::2] = packed >> 4
    w = (q - 8) * scales.reshape(h, blocks, 1)
    return w.reshape(h, -1)[:, :d].T


def fit_lowrank(x: np.ndarray, w1: np.ndarray, rank: int, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """``U [d, r]``, ``V [r, h]`` minimising ``Σ_tokens Σ_i ((x·W1 − x·U·V)_i / σ_i)²`` over samples ``x [n, d]``.

    ``σ_i`` is neuron ``i``'s pre-activation spread on ``x``. With the second-moment matrix
    ``C = xᵀx / n = E Λ Eᵀ``, the optimum is the truncated SVD of ``C^½ · W1 · diag(1/σ)`` mapped back.
    """
    x = np.asarray(x, dtype=np.float64)
    w1 = np.asarray(w1, dtype=np.float64)
    d, h = w1.shape
    rank = min(rank, d, h)
    second = x.T @ x / x.shape[0]
    # Each neuron's pre-activation spread from the second moments (d²h, not n·d·h, operations).
    variance = np.einsum("ki,kl,li->i", w1, second, w1, optimize=True) - (x.mean(axis=0) @ w1) ** 2
    sigma = np.maximum(np.sqrt(np.maximum(variance, 0.0)), 1e-12)
    eigenvalues, eigenvectors = np.linalg.eigh(second)
    eigenvalues = np.maximum(eigenvalues, ridge * max(eigenvalues.max(), 1e-30))
    root = (eigenvectors * np.sqrt(eigenvalues)) @ eigenvectors.T
    inverse_root = (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
    left, singular, right = np.linalg.svd(root @ w1 / sigma, full_matrices=False)
    u = inverse_root @ (left[:, :rank] * singular[:rank])
    v = right[:rank] * sigma
    return u, v


def predictor_bytes(kind: str, d: int, h: int, itemsize: int, rank: int = 0) -> int:
    """Bytes the predictor reads per token."""
    if kind == "exact":
        return d * h * itemsize
    if kind == "int4":
        blocks = -(-d // INT4_BLOCK)
        return h * blocks * (INT4_BLOCK // 2) + h * blocks * itemsize
    if kind == "int8":
        return d * h + h * itemsize
    if kind == "lowrank":
        return rank * (d + h) * itemsize
    raise ValueError(f"unknown predictor {kind!r}; expected one of {PREDICTORS}")


def predictor_quality(
    predictor: Predictor, ffn, x: np.ndarray, lines: NeuronLines, flags: NeuronLines, margin: float = 0.0
) -> tuple[float, float]:
    """On tokens ``x [n, d]``: the fraction of neurons the predictor flags (through the ``flags``
    windows), and its recall of the true outliers (outside the ``lines`` windows)."""
    flagged = hits = outliers = 0.0
    for start in range(0, x.shape[0], 4096):
        block = np.asarray(x[start : start + 4096], dtype=np.float64)
        z = block @ ffn.w1 + (0.0 if ffn.b1 is None else ffn.b1)
        z_hat = z if predictor.kind == "exact" else predictor.predict(block, ffn.w1, ffn.b1)
        true = outside_window(z, lines)
        predicted = outside_window(z_hat, flags, margin)
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
) -> tuple[float, float]:
    """On tokens ``x``: the rewritten FFN's error ``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` with the neurons the predictor
    flags getting their exact residual, and with their residual taken from the prediction."""
    x = np.asarray(x, dtype=np.float64)
    form = ffn.gelu.form
    y = dense_ffn(x, ffn.w1, ffn.b1, ffn.w2, ffn.b2, form)
    wf, bf = fold if fold is not None else fold_weights(ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines)
    z = x @ ffn.w1 + (0.0 if ffn.b1 is None else ffn.b1)
    z_hat = predictor.predict(x, ffn.w1, ffn.b1)
    flagged = outside_window(z_hat, flags, margin)
    base = x @ wf + bf
    spread = max(float(np.square(y - y.mean(axis=0)).sum()), 1e-300)
    errors = []
    for pre in (z, z_hat):
        y_hat = base + np.where(flagged, residual(pre, lines, form), 0.0) @ ffn.w2
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


def choose_predictor(
    kinds: tuple[str, ...],
    ffn,
    fit_x: np.ndarray,
    check_x: np.ndarray,
    lines: NeuronLines,
    *,
    rank: int = 64,
    uncertainty: float = 1.0,
    margin: float = 0.0,
    min_recall: float = 0.95,
) -> PredictorChoice:
    """Of the predictor ``kinds``, fitted on ``fit_x``, the one reading the fewest bytes per token
    (predictor + flagged rows) whose recall on ``check_x`` is at least ``min_recall``; the cheapest
    of the best-recalling ones when none reaches it. One kind: that one, measured."""
    return rank_predictors(
        kinds, ffn, fit_x, check_x, lines, rank=rank, uncertainty=uncertainty, margin=margin, min_recall=min_recall
    )[0]


def rank_predictors(
    kinds: tuple[str, ...],
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
) -> list[PredictorChoice]:
    """The predictor ``kinds`` fitted on ``fit_x`` and measured on ``check_x``, best first: those with
    recall ≥ ``min_recall`` (or, when none has it, those with the best recall) by bytes read per token;
    :func:`choose_predictor` takes the first, the never-slower check the first that runs faster.
    A predictor the residuals are taken from (int8) is left out where that raises the FFN's error on
    ``check_x`` by more than ``MAX_PREDICTED_RESIDUAL_ERROR`` (``fold``: the folded map, default the plain fold)."""
    d, h = ffn.w1.shape
    item = np.dtype(ffn.dtype).itemsize
    choices = []
    for kind in kinds:
        predictor = Predictor("lowrank", *fit_lowrank(fit_x, ffn.w1, rank)) if kind == "lowrank" else Predictor(kind)
        flags = flag_windows(lines, predictor.error_scale(fit_x[:8192], ffn.w1), uncertainty)
        if predictor.residual_from_prediction and len(kinds) > 1:  # asked for alone: taken as it is
            exact, predicted = predicted_residual_errors(predictor, ffn, check_x[:4096], lines, flags, fold, margin)
            if predicted > MAX_PREDICTED_RESIDUAL_ERROR * exact + 1e-9:
                continue
        flagged, recall = predictor_quality(predictor, ffn, check_x, lines, flags, margin)
        rows = ffn.w2.size if predictor.residual_from_prediction else ffn.w1.size + ffn.w2.size
        cost = predictor_bytes(kind, d, h, item, predictor.rank) + flagged * rows * item
        choices.append(PredictorChoice(predictor, flags, flagged, recall, cost))
    good = [c for c in choices if c.recall >= min_recall - 1e-12]
    if not good:
        best_recall = max(c.recall for c in choices)
        good = [c for c in choices if c.recall >= best_recall - 1e-12]
    return sorted(good, key=lambda c: c.read_bytes)
