"""``python -m tardis_onnx.optimize MODEL``: fold every GELU FFN of an ONNX model (TARDIS).

Pipeline: load → match (passes) → calibrate → fold and emit the fallback → save + report.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx import __version__, reference, runtime, text
from tardis_onnx.calibrate import FfnSamples, calibrate_ffns, capture_ffn_inputs
from tardis_onnx.config import ALLOCATIONS, FALLBACKS, PRESETS, WINDOWS, TardisConfig
from tardis_onnx.emit import DOMAIN, MIN_OPSET, emit_ffn, replace_nodes
from tardis_onnx.errors import TardisError, report_error
from tardis_onnx.feeds import Feeds, load_feeds, random_feeds
from tardis_onnx.io import check_writable, load_model, save_model
from tardis_onnx.passes import Refusal, find_ffns
from tardis_onnx.predictor import PREDICTORS, Predictor, fit_lowrank, flag_windows
from tardis_onnx.report import FfnReport, print_report
from tardis_onnx.schema import annotate_shapes

METADATA_VERSION = "tardis_onnx.version"
METADATA_CONFIG = "tardis_onnx.config"


@dataclass
class OptimizeResult:
    """What the pass did: the rewritten model, a row per folded FFN, the refusals, and per folded FFN
    its calibrated windows (``lines``: the true ones), its predictor and the windows the emitted flag
    test uses (``flags``: the lines, narrowed by the predictor's uncertainty). With :func:`predictor_quality`
    the last two measure the fallback fraction on other tokens."""

    model: onnx.ModelProto
    ffns: list[FfnReport]
    refusals: list[Refusal]
    config: TardisConfig
    fallback: str
    lines: list[reference.NeuronLines] = field(default_factory=list)
    predictors: list[Predictor] = field(default_factory=list)
    flags: list[reference.NeuronLines] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "tool": "tardis-onnx",
            "version": __version__,
            "config": self.config.to_dict(),
            "fallback": self.fallback,
            "ffns": [row.to_dict() for row in self.ffns],
            "refused": [vars(r) for r in self.refusals],
            "totals": FfnReport.totals(self.ffns),
        }


def default_output(model_path: Path) -> Path:
    """``model.onnx`` → ``model.tardis.onnx`` beside it."""
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".tardis.onnx")


def optimize_model(
    model: onnx.ModelProto,
    config: TardisConfig,
    calibration: list[Feeds] | None = None,
    *,
    samples: list[FfnSamples] | None = None,
) -> OptimizeResult:
    """Rewrite ``model`` in place: every foldable FFN becomes a folded MatMul plus an outlier fallback.

    ``samples``: calibration inputs already captured by :func:`capture_ffn_inputs` on this model
    (one per FFN, in :func:`find_ffns` order); they are reused instead of running ``calibration``.
    """
    if is_rewritten(model):
        raise TardisError("the model was already rewritten by tardis-onnx: nothing to do")
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        raise TardisError(f"the model uses opset {opset}; tardis-onnx needs opset >= {MIN_OPSET}")
    ffns, refusals = find_ffns(model)
    if not ffns:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in refusals[:3])
        raise TardisError("no foldable GELU FFN found" + (f" ({reasons})" if reasons else ""))
    fallback = _resolve_fallback(config.fallback)
    if samples is None:
        feeds = calibration or [
            random_feeds(model, config.calib_batch, config.calib_sequence, seed=config.seed + i)
            for i in range(config.calib_batches)
        ]
        samples = capture_ffn_inputs(model, ffns, feeds, config.max_samples, config.seed)
    replacements, rows, windows, predictors, flag_lines = [], [], [], [], []
    for ffn, result, kept in zip(ffns, calibrate_ffns(ffns, samples, config), samples, strict=True):
        predictor = fit_predictor(config, ffn, kept.x)
        flags = flag_windows(result.lines, predictor.error_scale(kept.x[:8192], ffn.w1), config.predictor_uncertainty)
        nodes, initializers = emit_ffn(
            ffn, flags, fallback, opset, config.margin, result.coverage, predictor, fold=result.fold
        )
        replacements.append((ffn.nodes, nodes, initializers))
        for reader in ffn.shape_readers:
            reader.input[0] = ffn.shape_source
        windows.append(result.lines)
        predictors.append(predictor)
        flag_lines.append(flags)
        flagged, recall = predictor_quality(predictor, ffn, kept, result.lines, flags, config.margin)
        rows.append(FfnReport.of(ffn, result, initializers, predictor, flagged, recall))
    replace_nodes(model, replacements)
    domains = {DOMAIN: fallback == "custom", "com.microsoft": fallback == "custom" and config.predictor == "int4"}
    for domain, needed in domains.items():
        if needed and not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    _set_metadata(model, config, fallback)
    annotate_shapes(model)
    return OptimizeResult(model, rows, refusals, config, fallback, windows, predictors, flag_lines)


def fit_predictor(config: TardisConfig, ffn, x: np.ndarray) -> Predictor:
    """The configured predictor for one FFN (low-rank factors fitted on its calibration inputs)."""
    if config.predictor == "lowrank":
        return Predictor("lowrank", *fit_lowrank(x, ffn.w1, config.predictor_rank))
    return Predictor(config.predictor)


def predictor_quality(
    predictor: Predictor, ffn, samples: FfnSamples, lines, flags, margin: float
) -> tuple[float, float]:
    """On the calibration tokens: the fraction of neurons the predictor flags (through the ``flags``
    windows), and its recall of the true outliers (outside the ``lines`` windows)."""
    flagged = hits = outliers = 0.0
    for start in range(0, samples.x.shape[0], 4096):
        rows = slice(start, start + 4096)
        z = samples.preactivations(ffn, rows)
        z_hat = z if predictor.kind == "exact" else predictor.predict(samples.x[rows], ffn.w1, ffn.b1)
        true = reference.outside_window(z, lines)
        predicted = reference.outside_window(z_hat, flags, margin)
        flagged += predicted.sum()
        hits += (predicted & true).sum()
        outliers += true.sum()
    total = samples.x.shape[0] * ffn.hidden
    return float(flagged / max(total, 1)), float(hits / outliers) if outliers else 1.0


def is_rewritten(model: onnx.ModelProto) -> bool:
    return any(p.key == METADATA_VERSION for p in model.metadata_props)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _resolve_fallback(choice: str) -> str:
    if choice == "auto":
        return "custom" if runtime.library_available() else "portable"
    if choice == "custom" and not runtime.library_available():
        raise TardisError("--fallback custom needs the ai.tardis library: build it with `make lib`")
    return choice


def _set_metadata(model: onnx.ModelProto, config: TardisConfig, fallback: str) -> None:
    settings = json.dumps({**config.to_dict(), "fallback": fallback}, sort_keys=True)
    for key, value in ((METADATA_VERSION, __version__), (METADATA_CONFIG, settings)):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _calibration_feeds(args: argparse.Namespace, model: onnx.ModelProto) -> list[Feeds] | None:
    """``--calib``: feeds from an ``.npz``, from a text file, or from the builtin corpus."""
    if not args.calib:
        return None
    if args.calib != text.BUILTIN and Path(args.calib).suffix == ".npz":
        return load_feeds(args.calib, model)
    if args.calib != text.BUILTIN and not Path(args.calib).is_file():
        raise TardisError(f"calibration text '{args.calib}' not found")
    tokenizer = args.tokenizer or args.model.parent
    return text.calibration_feeds(args.calib, model, tokenizer, args.calib_samples, args.calib_seq_len)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx.optimize",
        description="Fold every GELU FFN of an ONNX model into one MatMul plus an outlier fallback (TARDIS).",
    )
    parser.add_argument("model", type=Path, help="the ONNX model (an Optimum or torch.onnx export)")
    parser.add_argument("-o", "--output", type=Path, help="where to write (default: MODEL with .tardis.onnx)")
    parser.add_argument(
        "--coverage",
        type=float,
        default=TardisConfig.coverage,
        help="fraction of calibration pre-activations each neuron's line covers (0 = exact)",
    )
    parser.add_argument(
        "--calib",
        help="calibration data: an .npz of feeds (one array per input, or name/0, ...), a text file "
        "(one paragraph per line), or 'builtin' (CPython's documentation text)",
    )
    parser.add_argument(
        "--calib-samples", type=int, default=text.DEFAULT_SAMPLES, help="text calibration: paragraphs used"
    )
    parser.add_argument(
        "--calib-seq-len", type=int, default=text.DEFAULT_SEQ_LEN, help="text calibration: tokens per paragraph"
    )
    parser.add_argument("--tokenizer", type=Path, help="text calibration: tokenizer folder (default: the model's)")
    parser.add_argument(
        "--target-reduction",
        type=float,
        help="fallback reduction 1-(d²+f·2dh)/(2dh) every FFN must reach on the calibration tokens "
        "(sets the outlier budget; replaces --coverage)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named bundle of --window/--allocation/--refit (accurate: least-error, layer, refit); "
        "those flags, when given too, override it",
    )
    parser.add_argument("--window", choices=WINDOWS, help=f"window per neuron (default {TardisConfig.window})")
    parser.add_argument(
        "--allocation", choices=ALLOCATIONS, help=f"coverage per neuron (default {TardisConfig.allocation})"
    )
    parser.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, help="least-squares refit of the folded map and bias"
    )
    parser.add_argument("--fallback", choices=FALLBACKS, default="auto", help="outlier fallback form")
    parser.add_argument("--margin", type=float, default=0.0, help="widen each window by this much when flagging")
    parser.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default=TardisConfig.predictor,
        help="what predicts the outliers: exact (x·W1), int4 (MatMulNBits copy of W1) or lowrank",
    )
    parser.add_argument("--predictor-rank", type=int, default=TardisConfig.predictor_rank, help="lowrank rank")
    parser.add_argument(
        "--predictor-uncertainty",
        type=float,
        default=TardisConfig.predictor_uncertainty,
        help="flag predictions within this many predictor error std of a window edge",
    )
    parser.add_argument(
        "--max-samples", type=int, default=TardisConfig.max_samples, help="calibration tokens kept per FFN"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random calibration feeds and subsampling")
    parser.add_argument("--report", type=Path, help="JSON report path (default: beside the output)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def config_from_args(args: argparse.Namespace) -> TardisConfig:
    """The :class:`TardisConfig` that parsed command-line flags (:func:`build_parser`) ask for."""
    recipe = dict(PRESETS[args.preset or "plain"])
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
            max_samples=args.max_samples,
            seed=args.seed,
        )
    except ValueError as exc:
        raise TardisError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        output = args.output or default_output(args.model)
        report_path = args.report or output.with_name(output.name.removesuffix(".onnx") + ".json")
        check_writable(output, args.model)
        model = load_model(args.model)
        calibration = _calibration_feeds(args, model)
        result = optimize_model(model, config, calibration)
        written = save_model(result.model, output)
        try:
            report_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            raise TardisError(f"{report_path}: cannot write the report ({exc.strerror or exc})") from None
    except TardisError as exc:
        return report_error(exc)
    if not args.quiet:
        print_report(result, output, report_path)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
