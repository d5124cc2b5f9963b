"""One FFN in ONNX Runtime (CPU): dense vs folded + outlier fallback, side by side in one run.

For each width d (h = 4d), token count and outlier fraction: the dense FFN and its rewrite (custom-op
fallback, the chosen predictor) run alternately on the same inputs after a warm-up; medians are
compared, and the FFN weight bytes-read ratio (docs/design.md §2) is printed beside the measured one.
Each model holds enough copies of the FFN (its own weights each, all fed the same x) that one run
streams ``--stack-mib`` of rewritten weights, four times the last-level cache by default: the weights
come from memory, as a model's layers do, and a time is a run's over the number of copies.
A third model, the rewrite with every window widened to everything (`never_flagging`), splits the
rewrite's time into its fixed part and the flagged neurons' rows: each point also reports the read
rates (GB/s) of the dense weights, the fixed part and the rows (at decode, memory read rates).
Random weights: speed depends on how many neurons fall back, not on which, so each neuron's window
is calibrated on the predictor's own outputs to flag the requested fraction (measured on fresh
tokens and reported). Whether a predictor finds the true outliers is measured on real weights by
``python -m experiments.evaluate``, not here.

    python benchmarks/ffn_latency.py --out out/bench            # full grid, JSON + PNG
    python benchmarks/ffn_latency.py --dims 1024 --tokens 1 --fractions 0.05
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tardis_onnx import reference, runtime
from tardis_onnx.emit import CustomFallback, emit_ffn, replace_nodes
from tardis_onnx.errors import finite_float, fraction, non_negative_int, positive_int, run_command
from tardis_onnx.files import StagedWrites
from tardis_onnx.io import make_output_folders
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import PREDICTORS, predictor_class


def dense_model(d: int, h: int, rng: np.random.Generator) -> onnx.ModelProto:
    weights = {
        "w1": rng.normal(size=(d, h)) / np.sqrt(d),
        "b1": rng.normal(size=h) * 0.5,
        "w2": rng.normal(size=(h, d)) / np.sqrt(h),
        "b2": rng.normal(size=d) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["z0"], name="/ffn/fc1/MatMul"),
        helper.make_node("Add", ["z0", "b1"], ["z"], name="/ffn/fc1/Add"),
        helper.make_node("Gelu", ["z"], ["g"], name="/ffn/act/Gelu"),
        helper.make_node("MatMul", ["g", "w2"], ["y0"], name="/ffn/fc2/MatMul"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="/ffn/fc2/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", d])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def rewrite(model: onnx.ModelProto, x_cal: np.ndarray, fraction: float, kind: str, rank: int, margin: float):
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    ffn = find_ffns(rewritten)[0][0]
    predictor = predictor_class(kind).fit(x_cal, ffn.w1, rank)
    # Windows from tokens the predictor was not fitted on, as at inference.
    x_windows = np.random.default_rng(1).normal(size=x_cal.shape)
    lines = reference.calibrate_lines(predictor.predict(x_windows, ffn.w1, ffn.b1), 1.0 - fraction, "erf")
    nodes, constants = emit_ffn(ffn, lines, CustomFallback(), 20, margin, 1.0 - fraction, predictor)
    replace_nodes(rewritten, [(ffn.nodes, nodes, constants.tensors())])
    rewritten.opset_import.extend([helper.make_opsetid("ai.tardis", 1), helper.make_opsetid("com.microsoft", 1)])
    return rewritten, ffn, lines, predictor


DECODE_INPUTS = 32  # one-token inputs timed in turn
NEVER = 3.0e38  # a margin no finite z_hat gets past


def never_flagging(model: onnx.ModelProto) -> onnx.ModelProto:
    """The rewritten model with every fallback window widened to everything: the same reads and work
    except the flagged neurons' W1/W2 rows, so (rewritten − this) times the row reads alone."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "FfnFallback":
            margin = next((a for a in node.attribute if a.name == "margin"), None)
            if margin is None:
                node.attribute.append(helper.make_attribute("margin", NEVER))
            else:
                margin.f = NEVER
    return copy


