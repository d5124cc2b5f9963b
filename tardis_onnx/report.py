"""Honest accounting of what the pass did: per-FFN rows, totals, the printed table (docs/design.md §2)."""

from __future__ import annotations

import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tardis_onnx.predictor import Predictor, matmul_weight_bytes
from tardis_onnx.speed import CLEAR_MARGIN
from tardis_onnx.tables import text_table

if TYPE_CHECKING:
    from tardis_onnx.calibrate import Calibration
    from tardis_onnx.passes import FfnMatch


@dataclass
class FfnReport:
    """One folded FFN. Bytes are FFN weight bytes in the model's dtype.

    dense_bytes: W1 + W2 (what the original reads per token), quantized under ``--quantize`` (int8: a byte a
        weight; int4: half a byte and a scale in the model's dtype per 32 weights).
    fold_bytes: the folded matrix (likewise).
    outlier_fraction: true outliers (pre-activation outside the window) on the calibration tokens.
    predictor, flagged_fraction, recall: the predictor, the fraction of neurons it flags (what the
        fallback reads rows for) and the share of true outliers among them, on the calibration tokens.
    fallback_read_bytes: fold + flagged fraction × (W1 + W2), or × W2 alone where the residual is taken
        from the prediction (int8): reads without the predictor.
    predictor_bytes: what predicting the outliers reads (the exact predictor reads all of W1).
    storage_bytes: every initializer the rewritten FFN stores.
    calibration_error, heldout_error: ``Σ‖ŷ − y‖² / Σ‖y − ȳ‖²`` of the rewritten FFN (exact outlier set)
        on the fit tokens and on the held-out calibration tokens (None without held-out tokens).
    recipe: what the held-out check kept ("plain", "least-error/layer+refit", ...).
    speedups: per serving shape ("1x32"), the original FFN's time over the rewrite's in ONNX Runtime
        on this machine (empty when not timed).
    kept_original: the rewrite ran slower at some shape, so the original FFN stays in the model (its
        bytes are then counted as dense, its predictor as nothing).
    timing_of: the FFN whose timing (``speedups``) this one took, its twin in shapes, nodes and serving
        shapes whose verdict holds for it (:class:`tardis_onnx.speed.TimingCache`); None when timed itself.
    Flag rate and recall are measured on the held-out tokens when there are any.
    """

    name: str
    gelu: str
    d: int
    hidden: int
    coverage: float
    outlier_fraction: float
    calibration_tokens: int
    dense_bytes: int
    fold_bytes: int
    fallback_read_bytes: int
    predictor_bytes: int
    storage_bytes: int
    predictor: str = "exact"
    flagged_fraction: float = 0.0
    recall: float = 1.0
    calibration_error: float | None = None
    heldout_error: float | None = None
    recipe: str = "plain"
    speedups: dict[str, float] = field(default_factory=dict)
    kept_original: bool = False
    timing_of: str | None = None

    def kept(self) -> FfnReport:
        """This row for an FFN left as it was: it reads and stores the dense weights."""
        return replace(
            self,
            kept_original=True,
            fold_bytes=0,
            fallback_read_bytes=self.dense_bytes,
            predictor_bytes=0,
            storage_bytes=self.dense_bytes,
        )

    def slowest(self) -> tuple[str, float]:
        """The serving shape where the rewrite gains least, and its speedup (("-", nan) untimed)."""
        return min(self.speedups.items(), key=lambda item: item[1]) if self.speedups else ("-", float("nan"))

    @classmethod
    def of(
        cls,
        ffn: FfnMatch,
        result: Calibration,
        stored_bytes: int,
        predictor: Predictor,
        flagged_fraction: float,
        recall: float,
        quantize: str = "none",
        quantized_in_op: bool = False,
    ) -> FfnReport:
        """``stored_bytes``: the rewrite's initializers'. ``quantize="int8"`` or ``"int4"``: the MatMuls run
        quantized, so the original FFN and the fold count as their quantized weights
        (:func:`~tardis_onnx.predictor.matmul_weight_bytes`); ``quantized_in_op``: the rewrite was emitted quantized
        (its fold quantized and its fallback rows int8 in ``stored_bytes``), else its fold is quantized afterwards
        and the fallback op's rows stay in the model's dtype."""
        item = np.dtype(ffn.dtype).itemsize
        d, h = ffn.w1_stored.shape
        d_out = ffn.w2_stored.shape[1]
        dense = matmul_weight_bytes(d, h, quantize, item) + matmul_weight_bytes(h, d_out, quantize, item)
        fold = matmul_weight_bytes(d, d_out, quantize, item)
        rows = ffn.w2_stored.size if predictor.residual_from_prediction else ffn.w1_stored.size + ffn.w2_stored.size
        rows *= 1 if quantized_in_op else item  # the flagged neurons' rows read
        stored = stored_bytes if quantized_in_op else stored_bytes - (d * d_out * item - fold)
        return cls(
            name=ffn.name,
            gelu=ffn.gelu.spelling,
            d=d,
            hidden=h,
            coverage=result.coverage,
            outlier_fraction=result.outlier_fraction,
            calibration_tokens=result.tokens,
            dense_bytes=dense,
            fold_bytes=fold,
            fallback_read_bytes=int(fold + flagged_fraction * rows),
            predictor_bytes=predictor.read_bytes(d, h, item),
            predictor=predictor.kind + (f"-{predictor.rank}" if predictor.rank else ""),
            flagged_fraction=flagged_fraction,
            recall=recall,
            storage_bytes=stored,
            calibration_error=getattr(result, "calibration_error", None),
            heldout_error=getattr(result, "heldout_error", None),
            recipe=getattr(result, "recipe", "plain"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def totals(rows: list[FfnReport]) -> dict:
        dense = sum(r.dense_bytes for r in rows)
        fallback = sum(r.fallback_read_bytes for r in rows)
        predictor = sum(r.predictor_bytes for r in rows)
        storage = sum(r.storage_bytes for r in rows)
        return {
            "ffns": sum(not r.kept_original for r in rows),
            "kept_original": sum(r.kept_original for r in rows),
            "dense_bytes": dense,
            "fallback_read_bytes": fallback,
            "total_read_bytes": fallback + predictor,
            "storage_bytes": storage,
            "fallback_reduction": 1 - fallback / dense if dense else 0.0,
            "total_read_reduction": 1 - (fallback + predictor) / dense if dense else 0.0,
        }


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def speedup_text(speedup: float) -> str:
    """``1.23×``, rounded down: a rewrite measured 0.998× reads 0.99×, never 1.00×."""
    return f"{math.floor(speedup * 100) / 100:.2f}×"


def _speed(row: FfnReport) -> str:
    """The least speedup over the serving shapes, ``*`` where a twin FFN's timing stands for it, and "kept"
    where the original stays."""
    if not row.speedups:
        return "-"
    shape, speedup = row.slowest()
    return f"{speedup_text(speedup)} @{shape}" + ("*" if row.timing_of else "") + (" kept" if row.kept_original else "")


def print_report(result, output: Path, report_path: Path) -> None:
    """The warnings (stderr), then the per-FFN table, refusals and totals, as a person reads them."""
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    header = (
        "FFN",
        "GELU",
        "d→h",
        "recipe",
        "coverage",
        "held-out err",
        "outliers",
        "predictor",
        "flagged",
        "recall",
        "dense MiB",
        "read MiB",
        "+predictor",
        "stored MiB",
        "speed",
    )
    rows = [
        (
            r.name,
            r.gelu,
            f"{r.d}→{r.hidden}",
            r.recipe,
            f"{r.coverage:.3g}",
            "-" if r.heldout_error is None else f"{r.heldout_error:.4f}",
            f"{r.outlier_fraction:.3f}",
            r.predictor,
            f"{r.flagged_fraction:.3f}",
            f"{r.recall:.3f}",
            _mib(r.dense_bytes),
            _mib(r.fallback_read_bytes),
            _mib(r.fallback_read_bytes + r.predictor_bytes),
            _mib(r.storage_bytes),
            _speed(r),
        )
        for r in result.ffns
    ]
    print("\n".join(text_table(header, rows)))
    twins = sum(r.timing_of is not None for r in result.ffns)
    if twins:
        print(
            f"* {twins} FFN(s) took the timing of a twin timed before them (same weight shapes, nodes and serving "
            f"shapes; a loss, or a win by {CLEAR_MARGIN}× at its flag rate)"
        )
    for refusal in result.refusals:
        print(f"unchanged: {refusal.name}: {refusal.reason} [{refusal.rule}]")
    t = FfnReport.totals(result.ffns)
    kinds = Counter(r.predictor for r in result.ffns if not r.kept_original)
    predictors = ", ".join(f"{kind} ×{count}" for kind, count in kinds.most_common())
    predictors += "; " if predictors else ""  # none where every FFN was kept
    c = result.calibration
    if c:
        print(
            f"calibrated on {c['source']}: {c['tokens']} tokens, {c['fit_tokens_per_ffn']} fit and "
            f"{c['heldout_tokens_per_ffn']} held out per FFN"
            + (f", {c['skipped_tokens']} skipped (not finite)" if c.get("skipped_tokens") else "")
        )
    kept = f" (kept {t['kept_original']} as they were: slower rewritten)" if t["kept_original"] else ""
    print(
        f"folded {t['ffns']} FFN(s){kept}, fallback '{result.fallback}': FFN weights read per token "
        f"{1 - t['fallback_reduction']:.1%} of dense without the predictor "
        f"(reduction {t['fallback_reduction']:.1%}), {1 - t['total_read_reduction']:.1%} with the "
        f"predictors ({predictors}reduction {t['total_read_reduction']:.1%}); "
        f"stored {_mib(t['storage_bytes'])} MiB vs {_mib(t['dense_bytes'])} MiB dense"
    )
    print(f"took {result.elapsed_s:.1f} s, peak memory {result.peak_rss_mib:.0f} MiB")
    print(f"wrote {output} and {report_path}")
