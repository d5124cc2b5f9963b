"""Fit, the pass's fourth step: per FFN, the windows and lines under the outlier budget and the refit, each
kept only where the held-out tokens say it helps (:func:`tardis_onnx.calibrate.calibrate_ffns`), then the
predictor candidates fitted and ranked (:func:`tardis_onnx.predictor.rank_predictors`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tardis_onnx.calibrate import REFIT_TOKENS_PER_UNKNOWN, Calibration, FfnSamples, calibrate_ffns
from tardis_onnx.config import TardisConfig
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.predictor import Predictor, PredictorChoice, predictor_candidates, rank_predictors


@dataclass
class FittedFfn:
    """One FFN, its calibrated windows and fold, its kept inputs, and its predictor candidates, best first."""

    ffn: FfnMatch
    calibration: Calibration
    samples: FfnSamples
    candidates: list[PredictorChoice]


def fit_ffns(
    ffns: list[FfnMatch], samples: list[FfnSamples], config: TardisConfig, standard_only: bool
) -> Iterator[FittedFfn]:
    """Each FFN fitted, in order, when asked for (a large FFN's float64 weights exist one FFN at a time);
    ``standard_only``: the fallback uses standard ONNX ops only (:func:`predictor_candidates`)."""
    classes = predictor_candidates(config.predictor, standard_only)
    calibrations = calibrate_ffns(ffns, samples, config)
    for ffn, kept in zip(ffns, samples, strict=True):
        result = next(calibrations)
        yield FittedFfn(ffn, result, kept, _rank(ffn, result, kept, classes, config))


def _rank(
    ffn: FfnMatch, result: Calibration, kept: FfnSamples, classes: tuple[type[Predictor], ...], config: TardisConfig
) -> list[PredictorChoice]:
    """The predictor candidates of one calibrated FFN, fitted on its fit tokens, ranked on its held-out ones."""
    fit, heldout = kept.split(config.holdout, config.seed)
    check = fit if heldout is None else heldout
    return rank_predictors(
        classes,
        ffn,
        fit.x,
        check.x,
        result.lines,
        rank=config.predictor_rank,
        uncertainty=config.predictor_uncertainty,
        margin=config.margin,
        min_recall=config.min_recall,
        fold=result.fold,
    )


def refit_warnings(config: TardisConfig, ffns: list[FfnMatch], samples: list[FfnSamples]) -> list[str]:
    """One line when the fit tokens are fewer than the refit needs (``REFIT_TOKENS_PER_UNKNOWN · (d + 1)``)."""
    if not config.refit:
        return []
    fit = min(s.split(config.holdout, config.seed)[0].x.shape[0] for s in samples)
    d = max(f.w1_stored.shape[0] for f in ffns)
    needed = REFIT_TOKENS_PER_UNKNOWN * (d + 1)
    if fit >= needed:
        return []
    checked = "kept only where it lowers the held-out error" if config.holdout > 0 else "not checked (holdout 0)"
    return [
        f"{fit} calibration tokens fit each FFN, fewer than the {needed} ({REFIT_TOKENS_PER_UNKNOWN}·(d+1), "
        f"d = {d}) a trustworthy refit needs: the refit is {checked}; pass more text (--calib, --calib-samples)"
    ]
