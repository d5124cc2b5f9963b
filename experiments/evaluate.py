"""``python -m experiments.evaluate``: accuracy of TARDIS vs pruning on a real model (all-MiniLM-L6-v2).

Calibrates once on real text (WikiText-2 test by default), then scores in ONNX Runtime, by STS-B dev
Spearman × 100 (mean pooling with the attention mask, L2 norm, cosine): the dense model; TARDIS at
several fallback reductions with each idea switched on in turn (plain recipe, least-error windows,
per-neuron Lagrangian coverage, refit), all with the exact outlier set (portable fallback, which
recomputes z); magnitude / Wanda / RIA pruning at the same FFN reduction. Reports the measured
outlier fraction per layer on the evaluation tokens and FFN weights read per token, both figures of
docs/design.md §2. Writes ``results.json`` and ``accuracy_vs_bytes.png`` to ``--out`` (default ``out/eval``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from experiments import baselines
from experiments.data import REPO, data_dir
from tardis_onnx import text
from tardis_onnx.calibrate import capture_ffn_inputs
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import INSIDE_WINDOW, PRE_ACTIVATION, ffn_tensor
from tardis_onnx.errors import (
    TardisError,
    finite_float,
    fraction,
    int_at_least,
    non_negative_float,
    one_line,
    positive_int,
    run_command,
)
from tardis_onnx.files import StagedWrites, check_targets, model_files, strict_json
from tardis_onnx.io import check_output_folders, load_model, make_output_folders
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import PREDICTORS
from tardis_onnx.session import create_session, run_session

WIKITEXT = "wikitext-2-raw/wiki.test.raw"
STSB = "stsbenchmark/sts-dev.csv"

# The ideas of docs/design.md §1, switched on one after another (names are the table's rows).
# The ablation: each idea spelled out in full (the config's defaults are the whole accurate recipe), with
# the exact predictor and no held-out check, so each row measures that idea alone.
_ABLATION = {"window": "narrowest", "allocation": "uniform", "refit": False, "predictor": "exact", "holdout": 0.0}
IDEAS = {
    "plain": _ABLATION,
    "least-error": {**_ABLATION, "window": "least-error"},
    "least-error+layer": {**_ABLATION, "window": "least-error", "allocation": "layer"},
    "least-error+layer+refit": {**_ABLATION, "window": "least-error", "allocation": "layer", "refit": True},
    "least-error+global+refit": {**_ABLATION, "window": "least-error", "allocation": "global", "refit": True},
}
BEST = "least-error+layer+refit"


def read_stsb(path: Path, limit: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """STS-B pairs: tab-separated, no quoting, score and sentences in fields 5–7 (extra fields ignored)."""
    first, second, scores = [], [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TardisError(f"STS-B file '{path}' cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) < 7:
            continue
        try:
            score = float(fields[4])
        except ValueError:
            raise TardisError(f"STS-B file '{path}' line {number}: score {fields[4]!r} is not a number") from None
        if not math.isfinite(score):
            raise TardisError(f"STS-B file '{path}' line {number}: score {fields[4]!r} is not finite")
        scores.append(score)
        first.append(fields[5])
        second.append(fields[6])
    if len(scores) < 2:
        raise TardisError(f"STS-B file '{path}' holds fewer than 2 scored pairs")
    if limit:
        first, second, scores = first[:limit], second[:limit], scores[:limit]
    return first, second, np.array(scores)


def sentence_order(first: list[str], second: list[str]) -> list[str]:
    """The distinct sentences, shortest first (batches of similar length), ties in text order: an order that does
    not depend on Python's string hashing, since int8 activations are rounded with one scale per batch and a
    sentence's batch-mates move its embedding (a hash-ordered set moved STS-B by ±0.07 between runs)."""
    return sorted(set(first) | set(second), key=lambda s: (len(s), s))


