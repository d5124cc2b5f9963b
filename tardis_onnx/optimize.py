"""``python -m tardis_onnx.optimize MODEL``: fold every GELU FFN of an ONNX model (TARDIS).

:func:`optimize_model` is the driver: it composes the pass's steps (``passes/``), in the method's order:
prepare → match → calibrate → fit → emit → finish. The command loads the model, builds its calibration
data, runs the driver, saves the model and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx import __version__, reference, text
from tardis_onnx.calibrate import CalibrationData, FfnSamples
from tardis_onnx.config import (
    ALLOCATIONS,
    DEFAULT_SHAPES,
    DEFAULT_TARGET_REDUCTION,
    FALLBACKS,
    PREDICTOR_CHOICES,
    PRESETS,
    SPEED_CHECK_VARIABLE,
    WINDOWS,
    TardisConfig,
)
from tardis_onnx.emit import fallback_form
from tardis_onnx.errors import TardisError, finite_float, non_negative_int, positive_int, run_command
from tardis_onnx.feeds import load_feeds
from tardis_onnx.files import StagedWrites, check_targets, delete_staged_files_on_terminate, model_files, strict_json
from tardis_onnx.io import ExternalDataWriter, data_path, open_model, save_model
from tardis_onnx.passes import Refusal, find_ffns
from tardis_onnx.passes.capture import capture
from tardis_onnx.passes.finish import finish
from tardis_onnx.passes.fit import fit_ffns, refit_warnings
from tardis_onnx.passes.prepare import prepare
from tardis_onnx.passes.rewrite import emit_fastest, kept_warning
from tardis_onnx.predictor import Predictor
from tardis_onnx.quantize import QUANTIZE_CHOICES
from tardis_onnx.report import FfnReport, print_report
from tardis_onnx.speed import TimingCache, parse_shapes, shape_name
from tardis_onnx.stages import Stages, peak_rss_mib, progress_bar


@dataclass
class OptimizeResult:
    """What the pass did: the rewritten model, a row per folded FFN, the refusals, and per folded FFN
    its calibrated windows (``lines``: the true ones), its predictor and the windows the emitted flag
    test uses (``flags``: the lines, narrowed by the predictor's uncertainty). With
    :func:`tardis_onnx.predictor.predictor_quality` the last two measure the fallback fraction on other
    tokens. ``calibration`` says what calibrated the model; ``warnings`` are lines for the user."""

    model: onnx.ModelProto
    ffns: list[FfnReport]
    refusals: list[Refusal]
    config: TardisConfig
    fallback: str
    lines: list[reference.NeuronLines] = field(default_factory=list)
    predictors: list[Predictor] = field(default_factory=list)
    flags: list[reference.NeuronLines] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    peak_rss_mib: float = 0.0
    stages: Stages = field(default_factory=Stages)

    def to_dict(self) -> dict:
        return {
            "tool": "tardis-onnx",
            "version": __version__,
            "config": self.config.to_dict(),
            "fallback": self.fallback,
            "calibration": self.calibration,
            "ffns": [row.to_dict() for row in self.ffns],
            "refused": [vars(r) for r in self.refusals],
            "totals": FfnReport.totals(self.ffns),
            "warnings": self.warnings,
            "elapsed_s": round(self.elapsed_s, 3),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "stages": self.stages.rows,
        }


def default_output(model_path: Path) -> Path:
    """``model.onnx`` → ``model.tardis.onnx`` beside it."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".tardis.onnx")


def optimize_model(
    model: onnx.ModelProto,
    config: TardisConfig,
    calibration=None,
    *,
    samples: list[FfnSamples] | None = None,
    progress: bool = False,
    weights_dir: Path | None = None,
    weights: ExternalDataWriter | None = None,
) -> OptimizeResult:
    """Rewrite ``model`` in place: every foldable FFN becomes a folded MatMul plus an outlier fallback.

    ``calibration``: a list or any iterable of feed dicts, an ONNX Runtime ``CalibrationDataReader``,
    or a :class:`CalibrationData` (which also names its source); None: random feeds from the model's
    signature (with a warning: accuracy will be poor). ``samples``: calibration inputs already captured
    by :func:`capture_ffn_inputs` on this model (one per FFN, in :func:`find_ffns` order); they are
    reused instead of running ``calibration``. ``progress``: tqdm bars on stderr (on a terminal).

    A model read graph-only (:func:`tardis_onnx.io.open_model`) is rewritten FFN by FFN: ``weights_dir`` is
    where its weights are memory-mapped from (each FFN's only while it is folded), and ``weights`` receives
    each FFN's new tensors as soon as they are chosen (pass the same writer to :func:`tardis_onnx.io.save_model`).

    The pass, step by step (``passes/``): prepare → match → calibrate → fit → emit → finish.
    """
    started = time.perf_counter()
    stages = Stages()
    opset = prepare(model, config)
    with stages("match"):
        ffns, refusals = find_ffns(model, weights_dir)
    if not ffns:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in refusals[:3])
        raise TardisError("no foldable GELU FFN found" + (f" ({reasons})" if reasons else ""))
    form = fallback_form(config.fallback)
    captured = capture(model, ffns, config, calibration, samples, stages, progress=progress, weights_dir=weights_dir)
    warnings = captured.warnings + refit_warnings(config, ffns, captured.samples)
    timing = config.speed_check and bool(config.shapes)
    fitted = fit_ffns(ffns, captured.samples, config, form)
    timings = TimingCache()
    replacements, rows, windows, predictors, flag_lines = [], [], [], [], []
    with progress_bar(progress, "folding", len(ffns), "FFN") as bar:
        for ffn in ffns:
            with stages("fit"):
                fit = next(fitted)
            with stages("emit"):
                choice, nodes, initializers, row = emit_fastest(
                    fit, form, opset, timing, config, warnings, timings, weights
                )
                if not row.kept_original:
                    replacements += ffn.rewrite(nodes, initializers)
                    for tensor in initializers if weights is not None else ():
                        weights.add(tensor)  # out of memory, into the output's external data
                ffn.release()
                if ffn.large:
                    fit.samples.release()
            windows.append(fit.calibration.lines)
            predictors.append(choice.predictor)
            flag_lines.append(choice.flags)
            rows.append(row)
            bar.update(1)
    kept = [r for r in rows if r.kept_original]
    if kept:
        warnings.append(kept_warning(kept, len(rows), config.shapes))
    finish(model, replacements, rows, predictors, form, config, weights_dir, weights)
    summary = captured.summary(config)
    result = OptimizeResult(
        model, rows, refusals, config, form.name, windows, predictors, flag_lines, summary, warnings
    )
    result.elapsed_s = time.perf_counter() - started
    result.peak_rss_mib = peak_rss_mib()
    result.stages = stages
    return result


