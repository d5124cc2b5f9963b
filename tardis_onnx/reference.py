"""The numpy reference (float64) for all TARDIS math: the one source of truth.

Folding code, the portable fallback, the custom-op oracle and every test call
these functions; nothing else reimplements GELU.

Layout follows ONNX ``MatMul(x, W)``: ``W1: [d, h]``, ``W2: [h, d]``.

    Wf = W1 · diag(a) · W2                       [d, d]
    bf = (a ⊙ b1 + c) · W2 + b2                  [d]
    y  = x·Wf + bf + Σ_{i ∈ O(x)} r_i(z_i) · W2[i, :]
    r_i(z) = GELU(z) − (a_i z + c_i)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from tardis_onnx import parallel
from tardis_onnx.contract import ROW_SCALES_ROWS

GELU_FORMS = ("erf", "tanh")
_TANH_SCALE = math.sqrt(2.0 / math.pi)


def gelu(z: np.ndarray, form: str = "erf", dtype: np.dtype = np.float64) -> np.ndarray:
    """GELU in float64 (in ``dtype`` where asked: a large FFN is fitted in float32, a sixth of the time):
    ``form='erf'`` exact, ``form='tanh'`` the GPT-2 approximation. A large ``z`` a block of rows at a time on
    every thread (:func:`tardis_onnx.parallel.map_rows`: the same values)."""
    _check_form(form)
    return parallel.map_rows(lambda rows: _gelu(np.asarray(rows, dtype=dtype), form), np.asarray(z))


def _gelu(z: np.ndarray, form: str) -> np.ndarray:
    if form == "erf":
        return 0.5 * z * (1.0 + erf(z / z.dtype.type(math.sqrt(2.0))))
    return 0.5 * z * (1.0 + np.tanh(_TANH_SCALE * (z + 0.044715 * z**3)))


def _check_form(form: str) -> None:
    if form not in GELU_FORMS:
        raise ValueError(f"unknown GELU form {form!r}; expected one of {GELU_FORMS}")


def gelu_derivative(z: np.ndarray, form: str = "erf") -> np.ndarray:
    """d GELU / dz in float64."""
    z = np.asarray(z, dtype=np.float64)
    if form == "erf":
        return 0.5 * (1.0 + erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if form == "tanh":
        inner = _TANH_SCALE * (z + 0.044715 * z**3)
        t = np.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_SCALE * (1.0 + 3 * 0.044715 * z * z)
    raise ValueError(f"unknown GELU form {form!r}; expected one of {GELU_FORMS}")


def narrowest_window(samples: np.ndarray, coverage: float) -> tuple[float, float]:
    """Narrowest interval ``[lo, hi]`` holding ``ceil(coverage · n)`` of ``samples``.

    Coverage 0 gives the empty window ``(+inf, -inf)``: every input falls back.
    """
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    s = np.sort(np.asarray(samples, dtype=np.float64).ravel())
    s = s[np.isfinite(s)]
    k = math.ceil(coverage * s.size - 1e-9)
    if k == 0:
        return math.inf, -math.inf
    widths = s[k - 1 :] - s[: s.size - k + 1]
    i = int(np.argmin(widths))
    return float(s[i]), float(s[i + k - 1])


def fit_line(samples: np.ndarray, form: str = "erf") -> tuple[float, float]:
    """Least-squares line ``(a, c)`` with ``a·z + c ≈ GELU(z)`` over ``samples``.

    With fewer than two distinct samples the tangent at their mean is used
    (the tangent at 0 when there are none).
    """
    s = np.asarray(samples, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0 or np.ptp(s) == 0.0:
        z0 = float(s.mean()) if s.size else 0.0
        a = float(gelu_derivative(z0, form))
        return a, float(gelu(z0, form)) - a * z0
    a, c = np.polyfit(s, gelu(s, form), 1)
    return float(a), float(c)


@dataclass(frozen=True)
class NeuronLines:
    """Per-neuron line and window, each an array of shape ``[h]`` (float64)."""

    slope: np.ndarray
    intercept: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    @property
    def hidden(self) -> int:
        return int(self.slope.shape[0])


def calibrate_lines(preact: np.ndarray, coverage: float, form: str = "erf") -> NeuronLines:
    """Window and line per neuron from pre-activation samples ``preact: [n, h]``.

    Same result as :func:`narrowest_window` then :func:`fit_line` on the in-window samples of
    every column (the definitions), vectorised over neurons. The line is fitted on the in-window
    samples; an empty window (coverage 0) fits it on all samples, so the fold stays non-trivial
    and exact fallback of every neuron is a real identity.
    """
    preact = np.asarray(preact, dtype=np.float64)
    if preact.ndim != 2:
        raise ValueError(f"pre-activations must be [samples, neurons], got shape {preact.shape}")
    if not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage must be in [0, 1], got {coverage}")
    h = preact.shape[1]
    slope, intercept, lo, hi = (np.empty(h) for _ in range(4))
    finite = np.isfinite(preact).all(axis=0)
    for i in np.flatnonzero(~finite):  # columns with NaN/inf: the scalar definitions drop those samples
        col = preact[:, i]
        lo[i], hi[i] = narrowest_window(col, coverage)
        inside = col[(col >= lo[i]) & (col <= hi[i])] if lo[i] <= hi[i] else col
        slope[i], intercept[i] = fit_line(inside, form)
    for cols in column_blocks(preact.shape[0], np.flatnonzero(finite)):
        z = preact[:, cols]
        lo[cols], hi[cols] = narrowest_windows(np.sort(z, axis=0), coverage)
        empty = lo[cols] > hi[cols]
        inside = ((z >= lo[cols]) & (z <= hi[cols])) | empty
        slope[cols], intercept[cols] = fit_lines(z, inside, form)
    return NeuronLines(slope, intercept, lo, hi)


def column_blocks(rows: int, columns: np.ndarray | int, elements: int = 1 << 22) -> list[np.ndarray]:
    """Split ``columns`` (indices, or a count) into blocks of about ``elements`` values of ``rows`` rows each."""
    columns = np.arange(columns) if isinstance(columns, int) else np.asarray(columns)
    width = max(1, elements // max(rows, 1))
    return [columns[i : i + width] for i in range(0, columns.size, width)]


def narrowest_windows(sorted_z: np.ndarray, coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`narrowest_window` of every column of ``sorted_z: [n, h]`` (sorted along axis 0, finite)."""
    n, h = sorted_z.shape
    k = math.ceil(coverage * n - 1e-9)
    if k == 0:
        return np.full(h, math.inf), np.full(h, -math.inf)
    start = np.argmin(sorted_z[k - 1 :] - sorted_z[: n - k + 1], axis=0)
    cols = np.arange(h)
    return sorted_z[start, cols], sorted_z[start + k - 1, cols]


