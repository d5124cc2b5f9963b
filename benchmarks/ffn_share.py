"""How much of a model's time its FFNs take, and so how much faster any FFN rewrite could make it (Amdahl).

Runs one ONNX model beside the same model with every FFN (found by ``tardis_onnx.passes.find_ffns``) replaced by
``x · 0`` (one elementwise Mul: an FFN that costs nothing), both optionally as ``quantize_dynamic`` leaves them (what
a CPU user picks today), at one serving shape in ONNX Runtime (CPU, ``ORT_ENABLE_ALL``, workers sleeping between
runs, as the other benchmarks), runs alternated after a warm-up. Prints the median run of each, the FFNs' share
``s = 1 − t_without / t_with`` of a run and the ceiling ``t_with / t_without``: the most any FFN rewrite could speed
the model up at that shape. JSON beside.

Random inputs (``tardis_onnx.feeds.random_feeds``: the time does not depend on the token ids); a decoder with past
key/values at ``--past`` cached positions.

    python benchmarks/ffn_share.py --model <GPT-2 124M export>/model.onnx --int8 --shape 1x1 --past 64
    python benchmarks/ffn_share.py --model <MiniLM export>/model.onnx --int8 --shape 32x17 --past 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantizers import quantize_int8  # noqa: E402

from tardis_onnx import runtime  # noqa: E402
from tardis_onnx.emit import replace_nodes  # noqa: E402
from tardis_onnx.errors import TardisError, non_negative_int, positive_int, run_command  # noqa: E402
from tardis_onnx.feeds import random_feeds  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import load_model, make_output_folders  # noqa: E402
from tardis_onnx.passes import find_ffns  # noqa: E402
from tardis_onnx.speed import parse_shapes  # noqa: E402


def without_ffns(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose FFNs compute ``x · 0`` (d → d FFNs only), and how many were replaced."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ffns, _ = find_ffns(copy)
    replacements = []
    for ffn in ffns:
        d, d_out = ffn.w1_stored.shape[0], ffn.w2_stored.shape[1]
        if d != d_out:
            raise TardisError(f"{ffn.name} maps {d} to {d_out} features: only d → d FFNs are replaced here")
        zero = numpy_helper.from_array(np.zeros((), ffn.dtype), f"{ffn.name}/zero")
        replacements += ffn.rewrite([helper.make_node("Mul", [ffn.x, zero.name], [ffn.output])], [zero])
    if not ffns:
        raise TardisError("no FFN found in the model")
    replace_nodes(copy, replacements)
    return copy, len(ffns)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = runtime.session_options(threads=threads, optimization="all")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an ONNX model (float, with GELU FFNs)")
    parser.add_argument("--int8", action="store_true", help="time both as quantize_dynamic leaves them")
    parser.add_argument("--shape", type=parse_shapes, default=parse_shapes("1x1"), help="BATCHxSEQUENCE (1x1)")
    parser.add_argument("--past", type=non_negative_int, default=64, help="cached positions of a decoder (64)")
    parser.add_argument("--runs", type=positive_int, default=200, help="timed runs of each (alternated)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/ffn_share"))
    return parser


def run(args: argparse.Namespace) -> int:
    if len(args.shape) != 1:
        raise TardisError("give one --shape")
    (batch, sequence) = args.shape[0]
    make_output_folders(args.out)
    model = load_model(args.model)
    feeds = random_feeds(model, batch, sequence, past=args.past)
    feeds = {i.name: feeds[i.name] for i in model.graph.input if i.name in feeds}
    bare, ffns = without_ffns(model)
    with tempfile.TemporaryDirectory(prefix="tardis-ffn-share-") as tmp:
        paths = {"with FFNs": args.model, "without": Path(tmp) / "without.onnx"}
        onnx.save(bare, paths["without"])
        del model, bare
        if args.int8:
            for name, path in list(paths.items()):
                paths[name] = Path(tmp) / f"{path.stem}-int8.onnx"
                quantize_int8(path, paths[name])
        sessions = {name: session(path, args.threads) for name, path in paths.items()}
        times = {name: [] for name in sessions}
        for k in range(10 + args.runs):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, feeds)
                if k >= 10:
                    times[name].append(time.perf_counter() - start)
    full, bare_s = (statistics.median(times[name]) for name in ("with FFNs", "without"))
    share, ceiling = 1 - bare_s / full, full / bare_s
    result = {
        "model": str(args.model),
        "int8": args.int8,
        "shape": f"{batch}x{sequence}",
        "past": args.past,
        "threads": args.threads,
        "ffns": ffns,
        "run_ms": full * 1e3,
        "run_without_ffns_ms": bare_s * 1e3,
        "ffn_share": share,
        "ceiling": ceiling,
    }
    label = f"{args.model.name}{' as int8' if args.int8 else ''} at {batch}x{sequence}, past {args.past}"
    print(
        f"{label}: a run {full * 1e3:.2f} ms, {bare_s * 1e3:.2f} ms with its {ffns} FFNs costing nothing: the FFNs "
        f"are {share:.1%} of a run, so no FFN rewrite can make it more than {ceiling:.2f}x faster"
    )
    name = f"ffn_share_{args.model.stem}{'_int8' if args.int8 else ''}_{batch}x{sequence}"
    with StagedWrites() as staged:
        staged.write_text(args.out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
