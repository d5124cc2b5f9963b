"""Fit, the pass's fourth step: per FFN, the windows and lines under the outlier budget and the refit, each
kept only where the held-out tokens say it helps (:mod:`tardis_onnx.calibrate`), then the predictor candidates
fitted and ranked (:func:`tardis_onnx.predictor.rank_predictors`), all from one computation of the FFN's
pre-activations on its tokens."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tardis_onnx.calibrate import (
    REFIT_TOKENS_PER_UNKNOWN,
    Calibration,
    FfnSamples,
    FfnTokens,
    fallback_budgets,
    fold_best,
    is_large,
    plan_windows,
    window_candidates,
)
from tardis_onnx.config import TardisConfig
from tardis_onnx.emit import FallbackForm
from tardis_onnx.parallel import map_each
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.predictor import PredictorChoice, predictor_candidates, rank_predictors


@dataclass
class FittedFfn:
    """One FFN, its calibrated windows and fold, its kept inputs, and its predictor candidates, best first."""

    ffn: FfnMatch
    calibration: Calibration
    samples: FfnSamples
    candidates: list[PredictorChoice]


def fit_ffns(
    ffns: list[FfnMatch], samples: list[FfnSamples], config: TardisConfig, form: FallbackForm
) -> Iterator[FittedFfn]:
    """Each FFN fitted, in order; large ones (:func:`is_large`) one at a time when asked for, so that their
    weight copies and pre-activations exist for one FFN at once. ``form``: the fallback's (standard ONNX ops
    only: :func:`predictor_candidates`; its rows int8 under ``--quantize``: the bytes predictors are ranked by)."""
    for ffn, sample in zip(ffns, samples, strict=True):
        if ffn.name != sample.name:
            raise ValueError(f"calibration samples for {sample.name!r} given for FFN {ffn.name!r}")
    classes = predictor_candidates(config.predictor, form.standard_only)
    budgets = fallback_budgets(ffns, config)
    large = is_large(ffns)

    def parts(i: int):  # split when needed: a large model's copies exist for the FFN being fitted only
        return samples[i].split(config.holdout, config.seed)

    planned = None
    if config.allocation == "global":  # one multiplier over every FFN: all windows planned before any is chosen

        def plan(i):
            windows = plan_windows(ffns[i], parts(i)[0], budgets[i], config)
            ffns[i].release()  # its weight copies, read again when it is fitted
            return windows

        planned = window_candidates(map_each(plan, range(len(ffns)), 1 if large else None), ffns, budgets, config)

    def fit(i: int) -> FittedFfn:
        ffn, (fit_samples, held_samples) = ffns[i], parts(i)
        fit_tokens = FfnTokens(ffn, fit_samples)
        held_tokens = None if held_samples is None else FfnTokens(ffn, held_samples)
        if planned is None:
            windows = plan_windows(ffn, fit_samples, budgets[i], config, fit_tokens.z)
            candidates = window_candidates([windows], [ffn], [budgets[i]], config)[0]
        else:
            candidates = planned[i]
        calibration = fold_best(ffn, fit_tokens, held_tokens, candidates, config)
        check = held_tokens or fit_tokens
        choices = rank_predictors(
            classes,
            ffn,
            fit_tokens.x,
            check.x,
            calibration.lines,
            rank=config.predictor_rank,
            uncertainty=config.predictor_uncertainty,
            margin=config.margin,
            min_recall=config.min_recall,
            fold=calibration.fold,
            z_fit=fit_tokens.z,
            z_check=check.z,
            y_check=check.y,
            rows_itemsize=1 if form.quantized_in_op(ffn, config.quantize) else None,
        )
        return FittedFfn(ffn, calibration, samples[i], choices)

    if large:  # one at a time, as asked for: the caller releases each FFN when done with it
        yield from (fit(i) for i in range(len(ffns)))
    else:
        yield from map_each(fit, list(range(len(ffns))))


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