def fit_lines(z: np.ndarray, inside: np.ndarray, form: str = "erf") -> tuple[np.ndarray, np.ndarray]:
    """:func:`fit_line` of every column of ``z: [n, h]`` over the samples where ``inside`` is true."""
    w = np.asarray(inside, dtype=np.float64)
    count = w.sum(axis=0)
    safe = np.maximum(count, 1.0)
    mean_z = (w * z).sum(axis=0) / safe
    g = gelu(z, form)
    mean_g = (w * g).sum(axis=0) / safe
    dz = z - mean_z
    sxx = (w * dz * dz).sum(axis=0)
    sxy = (w * dz * (g - mean_g)).sum(axis=0)
    spread = np.where(inside, z, -np.inf).max(axis=0) - np.where(inside, z, np.inf).min(axis=0)
    degenerate = (count == 0) | ~(spread > 0)
    slope = np.where(degenerate, 0.0, sxy / np.where(degenerate, 1.0, sxx))
    intercept = mean_g - slope * mean_z
    if degenerate.any():  # the tangent at the mean (at 0 with no samples), as fit_line does
        z0 = np.where(count > 0, mean_z, 0.0)[degenerate]
        slope[degenerate] = gelu_derivative(z0, form)
        intercept[degenerate] = gelu(z0, form) - slope[degenerate] * z0
    return slope, intercept


