"""Emit, the pass's fifth step: one fitted FFN's rewrite in the fallback form, with the first predictor
candidate (cheapest first) whose rewrite is not slower than the original FFN at any serving shape
(:mod:`tardis_onnx.speed`); the original FFN kept where none pays."""

from __future__ import annotations

import onnx

from tardis_onnx.config import TardisConfig
from tardis_onnx.emit import FallbackForm, emit_ffn
from tardis_onnx.errors import TardisError, first_line, is_onnxruntime_error
from tardis_onnx.io import ExternalDataWriter
from tardis_onnx.passes.fit import FittedFfn
from tardis_onnx.predictor import PredictorChoice
from tardis_onnx.report import FfnReport, speedup_text
from tardis_onnx.speed import (
    RewriteFailed,
    SpeedCheck,
    TimedRewrite,
    TimingCache,
    check_ffn,
    shape_name,
    timing_key,
)


def emit_fastest(
    fitted: FittedFfn,
    form: FallbackForm,
    opset: int,
    timing: bool,
    config: TardisConfig,
    warnings: list[str],
    timings: TimingCache | None = None,
    weights: ExternalDataWriter | None = None,
) -> tuple[PredictorChoice, list[onnx.NodeProto], list[onnx.TensorProto], FfnReport]:
    """The chosen predictor, the rewrite's nodes and initializers, and its report row (:func:`_fold_fastest`);
    ``timing``: run the never-slower check; ``timings``: the run's earlier checks, reused where they hold;
    ``weights``: where the kept rewrite's large initializers are written as they are made."""
    ffn, result = fitted.ffn, fitted.calibration

    def emit(c):
        flags, margin, coverage = c.flags, config.margin, result.coverage
        return emit_ffn(ffn, flags, form, opset, margin, coverage, c.predictor, result.fold, config.quantize)

    candidates, x = fitted.candidates, fitted.samples.x
    in_op = form.quantized_in_op(ffn, config.quantize)
    return _fold_fastest(ffn, result, candidates, x, timing, emit, config, warnings, timings, weights, in_op)


def _fold_fastest(
    ffn,
    result,
    candidates,
    x,
    timing: bool,
    emit,
    config: TardisConfig,
    warnings: list[str],
    timings=None,
    weights=None,
    quantized_in_op: bool = False,
):
    """The first predictor choice (cheapest first) whose rewrite is not slower than the original at any
    serving shape, with its nodes, initializers and report row. Untimed: the cheapest. Where none pays:
    the one closest to paying, without nodes, its row marked kept (the original FFN stays)."""
    tried, refused = [], None
    for choice in candidates:
        nodes, constants = emit(choice)  # its initializers made only if it is timed or kept
        initializers = None
        flagged, recall, quantize = choice.flagged_fraction, choice.recall, config.quantize
        row = FfnReport.of(ffn, result, constants.nbytes, choice.predictor, flagged, recall, quantize, quantized_in_op)
        key = timing_key(ffn, choice.predictor.kind, nodes, config.shapes, config.quantize)
        reused = timings.lookup(key, choice.flagged_fraction) if timing and timings is not None else None
        try:
            if reused is not None:
                check, row.timing_of = reused.check, reused.ffn
            elif timing:
                initializers = constants.tensors()
                check = _check_speed(ffn, nodes, initializers, x, config, warnings)
                if check is not None and timings is not None:
                    timings.add(key, TimedRewrite(ffn.name, choice.flagged_fraction, check))
            else:
                check = None
        except RewriteFailed as exc:
            warnings.append(
                f"{ffn.name}: ONNX Runtime cannot run the rewrite with the {choice.predictor.kind} predictor ({exc})"
            )
            refused = (choice, row)
            continue
        if check is not None:
            row.speedups = check.speedups
        if check is None or check.pays:
            return choice, nodes, constants.tensors(weights) if initializers is None else initializers, row
        tried.append((choice, row))  # its nodes and initializers are dropped: a kept FFN emits none
    choice, row = max(tried, key=lambda t: t[1].slowest()[1]) if tried else refused
    return choice, [], [], row.kept()


def _check_speed(ffn, nodes, initializers, x, config: TardisConfig, warnings: list[str]) -> SpeedCheck | None:
    """The FFN timed against its rewrite (None, with a warning, where ONNX Runtime cannot run one of them)."""
    try:
        return check_ffn(ffn, nodes, initializers, x, config.shapes, quantize=config.quantize)
    except (TardisError, RewriteFailed):
        raise
    except Exception as exc:
        # ONNX Runtime refusing a timing model (e.g. a dtype without a CPU kernel, a model its quantizer
        # cannot read); anything else is a bug and propagates.
        if not (is_onnxruntime_error(exc) or isinstance(exc, RuntimeError)):
            raise
        warnings.append(f"{ffn.name}: not timed, rewrite kept ({first_line(exc)[:160]})")
        return None


def kept_warning(kept: list[FfnReport], total: int, shapes: tuple[tuple[int, int], ...]) -> str:
    """The warning naming the FFNs left as they were, where their rewrite ran slower."""

    def why(row: FfnReport) -> str:
        shape, speedup = row.slowest()
        return f"{row.name} {speedup_text(speedup)} at {shape}" if row.speedups else f"{row.name}: no rewrite runs"

    more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
    return (
        f"kept {len(kept)} of {total} FFN(s) as they were: their rewrite ran slower here at a serving shape "
        f"({'; '.join(why(r) for r in kept[:3])}{more}); shapes timed: {', '.join(shape_name(s) for s in shapes)} "
        "(--shapes names yours, --no-speed-check folds them anyway)"
    )
