"""Calibrate: run the original model, keep a bounded sample of each FFN's inputs and outputs, fit windows and
lines.

Memory bound (explicit, :func:`reservoir_bytes`): each FFN keeps a uniform reservoir of at most
``max_samples`` tokens: the input rows ``x`` and the output rows ``y`` the model computed from them (float32, or
float16 as an fp16 model computes them; ``d + d_out`` values a token, plus two 8-byte sort keys), so capture
holds at most ``Σ_FFN max_samples · (4·(d + d_out) + 16)`` bytes however many tokens stream by; a large model's
reservoirs (:func:`is_large`) keep their rows in files in a temporary folder (``$TMPDIR``) instead, 16 bytes a
token in memory. Storing ``x`` instead of ``z = x·W1 + b1`` is 4× smaller for ``h = 4d``: an FFN's ``z``
(:class:`FfnTokens`; ``n × h`` in the FFN's precision: 0.3 GB in float32 at 4096 tokens of a 7B FFN) is computed
when that FFN is fitted, once for its windows, folds and predictors; its true outputs come from the model (at
7B, the ``n·h·d`` product they would cost is the model's own). With ``max_samples`` at least the number of
calibration tokens every token is kept and the statistics equal the exact reference.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx import budget, parallel, reference
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import ffn_tensor
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import Feeds
from tardis_onnx.io import release
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.session import create_session, run_session
from tardis_onnx.subgraphs import expose, prune

# The refit's ridge, in pseudo-tokens per input dimension: the grid the held-out tokens choose from,
# and the value used when there are none.
REFIT_RIDGES = (1e-3, 1e-2, 0.1, 1.0, 10.0)
DEFAULT_REFIT_RIDGE = 0.1
# The refit of a d-input FFN solves d + 1 unknowns per output: trusted from this many fit tokens each.
REFIT_TOKENS_PER_UNKNOWN = 10


@dataclass
class Calibration:
    """Per FFN: the fitted lines and the measured outlier fraction on the fit tokens.

    coverage: the (mean) coverage of the neurons' windows; fold: the kept ``(Wf, bf)``, refitted or plain
    (computed once: at d = 4544, h = 18176 a fold is d²h multiply-adds; ``None`` only when built by hand);
    calibration_error and heldout_error: ``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` of the rewritten FFN with the exact
    outlier set on the fit tokens and on the held-out tokens (None without any); recipe: what was kept
    ("plain", "least-error/layer", "least-error/layer+refit", ...); refit_ridge: the refit's ridge when
    refitted.
    """

    lines: reference.NeuronLines
    outlier_fraction: float
    tokens: int
    coverage: float | None = None
    fold: tuple[np.ndarray, np.ndarray] | None = None
    calibration_error: float | None = None
    heldout_error: float | None = None
    heldout_tokens: int = 0
    recipe: str = "plain"
    refit_ridge: float | None = None


class SampleReservoir:
    """A uniform random subsample of at most ``capacity`` rows from a stream (memory ``capacity × (4·width + 8)``;
    ``2·width + 8`` for float16 rows, kept as they are: lossless). With ``spill``, the rows go to that file
    instead of memory (8 bytes a row stay: the keys): a large model's reservoirs; :meth:`kept` maps them back."""

    def __init__(self, capacity: int, seed: int = 0, dtype: np.dtype = np.float32, spill: Path | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.keys = np.empty(0)
        self.seen = 0
        self.spill, self.width = spill, None

    def add(self, rows: np.ndarray) -> None:
        self.seen += rows.shape[0]
        keys = self.rng.random(rows.shape[0])
        rows = rows.astype(self.dtype)
        if self.spill is not None:
            self._append(rows, keys)
            return
        if self.rows is not None:
            rows = np.concatenate([self.rows, rows])
            keys = np.concatenate([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = np.sort(np.argpartition(keys, self.capacity - 1)[: self.capacity])
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def _append(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """Rows appended to the spill file; past twice the capacity, the file keeps the ``capacity`` least keys
        (which rows a reservoir keeps does not depend on when it drops the others)."""
        self.width = rows.shape[1]
        with open(self.spill, "ab") as file:
            file.write(np.ascontiguousarray(rows).tobytes())
        self.keys = np.concatenate([self.keys, keys])
        if self.keys.size >= 2 * self.capacity:
            self._drop_extra()

    def _drop_extra(self) -> None:
        keep = np.sort(np.argpartition(self.keys, self.capacity - 1)[: self.capacity])
        staged = self.spill.with_suffix(".kept")
        np.asarray(self._mapped()[keep]).tofile(staged)
        staged.replace(self.spill)
        self.keys = self.keys[keep]

    def _mapped(self) -> np.ndarray:
        return np.memmap(self.spill, dtype=self.dtype, mode="r", shape=(self.keys.size, self.width))

    def kept(self) -> np.ndarray | None:
        """The rows kept, in stream order (memory-mapped from the spill file when spilled); None before any."""
        if self.spill is None or self.keys.size == 0:
            return self.rows
        if self.keys.size > self.capacity:
            self._drop_extra()
        return self._mapped()

    @property
    def nbytes(self) -> int:
        return (0 if self.rows is None else self.rows.nbytes) + self.keys.nbytes

    def samples(self) -> np.ndarray:
        rows = self.kept()
        if rows is None:
            raise ValueError("no calibration samples were captured")
        return rows.astype(np.float64)


@dataclass
class FfnSamples:
    """The kept calibration inputs ``x: [n, d]`` (float32; float16 for an fp16 FFN) of one FFN, its outputs ``y``
    at them as the model computed them, and how many tokens streamed by.

    Candidate tables (the costly part of budgets) are cached here, so one capture serves many configs.
    """

    name: str
    x: np.ndarray
    y: np.ndarray  # the model's outputs of the FFN at those tokens (``[n, d_out]``, as ``x`` is kept)
    seen: int
    tables: dict = field(default_factory=dict)
    store: object = None  # what ``x`` is mapped from, kept while it is (a large model's spilled reservoir)

    def release(self) -> None:
        """Drop the fit and held-out copies (:meth:`split`) and ``x``'s mapped pages: a large FFN, once folded."""
        for key in [k for k in self.tables if k[0] == "split"]:
            del self.tables[key]
        release(self.x)
        release(self.y)

    def split(self, holdout: float, seed: int = 0) -> tuple[FfnSamples, FfnSamples | None]:
        """The fit tokens and the held-out ones (a random ``holdout`` fraction; None when that is no
        token or would leave no fit token). Cached, so each part's candidate tables are computed once."""
        key = ("split", holdout, seed)
        if key not in self.tables:
            n = self.x.shape[0]
            held = int(round(holdout * n))
            if held == 0 or held >= n:
                self.tables[key] = (self, None)
            else:
                order = np.random.default_rng(seed).permutation(n)
                fit_rows, held_rows = np.sort(order[held:]), np.sort(order[:held])
                self.tables[key] = (
                    FfnSamples(self.name, self.x[fit_rows], self.y[fit_rows], self.seen),
                    FfnSamples(self.name, self.x[held_rows], self.y[held_rows], self.seen),
                )
        return self.tables[key]

    def preactivations(self, ffn: FfnMatch, rows: slice | None = None) -> np.ndarray:
        """``z = x·W1 + b1`` (float64) of the kept tokens (or the ``rows`` slice of them)."""
        x = np.asarray(self.x if rows is None else self.x[rows], dtype=np.float64)
        z = x @ ffn.w1
        return z if ffn.b1 is None else z + ffn.b1

    def lazy_preactivations(self, ffn: FfnMatch) -> _LazyPreactivations:
        return _LazyPreactivations(self.x, ffn.w1, ffn.b1)

    def tables_of(
        self, ffn: FfnMatch, specs: list[tuple[tuple[float, ...], str]], z: np.ndarray | None = None
    ) -> list[budget.CandidateTable]:
        """The candidate windows of every neuron (:func:`budget.candidate_table`) for each ``(grid, window)`` of
        ``specs``, cached; those not cached made from one sort of ``z``, the kept tokens' pre-activations when
        known (else computed a block of neurons at a time); a large FFN's (fitted alone) on every thread."""
        keys = [(tuple(grid), ffn.gelu.form, window) for grid, window in specs]
        missing = [(key[0], key[2]) for key in dict.fromkeys(keys) if key not in self.tables]
        if missing:
            source = self.lazy_preactivations(ffn) if z is None else z
            threads = parallel.threads() if ffn.large else 1
            made = budget.candidate_tables(source, missing, ffn.gelu.form, threads)
            for (grid, window), table in zip(missing, made, strict=True):
                self.tables[(grid, ffn.gelu.form, window)] = table
        return [self.tables[key] for key in keys]


class _LazyPreactivations:
    """``z[:, cols]`` computed on demand from ``x``: candidate tables read one block of neurons at a time."""

    def __init__(self, x: np.ndarray, w1: np.ndarray, b1: np.ndarray | None) -> None:
        self.x, self.w1, self.b1 = x, w1, b1
        self.shape = (x.shape[0], w1.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key
        z = np.asarray(self.x[rows], dtype=self.w1.dtype) @ self.w1[:, cols]
        return z if self.b1 is None else z + self.b1[cols]


@dataclass
class CaptureStats:
    """What calibration saw: batches, real (non-padding) tokens, tokens skipped for non-finite values."""

    batches: int = 0
    tokens: int = 0
    skipped_tokens: int = 0


@dataclass
class CalibrationData:
    """Calibration feeds (see :func:`iterate_feeds`) and where they come from, for the report."""

    feeds: object
    source: str

    def __iter__(self):
        return iter(iterate_feeds(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)


def iterate_feeds(source) -> Iterable[Feeds]:
    """Feed dicts from a list or any iterable of them, or from an ONNX Runtime ``CalibrationDataReader``
    (anything with ``get_next()`` returning a dict, then None), as Optimum and ORT quantization use."""
    if hasattr(source, "get_next"):
        return iter(source.get_next, None)
    if isinstance(source, dict):
        raise TardisError("calibration must be an iterable of feed dicts (got one dict: wrap it in a list)")
    try:
        return iter(source)
    except TypeError:
        raise TardisError(
            f"calibration must be an iterable of feed dicts or a CalibrationDataReader, got {type(source).__name__}"
        ) from None


def capture_ffn_inputs(
    model: onnx.ModelProto,
    ffns: list[FfnMatch],
    feeds,
    max_samples: int,
    seed: int = 0,
    stats: CaptureStats | None = None,
    progress=None,
    weights_dir=None,
) -> list[FfnSamples]:
    """Each FFN's inputs and outputs over ``feeds`` (padding tokens dropped), a uniform reservoir of
    ``max_samples`` tokens (the outputs' reservoir draws the inputs' keys: it keeps the same tokens).

    ``feeds``: see :func:`iterate_feeds`. Tokens whose FFN input or output holds a non-finite value are skipped and
    counted in ``stats``; ``progress`` (a callable taking a count) is told of each batch. ``weights_dir``:
    where a graph-only ``model`` keeps its external data (ONNX Runtime maps it from there).
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_inputs = {i.name for i in probe.graph.input}
    sources = [_probe_outputs(probe, ffn) for ffn in ffns]
    names = sorted({name for source in sources for part in source for name in part} - graph_inputs)
    prune(probe.graph, names)  # the model's own outputs (an LM head's logits) are not computed
    session = create_session(probe, weights_dir=weights_dir) if names else None
    stats = stats if stats is not None else CaptureStats()
    # A large model's reservoirs (32 × 4,096 tokens × (4,544 + 4,544) fp16 at 7B: 2.4 GB) go to files, not memory.
    store = tempfile.TemporaryDirectory(prefix="tardis-calibration-") if is_large(ffns) else None
    reservoirs = [
        tuple(
            SampleReservoir(
                max_samples, seed + i, _row_dtype(f), None if store is None else Path(store.name) / f"{i}{part}"
            )
            for part in (".x", ".y")
        )
        for i, f in enumerate(ffns)
    ]
    for batch in iterate_feeds(feeds):
        if not isinstance(batch, dict):
            raise TardisError(
                f"calibration batch {stats.batches}: expected a dict of input arrays, got {type(batch).__name__}"
            )
        values = (
            dict(zip(names, run_session(session, names, batch, "the model on the calibration data"), strict=True))
            if names
            else {}
        )
        keep = _real_tokens(batch)
        rows_per_ffn = []
        finite = None
        for ffn, source in zip(ffns, sources, strict=True):
            rows = []
            for names_of_part, width in zip(source, (ffn.w1_stored.shape[0], ffn.w2_stored.shape[1]), strict=True):
                parts = [np.asarray(batch[s] if s in graph_inputs else values[s]) for s in names_of_part]
                rows.append(np.concatenate([p.reshape(-1, width) for p in parts]))
                if keep is not None and keep.size == rows[-1].shape[0]:
                    rows[-1] = rows[-1][keep]
            ok = np.isfinite(rows[0]).all(axis=1) & np.isfinite(rows[1]).all(axis=1)
            finite = ok if finite is None or finite.shape != ok.shape else finite & ok
            rows_per_ffn.append((rows, ok))
        for (rows, ok), pair in zip(rows_per_ffn, reservoirs, strict=True):
            taken = finite if finite.shape == ok.shape else ok  # finite for every FFN, where their tokens align
            for part, reservoir in zip(rows, pair, strict=True):
                reservoir.add(part[taken])
        stats.batches += 1
        stats.tokens += int(finite.size)
        stats.skipped_tokens += int(finite.size - finite.sum())
        if progress is not None:
            progress(1)
    if stats.batches == 0:
        raise TardisError("the calibration data holds no batch")
    kept = [(x.kept(), y.kept()) for x, y in reservoirs]
    for ffn, (rows, _) in zip(ffns, kept, strict=True):
        if rows is None or rows.shape[0] == 0:
            why = (
                "all non-finite" if stats.skipped_tokens else "its subgraph never ran?" if ffn.scope else "all padding?"
            )
            raise TardisError(f"no calibration token reached FFN {ffn.name} ({why})")
    return [
        FfnSamples(f.name, x, y, r.seen, store=store) for f, (x, y), (r, _) in zip(ffns, kept, reservoirs, strict=True)
    ]


def _row_dtype(ffn: FfnMatch) -> np.dtype:
    """How a reservoir keeps an FFN's inputs: float16 ones as they are, others as float32."""
    return np.dtype(np.float16) if np.dtype(ffn.dtype) == np.float16 else np.dtype(np.float32)


def reservoir_bytes(ffns: list[FfnMatch], max_samples: int) -> int:
    """The most memory the reservoirs of :func:`capture_ffn_inputs` can hold, however long calibration runs."""
    return sum(
        max_samples * (_row_dtype(f).itemsize * (f.w1_stored.shape[0] + f.w2_stored.shape[1]) + 16) for f in ffns
    )


def _probe_outputs(probe: onnx.ModelProto, ffn: FfnMatch) -> tuple[list[str], list[str]]:
    """In place: each site's input and output of ``ffn`` as outputs of ``probe``; their names (a main-graph input:
    its own)."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(ffn.dtype))

    def exposed(value: str, width: int, label: str) -> list[str]:
        return [
            expose(probe, s.scope, getattr(s, value), elem, width, ffn_tensor(ffn.name, f"{label}/{i}"))
            for i, s in enumerate(ffn.sites)
        ]

    return exposed("x", ffn.w1_stored.shape[0], "Probe"), exposed("output", ffn.w2_stored.shape[1], "ProbeOutput")


def fallback_budgets(ffns: list[FfnMatch], config: TardisConfig) -> list[float]:
    """Allowed outlier fraction per FFN: from ``target_reduction`` (docs/design.md §2) or ``1 − coverage``.

    The default target (none given) gives an FFN too narrow for it the budget it gives an ``h = 4d`` FFN.
    """
    if config.target_reduction is None:
        return [1.0 - config.coverage] * len(ffns)
    budgets = []
    for f in ffns:
        try:
            budgets.append(budget.fallback_budget(config.target_reduction, *f.w1_stored.shape, f.w2_stored.shape[1]))
        except ValueError as exc:
            if not config.default_target:
                raise TardisError(str(exc)) from None
            budgets.append(budget.fallback_budget(config.target_reduction, 1, 4, 1))
    return budgets


@dataclass
class Candidate:
    """One recipe's windows for one FFN, with the coverage they hold on average."""

    recipe: str
    lines: reference.NeuronLines
    coverage: float


def is_large(ffns: list[FfnMatch]) -> bool:
    """True when an FFN is large (:attr:`FfnMatch.large`): then each is fitted alone, when asked for (its
    weights and pre-activations exist for one FFN at once; BLAS uses every core)."""
    return any(f.large for f in ffns)


@dataclass
class PlannedWindows:
    """One FFN's windows before the allocation: the recipe's (uniform: its lines and coverage; allocated: the
    candidate table and each neuron's importance ``‖W2[i,:]‖²``) and, when compared, the plain recipe's."""

    recipe: tuple | budget.CandidateTable
    importance: np.ndarray | None
    plain: tuple | None


def plan_windows(
    ffn: FfnMatch, fit: FfnSamples, outlier_budget: float, config: TardisConfig, z: np.ndarray | None = None
) -> PlannedWindows:
    """The windows one FFN's recipe may choose from, on its fit tokens (``z``: their pre-activations when
    known, else computed a block of neurons at a time)."""
    coverage = 1.0 - outlier_budget
    compared = not config.plain and config.holdout > 0
    recipe_grid = (coverage,) if config.allocation == "uniform" else tuple(config.coverage_grid)
    specs = [(recipe_grid, config.window)] + ([((coverage,), "narrowest")] if compared else [])
    tables = fit.tables_of(ffn, specs, z)  # one sort of each neuron's pre-activations for both
    if config.allocation == "uniform":
        recipe, importance = _uniform_lines(ffn, tables[0], coverage), None
    else:
        recipe, importance = tables[0], (ffn.w2 * ffn.w2).sum(axis=1)
    plain = _uniform_lines(ffn, tables[1], coverage) if compared else None
    return PlannedWindows(recipe, importance, plain)


def window_candidates(
    planned: list[PlannedWindows], ffns: list[FfnMatch], budgets: list[float], config: TardisConfig
) -> list[list[Candidate]]:
    """Per FFN, the recipe's windows (allocated under the budgets: per FFN, or with ``global`` allocation
    across all of ``ffns``) and the plain recipe's when planned, for :func:`fold_best` to choose from."""
    if config.allocation == "uniform":
        candidates = [[Candidate(_recipe_name(config), *p.recipe)] for p in planned]
    else:
        tables = [p.recipe for p in planned]
        weights = [float(f.w1_stored.size + f.w2_stored.size) for f in ffns]
        choices = budget.allocate(tables, [p.importance for p in planned], budgets, weights, config.allocation)
        candidates = [
            [Candidate(_recipe_name(config), table.lines(choice), float(table.grid[choice].mean()))]
            for table, choice in zip(tables, choices, strict=True)
        ]
    for row, p in zip(candidates, planned, strict=True):
        if p.plain is not None:
            row.append(Candidate("plain", *p.plain))
    return candidates


def _recipe_name(config: TardisConfig) -> str:
    return "plain" if config.plain else f"{config.window}/{config.allocation}"


def _uniform_lines(ffn: FfnMatch, table: budget.CandidateTable, coverage: float):
    """The lines and coverage of a one-coverage ``table``."""
    return table.lines(np.zeros(ffn.hidden, dtype=np.int64)), coverage


class FfnTokens:
    """One FFN's tokens in its precision (float64; float32 for a large FFN), with what every candidate's fold is
    measured against: the pre-activations ``z = x·W1 + b1`` (computed once, ``n × h``, shared with the windows
    and the predictors), the true outputs ``y`` (the model's, captured with the inputs) and their spread
    ``Σ‖y − ȳ‖²``."""

    def __init__(self, ffn: FfnMatch, samples: FfnSamples) -> None:
        self.ffn = ffn
        self.x = np.asarray(samples.x, dtype=ffn.precision)
        self.z = self.x @ ffn.w1
        if ffn.b1 is not None:
            self.z += ffn.b1
        self.y = np.asarray(samples.y, dtype=ffn.precision)
        n = self.y.shape[0]
        y_sum = self.y.sum(axis=0, dtype=np.float64)
        y_sq = float(np.square(self.y).sum(dtype=np.float64))
        self.spread = y_sq - float((y_sum * y_sum).sum()) / n if n else 0.0

    def _blocks(self) -> Iterator[slice]:
        step = max(1, (1 << 22) // max(self.ffn.hidden, 1))
        return (slice(start, start + step) for start in range(0, self.x.shape[0], step))

    def miss(self, lines: reference.NeuronLines) -> np.ndarray:
        """By how much the plain fold of ``lines`` misses its target on these tokens (the true output minus the
        exact fallback term), ``x·Wf + bf − target = (line(z) − GELU(z))·W2`` over the pre-activations inside
        their windows (outside, the fallback is exact), without forming the fold (``n·h·d`` operations instead of
        the fold's ``d·h·d``)."""
        ffn, precision = self.ffn, self.ffn.precision
        miss = np.empty((self.x.shape[0], ffn.w2_stored.shape[1]), dtype=precision)

        def inside(z: np.ndarray, g: np.ndarray) -> np.ndarray:  # line(z) − GELU(z) inside the windows, 0 outside
            return np.where(reference.outside_window(z, lines), 0.0, reference.line(z, lines, precision) - g)

        for rows in self._blocks():
            miss[rows] = ffn.times_w2(parallel.map_rows(inside, self.z[rows], self.gelu[rows]))
        return miss

    @functools.cached_property
    def gelu(self) -> np.ndarray:
        """``GELU(z)``, once for every candidate's miss."""
        return reference.gelu(self.z, self.ffn.gelu.form, self.ffn.precision)

    def error(self, miss: np.ndarray) -> float:
        """``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` of a fold whose outputs miss the target (the true output with the exact
        outlier set) by ``miss``."""
        return self.relative(float(np.square(miss).sum()))

    def relative(self, error: float) -> float:
        """A squared error over these tokens relative to the spread of their true outputs (NaN without tokens)."""
        if self.x.shape[0] == 0:
            return math.nan
        return error / self.spread if self.spread > 0 else 0.0


def fold_best(
    ffn: FfnMatch, fit: FfnTokens, heldout: FfnTokens | None, candidates: list[Candidate], config: TardisConfig
) -> Calibration:
    """Fold each candidate's windows (plainly, and refitted when asked) and keep the least held-out error,
    each measured from the plain fold's miss (:meth:`FfnTokens.miss`, and the refit's correction of it) without
    forming a fold; the kept one is formed once."""
    products = None  # the fit tokens' Gram matrix (or kernel), shared by every candidate's refit
    best = None  # (candidate, recipe, ridge, refit, held-out error): only the best is kept
    for candidate in candidates:
        refit, ridges = None, ()
        held_miss = None if heldout is None else heldout.miss(candidate.lines)
        if config.refit and candidate.recipe != "plain":
            chosen_ridge = config.refit_ridge if config.refit_ridge is not None else DEFAULT_REFIT_RIDGE
            ridges = REFIT_RIDGES if config.refit_ridge is None and heldout is not None else (chosen_ridge,)
            products = budget.token_products(fit.x) if products is None else products
            refit = budget.Refit(fit.x, products, fit.miss(candidate.lines))
        for ridge in (None, *ridges):
            if heldout is None:
                held = math.nan
            elif ridge is None:
                held = heldout.error(held_miss)
            else:
                held = heldout.error(held_miss + refit.predict(heldout.x, ridge))
            recipe = candidate.recipe + ("" if ridge is None else "+refit")
            # Without held-out tokens the recipe asked for is taken as it is (refitted when the refit is on).
            if best is None or heldout is None or held < best[-1]:
                best = (candidate, recipe, ridge, refit, held)
    candidate, recipe, ridge, refit, held_error = best
    wf, bf = reference.fold(ffn.w1, ffn.b1, ffn.w2, ffn.b2, candidate.lines)
    outliers = int(reference.outside_window(fit.z, candidate.lines).sum())
    if ridge is not None:
        delta_w, delta_b, square = refit.correction(ridge)
        wf, bf, fit_error = wf + delta_w, bf + delta_b, fit.relative(square)
    else:
        fit_error = fit.error(refit.miss if refit is not None else fit.miss(candidate.lines))
    if not (np.isfinite(wf).all() and np.isfinite(bf).all()):
        raise TardisError(f"FFN {ffn.name}: the folded weights are not finite (non-finite weights or calibration?)")
    tokens = fit.x.shape[0]
    return Calibration(
        lines=candidate.lines,
        outlier_fraction=outliers / max(tokens * ffn.hidden, 1),
        tokens=tokens,
        coverage=candidate.coverage,
        fold=(wf, bf),
        calibration_error=fit_error,
        heldout_error=None if math.isnan(held_error) else held_error,
        heldout_tokens=0 if heldout is None else heldout.x.shape[0],
        recipe=recipe,
        refit_ridge=ridge,
    )


def _real_tokens(batch: Feeds) -> np.ndarray | None:
    """Flat boolean mask of non-padding tokens, from ``attention_mask`` when its shape allows."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None or ids is None or mask.shape != ids.shape:
        return None
    return mask.reshape(-1).astype(bool)
