"""Calibrate, the pass's third step: run the original model on the calibration data and keep each FFN's
inputs (a bounded reservoir per FFN, :func:`tardis_onnx.calibrate.capture_ffn_inputs`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from tqdm.auto import tqdm

from tardis_onnx.calibrate import (
    CalibrationData,
    CaptureStats,
    FfnSamples,
    capture_ffn_inputs,
    is_large,
    reservoir_bytes,
)
from tardis_onnx.config import TardisConfig
from tardis_onnx.feeds import random_feeds
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.stages import Stages, progress_bar

RANDOM_FEEDS_WARNING = (
    "calibrating on random inputs (no calibration data, and no tokenizer beside the model): accuracy will be "
    "poor; pass --calib builtin|TEXT_FILE|FEEDS.npz (with --tokenizer DIR when the tokenizer is elsewhere)"
)


@dataclass
class Captured:
    """Each FFN's kept inputs and outputs (in :func:`find_ffns` order), what calibration saw and where it came
    from, the reservoirs' bound (in memory, or for a large model in files), and warnings for the user."""

    samples: list[FfnSamples]
    stats: CaptureStats
    source: str
    bound_mib: float
    in_files: bool = False
    warnings: list[str] = field(default_factory=list)

    def summary(self, config: TardisConfig) -> dict:
        """The report's ``calibration`` entry."""
        samples, stats = self.samples, self.stats
        fit_tokens = [s.split(config.holdout, config.seed) for s in samples]
        return {
            "source": self.source,
            "batches": stats.batches,
            "tokens": stats.tokens or max(s.seen for s in samples),
            "skipped_tokens": stats.skipped_tokens,
            "kept_tokens_per_ffn": max(s.x.shape[0] for s in samples),
            "fit_tokens_per_ffn": max(f.x.shape[0] for f, _ in fit_tokens),
            "heldout_tokens_per_ffn": max((0 if h is None else h.x.shape[0]) for _, h in fit_tokens),
            "reservoir_bound_mib": round(self.bound_mib, 1),
            "reservoir_in_files": self.in_files,
        }


def capture(
    model: onnx.ModelProto,
    ffns: list[FfnMatch],
    config: TardisConfig,
    calibration,
    samples: list[FfnSamples] | None,
    stages: Stages,
    *,
    progress: bool = False,
    weights_dir: Path | None = None,
) -> Captured:
    """The inputs of ``ffns`` over ``calibration`` (see :func:`tardis_onnx.optimize.optimize_model`), timed
    in ``stages``; random feeds from the model's signature when there is none (with a warning); ``samples``
    given are kept."""
    bound_mib = reservoir_bytes(ffns, config.max_samples) / 2**20
    warnings: list[str] = []
    stats = CaptureStats()
    if samples is None:
        if calibration is None:
            calibration = CalibrationData(
                [
                    random_feeds(model, config.calib_batch, config.calib_sequence, seed=config.seed + i)
                    for i in range(config.calib_batches)
                ],
                f"random feeds ({config.calib_batches} batches of {config.calib_batch}×{config.calib_sequence})",
            )
            warnings.append(RANDOM_FEEDS_WARNING)
        if progress and sys.stderr.isatty():  # the bound is in the report too
            where = " (in files in a temporary folder: a large model's)" if is_large(ffns) else ""
            tqdm.write(
                f"calibration keeps at most {config.max_samples} tokens per FFN: {bound_mib:.0f} MiB{where}",
                file=sys.stderr,
            )
        with stages("calibrate"), progress_bar(progress, "calibrating", _length(calibration), "batch") as bar:
            samples = capture_ffn_inputs(
                model, ffns, calibration, config.max_samples, config.seed, stats, bar.update, weights_dir
            )
        if stats.skipped_tokens:
            skipped = stats.skipped_tokens
            warnings.append(f"skipped {skipped} calibration tokens whose FFN inputs or outputs are not finite")
    source = getattr(calibration, "source", "samples given" if calibration is None else "feeds given")
    return Captured(samples, stats, source, bound_mib, is_large(ffns), warnings)


def _length(calibration) -> int | None:
    try:
        return len(calibration)
    except TypeError:
        return None
