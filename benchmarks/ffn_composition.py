"""Where one token's time goes when TARDIS is composed with int8 (or int4): a stack of FFNs (random weights) as
dense, ``quantize_dynamic`` int8 (``--bits int4``: ``MatMulNBitsQuantizer``), the plain rewrite with the predictor of
that kind and ``--quantize int8`` (``int4``) (folded, forced: ``--no-speed-check``).

Explains the end-to-end figures (docs/results.md, docs/whisper.md); it carries no headline. Each variant runs
one token per call, the sessions taking turns after a warm-up (``ffn_latency.median_times``, workers sleeping
between runs), then an ONNX Runtime profile of the int8 model and the composed rewrite gives each op's kernel
time per FFN.

    python benchmarks/ffn_composition.py --dims 512 2048 --layers 6     # Whisper-base's decoder FFNs
    python benchmarks/ffn_composition.py --dims 768 3072 --layers 12 --bits int4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ffn_latency import median_times  # noqa: E402
from real_models import session  # noqa: E402

from tardis_onnx import runtime  # noqa: E402
from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402
from tardis_onnx.quantize import quantize_model  # noqa: E402  (as --quantize runs its quantizer)


def ffn_stack(d: int, h: int, layers: int, seed: int = 0) -> onnx.ModelProto:
    """``layers`` FFNs ``x + GELU(x·W1 + b1)·W2 + b2`` in a row (com.microsoft Gelu), random weights."""
    rng = np.random.default_rng(seed)
    nodes, weights, x = [], [], "x"
    for layer in range(layers):
        p = f"/layer.{layer}/mlp"
        for name, shape, scale in (
            ("w1", (d, h), d**-0.5),
            ("b1", (h,), 0.5),
            ("w2", (h, d), h**-0.5),
            ("b2", (d,), 0),
        ):
            weights.append(numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), f"{p}/{name}"))
        nodes += [
            helper.make_node("MatMul", [x, f"{p}/w1"], [f"{p}/z0"], name=f"{p}/fc1/MatMul"),
            helper.make_node("Add", [f"{p}/z0", f"{p}/b1"], [f"{p}/z"], name=f"{p}/fc1/Add"),
            helper.make_node("Gelu", [f"{p}/z"], [f"{p}/g"], domain="com.microsoft", name=f"{p}/act"),
            helper.make_node("MatMul", [f"{p}/g", f"{p}/w2"], [f"{p}/y0"], name=f"{p}/fc2/MatMul"),
            helper.make_node("Add", [f"{p}/y0", f"{p}/b2"], [f"{p}/y"], name=f"{p}/fc2/Add"),
            helper.make_node("Add", [f"{p}/y", x], [f"{p}/out"], name=f"{p}/residual"),
        ]
        x = f"{p}/out"
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "ffns",
        [value("x", TensorProto.FLOAT, ["b", "s", d])],
        [value(x, TensorProto.FLOAT, ["b", "s", d])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def kernel_times(path: Path, feeds: list[dict], threads: int, layers: int, runs: int = 200) -> dict[str, float]:
    """Microseconds per FFN per op type, from ONNX Runtime's profile of ``runs`` one-token runs."""
    s = session(path, threads, path.with_suffix(""))
    for k in range(runs):
        s.run(None, feeds[k % len(feeds)])
    events = json.loads(Path(s.end_profiling()).read_text())
    total: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"] / runs / layers
    return dict(sorted(total.items(), key=lambda item: -item[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=positive_int, nargs=2, default=[512, 2048], metavar=("D", "H"))
    parser.add_argument("--layers", type=positive_int, default=6)
    parser.add_argument("--bits", choices=("int8", "int4"), default="int8", help="the quantization composed with")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--out", type=Path, default=Path("out/ffn_composition"))
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out)  # before any work
    if not runtime.library_available():
        raise TardisError("the ai.tardis library is not built (python custom_ops/build.py)")
    (d, h), layers, bits = args.dims, args.layers, args.bits
    composed = f"tardis+{bits}"
    variants = {"tardis": ["--predictor", bits], composed: ["--predictor", bits, "--quantize", bits]}
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 1, d)).astype(np.float32)} for _ in range(32)]
    with tempfile.TemporaryDirectory(prefix="tardis-composition-") as tmp:
        folder = Path(tmp)
        files = {"dense": folder / "dense.onnx", bits: folder / f"{bits}.onnx"}
        onnx.save(ffn_stack(d, h, layers), files["dense"])
        onnx.save(quantize_model(onnx.load(files["dense"]), bits), files[bits])
        for name, flags in variants.items():
            files[name] = folder / f"{name}.onnx"
            command = [sys.executable, "-m", "tardis_onnx.optimize", str(files["dense"]), "-o", str(files[name])]
            subprocess.run([*command, "--no-speed-check", "-q", *flags], check=True)
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        seconds = median_times(sessions, feeds, args.repeats)
        kernels = {name: kernel_times(files[name], feeds, args.threads, layers) for name in (bits, composed)}
    per_ffn = {name: 1e6 * s / layers for name, s in seconds.items()}
    for name, us in per_ffn.items():
        ratios = f"{per_ffn[bits] / us:5.2f}x of {bits}   {per_ffn['dense'] / us:5.2f}x of dense"
        print(f"{name:12s} {us:7.1f} µs per FFN   {ratios}")
    for name, ops in kernels.items():
        print(f"{name} kernels, µs per FFN: " + ", ".join(f"{op} {us:.1f}" for op, us in ops.items()))
    make_output_folders(args.out)
    result = {"d": d, "h": h, "layers": layers, "bits": bits, "threads": args.threads, "us_per_ffn": per_ffn}
    result["kernels_us"] = kernels
    with StagedWrites() as staged:
        staged.write_text(args.out / f"ffn_composition_{bits}.json", json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
