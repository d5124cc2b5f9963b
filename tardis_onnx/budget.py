"""Budgets and better lines (docs/design.md §1), in numpy float64 on calibration samples.

Three switchable ideas on top of the plain recipe (narrowest window, one coverage for all):

- **least-error windows**: among the windows holding ``k = ceil(t·n)`` consecutive sorted samples,
  the one whose least-squares line has the least in-window squared error (not the narrowest).
- **per-neuron coverage** by a Lagrangian: for each neuron pick ``t_i`` from a grid to minimise
  ``Σ_i cost_i(t_i) + λ · Σ_i fallback_i(t_i)``, cost = in-window SSE / n · ‖W2[i,:]‖²; ``λ`` is
  bisected so each layer (``allocation="layer"``) or all FFNs together (``"global"``) meet the
  fallback budget.
- **refit** of the folded ``d×d`` map and bias by least squares on calibration tokens, target =
  true FFN output − the exact fallback term (no extra weights at inference).

A window here is ``k`` consecutive samples in sorted order (ties at its edges are ignored), so the
calibration outlier fraction of coverage ``t`` is exactly ``1 − k/n``. GELU and the fold come from
:mod:`tardis_onnx.reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from tardis_onnx import parallel, reference
from tardis_onnx.config import DEFAULT_GRID, WINDOWS  # noqa: F401  (re-exported)


@dataclass
class CandidateTable:
    """Per coverage ``grid[g]`` and neuron ``i``: window, line and in-window squared error (``[G, h]``)."""

    grid: np.ndarray  # [G]
    lo: np.ndarray
    hi: np.ndarray
    slope: np.ndarray
    intercept: np.ndarray
    sse: np.ndarray  # Σ over in-window samples of (GELU(z) − a z − c)², divided by n (per token)
    fraction: np.ndarray  # [G]: calibration outlier fraction 1 − k/n

    def lines(self, choice: np.ndarray) -> reference.NeuronLines:
        """The lines of grid index ``choice[i]`` for each neuron ``i``."""
        cols = np.arange(self.slope.shape[1])
        return reference.NeuronLines(
            self.slope[choice, cols], self.intercept[choice, cols], self.lo[choice, cols], self.hi[choice, cols]
        )


def window_size(n: int, coverage: float) -> int:
    return math.ceil(coverage * n - 1e-9)


def candidate_table(z: np.ndarray, grid: tuple[float, ...], form: str, window: str = "narrowest") -> CandidateTable:
    """Windows, lines and errors of every neuron of ``z: [n, h]`` at each coverage of ``grid``.

    ``z`` may be any object with ``shape`` whose ``z[:, cols]`` gives a block of columns (computed lazily).

    Memory: one block of columns at a time (about 16 arrays of ``2**22`` float64 values).
    """
    return candidate_tables(z, [(tuple(grid), window)], form)[0]


def candidate_tables(
    z: np.ndarray, specs: list[tuple[tuple[float, ...], str]], form: str, threads: int = 1
) -> list[CandidateTable]:
    """:func:`candidate_table` for each ``(grid, window)`` of ``specs``, from one sort of each block of columns;
    ``threads`` blocks at once (numpy releases the GIL; each block its own memory)."""
    for _, window in specs:
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if not hasattr(z, "shape"):
        z = np.asarray(z, dtype=np.float64)
    n, h = z.shape
    if n == 0:
        raise ValueError("no calibration samples")
    grids = [np.asarray(grid, dtype=np.float64) for grid, _ in specs]
    arrays = [[np.empty((grid.size, h)) for _ in range(5)] for grid in grids]  # lo, hi, slope, intercept, sse

    def fill(cols: np.ndarray) -> None:  # the columns ``cols`` of every table
        s = np.sort(z[:, cols], axis=0).astype(np.float64, copy=False)  # sorted as stored: the same order
        shift_z = s.mean(axis=0)
        g = reference.gelu(s, form)
        shift_g = g.mean(axis=0)
        zc, gc = s - shift_z, g - shift_g  # centred: prefix sums lose less precision
        prefix = [_running_sums(v) for v in (zc, gc, zc * zc, gc * gc, zc * gc)]
        for grid_arr, (_, window), (lo, hi, slope, intercept, sse) in zip(grids, specs, arrays, strict=True):
            for gi, t in enumerate(grid_arr):
                k = window_size(n, t)
                if k == 0:  # every sample falls back: fit the line on all samples (as reference.calibrate_lines)
                    start = np.zeros(cols.size, dtype=np.int64)
                    k_fit = n
                else:
                    k_fit = k
                    if window == "narrowest":
                        start = np.argmin(s[k - 1 :] - s[: n - k + 1], axis=0)
                    else:
                        start = np.argmin(_window_errors(prefix, k), axis=0)
                a, c, err = _window_fit(prefix, start, k_fit, s, shift_z, shift_g, form)
                idx = np.arange(cols.size)
                if k == 0:
                    lo[gi, cols], hi[gi, cols] = math.inf, -math.inf
                    err = np.zeros(cols.size)
                else:
                    lo[gi, cols], hi[gi, cols] = s[start, idx], s[start + k - 1, idx]
                slope[gi, cols] = a
                intercept[gi, cols] = c
                sse[gi, cols] = err / n

    parallel.map_each(fill, reference.column_blocks(n, h), threads)
    return [
        CandidateTable(grid, *table, np.array([1.0 - window_size(n, t) / n for t in grid]))
        for grid, table in zip(grids, arrays, strict=True)
    ]


def _running_sums(v: np.ndarray) -> np.ndarray:
    """``p[i] = Σ_{r < i} v[r]`` down the rows of ``v: [n, c]`` (``n + 1`` rows, the first zero): numpy's cumsum, a
    row at a time (contiguous; cumsum along axis 0 strides through memory at several times the cost)."""
    p = np.empty((v.shape[0] + 1, v.shape[1]))
    p[0] = 0.0
    for i, row in enumerate(v):
        np.add(p[i], row, out=p[i + 1])
    return p


def _window_sums(prefix: list[np.ndarray], start: np.ndarray, k: int):
    cols = np.arange(prefix[0].shape[1])
    return [p[start + k, cols] - p[start, cols] for p in prefix]


def _window_errors(prefix: list[np.ndarray], k: int) -> np.ndarray:
    """In-window least-squares SSE of every window of ``k`` consecutive sorted samples (``[n − k + 1, c]``), in place
    on a few buffers: ``syy − sxy²/sxx`` where ``sxx > 0`` (else ``syy``), never below 0."""
    p_z, p_g, p_zz, p_gg, p_zg = prefix
    starts = p_z.shape[0] - k

    def window(p: np.ndarray) -> np.ndarray:  # each window's sum, from the running sums
        return np.subtract(p[k:], p[:starts])

    sz, sg, sxx, sxy, syy = window(p_z), window(p_g), window(p_zz), window(p_zg), window(p_gg)
    term = np.empty_like(sz)
    for total, a, b in ((sxx, sz, sz), (sxy, sz, sg), (syy, sg, sg)):  # centred: total − a·b / k
        np.multiply(a, b, out=term)
        term /= k
        total -= term
    positive = sxx > 0
    np.copyto(sxx, 1.0, where=~positive)
    np.multiply(sxy, sxy, out=term)
    term /= sxx
    np.subtract(syy, term, out=syy, where=positive)
    return np.maximum(syy, 0.0, out=syy)


def _window_fit(prefix, start, k, s, shift_z, shift_g, form):
    """Line ``(a, c)`` and SSE of the window ``[start, start + k)`` of each sorted column ``s``."""
    cols = np.arange(s.shape[1])
    sz, sg, szz, sgg, szg = _window_sums(prefix, start, k)
    sxx = szz - sz * sz / k
    sxy = szg - sz * sg / k
    syy = sgg - sg * sg / k
    ok = (s[start + k - 1, cols] > s[start, cols]) & (sxx > 0)
    a = np.where(ok, sxy / np.where(ok, sxx, 1.0), 0.0)
    c = (sg - a * sz) / k + shift_g - a * shift_z
    err = np.maximum(syy - a * sxy, 0.0)
    if not ok.all():  # one distinct value: the tangent there (as reference.fit_line), no in-window error
        z0 = s[start[~ok], cols[~ok]]
        a[~ok] = reference.gelu_derivative(z0, form)
        c[~ok] = reference.gelu(z0, form) - a[~ok] * z0
        err[~ok] = 0.0
    return a, c, err


def fallback_budget(target_reduction: float, d: int, h: int, d_out: int) -> float:
    """Outlier fraction ``f`` giving fallback reduction ``target`` for one FFN (docs/design.md §2)."""
    dense = d * h + h * d_out
    f = 1.0 - target_reduction - d * d_out / dense
    if f < 0:
        ceiling = 1.0 - d * d_out / dense
        raise ValueError(f"target reduction {target_reduction:g} exceeds this FFN's ceiling {ceiling:.4f}")
    return f


def allocate(
    tables: list[CandidateTable],
    importance: list[np.ndarray],
    budgets: list[float],
    weights: list[float],
    scope: str = "layer",
) -> list[np.ndarray]:
    """Grid index per neuron minimising ``Σ sse · importance`` with the fallback budgets met.

    ``budgets[l]``: the allowed mean outlier fraction of FFN ``l``; ``weights[l]``: bytes one
    unit of its outlier fraction costs (for ``scope="global"``, where one multiplier ``λ`` serves
    all FFNs and only the weighted total must be met). ``importance[l]``: ``‖W2[i,:]‖²`` per neuron.
    """
    costs = [t.sse * imp[None, :] for t, imp in zip(tables, importance, strict=True)]
    if scope == "layer":
        return [_bisect([c], [t.fraction], [1.0], b * 1.0)[0] for c, t, b in zip(costs, tables, budgets, strict=True)]
    if scope == "global":
        total = sum(b * w * t.sse.shape[1] for b, w, t in zip(budgets, weights, tables, strict=True))
        return _bisect(costs, [t.fraction for t in tables], weights, total, per_neuron=True)
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")


def _bisect(costs, fractions, weights, budget, per_neuron=False):
    """Smallest ``λ`` (log-bisection) whose choices spend at most ``budget``."""

    def choose(lam):
        return [np.argmin(c + lam * w * f[:, None], axis=0) for c, f, w in zip(costs, fractions, weights, strict=True)]

    def spent(choice):
        if per_neuron:
            return sum(w * f[ch].sum() for ch, f, w in zip(choice, fractions, weights, strict=True))
        return float(np.mean(fractions[0][choice[0]]))

    scale = max(max(float(c.max()) for c in costs), 1e-30)
    lo_lam, hi_lam = 0.0, scale
    while spent(choose(hi_lam)) > budget + 1e-12:
        hi_lam *= 10.0
        if hi_lam > scale * 1e12:
            break  # the budget is below the cheapest grid point: return the cheapest choice
    if spent(choose(lo_lam)) <= budget + 1e-12:
        return choose(lo_lam)
    for _ in range(60):
        mid = 0.5 * (lo_lam + hi_lam) if lo_lam > 0 else hi_lam * 1e-6 if hi_lam > scale * 1e-6 else 0.5 * hi_lam
        if spent(choose(mid)) <= budget + 1e-12:
            hi_lam = mid
        else:
            lo_lam = mid
        if hi_lam - lo_lam <= 1e-9 * hi_lam:
            break
    return choose(hi_lam)


def _design(x: np.ndarray) -> np.ndarray:
    """``[x 1]`` in float64."""
    return np.concatenate([np.asarray(x, dtype=np.float64), np.ones((x.shape[0], 1))], axis=1)


def token_products(x: np.ndarray) -> np.ndarray:
    """What a :class:`Refit` on the tokens ``x`` needs whatever its target: the Gram matrix ``[x 1]ᵀ[x 1]``, or
    with fewer tokens than unknowns (``n < d + 1``) the kernel ``[x 1][x 1]ᵀ`` (``n × n``)."""
    a = _design(x)
    return a.T @ a if a.shape[0] >= a.shape[1] else a @ a.T


def _solve_positive(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(system), rhs)
    except np.linalg.LinAlgError:  # positive definite in exact arithmetic, not always in floating point
        return np.linalg.solve(system, rhs)


class Refit:
    """The least-squares correction ``Δ = (ΔWf, Δbf)`` of a fold ``B0 = (Wf, bf)`` with ``[x 1]·(B0 + Δ) ≈ target``.

    Minimises ``‖A·(B0 + Δ) − target‖² + ρ‖Δ‖²`` (``A = [x 1]``) with ``ρ = ridge · (d + 1) · mean x²``: the
    prior weighs as much as ``ridge · (d + 1)`` tokens, whatever the token count, so it matters when tokens are
    few relative to the ``d + 1`` unknowns per output and fades when many. Known from the fold's miss
    ``M = A·B0 − target`` on the tokens, without ``B0`` (:meth:`tardis_onnx.calibrate.FfnTokens.miss`):
    ``Δ = −(AᵀA + ρI)⁻¹AᵀM`` from the Gram matrix (``products``: :func:`token_products`, shared by every
    candidate's refit), or with fewer tokens than unknowns from the kernel, ``Δ = −Aᵀ(AAᵀ + ρI)⁻¹M``: the same
    from an ``n × n`` system (a 7B FFN's 3,277 fit tokens against its 4,545 unknowns: half the work).
    """

    def __init__(self, x: np.ndarray, products: np.ndarray, miss: np.ndarray) -> None:
        self.x, self.products, self.miss, self._held = x, products, miss, None
        self.unknowns = x.shape[1] + 1
        self.dual = x.shape[0] < self.unknowns
        if self.dual:
            self.a = _design(x)
            self.mean_square = max(float(np.mean(np.square(self.a[:, :-1]))), 1e-30)
        else:
            x = np.asarray(x, dtype=np.float64)
            self.rhs = np.concatenate([x.T @ miss, miss.sum(axis=0, keepdims=True)], axis=0)  # AᵀM
            tokens = max(float(products[-1, -1]), 1.0)  # the bias column's sum of ones
            self.mean_square = max(float(np.mean(np.diag(products)[:-1])) / tokens, 1e-30)

    def _rho(self, ridge: float) -> float:
        return ridge * self.unknowns * self.mean_square

    def _system(self, ridge: float) -> np.ndarray:
        """``AAᵀ + ρI`` (the kernel form) or ``AᵀA + ρI``."""
        system = self.products.copy()
        system[np.diag_indices_from(system)] += self._rho(ridge)
        return system

    def correction(self, ridge: float) -> tuple[np.ndarray, np.ndarray, float]:
        """``(ΔWf, Δbf)`` and the refitted fold's ``Σ‖A·(B0 + Δ) − target‖²`` on the fit tokens (in the kernel
        form ``M − AAᵀ(AAᵀ + ρI)⁻¹M = ρ(AAᵀ + ρI)⁻¹M``, without a product)."""
        system = self._system(ridge)
        if self.dual:
            u = _solve_positive(system, self.miss)
            rho = self._rho(ridge)
            u_x = u.astype(self.x.dtype, copy=False)  # the d × n × d product in the tokens' precision
            delta = -np.concatenate([self.x.T @ u_x, u.sum(axis=0, keepdims=True)], axis=0)
            return delta[:-1], delta[-1], rho * rho * float(np.square(u).sum())
        delta = -_solve_positive(system, self.rhs)
        return delta[:-1], delta[-1], float(np.square(self.miss + _design(self.x) @ delta).sum())

    def predict(self, x: np.ndarray, ridge: float) -> np.ndarray:
        """``[x 1]·Δ``, how the refit moves the outputs of tokens ``x``, without forming ``Δ`` where that is
        cheaper: for fewer tokens than outputs, ``[x 1]·S⁻¹·AᵀM = (S⁻¹·[x 1]ᵀ)ᵀ·AᵀM`` (S symmetric) solves for the
        tokens instead of the outputs (a 7B FFN's 819 held-out tokens against its 4,544 outputs: a third of the
        work); in the kernel form ``−((AAᵀ + ρI)⁻¹·A·[x 1]ᵀ)ᵀ·M``, its ridge-free product kept for the next
        ridge."""
        system = self._system(ridge)
        if self.dual:
            if self._held is None or self._held[0] is not x:
                self._held = (x, self.a @ _design(x).T)
            solved = _solve_positive(system, self._held[1])
            return -(solved.T.astype(self.miss.dtype, copy=False) @ self.miss)
        a = _design(x)
        if a.shape[0] >= self.rhs.shape[1]:
            return -(a @ _solve_positive(system, self.rhs))
        return -(_solve_positive(system, a.T).T @ self.rhs)
