"""The paper's scale on one machine: fold a Falcon-7B-shaped GELU decoder (fp16, 14.4 GB of external data).

The model comes from ``models/gelu_decoder.py`` (random weights, written straight to ONNX, cached). The plain
command ``python -m tardis_onnx.optimize`` folds it in a subprocess, calibrated on ``--sequences`` random
token sequences of ``--seq-len`` tokens (random weights have no text to prefer); its report gives the
seconds and peak memory of each stage (match, calibrate, fit, emit, save) and the child's peak RSS is
read when it exits. Then both models decode with the KV cache in ONNX Runtime (CPU, the memory-frugal
options a model this size needs here: no graph optimisation, no arena, no prepacking; fp16 MatMuls run
as Cast + fp32 MatMul), one session alive at a time, whole decodes alternated, medians over repeats.
Beside the speed: the weight bytes a decoded token reads (the embedding row aside), dense and rewritten
(the FFNs' from the report: fold, predictor and flagged rows).

Side by side, decoded in the same alternation, what users would pick instead (``benchmarks/quantizers.py``):
``float32`` (the same preset built in float32: no casts, twice the bytes), ``int8`` (``quantize_dynamic`` of
the float32 model, as it refuses fp16 ones), ``int4`` (``MatMulNBits``, ``accuracy_level=4``) and the
rewrite composed with them: ``tardis+int8`` (``quantize_dynamic`` of the rewrite, so ``--dtype float32``
only) and ``tardis+int4`` (the folded and attention MatMuls quantized; the fallback op's rows and the
predictor stay as they are). Each is built in memory, so a baseline that would not fit in this machine's
memory is skipped, and said so (at 7B: all but float32), as is one the model's dtype rules out.

    python benchmarks/scale.py --out out/scale --plot docs/scale.png
    python benchmarks/scale.py --layers 2 --sequences 4 --decode-steps 2 --repeats 1   # a quick look
    python benchmarks/scale.py --layers 4 --rewritten /tmp/s4/model.tardis.onnx   # decode an existing rewrite
    python benchmarks/scale.py --layers 4 --dtype float32 --out out/scale-fp32     # TARDIS composed with int8
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantizers import quantize_int4, quantize_int8  # noqa: E402

from models import gelu_decoder  # noqa: E402
from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402
from tardis_onnx.files import (
    StagedWrites,  # noqa: E402
    all_tensors,  # noqa: E402
    model_file_bytes,  # noqa: E402
)
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402
from tardis_onnx.session import create_session, physical_memory  # noqa: E402
from tardis_onnx.text import embedding_rows  # noqa: E402

STAGES = ("match", "calibrate", "fit", "emit", "save")
BASELINES = ("float32", "int8", "int4", "tardis+int8", "tardis+int4")
# A baseline is built in memory: the model it quantizes must fit in this share of it.
MEMORY_SHARE = 0.6


def calibration_feeds(graph: onnx.ModelProto, path: Path, sequences: int, seq_len: int, batch: int, seed: int) -> Path:
    """An ``.npz`` of feeds (``name/0``, ``name/1``, ...) for the model ``graph`` (its graph only): random
    token ids, batches of ``batch`` sequences."""
    vocabulary = embedding_rows(graph)
    rng = np.random.default_rng(seed)
    arrays = {}
    for k in range(-(-sequences // batch)):
        rows = min(batch, sequences - k * batch)
        ids = rng.integers(0, vocabulary, (rows, seq_len), dtype=np.int64)
        arrays[f"input_ids/{k}"] = ids
        arrays[f"attention_mask/{k}"] = np.ones_like(ids)
        for value in graph.graph.input:
            if value.name.startswith("past_key_values."):
                dims = value.type.tensor_type.shape.dim
                dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                arrays[f"{value.name}/{k}"] = np.zeros((rows, dims[1].dim_value, 0, dims[3].dim_value), dtype)
    np.savez(path, **arrays)
    return path


def optimize(model: Path, output: Path, feeds: Path, extra: list[str], reuse: bool = False) -> dict:
    """The plain command on ``model`` in a subprocess: its report, wall seconds and peak RSS (``reuse``: the
    rewrite ``output`` exists; its report's own time and memory)."""
    command = [sys.executable, "-m", "tardis_onnx.optimize", str(model), "-o", str(output), "--calib", str(feeds)]
    started = time.perf_counter()
    if not reuse:
        subprocess.run([*command, *extra], check=True)
    wall = time.perf_counter() - started
    report = json.loads(output.with_name(output.name.removesuffix(".onnx") + ".json").read_text())
    return {
        "command": " ".join(["python", *command[1:], *extra]),
        "wall_s": round(report["elapsed_s"] if reuse else wall, 1),
        "peak_rss_mib": round(
            report["peak_rss_mib"] if reuse else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "stages": report["stages"],
        "totals": report["totals"],
        "predictors": sorted({row["predictor"] for row in report["ffns"]}),
        "flagged_fraction": statistics.mean(row["flagged_fraction"] for row in report["ffns"]),
        "warnings": report["warnings"],
    }


def peak_child_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """(all weight bytes, those of the token embedding, which a token reads one row of)."""
    graph = model.graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    sizes = {
        t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in all_tensors(graph)
    }
    return sum(sizes.values()), sum(size for name, size in sizes.items() if name in gathered)


def per_token_bytes(path: Path) -> int:
    """The weight bytes of the model at ``path``, less its token embedding's."""
    total, embedding = weight_bytes(onnx.load(str(path), load_external_data=False))
    return total - embedding


def baselines(names: list[str], args: argparse.Namespace, model: Path, rewritten: Path, work: Path):
    """Baseline name → model file, built in ``work`` (or, per skipped one, a line saying why)."""
    float32 = args.dtype == "float32"
    memory = physical_memory()
    files, skipped = {}, {}
    for name in names:
        quantized = model if name in ("int8", "int4") else rewritten
        from_float32_build = name == "int8" and not float32  # quantize_dynamic refuses the fp16 model itself
        need = model_file_bytes(quantized) * (2 if from_float32_build else 1)
        if name == "float32" and float32:
            skipped[name] = "the model is float32"
        elif name == "tardis+int8" and not float32:
            skipped[name] = "quantize_dynamic takes float32 models only: run with --dtype float32"
        elif name != "float32" and need > MEMORY_SHARE * memory:
            skipped[name] = f"needs about {need / 2**30:.0f} GiB in memory to build, {memory / 2**30:.0f} GiB here"
        if name in skipped:
            print(f"{name}: skipped ({skipped[name]})", flush=True)
            continue
        started, target = time.perf_counter(), work / f"{name}.onnx"
        if name == "float32":
            target = gelu_decoder.build(args.preset, "float32", args.layers)
        elif name.endswith("int8"):
            quantize_int8(
                gelu_decoder.build(args.preset, "float32", args.layers) if from_float32_build else quantized, target
            )
        else:
            quantize_int4(quantized, target)
        print(f"{name}: built in {time.perf_counter() - started:.0f} s", flush=True)
        files[name] = target
    return files, skipped


def decode_times(paths: dict[str, Path], prompt: np.ndarray, steps: int, repeats: int) -> dict[str, dict]:
    """Per model: median seconds of the prefill and per decoded token, and the tokens, over ``repeats``
    whole decodes alternated (one session alive at a time: two 7B models do not fit in memory together)."""
    runs: dict[str, list] = {name: [] for name in paths}
    tokens = {}
    for _ in range(repeats):
        for name, path in paths.items():
            session = create_session(path)
            ids, seconds = gelu_decoder.decode(session, prompt, steps + 1)
            del session
            runs[name].append((seconds[0], statistics.median(seconds[1:])))
            tokens[name] = ids[0].tolist()
    return {
        name: {
            "prefill_s": statistics.median(r[0] for r in rows),
            "s_per_token": statistics.median(r[1] for r in rows),
            "tokens": tokens[name],
        }
        for name, rows in runs.items()
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["optimize"]["stages"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [s for s in STAGES if s in stages]
    left.bar(names, [stages[s]["seconds"] / 60 for s in names], color="tab:blue")
    left.set_ylabel("minutes")
    twin = left.twinx()
    twin.plot(names, [stages[s]["peak_rss_mib"] / 1024 for s in names], "o-", color="tab:red")
    twin.axhline(result["model"]["weight_bytes"] / 2**30, color="gray", ls="--", lw=1)
    twin.set_ylabel("peak RSS so far, GiB (dashed: the weights)")
    model = result["model"]
    left.set_title(f"optimize {model['name']}, {model['dtype']}: {result['optimize']['wall_s'] / 60:.1f} min")
    decode = result["decode"]
    right.bar(
        list(decode),
        [1 / d["s_per_token"] for d in decode.values()],
        color=["gray", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:olive"][: len(decode)],
    )
    right.set_ylabel("tokens/s (KV cache, ONNX Runtime CPU)")
    for i, d in enumerate(decode.values()):
        right.annotate(f"{d['read_gib_per_token']:.2f} GiB", (i, 1 / d["s_per_token"]), ha="center", va="bottom")
    right.set_title("decode")
    right.tick_params(axis="x", labelrotation=20)  # six names side by side overlap
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="falcon-7b", choices=sorted(gelu_decoder.PRESETS))
    parser.add_argument("--layers", type=positive_int, help="override the preset's depth (a quicker run)")
    parser.add_argument("--dtype", default="float16", choices=sorted(gelu_decoder.DTYPES))
    parser.add_argument("--sequences", type=positive_int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--batch", type=positive_int, default=4, help="calibration sequences per batch")
    parser.add_argument("--decode-steps", type=positive_int, default=4, help="tokens decoded after the prompt")
    parser.add_argument("--prompt", type=positive_int, default=8, help="prompt tokens")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--model", type=Path, help="an existing model.onnx written by models/gelu_decoder.py")
    parser.add_argument("--work", type=Path, help="folder for the feeds and the rewrite (default: beside the model)")
    parser.add_argument("--optimize-args", default="", help="extra flags for optimize, e.g. '--shapes 1x1'")
    parser.add_argument("--rewritten", type=Path, help="an existing rewrite of the model (and its report beside it)")
    parser.add_argument(
        "--baselines", default=",".join(BASELINES), help=f"decoded beside: some of {','.join(BASELINES)}, or none"
    )
    parser.add_argument("--out", type=Path, default=Path("out/scale"))
    parser.add_argument("--plot", type=Path, help="write a PNG (e.g. docs/scale.png)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out, *([args.plot.parent] if args.plot else []))  # before any work
    wanted = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",")]
    if unknown := set(wanted) - set(BASELINES):
        raise TardisError(f"unknown baselines: {', '.join(sorted(unknown))}")
    started = time.perf_counter()
    model = args.model or gelu_decoder.build(args.preset, args.dtype, args.layers)
    built_s = time.perf_counter() - started
    work = args.work or model.parent / "tardis"
    work.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(model), load_external_data=False)
    feeds = calibration_feeds(graph, work / "feeds.npz", args.sequences, args.seq_len, args.batch, seed=0)
    rewritten = args.rewritten or work / "model.tardis.onnx"
    optimized = optimize(model, rewritten, feeds, args.optimize_args.split(), reuse=args.rewritten is not None)
    total, embedding = weight_bytes(graph)
    per_token = total - embedding
    ffn = optimized["totals"]
    tardis_per_token = per_token_bytes(rewritten)
    # The rewrite's weights but its FFNs' (the rest quantized too under --quantize), then what its FFNs read per
    # token (the report's: fold, predictor, flagged rows; a kept FFN's all).
    read = {"dense": per_token, "tardis": tardis_per_token - ffn["storage_bytes"] + ffn["total_read_bytes"]}
    built, skipped = baselines(wanted, args, model, rewritten, work)
    for name, path in built.items():
        # tardis+int8/int4 read what the rewrite reads, less what the quantizer took off its every-token MatMuls
        # (the fallback op's tensors, of which a token reads the flagged rows, are left as they are).
        quantized = per_token_bytes(path)
        read[name] = read["tardis"] - (tardis_per_token - quantized) if name.startswith("tardis+") else quantized
    prompt = np.random.default_rng(1).integers(0, embedding_rows(graph), (1, args.prompt), dtype=np.int64)
    decode = decode_times({"dense": model, "tardis": rewritten, **built}, prompt, args.decode_steps, args.repeats)
    for name, row in decode.items():
        row["read_gib_per_token"] = read[name] / 2**30
        row["speedup"] = decode["dense"]["s_per_token"] / row["s_per_token"]
    result = {
        "model": {"name": args.preset + (f" ({args.layers} layers)" if args.layers else ""), "path": str(model)}
        | {"dtype": args.dtype, "weight_bytes": total, "built_or_cached_s": round(built_s, 1)},
        "calibration": {"sequences": args.sequences, "seq_len": args.seq_len, "batch": args.batch},
        "optimize": optimized,
        "decode": decode,
        "skipped_baselines": skipped,
        "speedup": decode["dense"]["s_per_token"] / decode["tardis"]["s_per_token"],
        "bytes_bound": read["dense"] / read["tardis"],
        "same_tokens": decode["dense"]["tokens"] == decode["tardis"]["tokens"],
        "machine": {"cpus": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    make_output_folders(args.out)
    with StagedWrites() as staged:
        staged.write_text(args.out / "scale.json", json.dumps(result, indent=2) + "\n")
        if args.plot:
            plot(result, staged.path(args.plot))
    stages = optimized["stages"]
    print(f"optimize: {optimized['wall_s'] / 60:.1f} min, peak RSS {optimized['peak_rss_mib'] / 1024:.1f} GiB")
    print(f"  weights {total / 2**30:.1f} GiB; " + ", ".join(f"{s} {stages[s]['seconds']:.0f} s" for s in stages))
    for name, row in decode.items():
        print(
            f"decode {name}: {1 / row['s_per_token']:.3f} tok/s ({row['speedup']:.2f}x), "
            f"{row['read_gib_per_token']:.2f} GiB/token"
        )
    speedup, bound, same = result["speedup"], result["bytes_bound"], result["same_tokens"]
    print(f"speedup {speedup:.2f}x (bytes bound {bound:.2f}x); same tokens: {same}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
