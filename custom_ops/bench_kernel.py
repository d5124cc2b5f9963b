#!/usr/bin/env python3
"""Microbenchmark of ai.tardis::FfnFallback on the CPU (ONNX Runtime, library registered).

    python custom_ops/bench_kernel.py [--tokens 1] [--d 1024] [--h 4096] [--flagged 0.05] [--threads 2]

Times the op against the dense FFN it serves (MatMul, Gelu, MatMul) and against a trivial
model with the same seven inputs (the fixed cost of session.run). Inputs rotate over many
random tokens, so every call flags a different set of neurons (no cache-warm rows).
Median (and 10th percentile) of alternated repeats, in microseconds. The machine should be
otherwise idle: with more busy threads than cores, ONNX Runtime's spinning workers stall.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tardis_onnx import runtime

INPUTS = ("x", "y_folded", "z_hat", "w1t", "b1", "w2", "lines")
OPSETS = [helper.make_opsetid("", 20), helper.make_opsetid("ai.tardis", 1)]


def fallback_model(weights: dict) -> bytes:
    """The op with its weights (w1t, b1, w2, lines) as initializers, as in a rewritten model."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("x", "y_folded", "z_hat")]
    inits = [numpy_helper.from_array(weights[n], n) for n in ("w1t", "b1", "w2", "lines")]
    node = helper.make_node("FfnFallback", list(INPUTS), ["y"], domain="ai.tardis")
    graph = helper.make_graph([node], "fallback", inputs, [helper.make_tensor_value_info("y", f, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()


def overhead_model() -> bytes:
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("x", "y_folded", "z_hat")]
    node = helper.make_node("Identity", ["y_folded"], ["y"])
    graph = helper.make_graph([node], "overhead", inputs, [helper.make_tensor_value_info("y", f, None)])
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()


def dense_model(w1: np.ndarray, w2: np.ndarray) -> bytes:
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["z"]),
        helper.make_node("Gelu", ["z"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", f, None)],
        [helper.make_tensor_value_info("y", f, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=10).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--flagged", type=float, default=0.05, help="fraction of neurons flagged per token")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=400)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    d, h, t = args.d, args.h, args.tokens
    w1t = (rng.standard_normal((h, d)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    b1 = np.zeros(h, np.float32)
    # z_hat ~ N(0, 1); a window of +-q flags a fraction `flagged` of neurons per token.
    from scipy.stats import norm

    q = norm.ppf(1 - args.flagged / 2)
    lines = np.stack([np.full(h, 0.5), np.zeros(h), np.full(h, -q), np.full(h, q)]).astype(np.float32)
    weights = {"w1t": w1t, "b1": b1, "w2": w2, "lines": lines}
    feeds = [
        {
            "x": rng.standard_normal((t, d)).astype(np.float32),
            "y_folded": rng.standard_normal((t, d)).astype(np.float32),
            "z_hat": rng.standard_normal((t, h)).astype(np.float32),
        }
        for _ in range(64)
    ]

    so = runtime.session_options(threads=args.threads, optimization="all")
    sessions = {
        "FfnFallback": (ort.InferenceSession(fallback_model(weights), so), lambda f: f),
        "session.run overhead": (ort.InferenceSession(overhead_model(), so), lambda f: f),
        "dense FFN": (ort.InferenceSession(dense_model(np.ascontiguousarray(w1t.T), w2), so), lambda f: {"x": f["x"]}),
    }
    times = {name: [] for name in sessions}
    for _ in range(20):  # warm-up
        for session, feed in sessions.values():
            session.run(None, feed(feeds[0]))
    for r in range(args.repeats):
        f = feeds[r % len(feeds)]
        for name, (session, feed) in sessions.items():
            inputs = feed(f)
            start = time.perf_counter()
            session.run(None, inputs)
            times[name].append(time.perf_counter() - start)
    print(f"tokens={t} d={d} h={h} flagged~{args.flagged:.0%} threads={args.threads} ({args.repeats} runs)")
    for name, samples in times.items():
        p10 = statistics.quantiles(samples, n=10)[0]
        print(f"  {name:22s} median {statistics.median(samples) * 1e6:8.1f} us   p10 {p10 * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
