"""Calibrate: run the original model, keep a bounded sample of each FFN's inputs, fit windows and lines.

Memory bound (explicit): each FFN keeps a uniform reservoir of at most ``max_samples`` input rows
``x`` (float32, ``d`` values each, plus an 8-byte sort key), so capture holds at most
``Σ_FFN max_samples · (4·d + 8)`` bytes however many tokens stream by; the pre-activations
``z = x·W1 + b1`` are recomputed from ``x`` a block of neurons (or tokens) at a time, never all at
once. Storing ``x`` instead of ``z`` is 4× smaller for ``h = 4d``. With ``max_samples`` at least the
number of calibration tokens every token is kept and the statistics equal the exact reference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import onnx

from tardis_onnx import budget, reference
from tardis_onnx.config import TardisConfig
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import Feeds
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.session import create_session


@dataclass
class Calibration:
    """Per FFN: the fitted lines and the measured outlier fraction on the calibration tokens.

    coverage: the (mean) coverage of the neurons' windows; fold: the refitted ``(Wf, bf)`` when the
    refit is on (else ``None``: the plain fold); calibration_error: ``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` of the
    rewritten FFN with the exact outlier set on the calibration tokens.
    """

    lines: reference.NeuronLines
    outlier_fraction: float
    tokens: int
    coverage: float | None = None
    fold: tuple[np.ndarray, np.ndarray] | None = None
    calibration_error: float | None = None


class SampleReservoir:
    """A uniform random subsample of at most ``capacity`` rows from a stream (memory ``capacity × (4·width + 8)``)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.keys = np.empty(0)
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        self.seen += rows.shape[0]
        keys = self.rng.random(rows.shape[0])
        rows = rows.astype(np.float32)
        if self.rows is not None:
            rows = np.concatenate([self.rows, rows])
            keys = np.concatenate([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = np.sort(np.argpartition(keys, self.capacity - 1)[: self.capacity])
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    @property
    def nbytes(self) -> int:
        return (0 if self.rows is None else self.rows.nbytes) + self.keys.nbytes

    def samples(self) -> np.ndarray:
        if self.rows is None:
            raise ValueError("no calibration samples were captured")
        return self.rows.astype(np.float64)


@dataclass
class FfnSamples:
    """The kept calibration inputs ``x: [n, d]`` (float32) of one FFN, and how many tokens streamed by.

    Candidate tables (the costly part of budgets) are cached here, so one capture serves many configs.
    """

    name: str
    x: np.ndarray
    seen: int
    tables: dict = field(default_factory=dict)

    def preactivations(self, ffn: FfnMatch, rows: slice | None = None) -> np.ndarray:
        """``z = x·W1 + b1`` (float64) of the kept tokens (or the ``rows`` slice of them)."""
        x = np.asarray(self.x if rows is None else self.x[rows], dtype=np.float64)
        z = x @ ffn.w1
        return z if ffn.b1 is None else z + ffn.b1

    def lazy_preactivations(self, ffn: FfnMatch) -> _LazyPreactivations:
        return _LazyPreactivations(self.x, ffn.w1, ffn.b1)

    def table(self, ffn: FfnMatch, grid: tuple[float, ...], window: str) -> budget.CandidateTable:
        key = (tuple(grid), ffn.gelu.form, window)
        if key not in self.tables:
            self.tables[key] = budget.candidate_table(self.lazy_preactivations(ffn), grid, ffn.gelu.form, window)
        return self.tables[key]


class _LazyPreactivations:
    """``z[:, cols]`` computed on demand from ``x``: candidate tables read one block of neurons at a time."""

    def __init__(self, x: np.ndarray, w1: np.ndarray, b1: np.ndarray | None) -> None:
        self.x, self.w1, self.b1 = x, w1, b1
        self.shape = (x.shape[0], w1.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key
        z = np.asarray(self.x[rows], dtype=np.float64) @ self.w1[:, cols]
        return z if self.b1 is None else z + self.b1[cols]


def capture_ffn_inputs(
    model: onnx.ModelProto, ffns: list[FfnMatch], feeds: Iterable[Feeds], max_samples: int, seed: int = 0
) -> list[FfnSamples]:
    """Each FFN's inputs over ``feeds`` (padding tokens dropped), a uniform reservoir of ``max_samples`` rows."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for ffn in ffns:
        if ffn.x not in existing and ffn.x not in graph_inputs:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ffn.dtype))
            probe.graph.output.append(onnx.helper.make_tensor_value_info(ffn.x, elem, None))
            existing.add(ffn.x)
    names = sorted({ffn.x for ffn in ffns} - graph_inputs)
    session = create_session(probe)
    reservoirs = [SampleReservoir(max_samples, seed + i) for i in range(len(ffns))]
    for batch in feeds:
        values = dict(zip(names, session.run(names, batch), strict=True)) if names else {}
        keep = _real_tokens(batch)
        for ffn, reservoir in zip(ffns, reservoirs, strict=True):
            value = batch[ffn.x] if ffn.x in graph_inputs else values[ffn.x]
            rows = value.reshape(-1, ffn.w1.shape[0])
            if keep is not None and keep.size == rows.shape[0]:
                rows = rows[keep]
            reservoir.add(rows)
    for reservoir in reservoirs:
        if reservoir.rows is None or reservoir.rows.shape[0] == 0:
            raise ValueError("no calibration tokens were captured (all padding?)")
    return [FfnSamples(f.name, r.rows, r.seen) for f, r in zip(ffns, reservoirs, strict=True)]


def fallback_budgets(ffns: list[FfnMatch], config: TardisConfig) -> list[float]:
    """Allowed outlier fraction per FFN: from ``target_reduction`` (DESIGN §2) or ``1 − coverage``."""
    if config.target_reduction is None:
        return [1.0 - config.coverage] * len(ffns)
    try:
        return [budget.fallback_budget(config.target_reduction, *f.w1.shape, f.w2.shape[1]) for f in ffns]
    except ValueError as exc:
        raise TardisError(str(exc)) from None


def calibrate_ffns(ffns: list[FfnMatch], samples: list[FfnSamples], config: TardisConfig) -> list[Calibration]:
    """Lines (and, with ``config.refit``, a refitted fold) for every FFN, meeting the config's budget."""
    for ffn, sample in zip(ffns, samples, strict=True):
        if ffn.name != sample.name:
            raise ValueError(f"calibration samples for {sample.name!r} given for FFN {ffn.name!r}")
    budgets = fallback_budgets(ffns, config)
    if config.allocation == "uniform":
        coverages = [1.0 - b for b in budgets]
        all_lines = _map(
            lambda fst: fst[1].table(fst[0], (fst[2],), config.window).lines(np.zeros(fst[0].hidden, dtype=np.int64)),
            list(zip(ffns, samples, coverages, strict=True)),
        )
    else:
        tables = _map(
            lambda fs: fs[1].table(fs[0], config.coverage_grid, config.window), list(zip(ffns, samples, strict=True))
        )
        importance = [(f.w2 * f.w2).sum(axis=1) for f in ffns]
        weights = [float(f.w1.size + f.w2.size) for f in ffns]
        choices = budget.allocate(tables, importance, budgets, weights, config.allocation)
        all_lines = [t.lines(c) for t, c in zip(tables, choices, strict=True)]
        coverages = [float(t.grid[c].mean()) for t, c in zip(tables, choices, strict=True)]
    return _map(lambda args: _finish(*args, config), list(zip(ffns, samples, all_lines, coverages, strict=True)))


def _map(function, items: list) -> list:
    """``[function(i) for i in items]`` on ``TARDIS_THREADS`` threads (default 2): numpy releases the GIL."""
    threads = int(os.environ.get("TARDIS_THREADS", "2"))
    if threads <= 1 or len(items) <= 1:
        return [function(i) for i in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


def _finish(
    ffn: FfnMatch, sample: FfnSamples, lines: reference.NeuronLines, coverage: float, config: TardisConfig
) -> Calibration:
    """Stream the kept tokens in blocks: outlier fraction, normal equations, error; refit when asked."""
    wf, bf = reference.fold(ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines)
    n = sample.x.shape[0]
    d_out = ffn.w2.shape[1]
    gram, cross, target_sq = np.zeros((wf.shape[0] + 1,) * 2), np.zeros((wf.shape[0] + 1, d_out)), 0.0
    outliers = 0
    y_sum, y_sq = np.zeros(d_out), 0.0
    step = max(1, (1 << 22) // ffn.hidden)
    for start in range(0, n, step):
        rows = slice(start, min(n, start + step))
        z = sample.preactivations(ffn, rows)
        outside = reference.outside_window(z, lines)
        outliers += int(outside.sum())
        g = reference.gelu(z, ffn.gelu.form)
        line = lines.slope * z + lines.intercept
        target = np.where(outside, line, g) @ ffn.w2  # true output minus the exact fallback term
        y = g @ ffn.w2
        if ffn.b2 is not None:
            target, y = target + ffn.b2, y + ffn.b2
        y_sum += y.sum(axis=0)
        y_sq += float((y * y).sum())
        g, c, t = budget.normal_equations(sample.x[rows], target)
        gram += g
        cross += c
        target_sq += t
    fold = None
    if config.refit:
        wf, bf = budget.refit_fold(gram, cross, wf, bf, config.refit_ridge)
        fold = (wf, bf)
    spread = y_sq - float((y_sum * y_sum).sum()) / n
    error = budget.squared_error(gram, cross, target_sq, wf, bf) / spread if spread > 0 else 0.0
    return Calibration(lines, outliers / (n * ffn.hidden), n, coverage, fold, error)


def _real_tokens(batch: Feeds) -> np.ndarray | None:
    """Flat boolean mask of non-padding tokens, from ``attention_mask`` when its shape allows."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None or ids is None or mask.shape != ids.shape:
        return None
    return mask.reshape(-1).astype(bool)