def fold(
    w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None, lines: NeuronLines
) -> tuple[np.ndarray, np.ndarray]:
    """Folded ``(Wf [d, d], bf [d])`` in float64; computed in float32 where both weights are (a large FFN's)."""
    w1, w2 = np.asarray(w1), np.asarray(w2)
    dtype = np.float32 if w1.dtype == w2.dtype == np.float32 else np.float64
    w1, w2 = w1.astype(dtype, copy=False), w2.astype(dtype, copy=False)
    d, h = w1.shape
    b1 = np.zeros(h) if b1 is None else np.asarray(b1, dtype=np.float64)
    b2 = np.zeros(w2.shape[1]) if b2 is None else np.asarray(b2, dtype=np.float64)
    wf = (w1 * lines.slope.astype(dtype)[None, :]) @ w2
    bf = (lines.slope * b1 + lines.intercept).astype(dtype) @ w2 + b2
    return wf.astype(np.float64, copy=False), bf


def residual(z: np.ndarray, lines: NeuronLines, form: str = "erf", dtype: np.dtype = np.float64) -> np.ndarray:
    """Exact residual ``GELU(z) − (a z + c)`` per neuron; ``z: [..., h]`` (in ``dtype``, as :func:`gelu`)."""
    _check_form(form)

    def rows(z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=dtype)
        return _gelu(z, form) - line(z, lines, dtype)

    return parallel.map_rows(rows, np.asarray(z))


def line(z: np.ndarray, lines: NeuronLines, dtype: np.dtype = np.float64) -> np.ndarray:
    """Each neuron's line ``a·z + c`` in ``dtype``; ``z: [..., h]`` (already in ``dtype``)."""
    return lines.slope.astype(dtype, copy=False) * z + lines.intercept.astype(dtype, copy=False)


def outside_window(z: np.ndarray, lines: NeuronLines, margin: float = 0.0) -> np.ndarray:
    """Boolean ``[..., h]``: ``z`` outside ``[lo − margin, hi + margin]`` (NaN counts as outside); a float32 ``z``
    is compared as float64 without being converted first (the comparison promotes it, exactly)."""
    z = np.asarray(z)
    return ~((z >= lines.lo - margin) & (z <= lines.hi + margin))


def dense_ffn(
    x: np.ndarray, w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None, form: str = "erf"
) -> np.ndarray:
    """The original FFN ``GELU(x·W1 + b1)·W2 + b2`` in float64."""
    z = np.asarray(x, dtype=np.float64) @ np.asarray(w1, dtype=np.float64)
    if b1 is not None:
        z = z + b1
    y = gelu(z, form) @ np.asarray(w2, dtype=np.float64)
    return y if b2 is None else y + b2


def tardis_ffn(
    x: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray | None,
    w2: np.ndarray,
    b2: np.ndarray | None,
    lines: NeuronLines,
    form: str = "erf",
    flagged: np.ndarray | None = None,
) -> np.ndarray:
    """The rewritten FFN: folded map plus the exact residual of ``flagged`` neurons.

    ``flagged`` (``[..., h]`` bool) defaults to the exact outlier set, i.e. the
    neurons whose true pre-activation lies outside their window.
    """
    x = np.asarray(x, dtype=np.float64)
    wf, bf = fold(w1, b1, w2, b2, lines)
    z = x @ np.asarray(w1, dtype=np.float64)
    if b1 is not None:
        z = z + b1
    if flagged is None:
        flagged = outside_window(z, lines)
    r = np.where(flagged, residual(z, lines, form), 0.0)
    return x @ wf + bf + r @ np.asarray(w2, dtype=np.float64)