class StsEvaluator:
    """Embeds the STS-B sentences once per model and scores Spearman × 100."""

    def __init__(self, tokenizer, model: onnx.ModelProto, path: Path, limit: int | None, batch: int = 64) -> None:
        self.first, self.second, self.gold = read_stsb(path, limit)
        sentences = sentence_order(self.first, self.second)
        self.index = {s: i for i, s in enumerate(sentences)}
        self.feeds = text.text_feeds(tokenizer, sentences, model, samples=len(sentences), seq_len=128, batch=batch)
        self.tokens = int(sum(f["attention_mask"].sum() for f in self.feeds))

    def score(self, model: onnx.ModelProto, probes: list[str] = ()) -> tuple[float, dict[str, float]]:
        """Spearman × 100, and for each boolean ``probe`` output the fraction of False over real tokens."""
        embeddings, outside = self.embed(model, probes)
        return self.spearman(embeddings), outside

    def embed(self, model: onnx.ModelProto, probes: list[str] = ()) -> tuple[np.ndarray, dict[str, float]]:
        """Unit-norm mean-pooled embeddings of the sentences (in ``self.index`` order), and for each boolean
        ``probe`` output the count of False over real tokens."""
        probe_model = onnx.ModelProto()
        probe_model.CopyFrom(model)
        for name in probes:
            probe_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
        session = create_session(probe_model)
        output = model.graph.output[0].name
        embeddings, outside = [], dict.fromkeys(probes, 0.0)
        for feeds in self.feeds:
            values = run_session(session, [output, *probes], feeds)
            mask = feeds["attention_mask"].astype(np.float64)
            pooled = (values[0] * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
            embeddings.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
            real = mask.astype(bool)
            for name, inside in zip(probes, values[1:], strict=True):
                outside[name] += float((~inside[real]).sum())
        return np.concatenate(embeddings), outside

    def spearman(self, embeddings: np.ndarray) -> float:
        """Spearman × 100 of the pairs' cosines (from :meth:`embed`) against the gold scores."""
        from scipy.stats import spearmanr

        a = embeddings[[self.index[s] for s in self.first]]
        b = embeddings[[self.index[s] for s in self.second]]
        return 100.0 * float(spearmanr((a * b).sum(axis=1), self.gold).statistic)


def tardis_row(name, model, ffns, samples, evaluator, config, metric: str = "stsb") -> dict:
    """Rewrite ``model`` with ``config`` on the captured ``samples`` and score it: ``evaluator.score(model,
    probes) -> (value, {probe: False count})`` over ``evaluator.tokens`` tokens; the row keeps the value as
    ``metric``, the measured outlier fraction per layer and both bytes-read figures (docs/design.md §2). Every FFN is
    folded (the never-slower check off): the row measures the recipe's accuracy, and reads each FFN's probes."""
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    t0 = time.perf_counter()
    result = optimize_model(rewritten, dataclasses.replace(config, speed_check=False), samples=samples)
    fit_s = time.perf_counter() - t0
    probes = [ffn_tensor(f.name, INSIDE_WINDOW) for f in ffns]
    scored = result.model
    recall_probes: list[tuple[str, str]] = []
    if config.predictor != "exact":
        scored, recall_probes = _with_true_outlier_probes(result.model, ffns, result.lines, probes)
    value, outside = evaluator.score(scored, probes + [p for pair in recall_probes for p in pair])
    per_layer = [outside[p] / (evaluator.tokens * f.hidden) for p, f in zip(probes, ffns, strict=True)]
    true_outliers = [outside[t] / (evaluator.tokens * f.hidden) for (t, _), f in zip(recall_probes, ffns, strict=False)]
    recall = [outside[both] / max(outside[t], 1.0) for t, both in recall_probes]
    dense = sum(r.dense_bytes for r in result.ffns)
    fold = sum(r.fold_bytes for r in result.ffns)
    fallback = fold + sum(f * r.dense_bytes for f, r in zip(per_layer, result.ffns, strict=True))
    predictor = sum(r.predictor_bytes for r in result.ffns)
    totals = result.to_dict()["totals"]
    return {
        "method": "tardis",
        "name": name,
        "target_reduction": config.target_reduction,
        "config": {k: v for k, v in config.to_dict().items() if k in ("window", "allocation", "refit")},
        "predictor": config.predictor + (f"-{config.predictor_rank}" if config.predictor == "lowrank" else ""),
        "predictor_uncertainty": config.predictor_uncertainty,
        "true_outlier_fraction_eval": true_outliers or per_layer,
        "recall_eval": recall or [1.0] * len(ffns),
        metric: value,
        "outlier_fraction_eval": per_layer,
        "outlier_fraction_calibration": [r.outlier_fraction for r in result.ffns],
        "coverage_mean": [r.coverage for r in result.ffns],
        "calibration_error": [r.calibration_error for r in result.ffns],
        "fallback_reduction_calibration": totals["fallback_reduction"],
        "fallback_reduction": 1 - fallback / dense,
        "total_read_reduction_with_predictor": 1 - (fallback + predictor) / dense,
        "weights_read": fallback / dense,
        "weights_read_with_predictor": (fallback + predictor) / dense,
        "storage_bytes": totals["storage_bytes"],
        "dense_bytes": dense,
        "fit_seconds": fit_s,
    }


def _with_true_outlier_probes(model, ffns, windows, predicted) -> tuple[onnx.ModelProto, list[tuple[str, str]]]:
    """A copy of a portable rewrite with two boolean outputs per FFN: inside its true window (exact z),
    and inside either window, whose False count is the outliers the predictor caught."""
    from onnx import helper, numpy_helper

    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    pairs = []
    for ffn, lines, flagged in zip(ffns, windows, predicted, strict=True):
        prefix = ffn_tensor(ffn.name, "Probe")
        z = ffn_tensor(ffn.name, PRE_ACTIVATION)
        dtype = np.dtype(ffn.dtype)
        probed.graph.initializer.extend(
            [
                numpy_helper.from_array(lines.lo.astype(dtype), f"{prefix}/lo"),
                numpy_helper.from_array(lines.hi.astype(dtype), f"{prefix}/hi"),
            ]
        )
        probed.graph.node.extend(
            [
                helper.make_node("GreaterOrEqual", [z, f"{prefix}/lo"], [f"{prefix}/above"]),
                helper.make_node("LessOrEqual", [z, f"{prefix}/hi"], [f"{prefix}/below"]),
                helper.make_node("And", [f"{prefix}/above", f"{prefix}/below"], [f"{prefix}/inside"]),
                helper.make_node("Or", [f"{prefix}/inside", flagged], [f"{prefix}/caught_or_inside"]),
            ]
        )
        pairs.append((f"{prefix}/inside", f"{prefix}/caught_or_inside"))
    return probed, pairs


def baseline_row(method, sparsity, model, ffns, samples, evaluator, metric: str = "stsb") -> dict:
    """Prune a copy of ``model`` (magnitude / Wanda / RIA, norms cached in ``samples``) and score it."""
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    norms = {s.name: s.tables.setdefault("activation_norms", None) for s in samples}
    info = baselines.prune_model(pruned, {s.name: s.x for s in samples}, method, sparsity, norms)
    for s in samples:
        s.tables["activation_norms"] = info["norms"][s.name]
    value, _ = evaluator.score(pruned)
    return {
        "method": method,
        "name": f"{method}@{sparsity:g}",
        "target_reduction": sparsity,
        metric: value,
        "sparsity": info["sparsity"],
        "weights_read": 1 - info["sparsity"],
    }


def plot(rows: list[dict], dense: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.axhline(dense, color="grey", linestyle=":", label=f"dense {dense:.2f}")
    markers = {"magnitude": "v", "wanda": "s", "ria": "D"}
    exact = [r for r in rows if r["method"] == "tardis" and r["predictor"] == "exact"]
    names = sorted({r["name"].split("@")[0] for r in exact})
    for i, name in enumerate(names):
        pts = sorted((r["weights_read"], r["stsb"]) for r in exact if r["name"].startswith(name + "@"))
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o-", color=f"C{i}", label=f"TARDIS {name} (fold + fallback rows)")
        pts = sorted((r["weights_read_with_predictor"], r["stsb"]) for r in exact if r["name"].startswith(name + "@"))
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o--", mfc="none", color=f"C{i}", alpha=0.5)
    for j, row in enumerate(r for r in rows if r["method"] == "tardis" and r["predictor"] != "exact"):
        label = f"TARDIS best + {row['predictor']} predictor (u={row['predictor_uncertainty']:g}): total read"
        ax.plot(row["weights_read_with_predictor"], row["stsb"], "*", ms=11, color=f"C{len(names) + j}", label=label)
    for method, marker in markers.items():
        pts = sorted((r["weights_read"], r["stsb"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker + "-", color="k", alpha=0.6, label=f"{method} pruning")
    ax.set_xlabel("FFN weights read per token / dense  (hollow, dashed: + exact W1 predictor; stars: cheap predictors)")
    ax.set_ylabel("STS-B dev Spearman × 100")
    ax.set_title("all-MiniLM-L6-v2: TARDIS vs one-shot pruning (ONNX Runtime)")
    low = min(r["stsb"] for r in rows)
    ax.set_ylim(max(low - 2, dense - 25), dense + 1.5)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig.savefig(path)`` (format from the suffix), then close it; a one-line error when it cannot be."""
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=dpi)
    except (OSError, ValueError) as exc:
        raise TardisError(f"{path}: cannot save the plot ({one_line(exc, 150)})") from None
    finally:
        plt.close(fig)


def check_plot_path(path: Path) -> None:
    """Refuse, before any work, a plot path whose suffix matplotlib cannot write."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise TardisError(
            f"{path}: matplotlib cannot write '.{suffix}' plots (use one of {', '.join(sorted(formats))})"
        )


def parse_predictor(spec: str) -> dict:
    """``int4``, ``int4:0``, ``lowrank-128``, ``lowrank-128:2`` → TardisConfig predictor fields."""
    kind, _, uncertainty = spec.partition(":")
    kind, _, rank = kind.partition("-")
    if kind not in PREDICTORS or (rank and kind != "lowrank"):
        raise TardisError(f"predictor {spec!r}: expected KIND[-RANK][:UNCERTAINTY], KIND one of {PREDICTORS}")
    fields: dict = {"predictor": kind}
    try:
        if rank:
            fields["predictor_rank"] = positive_int(rank)
        if uncertainty:
            fields["predictor_uncertainty"] = non_negative_float(uncertainty)
    except argparse.ArgumentTypeError as exc:
        raise TardisError(f"predictor {spec!r}: {exc}") from None
    return fields


def predictor_spec(text: str) -> str:
    """argparse type: a predictor spec :func:`parse_predictor` accepts."""
    try:
        parse_predictor(text)
    except TardisError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def reduction(text: str) -> float:
    """argparse type: a target reduction, finite and in [0, 1)."""
    value = finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="MiniLM ONNX export with its tokenizer beside it (default: export)")
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    p.add_argument("--calib", help="calibration text file or 'builtin' (default: WikiText-2 raw test)")
    p.add_argument("--calib-samples", type=positive_int, default=512)
    p.add_argument("--calib-seq-len", type=int_at_least(2), default=128)
    p.add_argument("--max-samples", type=positive_int, default=65536, help="calibration tokens kept per FFN")
    p.add_argument("--reductions", type=reduction, nargs="+", default=[0.5, 0.7, 0.8])
    p.add_argument("--sparsities", type=fraction, nargs="*", default=[0.5, 0.8], help="pruning baselines (none: skip)")
    p.add_argument("--pairs", type=positive_int, default=None, help="STS-B pairs used (default: all 1500)")
    p.add_argument("--quick", action="store_true", help="a small run (fewer sentences and tokens) for tests")
    p.add_argument("--ideas", nargs="+", choices=list(IDEAS), help="TARDIS variants to run (default: all)")
    p.add_argument(
        "--predictors",
        nargs="*",
        type=predictor_spec,
        default=["int4:0", "int4", "lowrank-128", "lowrank-128:2"],
        help="predictors evaluated on the best TARDIS setting at the top reduction: KIND[-RANK][:UNCERTAINTY]",
    )
    p.add_argument("--out", type=Path, default=REPO / "out" / "eval")
    return p


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    results_path, plot_path = args.out / "results.json", args.out / "accuracy_vs_bytes.png"
    check_output_folders(args.out)
    data = data_dir(args.data)
    if args.quick:
        args.calib_samples, args.calib_seq_len = min(args.calib_samples, 48), min(args.calib_seq_len, 64)
        args.pairs = args.pairs or 300
        args.reductions, args.sparsities = [0.8], [0.8]
    stsb_path = data / STSB
    calib_input = Path(args.calib) if args.calib and args.calib != text.BUILTIN else None
    inputs = [*(model_files(args.model) if args.model else []), calib_input, stsb_path]
    check_targets([results_path, plot_path], inputs, folders_may_be_missing=True)
    if args.model is None:
        from models.minilm import export_minilm

    model_path = args.model or export_minilm()
    model = load_model(model_path)
    tokenizer = text.load_tokenizer(model_path.parent)
    if not stsb_path.is_file():
        raise TardisError(f"STS-B dev not found at {stsb_path} (set --data or $TARDIS_DATA)")
    calib = args.calib or str(data / WIKITEXT)
    ffns, _ = find_ffns(model)

    def calibrate_on(source: str):
        feeds = text.text_feeds(
            tokenizer, text.paragraphs(source), model, samples=args.calib_samples, seq_len=args.calib_seq_len
        )
        t0 = time.perf_counter()
        samples = capture_ffn_inputs(model, ffns, feeds, args.max_samples)
        return samples, time.perf_counter() - t0

    samples, capture_s = calibrate_on(calib)
    evaluator = StsEvaluator(tokenizer, model, stsb_path, args.pairs)
    dense, _ = evaluator.score(model)
    rows: list[dict] = []

    def log(row):
        rows.append(row)
        extra = ""
        if row["method"] == "tardis":
            extra = f"  flagged={np.mean(row['outlier_fraction_eval']):.3f} recall={np.mean(row['recall_eval']):.3f}"
            extra += f"  total read {row['weights_read_with_predictor']:.3f}"
        print(f"{row['name']:<36} STS-B {row['stsb']:6.2f}  weights read {row['weights_read']:.3f}{extra}", flush=True)

    ideas = {"plain": IDEAS["plain"], BEST: IDEAS[BEST]} if args.quick else IDEAS
    if args.ideas:
        ideas = {name: IDEAS[name] for name in args.ideas}
    top = max(args.reductions)
    for name, idea in ideas.items():
        for r in args.reductions if name in ("plain", BEST) else [top]:
            config = TardisConfig(fallback="portable", target_reduction=r, **idea)
            log(tardis_row(f"{name}@{r:g}", model, ffns, samples, evaluator, config))
    for spec in args.predictors if not args.quick else args.predictors[:1]:
        config = TardisConfig(fallback="portable", target_reduction=top, **{**IDEAS[BEST], **parse_predictor(spec)})
        log(tardis_row(f"{BEST}+{spec}@{top:g}", model, ffns, samples, evaluator, config))
    for method in baselines.METHODS:
        for s in args.sparsities:
            if args.quick and method != "wanda":
                continue
            log(baseline_row(method, s, model, ffns, samples, evaluator))
    if not args.quick and not args.ideas and str(calib) != text.BUILTIN:
        builtin_samples, _ = calibrate_on(text.BUILTIN)
        config = TardisConfig(fallback="portable", target_reduction=top, **IDEAS[BEST])
        row = tardis_row(f"{BEST}@{top:g}", model, ffns, builtin_samples, evaluator, config)
        row["name"] = f"builtin-calib:{row['name']}"
        row["method"] = "tardis-builtin-calibration"
        log(row)
    n_tokens = samples[0].x.shape[0]
    d = ffns[0].w1_stored.shape[0]
    result = {
        "model": str(model_path),
        "calibration": {
            "source": str(calib),
            "paragraphs": args.calib_samples,
            "seq_len": args.calib_seq_len,
            "tokens_seen": samples[0].seen,
            "tokens_kept": n_tokens,
            "reservoir_bound_bytes": len(ffns) * args.max_samples * (4 * d + 8),
            "reservoir_bytes": int(sum(s.x.nbytes + s.y.nbytes for s in samples)),
            "capture_seconds": capture_s,
        },
        "stsb": {"path": str(stsb_path), "pairs": len(evaluator.gold), "tokens": evaluator.tokens},
        "dense": dense,
        "rows": rows,
    }
    make_output_folders(args.out)
    with StagedWrites() as staged:
        save_results(args.out, result, started, staged)
        plot(rows, dense, staged.path(plot_path))
    print(
        f"dense {dense:.2f}; calibration {samples[0].seen} tokens; peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB;"
        f" {result['seconds']:.0f} s; wrote {args.out / 'results.json'} and accuracy_vs_bytes.png"
    )
    return result


def save_results(out: Path, result: dict, started: float, staged: StagedWrites | None = None) -> None:
    """Add the peak RSS and the seconds since ``started`` to ``result``; write it to ``out/results.json``
    (strict JSON: non-finite numbers as null), through ``staged`` when given."""
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["seconds"] = time.perf_counter() - started
    if staged is None:
        with StagedWrites() as own:
            own.write_text(out / "results.json", strict_json(result, indent=2) + "\n")
    else:
        staged.write_text(out / "results.json", strict_json(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
