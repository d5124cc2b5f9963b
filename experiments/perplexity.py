"""``python -m experiments.perplexity``: held-out perplexity of a causal LM in ONNX Runtime, TARDIS vs pruning.

Method: the held-out text (WikiText-2 test) is tokenized with the tokenizer beside the model and cut
into non-overlapping windows of the context length (the last partial window dropped); each window is
scored on its own from an empty cache (``past_key_values.*`` of length 0 for with-past exports), so
perplexity = exp(mean over windows and positions 2..C of −log p(token | the tokens before it in its
window)). The log-probabilities are computed inside the graph (``LogSoftmax`` + ``GatherElements``
appended to the model), so the logits never leave ONNX Runtime.

The comparison (defaults: the self-trained GPT of ``models/gpt_selftrained.py``): calibrate once on
the training text (never the test split), then score the dense export; TARDIS with the ``accurate``
preset at several fallback reductions, the plain recipe at several coverages, and the accurate one
with an int4 predictor; magnitude / Wanda / RIA pruning at the same FFN reductions; and what users would pick
instead, beside the plain command composed with it (``--quantized``, on by default): ONNX Runtime's int8
(``quantize_dynamic``) and int4 (``MatMulNBitsQuantizer``) of the export, the plain command's defaults, and
``--quantize int8`` / ``--quantize int4``, every FFN folded (the never-slower check off: its accuracy is measured, its
speed is ``benchmarks/decode_tokens.py``'s). Each TARDIS row
reports the outlier fraction ``f`` measured per layer on the held-out tokens and both bytes-read
figures of docs/design.md §2 (fallback reduction; total read with the predictor). Writes
``results.json`` and ``perplexity.png`` to ``--out`` (default ``out/perplexity``), the plot elsewhere with
``--plot`` (the README's figure: ``--plot docs/gpt_selftrained_perplexity.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from experiments import baselines
from experiments.data import REPO, data_dir
from experiments.evaluate import (
    baseline_row,
    check_plot_path,
    parse_predictor,
    predictor_spec,
    reduction,
    save_figure,
    save_results,
    tardis_row,
)
from tardis_onnx import text
from tardis_onnx.calibrate import capture_ffn_inputs
from tardis_onnx.config import PRESETS, TardisConfig
from tardis_onnx.emit import fallback_form
from tardis_onnx.errors import (
    TardisError,
    fraction,
    int_at_least,
    non_negative_float,
    positive_int,
    run_command,
)
from tardis_onnx.feeds import Feeds, random_feeds
from tardis_onnx.files import StagedWrites, check_targets, model_files
from tardis_onnx.io import check_output_folders, load_model, make_output_folders
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import matmul_weight_bytes
from tardis_onnx.quantize import QUANTIZERS, quantize_model
from tardis_onnx.session import create_session, run_session

LOGPROB = "tardis_eval/token_logprob"
LABELS = "tardis_eval/labels"


def windows(ids: np.ndarray, context: int) -> np.ndarray:
    """``ids`` cut into non-overlapping rows of ``context`` tokens, ``[n, context]`` (the remainder dropped)."""
    n = len(ids) // context
    if context < 2 or n < 1:
        raise TardisError(f"need at least one window of >= 2 tokens (got {len(ids)} tokens, context {context})")
    return np.asarray(ids[: n * context], dtype=np.int64).reshape(n, context)


def lm_feeds(model: onnx.ModelProto, ids: np.ndarray) -> Feeds:
    """Feeds for a causal-LM export scoring ``ids: [batch, seq]`` from scratch: ones as the mask,
    positions ``0..seq-1``, empty past key/values."""
    feeds = random_feeds(model, batch=ids.shape[0], sequence=ids.shape[1], past=0)
    feeds["input_ids"] = ids.astype(feeds["input_ids"].dtype)
    return feeds


def with_token_logprobs(model: onnx.ModelProto, logits: str = "logits") -> onnx.ModelProto:
    """A copy of ``model`` with input ``LABELS [b, s−1, 1]`` and output ``LOGPROB [b, s−1, 1]`` (float32):
    ``log_softmax(logits[:, :−1])`` at each next token."""
    scored = onnx.ModelProto()
    scored.CopyFrom(model)
    graph = scored.graph
    if logits not in {o.name for o in graph.output}:
        raise TardisError(f"the model has no '{logits}' output: not a causal-LM export")
    graph.initializer.extend(
        [
            helper.make_tensor(f"{LOGPROB}/start", TensorProto.INT64, [1], [0]),
            helper.make_tensor(f"{LOGPROB}/end", TensorProto.INT64, [1], [-1]),
            helper.make_tensor(f"{LOGPROB}/axis", TensorProto.INT64, [1], [1]),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["batch", "labels", 1]))
    graph.node.extend(
        [
            helper.make_node(
                "Slice", [logits, f"{LOGPROB}/start", f"{LOGPROB}/end", f"{LOGPROB}/axis"], [f"{LOGPROB}/prefix"]
            ),
            # In float32 whatever the export's logits are (fp16 log-softmax over a large vocabulary loses digits).
            helper.make_node("Cast", [f"{LOGPROB}/prefix"], [f"{LOGPROB}/prefix_float"], to=TensorProto.FLOAT),
            helper.make_node("LogSoftmax", [f"{LOGPROB}/prefix_float"], [f"{LOGPROB}/all"], axis=-1),
            helper.make_node("GatherElements", [f"{LOGPROB}/all", LABELS], [LOGPROB], axis=2),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(LOGPROB, TensorProto.FLOAT, ["batch", "labels", 1]))
    return scored


class PerplexityEvaluator:
    """Scores models on fixed token windows: ``score(model, probes) -> (perplexity, {probe: False count})``.

    ``tokens``: the tokens fed (every window position, for the probes' outlier fractions).
    """

    def __init__(self, model: onnx.ModelProto, ids: np.ndarray, context: int, batch: int = 8) -> None:
        rows = windows(ids, context)
        self.feeds = [
            {**lm_feeds(model, rows[i : i + batch]), LABELS: rows[i : i + batch, 1:, None]}
            for i in range(0, len(rows), batch)
        ]
        self.tokens = rows.size
        self.predicted = rows[:, 1:].size

    def score(self, model: onnx.ModelProto, probes: list[str] = ()) -> tuple[float, dict[str, float]]:
        scored = with_token_logprobs(model)
        for name in probes:
            scored.graph.output.append(helper.make_tensor_value_info(name, TensorProto.BOOL, None))
        session = create_session(scored)
        nll, outside = 0.0, dict.fromkeys(probes, 0.0)
        for feeds in self.feeds:
            values = run_session(session, [LOGPROB, *probes], feeds)
            nll -= float(values[0].astype(np.float64).sum())
            for name, inside in zip(probes, values[1:], strict=True):
                outside[name] += float((~inside).sum())
        return math.exp(nll / self.predicted), outside


def quantized_rows(model: onnx.ModelProto, ffns, samples, evaluator, max_samples: int) -> list[dict]:
    """ONNX Runtime's int8 and int4 of ``model`` (what users pick instead), then the plain command's defaults alone
    and composed with each (``--quantize``), every FFN folded. ``weights_read``: the FFN weight bytes a token reads
    (the report's, at the calibration tokens' flag rate, predictor included) over the float FFNs'."""
    itemsize = np.dtype(ffns[0].dtype).itemsize
    float_bytes = sum((f.w1_stored.size + f.w2_stored.size) * itemsize for f in ffns)
    rows = []
    for kind in QUANTIZERS:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        value, _ = evaluator.score(quantize_model(copy, kind))
        read = sum(
            matmul_weight_bytes(*f.w1_stored.shape, kind, itemsize)
            + matmul_weight_bytes(*f.w2_stored.shape, kind, itemsize)
            for f in ffns
        )
        rows.append({"method": "quantized", "name": kind, "perplexity": value, "weights_read": read / float_bytes})
    for kind in ("none", *QUANTIZERS):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        config = TardisConfig(quantize=kind, speed_check=False, max_samples=max_samples)
        result = optimize_model(copy, config, samples=samples)
        value, _ = evaluator.score(result.model)
        read = sum(r.fallback_read_bytes + r.predictor_bytes for r in result.ffns)
        name = "tardis" if kind == "none" else f"tardis --quantize {kind}"
        predictors = [r.predictor for r in result.ffns]
        row = {"method": "composed", "name": name, "perplexity": value, "weights_read": read / float_bytes}
        rows.append({**row, "predictors": predictors, "fallback": fallback_form(config.fallback).name})
    return rows


def train_windows(ids: np.ndarray, context: int, count: int) -> np.ndarray:
    """``count`` windows spread evenly over the training tokens (calibration)."""
    if len(ids) < context:
        raise TardisError(f"the calibration text has {len(ids)} tokens, fewer than one window of {context}")
    starts = np.linspace(0, len(ids) - context, num=min(count, max(1, len(ids) // context))).astype(np.int64)
    return np.stack([ids[s : s + context] for s in starts])


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TardisError(f"'{path}' cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise TardisError(f"'{path}' is not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def plot(rows: list[dict], dense: float, title: str, path: Path) -> None:
    """Perplexity vs FFN weights read per token: TARDIS (fold + fallback rows, and + predictor) vs pruning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.axhline(dense, color="grey", linestyle=":", label=f"dense {dense:.2f}")
    exact = [r for r in rows if r["method"] == "tardis" and r["predictor"] == "exact"]
    for i, recipe in enumerate(sorted({r["name"].split("@")[0] for r in exact})):
        mine = [r for r in exact if r["name"].split("@")[0] == recipe]
        for key, style, alpha in (("weights_read", "o-", 1.0), ("weights_read_with_predictor", "o--", 0.4)):
            xs, ys = zip(*sorted((r[key], r["perplexity"]) for r in mine), strict=True)
            label = f"TARDIS {recipe}" + (" (+ exact W1 predictor)" if alpha < 1 else " (fold + fallback rows)")
            ax.plot(xs, ys, style, color=f"C{i}", alpha=alpha, mfc="none" if alpha < 1 else None, label=label)
    for j, r in enumerate(r for r in rows if r["method"] == "tardis" and r["predictor"] != "exact"):
        ax.plot(
            r["weights_read_with_predictor"],
            r["perplexity"],
            "*",
            ms=11,
            color=f"C{4 + j}",
            label=f"TARDIS {r['name']}: total read",
        )
    for method, marker in (("magnitude", "v"), ("wanda", "s"), ("ria", "D")):
        pts = sorted((r["weights_read"], r["perplexity"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker + "-", color="k", alpha=0.6, label=f"{method} pruning")
    # ONNX Runtime's quantizers, the plain command and its compositions with them
    for k, r in enumerate(r for r in rows if r["method"] in ("quantized", "composed")):
        marker = "X" if r["method"] == "quantized" else "P"
        ax.plot(r["weights_read"], r["perplexity"], marker, ms=8, color=f"C{5 + k}", label=r["name"], alpha=0.8)
    worst = max(r["perplexity"] for r in rows)
    ax.set_ylim(dense - 0.02 * (worst - dense) - 1e-6, min(worst, 3 * dense) + 0.05 * (min(worst, 3 * dense) - dense))
    ax.set_xlabel("FFN weights read per token / dense")
    ax.set_ylabel("held-out perplexity (points above 3× dense clipped)" if worst > 3 * dense else "held-out perplexity")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, help="causal-LM ONNX export, tokenizer beside it (default: the self-trained GPT)"
    )
    p.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    p.add_argument(
        "--minutes", type=non_negative_float, default=20.0, help="training budget of the default self-trained GPT"
    )
    p.add_argument("--heldout", type=Path, help="held-out text (default: DATA/wikitext-2/test.txt)")
    p.add_argument("--calib", type=Path, nargs="+", help="calibration text files (default: the training text)")
    p.add_argument(
        "--context", type=int_at_least(2), default=None, help="window length (default: positions in config.json)"
    )
    p.add_argument("--calib-windows", type=positive_int, default=128, help="calibration windows of the context length")
    p.add_argument("--max-windows", type=positive_int, default=None, help="held-out windows scored (default: all)")
    p.add_argument("--max-samples", type=positive_int, default=65536, help="calibration tokens kept per FFN")
    p.add_argument("--reductions", type=reduction, nargs="+", default=[0.5, 0.7, 0.8], help="accurate preset targets")
    p.add_argument("--coverages", type=fraction, nargs="*", default=[0.8, 0.9, 0.95], help="plain recipe coverages")
    p.add_argument("--sparsities", type=fraction, nargs="*", default=None, help="pruning (default: the reductions)")
    p.add_argument(
        "--predictors", type=predictor_spec, nargs="*", default=["int4"], help="on accurate at the top reduction"
    )
    p.add_argument(
        "--quantized",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ONNX Runtime's int8 and int4, the plain command and --quantize int8|int4 beside them",
    )
    p.add_argument("--out", type=Path, default=REPO / "out" / "perplexity")
    p.add_argument("--plot", type=Path, default=None, help="where the plot goes (default: perplexity.png in --out)")
    return p


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    plot_path = args.plot or args.out / "perplexity.png"
    check_output_folders(args.out, plot_path.parent)
    inputs = [*(model_files(args.model) if args.model else []), *(args.calib or []), args.heldout]
    check_targets([args.out / "results.json", plot_path], inputs, folders_may_be_missing=True)
    check_plot_path(plot_path)
    data = data_dir(args.data)
    if args.model is None:
        from models import gpt_selftrained as recipe

        train_text, heldout_text = recipe.read_texts(data)
        heldout_name = str(data / recipe.HELDOUT_FILE)
        model_path = recipe.export_selftrained(data, minutes=args.minutes)
    elif not (args.calib and args.heldout):
        raise TardisError("--model needs --calib (its training text) and --heldout (held-out text)")
    model_path = args.model or model_path
    if args.calib:
        train_text = "\n".join(_read(p) for p in args.calib)
    if args.heldout:
        heldout_text, heldout_name = _read(args.heldout), str(args.heldout)
    model = load_model(model_path)
    tokenizer = text.load_tokenizer(model_path.parent)
    hf_config = json.loads(_read(model_path.parent / "config.json")) if not args.context else {}
    context = args.context or hf_config.get("n_positions") or hf_config.get("max_position_embeddings", 128)
    ids = np.asarray(tokenizer(heldout_text)["input_ids"], dtype=np.int64)
    if args.max_windows:
        ids = ids[: args.max_windows * context]
    ffns, _ = find_ffns(model)
    train_ids = np.asarray(tokenizer(train_text)["input_ids"], dtype=np.int64)
    vocabulary = text.embedding_rows(model)
    for tokens in (ids, train_ids):
        text.check_token_ids(tokens, vocabulary)
    calib_rows = train_windows(train_ids, context, args.calib_windows)
    t0 = time.perf_counter()
    feeds = [lm_feeds(model, calib_rows[i : i + 8]) for i in range(0, len(calib_rows), 8)]
    samples = capture_ffn_inputs(model, ffns, feeds, args.max_samples)
    capture_s = time.perf_counter() - t0
    evaluator = PerplexityEvaluator(model, ids, context)
    dense, _ = evaluator.score(model)
    print(f"dense: perplexity {dense:.3f} on {evaluator.predicted} predicted tokens", flush=True)
    rows: list[dict] = []

    def log(row: dict) -> None:
        rows.append(row)
        extra = ""
        if "outlier_fraction_eval" in row:
            extra = (
                f"  f={np.mean(row['outlier_fraction_eval']):.3f}  fallback reduction "
                f"{row['fallback_reduction']:.3f}  total read {row['weights_read_with_predictor']:.3f}"
            )
        print(
            f"{row['name']:<28} ppl {row['perplexity']:9.3f}  weights read {row['weights_read']:.3f}{extra}", flush=True
        )

    def tardis(name: str, **fields) -> None:
        # Each row measures its recipe as named: the exact predictor unless one is named, no held-out check.
        fields = {"predictor": "exact", "holdout": 0.0, **fields}
        config = TardisConfig(fallback="portable", max_samples=args.max_samples, **fields)
        log(tardis_row(name, model, ffns, samples, evaluator, config, metric="perplexity"))

    for r in args.reductions:
        tardis(f"accurate@{r:g}", target_reduction=r, **PRESETS["accurate"])
    for t in args.coverages:
        tardis(f"plain-coverage@{t:g}", coverage=t, **PRESETS["plain"])
    top = max(args.reductions)
    for spec in args.predictors:
        tardis(f"accurate+{spec}@{top:g}", target_reduction=top, **PRESETS["accurate"], **parse_predictor(spec))
    for method in baselines.METHODS:
        for s in args.reductions if args.sparsities is None else args.sparsities:
            log(baseline_row(method, s, model, ffns, samples, evaluator, metric="perplexity"))
    if args.quantized:
        for row in quantized_rows(model, ffns, samples, evaluator, args.max_samples):
            log(row)
    result = {
        "model": str(model_path),
        "method": "non-overlapping windows of the context length, each from an empty cache; "
        "perplexity = exp(mean NLL of positions 2..C); ONNX Runtime CPU, graph optimisations off",
        "context": context,
        "heldout": {
            "path": heldout_name,
            "windows": evaluator.tokens // context,
            "tokens_predicted": evaluator.predicted,
        },
        "calibration": {
            "windows": len(calib_rows),
            "tokens": int(calib_rows.size),
            "tokens_kept": samples[0].x.shape[0],
            "capture_seconds": capture_s,
        },
        "dense": dense,
        "rows": rows,
    }
    make_output_folders(args.out, plot_path.parent)
    entry = Path(model_path).parent.parent.name.split("__")
    name = f"self-trained GPT-2 {entry[1]}" if entry[0] == "gpt-selftrained" else Path(model_path).stem
    with StagedWrites() as staged:
        save_results(args.out, result, started, staged)
        plot(rows, dense, f"{name}: held-out perplexity, ONNX Runtime", staged.path(plot_path))
    print(f"dense {dense:.3f}; {result['seconds']:.0f} s; wrote {args.out / 'results.json'} and {plot_path}")
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
