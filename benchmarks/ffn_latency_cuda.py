"""One FFN on a CUDA GPU: dense vs folded + outlier fallback (the ``ai.tardis`` CUDA kernel), side by side.

The GPU machines lent to this project have a CPU-only ONNX Runtime, so the CUDA kernel runs through
its C entry point (``tardis_ffn_fallback_cuda_*`` in ``libtardis_ops_cuda.so``) on torch device
pointers, and the MatMuls around it are torch's (cuBLAS), as ONNX Runtime's CUDA provider would run
them. Dense: ``GELU(x·W1 + b1)·W2 + b2``. Rewritten: ``x·[Wf | U]`` (fold and the low-rank predictor's
first factor in one MatMul, as the emitted graph does), then with ``--form z_hat`` (default) a second
MatMul ``z_hat = t·V + b1`` and the fallback kernel reading it, with ``--form fused`` the kernel alone,
computing ``z_hat`` from the code ``t`` and V itself (the form the optimizer emits).

Weights are random; each neuron's window is calibrated on the predictor's own outputs to flag the
requested fraction (measured on fresh tokens and reported). Each timed run goes through ``layers``
distinct copies of the FFN so that the weights come from HBM, not the 60 MB L2, and is replayed from a
CUDA graph (no launch overhead, as serving stacks decode); medians of alternated runs. Before timing,
every configuration checks that the rewrite with all neurons falling back equals the dense FFN.

    python benchmarks/ffn_latency_cuda.py --out out/bench-cuda
    python benchmarks/ffn_latency_cuda.py --form fused --out out/bench-cuda-fused
"""

from __future__ import annotations

import argparse
import ctypes
import json
from functools import partial
from pathlib import Path

import numpy as np
from ffn_latency import grid_parser, plot  # this script's folder is on sys.path

from tardis_onnx import reference, runtime
from tardis_onnx.errors import TardisError, positive_int, run_command
from tardis_onnx.files import StagedWrites
from tardis_onnx.io import check_output_folders, make_output_folders
from tardis_onnx.predictor import fit_lowrank

L2_BYTES = 60 << 20  # the H200's
DEVICE = "cuda"


def load_entry(dtype_name: str):
    lib = ctypes.CDLL(str(runtime.library_path(cuda=True)))
    fn = getattr(lib, f"tardis_ffn_fallback_cuda_{dtype_name}")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    lib.tardis_cuda_error_string.restype = ctypes.c_char_p
    return fn, lib.tardis_cuda_error_string


class Layer:
    """One FFN's dense and rewritten weights on the GPU, its windows flagging ``fraction`` of the neurons."""

    def __init__(self, torch, d: int, fraction: float, rank: int, dtype, rng: np.random.Generator) -> None:
        h = 4 * d
        w1 = rng.normal(size=(d, h)) / np.sqrt(d)
        b1 = rng.normal(size=h) * 0.5
        w2 = rng.normal(size=(h, d)) / np.sqrt(h)
        b2 = rng.normal(size=d) * 0.1
        x_fit, x_windows, x_test = (rng.normal(size=(2048, d)) for _ in range(3))
        u, v = fit_lowrank(x_fit, w1, rank)
        lines = reference.calibrate_lines((x_windows @ u) @ v + b1, 1.0 - fraction, "erf")
        self.flagged = float(reference.outside_window((x_test @ u) @ v + b1, lines).mean())
        wf, bf = reference.fold(w1, b1, w2, b2, lines)
        empty = reference.NeuronLines(lines.slope, lines.intercept, np.full(h, np.inf), np.full(h, -np.inf))
        # The fused form tests z_hat without b1 against windows shifted by −b1, as emit.py writes them.
        shifted = reference.NeuronLines(lines.slope, lines.intercept, lines.lo - b1, lines.hi - b1)

        def dev(a: np.ndarray, dt=dtype):
            return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE, dt)

        self.d, self.h = d, h
        self.tensors = {
            "w1": dev(w1), "b1": dev(b1), "w2": dev(w2), "b2": dev(b2), "w1t": dev(w1.T),
            "wfu": dev(np.concatenate([wf, u], axis=1)),  # fold and predictor's first factor: one MatMul
            "bias0": dev(np.concatenate([bf, np.zeros(rank)])), "v": dev(v),
            "lines": dev(reference.pack_lines(lines), torch.float32),
            "lines_fused": dev(reference.pack_lines(shifted), torch.float32),
            "all_flagged": dev(reference.pack_lines(empty), torch.float32),
        }  # fmt: skip

    def copy(self) -> Layer:
        """The same weights at new addresses (another layer, as far as the caches can tell)."""
        other = object.__new__(Layer)
        other.__dict__.update(self.__dict__, tensors={k: t.clone() for k, t in self.tensors.items()})
        return other


def dense(torch, layer: Layer, x):
    w = layer.tensors
    return torch.addmm(w["b2"], torch.nn.functional.gelu(torch.addmm(w["b1"], x, w["w1"])), w["w2"])


def folded(torch, layer: Layer, x):
    """The rewrite's first MatMul: ``[y_folded | t]``, the folded output and the predictor's code ``t = x·U``."""
    w = layer.tensors
    return torch.addmm(w["bias0"], x, w["wfu"])


def folded_and_predicted(torch, layer: Layer, x):
    """The z_hat form's MatMuls: ``y_folded`` and ``z_hat``."""
    w, d = layer.tensors, layer.d
    yt = folded(torch, layer, x)
    return yt[:, :d].contiguous(), torch.addmm(w["b1"], yt[:, d:], w["v"])