def pack_lines(lines: NeuronLines) -> np.ndarray:
    """The ``[4, h]`` float32 tensor the fallback op takes: slope, intercept, lo, hi."""
    return np.stack([lines.slope, lines.intercept, lines.lo, lines.hi]).astype(np.float32)


def unpack_lines(packed: np.ndarray) -> NeuronLines:
    """Inverse of :func:`pack_lines` (float64)."""
    p = np.asarray(packed, dtype=np.float64)
    return NeuronLines(p[0], p[1], p[2], p[3])


def fallback_op(
    x: np.ndarray,
    y_folded: np.ndarray,
    z_hat: np.ndarray | None,
    w1t: np.ndarray | None,
    b1: np.ndarray,
    w2: np.ndarray,
    lines: np.ndarray,
    predictor_v: np.ndarray | None = None,
    row_scales: np.ndarray | None = None,
    margin: float = 0.0,
    form: str = "erf",
) -> np.ndarray:
    """Oracle of ``ai.tardis::FfnFallback`` (float64 result).

    Neuron ``i`` of a token is flagged when its predicted pre-activation
    ``z_hat[..., i]`` lies outside ``[lo_i − margin, hi_i + margin]`` (or is NaN);
    for flagged neurons the exact ``z_i = x · w1t[i] + b1[i]`` is recomputed and
    ``r_i(z_i) · w2[i, :]`` is added to ``y_folded``. With the low-rank predictor fused in,
    ``z_hat`` is None and ``y_folded`` carries the code ``c = x·U`` in its last ``rank`` columns:
    ``z_hat = c · predictor_v`` (``predictor_v``: ``[rank, h]``). Without ``w1t`` (an accurate predictor,
    z_hat given) the residual is taken from the prediction: ``z_i = z_hat_i + b1_i``. With ``row_scales``
    (``[2, h]``), ``w1t`` and ``w2`` are int8 rows: row ``k`` stands for ``q[k]·scale[k]`` (:func:`int8_rows`).
    """
    if row_scales is not None:
        scales = dict(zip(ROW_SCALES_ROWS, np.asarray(row_scales, dtype=np.float32), strict=True))
        w1t = None if w1t is None else int8_rows(w1t, scales["w1t"])
        w2 = int8_rows(w2, scales["w2"])
    if (z_hat is None) == (predictor_v is None):
        raise ValueError("give exactly one of z_hat and predictor_v")
    if w1t is None and z_hat is None:
        raise ValueError("w1t may be left out only with z_hat")
    if predictor_v is not None:
        d = np.shape(x)[-1]
        code = np.asarray(y_folded, dtype=np.float64)[..., d:]
        y_folded = np.asarray(y_folded)[..., :d]
        z_hat = code @ np.asarray(predictor_v, dtype=np.float64)
    unpacked = unpack_lines(lines)
    flagged = outside_window(z_hat, unpacked, margin)
    if w1t is None:
        z = np.asarray(z_hat, dtype=np.float64) + np.asarray(b1, dtype=np.float64)
    else:
        z = np.asarray(x, dtype=np.float64) @ np.asarray(w1t, dtype=np.float64).T + np.asarray(b1, dtype=np.float64)
    r = np.where(flagged, residual(z, unpacked, form), 0.0)
    return np.asarray(y_folded, dtype=np.float64) + r @ np.asarray(w2, dtype=np.float64)


def int8_rows(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The rows int8 rows ``q [h, d]`` stand for: ``q·scale`` per row (float64; where the kernel adds a W2 row at
    decode it scales the residual instead: the same up to float rounding)."""
    return np.asarray(q, dtype=np.float64) * np.asarray(scales, dtype=np.float32).astype(np.float64)[:, None]