def stacked(model: onnx.ModelProto, copies: int) -> onnx.ModelProto:
    """``copies`` copies of a one-FFN model side by side, each with its own weights (same values, separate
    buffers), all reading input x, outputs ``y#0 … y#n−1``: one run streams every copy's weights once,
    as a model's layers do. (Caches evicted between runs instead leave dirty lines, whose write-backs land
    in the timed run, or, evicted by reading, let a scan-resistant cache keep the reused FFN weights.)"""
    graph = model.graph
    x = graph.input[0].name
    nodes, initializers, outputs = [], [], []
    for k in range(copies):

        def renamed(name: str, k: int = k) -> str:
            return name if name in ("", x) else f"{name}#{k}"  # "": an absent optional input

        for tensor in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = renamed(tensor.name)
            initializers.append(copy)
        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = renamed(node.name)
            copy.input[:] = [renamed(i) for i in node.input]
            copy.output[:] = [renamed(o) for o in node.output]
            nodes.append(copy)
        output = onnx.ValueInfoProto()
        output.CopyFrom(graph.output[0])
        output.name = renamed(output.name)
        outputs.append(output)
    stack = helper.make_graph(nodes, f"{graph.name}_x{copies}", list(graph.input), outputs, initializers)
    return helper.make_model(stack, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def median_times(sessions: dict, feeds: list[dict], repeats: int, warmup: int = 5, block: int = 1) -> dict[str, float]:
    """Seconds per run: for each of the inputs ``feeds`` (used in turn) the median of its runs, averaged
    over the inputs (one token flags more neurons than another: each input's cost counts once). The
    sessions take turns so drift hits all alike: ``block`` runs of one, then ``block`` of the next (with
    spinning workers, a session's first two runs of a turn are not timed: the other session's workers
    are still spinning down)."""
    times: dict[str, list[list[float]]] = {name: [[] for _ in feeds] for name in sessions}
    runs = dict.fromkeys(sessions, 0)
    settle = 2 if block > 1 else 0
    turns = warmup + -(-repeats // block)
    for turn in range(turns):
        for name, session in sessions.items():
            for i in range(settle + block):
                k = runs[name] % len(feeds)
                runs[name] += 1
                start = time.perf_counter()
                session.run(None, feeds[k])
                if turn >= warmup and i >= settle:
                    times[name][k].append(time.perf_counter() - start)
    return {name: float(np.mean([np.median(t) for t in per_input if t])) for name, per_input in times.items()}


def grid_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of the issue's grid (widths, token counts, outlier fractions), shared by the CUDA script."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--dims", type=positive_int, nargs="+", default=[768, 1024, 1280])
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[1, 128, 512])
    parser.add_argument("--fractions", type=fraction, nargs="+", default=[0.02, 0.05, 0.10])
    parser.add_argument("--rank", type=positive_int, default=64, help="rank of the low-rank predictor")
    return parser


def measure_point(d: int, fraction: float, args: argparse.Namespace) -> list[dict]:
    """Rows of one width and outlier fraction, every token count: dense vs rewritten stacks, side by side."""
    import onnxruntime as ort

    rng = np.random.default_rng([d, round(fraction * 1e4)])
    h = 4 * d
    model = dense_model(d, h, rng)
    x_cal = rng.normal(size=(4096, d))
    rewritten, ffn, lines, predictor = rewrite(model, x_cal, fraction, args.predictor, args.rank, args.margin)
    x_test = rng.normal(size=(2048, d))
    flagged = float(reference.outside_window(predictor.predict(x_test, ffn.w1, ffn.b1), lines, args.margin).mean())
    dense_bytes = 2 * d * h * 4
    fixed_read = d * d * 4 + predictor.read_bytes(d, h, 4)
    copies = max(1, -(-args.stack_mib * 2**20 // int(fixed_read + flagged * dense_bytes)))
    if args.spinning:
        # Both sessions on one global pool (spinning by default), as a server hosting several models
        # runs: the idle session's workers then cannot spin on the cores the timed one needs.
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(args.threads, 1)  # this process's first session comes next
        options = runtime.session_options(optimization="all")
        options.use_per_session_threads = False
    else:
        options = runtime.session_options(threads=args.threads, optimization="all")
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: ort.InferenceSession(stacked(m, copies).SerializeToString(), options, providers=["CPUExecutionProvider"])
        for name, m in (("dense", model), ("tardis", rewritten), ("unflagged", never_flagging(rewritten)))
    }
    rows = []
    for tokens in args.tokens:
        # Decode: DECODE_INPUTS different tokens in turn (and eight times the repeats: short, noisy runs);
        # prefill: one batch (and a third of the repeats: long runs).
        inputs = DECODE_INPUTS if tokens == 1 else 1
        feeds = [{"x": rng.normal(size=(tokens, d)).astype(np.float32)} for _ in range(inputs)]
        repeats = args.repeats * 8 if tokens == 1 else max(5, args.repeats // 3)
        flags = [
            reference.outside_window(predictor.predict(f["x"].astype(np.float64), ffn.w1, ffn.b1), lines, args.margin)
            for f in feeds
        ]
        timed_flagged = float(np.concatenate(flags).mean())
        # Rows read per run: those of the neurons that any token of the input flags (one block: ≤ 512 tokens).
        rows_read = dense_bytes * np.mean([f.any(axis=0).mean() for f in flags])
        # Spinning: turns of 10 runs whose first 2 are untimed, one turn of warm-up.
        t = median_times(sessions, feeds, repeats, warmup=1 if args.spinning else 5, block=10 if args.spinning else 1)
        t = {name: seconds / copies for name, seconds in t.items()}
        rows.append(
            {
                "d": d,
                "h": h,
                "tokens": tokens,
                "outlier_fraction": fraction,
                "flagged_fraction": timed_flagged,
                "flagged_fraction_2048_tokens": flagged,
                "predictor": predictor.kind,
                "rank": predictor.rank,
                "copies": copies,
                "dense_us": t["dense"] * 1e6,
                "tardis_us": t["tardis"] * 1e6,
                "unflagged_us": t["unflagged"] * 1e6,
                "speedup": t["dense"] / t["tardis"],
                "bytes_read_ratio": dense_bytes / (fixed_read + timed_flagged * dense_bytes),
                # Read rates: the dense weights, the rewrite's fixed part (nothing flagged) and the flagged
                # neurons' W1/W2 rows (the time they add over the never-flagging rewrite), GB/s.
                "dense_gbps": dense_bytes / t["dense"] / 1e9,
                "fixed_gbps": fixed_read / t["unflagged"] / 1e9,
                "rows_gbps": rows_read / max(t["tardis"] - t["unflagged"], 1e-9) / 1e9,
            }
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = grid_parser(__doc__)
    parser.add_argument("--predictor", choices=PREDICTORS, default="lowrank")
    parser.add_argument("--margin", type=finite_float, default=0.0)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument(
        "--spinning",
        action="store_true",
        help="let ONNX Runtime's intra-op workers spin between ops (its default, as deployed): both sessions share "
        "one global intra-op pool, take turns of 10 runs and the first 2 of each turn are not timed. Off by "
        "default here: every run then starts from sleeping workers, each session with its own pool",
    )
    parser.add_argument(
        "--stack-mib",
        type=non_negative_int,
        default=128,
        help="copies of the FFN per model until one run reads this many MiB of rewritten weights (the default: "
        "four times a 32 MiB last-level cache); 0: one copy, whose weights then stay in cache between runs",
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    return parser


def run(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    make_output_folders(args.out)
    rows = []
    print(
        f"{'d':>5} {'tokens':>6} {'f':>5} {'flagged':>7} {'dense us':>9} {'tardis us':>9} {'speedup':>7} {'bound':>6}"
        "  GB/s: dense  fixed   rows"
    )
    # One fresh process per (d, fraction): in one process, a second rewritten stack timed up to 1.5x slower
    # than the first (d = 1024, 5%: 103 us first, 133-153 us after), a state a deployed model never sees.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn, max_tasks_per_child=1) as pool:
        for d in args.dims:
            for fraction in args.fractions:
                for row in pool.submit(measure_point, d, fraction, args).result():
                    rows.append(row)
                    cells = (
                        d,
                        row["tokens"],
                        f"{fraction:.2f}",
                        f"{row['flagged_fraction']:.3f}",
                        f"{row['dense_us']:.1f}",
                        f"{row['tardis_us']:.1f}",
                        f"{row['speedup']:.2f}x",
                        f"{row['bytes_read_ratio']:.2f}x",
                    )
                    rates = (f"{row[k]:.0f}" for k in ("dense_gbps", "fixed_gbps", "rows_gbps"))
                    print(" ".join(f"{c:>9}" for c in cells), " " * 4, " ".join(f"{r:>6}" for r in rates), flush=True)
    meta = {
        "threads": args.threads,
        "repeats": args.repeats,
        "onnxruntime": ort.__version__,
        "machine": platform.processor() or platform.machine(),
        "predictor": args.predictor,
        "rank": args.rank,
        "intra_op_spinning": args.spinning,
        "stack_mib": args.stack_mib,
    }
    with StagedWrites() as staged:
        staged.write_text(args.out / "ffn_latency.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        plot(rows, staged.path(args.out / "ffn_latency.png"))
    print(f"wrote {args.out / 'ffn_latency.json'} and {args.out / 'ffn_latency.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    token_counts = sorted({r["tokens"] for r in rows})
    decode = [r for r in rows if r["tokens"] == 1]
    panels = len(token_counts) + bool(decode)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, tokens in zip(axes[0], token_counts, strict=False):
        for i, d in enumerate(sorted({r["d"] for r in rows})):
            sel = [r for r in rows if r["tokens"] == tokens and r["d"] == d]
            fractions = [r["outlier_fraction"] * 100 for r in sel]
            ax.plot(fractions, [r["speedup"] for r in sel], "o-", color=f"C{i}", label=f"d={d} measured")
            ax.plot(
                fractions,
                [r["bytes_read_ratio"] for r in sel],
                "x--",
                color=f"C{i}",
                alpha=0.5,
                label=f"d={d} bytes-read bound",
            )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"{tokens} token(s)")
        ax.set_xlabel("outlier fraction (%)")
        ax.set_ylabel("speedup vs dense FFN")
        ax.legend(fontsize=7)
    if decode:  # where the decode time goes: how fast each kind of read streams
        ax = axes[0][-1]
        labels = [f"d={r['d']}\n{r['outlier_fraction'] * 100:.0f}%" for r in decode]
        kinds = (("dense_gbps", "dense W1+W2"), ("fixed_gbps", "rewrite, none flagged"), ("rows_gbps", "flagged rows"))
        for k, (key, label) in enumerate(kinds):
            ax.bar(np.arange(len(decode)) + (k - 1) * 0.27, [r[key] for r in decode], 0.27, label=label)
        ax.set_xticks(np.arange(len(decode)), labels, fontsize=7)
        ax.set_title("1 token: read rates")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