def rewritten(torch, entry, layer: Layer, x, fused: bool = False, all_flagged: bool = False):
    """The rewritten FFN; ``fused``: the kernel computes z_hat from the code and V; ``all_flagged``: every
    neuron falls back (empty windows, the same in both forms)."""
    w, d = layer.tensors, layer.d
    fn, error_string = entry
    lines = "all_flagged" if all_flagged else "lines_fused" if fused else "lines"
    if fused:
        y_folded, z_hat, v = folded(torch, layer, x), None, w["v"]
    else:
        (y_folded, z_hat), v = folded_and_predicted(torch, layer, x), None
    y = torch.empty(x.shape[0], d, device=x.device, dtype=x.dtype)
    inputs = (x, y_folded, z_hat, w["w1t"], w["b1"], w["w2"], w[lines], v)
    pointers = [None if t is None else t.data_ptr() for t in inputs]
    rank = 0 if v is None else v.shape[0]
    stream = torch.cuda.current_stream().cuda_stream
    code = fn(*pointers, y.data_ptr(), x.shape[0], d, layer.h, rank, 0.0, 0, stream)
    if code != 0:
        raise RuntimeError(f"fallback kernel: {error_string(code).decode()}")
    return y


def graph_of(torch, step, layers: list[Layer], x):
    """A CUDA graph running ``step`` once per layer."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for layer in layers:  # warm-up outside capture (cuBLAS workspaces, allocator pools)
            step(layer, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in layers:
            step(layer, x)
    return graph


def median_ms(torch, graphs: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for i in range(repeats + 3):
        for name, graph in graphs.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            if i >= 3:
                times[name].append(start.elapsed_time(stop))
    return {name: float(np.median(t)) for name, t in times.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = grid_parser(__doc__)
    parser.add_argument("--dtypes", nargs="+", choices=["fp16", "fp32"], default=["fp16", "fp32"])
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument(
        "--form", choices=["z_hat", "fused"], default="z_hat", help="z_hat from a second MatMul, or in the kernel"
    )
    parser.add_argument("--out", type=Path, default=Path("out/bench-cuda"))
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out)  # before any work
    import torch

    if not torch.cuda.is_available():
        raise TardisError("no CUDA device")
    make_output_folders(args.out)
    fused = args.form == "fused"
    rng = np.random.default_rng(0)
    rows = []
    print(
        f"{'dtype':>5} {'d':>5} {'tokens':>6} {'f':>5} {'flagged':>7} {'dense us':>9} {'tardis us':>9} "
        f"{'kernel us':>9} {'speedup':>7} {'bound':>6}"
    )
    for dtype_name in args.dtypes:
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        itemsize = 2 if dtype_name == "fp16" else 4
        entry = load_entry("f16" if dtype_name == "fp16" else "f32")
        for d in args.dims:
            h = 4 * d
            dense_bytes = 2 * d * h * itemsize
            count = max(2, -(-4 * L2_BYTES // dense_bytes))  # weights of all layers ≥ 4 × L2
            for fraction in args.fractions:
                first = Layer(torch, d, fraction, args.rank, dtype, rng)
                layers = [first] + [first.copy() for _ in range(count - 1)]
                # Coverage 0 (every neuron falls back) must reproduce the dense FFN.
                x_check = torch.randn(64, d, device=DEVICE, dtype=dtype)
                want = dense(torch, first, x_check).float()
                got = rewritten(torch, entry, first, x_check, fused, all_flagged=True).float()
                error = float((got - want).abs().max() / want.abs().max())
                assert error < (2e-2 if dtype_name == "fp16" else 1e-4), f"coverage-0 rewrite differs: {error:.2e}"
                flagged = first.flagged
                read = (d * (d + args.rank) + args.rank * h + flagged * 2 * d * h) * itemsize
                for tokens in args.tokens:
                    x = torch.randn(tokens, d, device=DEVICE, dtype=dtype)
                    matmuls = folded if fused else folded_and_predicted
                    graphs = {
                        "dense": graph_of(torch, partial(dense, torch), layers, x),
                        "tardis": graph_of(torch, partial(rewritten, torch, entry, fused=fused), layers, x),
                        "matmuls": graph_of(torch, partial(matmuls, torch), layers, x),
                    }
                    t = median_ms(torch, graphs, args.repeats)
                    row = {
                        "form": args.form,
                        "dtype": dtype_name,
                        "d": d,
                        "h": h,
                        "tokens": tokens,
                        "outlier_fraction": fraction,
                        "flagged_fraction": flagged,
                        "layers_per_run": count,
                        "coverage0_rel_error": error,
                        "dense_us": t["dense"] * 1e3 / count,
                        "tardis_us": t["tardis"] * 1e3 / count,
                        "fallback_kernel_us": (t["tardis"] - t["matmuls"]) * 1e3 / count,
                        "speedup": t["dense"] / t["tardis"],
                        "bytes_read_ratio": dense_bytes / read,
                    }
                    rows.append(row)
                    print(
                        f"{dtype_name:>5} {d:>5} {tokens:>6} {fraction:>5.2f} {flagged:>7.3f} {row['dense_us']:>9.2f} "
                        f"{row['tardis_us']:>9.2f} {row['fallback_kernel_us']:>9.2f} {row['speedup']:>6.2f}x "
                        f"{row['bytes_read_ratio']:>5.2f}x"
                    )
                    del graphs
                del layers
                torch.cuda.empty_cache()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "timing": "CUDA graph replay, CUDA events, median of alternated runs",
        "repeats": args.repeats,
        "rank": args.rank,
    }
    with StagedWrites() as staged:
        staged.write_text(args.out / "ffn_latency_cuda.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        for dtype_name in args.dtypes:
            png = staged.path(args.out / f"ffn_latency_cuda_{dtype_name}.png")
            plot([r for r in rows if r["dtype"] == dtype_name], png)
    print(f"wrote {args.out}/ffn_latency_cuda.json and a plot per dtype")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