def _calibration_feeds(args: argparse.Namespace, model: onnx.ModelProto) -> CalibrationData | None:
    """``--calib``: feeds from an ``.npz``, a text file or the builtin corpus. Without it: the builtin
    corpus when a tokenizer is found (``--tokenizer``, else beside the model), else None (random feeds).

    Whisper's encoder and decoder files (:func:`tardis_onnx.speech.model_kind`): ``--calib`` a folder of audio
    or a ``manifest.json`` (``--calib-samples`` utterances when given, else 16; ``--calib-seq-len`` transcript
    tokens each), an ``.npz`` of feeds, or none: random feeds for the encoder, a one-line error for the
    decoders (text alone cannot feed ``encoder_hidden_states`` or the cross-attention past)."""
    from tardis_onnx import speech

    tokenizer = args.tokenizer or args.model.parent
    samples, seq_len = args.calib_samples, args.calib_seq_len
    kind = speech.model_kind(model)
    if kind is not None and not (args.calib and Path(args.calib).suffix == ".npz"):
        if not args.calib and kind == "encoder":
            return None
        if not args.calib or not speech.is_speech_source(args.calib):
            given = f" (got '{args.calib}')" if args.calib else ""
            raise TardisError(
                f"Whisper's {kind.replace('_', ' ')} calibrates on speech: pass --calib a folder of audio files "
                f"or a manifest.json{given}"
            )
        count = speech.DEFAULT_UTTERANCES if samples == text.DEFAULT_SAMPLES else samples
        feeds = speech.calibration_feeds(model, tokenizer, args.calib, count, seq_len)
        return CalibrationData(feeds, feeds.describe())
    if not args.calib:
        if args.tokenizer is None and not (text.has_tokenizer(tokenizer) and text.reads_token_ids(model)):
            return None
        feeds = text.calibration_feeds(text.BUILTIN, model, tokenizer, samples, seq_len)
        return CalibrationData(feeds, f"builtin corpus (CPython docs; default), {len(feeds)} batches")
    if args.calib != text.BUILTIN and Path(args.calib).suffix == ".npz":
        return CalibrationData(load_feeds(args.calib, model), f"feeds {args.calib}")
    if args.calib != text.BUILTIN and not Path(args.calib).is_file():
        raise TardisError(f"calibration text '{args.calib}' not found")
    feeds = text.calibration_feeds(args.calib, model, tokenizer, samples, seq_len)
    name = "builtin corpus (CPython docs)" if args.calib == text.BUILTIN else f"text {args.calib}"
    return CalibrationData(feeds, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx.optimize",
        description="Fold every GELU FFN of an ONNX model into one MatMul plus an outlier fallback (TARDIS). "
        "The defaults are the best recipe measured: calibration on real text, 80%% fallback reduction, "
        "the accurate preset checked on held-out tokens, the cheapest predictor that recalls 95%% of outliers.",
    )
    parser.add_argument("model", type=Path, help="the ONNX model (an Optimum or torch.onnx export)")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: MODEL with .tardis.onnx)")
    parser.add_argument(
        "--target-reduction",
        type=finite_float,
        help="fallback reduction 1-(d²+f·2dh)/(2dh) every FFN must reach on the calibration tokens "
        f"(sets the outlier budget f; default {DEFAULT_TARGET_REDUCTION} when no --coverage is given)",
    )
    parser.add_argument(
        "--coverage",
        type=finite_float,
        help="instead of a target: fraction of calibration pre-activations each neuron's line covers (0 = exact)",
    )
    parser.add_argument(
        "--calib",
        help="calibration data: an .npz of feeds (one array per input, or name/0, ...), a text file "
        "(one paragraph per line), or 'builtin' (CPython's documentation text); default: builtin when a "
        "tokenizer is found, else random feeds (with a warning). Whisper's encoder_model / decoder_model / "
        "decoder_with_past_model / decoder_model_merged.onnx: a folder of audio files or a manifest.json "
        "(file, text), the first 16 utterances (--calib-samples N), with the feature extractor, tokenizer and "
        "dense encoder/decoder files beside the model (or in --tokenizer DIR)",
    )
    parser.add_argument(
        "--calib-samples", type=positive_int, default=text.DEFAULT_SAMPLES, help="text: paragraphs used"
    )
    parser.add_argument(
        "--calib-seq-len", type=positive_int, default=text.DEFAULT_SEQ_LEN, help="text: tokens per paragraph"
    )
    parser.add_argument("--tokenizer", type=Path, help="text calibration: tokenizer folder (default: the model's)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="accurate",
        help="a named bundle of --window/--allocation/--refit (accurate: least-error, layer, refit; plain: "
        "narrowest, uniform, no refit); those flags, when given too, override it",
    )
    parser.add_argument("--window", choices=WINDOWS, help="window per neuron (default: the preset's)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, help="coverage per neuron (default: the preset's)")
    parser.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help="least-squares refit of the folded map and bias (default: the preset's)",
    )
    parser.add_argument(
        "--refit-ridge",
        type=finite_float,
        help="the refit's shrinkage towards the plain fold, in pseudo-tokens per input dimension "
        "(default: chosen on the held-out tokens)",
    )
    parser.add_argument(
        "--holdout",
        type=finite_float,
        default=TardisConfig.holdout,
        help="fraction of calibration tokens held out: each FFN keeps the recipe only where it lowers the "
        "held-out error below the plain recipe's; the auto predictor's recall is measured there",
    )
    parser.add_argument("--fallback", choices=FALLBACKS, default="auto", help="outlier fallback form")
    parser.add_argument("--margin", type=finite_float, default=0.0, help="widen each window by this much when flagging")
    parser.add_argument(
        "--predictor",
        choices=PREDICTOR_CHOICES,
        default=TardisConfig.predictor,
        help="what predicts the outliers: exact (x·W1), int8 (DynamicQuantizeMatMul copy of W1; flagged "
        "residuals taken from it), int4 (MatMulNBits copy of W1), int2 (2-bit MatMulNBits copy; not in auto), "
        "lowrank, or auto (per FFN, the fewest bytes "
        "read with recall >= --min-recall on held-out tokens, and no slower than the original)",
    )
    parser.add_argument(
        "--min-recall", type=finite_float, default=TardisConfig.min_recall, help="auto predictor: least recall"
    )
    parser.add_argument("--predictor-rank", type=positive_int, default=TardisConfig.predictor_rank, help="lowrank rank")
    parser.add_argument(
        "--predictor-uncertainty",
        type=finite_float,
        default=TardisConfig.predictor_uncertainty,
        help="flag predictions within this many predictor error std of a window edge",
    )
    parser.add_argument(
        "--max-samples", type=positive_int, default=TardisConfig.max_samples, help="calibration tokens kept per FFN"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of random calibration feeds and subsampling"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="int8 / int4: after folding, run the model's MatMuls in int8 as onnxruntime's quantize_dynamic does, "
        "or in 4 bits as its MatMulNBitsQuantizer does (block 32, accuracy_level 4); the fold is quantized alike "
        "and the fallback's rows are int8 (custom fallback, float32 models); the speed check then compares with "
        "the original FFN quantized the same way",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=DEFAULT_SHAPES,
        help="serving shapes BATCHxSEQUENCE, comma-separated, each FFN's rewrite is timed at against the "
        "original (in ONNX Runtime, on this machine); an FFN whose rewrite is slower at any of them stays "
        "as it was (default: " + ",".join(shape_name(s) for s in DEFAULT_SHAPES) + "; none: no timing)",
    )
    parser.add_argument(
        "--speed-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the original FFN wherever its rewrite is slower at a serving shape; --no-speed-check folds "
        f"every FFN (reproducible output; also ${SPEED_CHECK_VARIABLE}=0) (default: on)",
    )
    parser.add_argument("--report", type=Path, help="JSON report path (default: beside the output)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def config_from_args(args: argparse.Namespace) -> TardisConfig:
    """The :class:`TardisConfig` that parsed command-line flags (:func:`build_parser`) ask for."""
    recipe = dict(PRESETS[args.preset or "accurate"])
    recipe.update({k: v for k in ("window", "allocation", "refit") if (v := getattr(args, k)) is not None})
    try:
        return TardisConfig(
            coverage=args.coverage,
            fallback=args.fallback,
            margin=args.margin,
            predictor=args.predictor,
            predictor_rank=args.predictor_rank,
            predictor_uncertainty=args.predictor_uncertainty,
            target_reduction=args.target_reduction,
            **recipe,
            refit_ridge=args.refit_ridge,
            holdout=args.holdout,
            min_recall=args.min_recall,
            max_samples=args.max_samples,
            seed=args.seed,
            shapes=args.shapes,
            quantize=args.quantize,
            **({} if args.speed_check is None else {"speed_check": args.speed_check}),
        )
    except ValueError as exc:
        raise TardisError(str(exc)) from None


def run(args: argparse.Namespace) -> None:
    """Fold ``args.model`` as the parsed flags ask; write the model and its report, print the report."""
    config = config_from_args(args)
    output = args.output if args.output is not None else default_output(args.model)
    check_targets([output], [])  # a name to derive the report's from ("" or "." is a folder)
    report_path = args.report or output.with_name(output.name.removesuffix(".onnx") + ".json")
    calib = Path(args.calib) if args.calib and args.calib != text.BUILTIN else None
    tokenizer = text.tokenizer_files(args.tokenizer or args.model.parent)
    # Before any work: no output may be an input (the model, its external data, the calibration
    # file, the tokenizer's files) or another output; the model, its external data and the report
    # are committed together.
    check_targets([output, data_path(output), report_path], [*model_files(args.model), calib, *tokenizer])
    model, weights_dir = open_model(args.model)
    calibration = _calibration_feeds(args, model)
    with StagedWrites() as staged:
        # A model with external data is read graph-only and its new weights written out as they come.
        weights = ExternalDataWriter.staged(staged, output) if weights_dir is not None else None
        with weights or contextlib.nullcontext():
            result = optimize_model(
                model, config, calibration, progress=not args.quiet, weights_dir=weights_dir, weights=weights
            )
            with result.stages("save"):
                save_model(result.model, output, staged, weights_dir, weights)
        staged.write_text(report_path, strict_json(result.to_dict(), indent=2) + "\n")
    if not args.quiet:
        print_report(result, output, report_path)


def main(argv: list[str] | None = None) -> int:
    delete_staged_files_on_terminate()
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
