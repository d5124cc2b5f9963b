"""Verify: ``python -m tardis_onnx verify ORIGINAL REWRITTEN`` compares two models on the same inputs.

In the manner of ``polygraphy run``: per output, max/mean absolute and relative
error; a mismatch beyond ``--atol``/``--rtol`` exits 1.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tardis_onnx.errors import TardisError, non_negative_float, non_negative_int, positive_int, run_command
from tardis_onnx.feeds import Feeds, load_feeds, random_feeds
from tardis_onnx.files import StagedWrites, check_targets, model_files, strict_json
from tardis_onnx.io import load_model
from tardis_onnx.runtime import OPTIMIZATION_LEVELS
from tardis_onnx.session import create_session, run_session
from tardis_onnx.tables import text_table

ERROR_STATS = ("elemwise", "max", "mean", "median")


@dataclass
class OutputComparison:
    name: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    max_ref: float
    passed: bool


def compare_outputs(
    expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float, rtol: float, stat: str = "elemwise"
) -> list[OutputComparison]:
    """Per output: errors of ``actual`` against ``expected`` and whether they are within tolerance."""
    results = []
    for name, want in expected.items():
        if name not in actual:
            raise TardisError(f"output '{name}' is missing from the rewritten model")
        got = actual[name]
        if got.shape != want.shape:
            raise TardisError(f"output '{name}' has shape {got.shape}, expected {want.shape}")
        try:
            want64, got64 = want.astype(np.float64), got.astype(np.float64)
        except (TypeError, ValueError):
            raise TardisError(f"output '{name}' is {want.dtype}: not numbers, cannot compare") from None
        with np.errstate(all="ignore"):  # inf − inf and friends: NaN, reported, not warned about
            stats_passed = _compare(want64, got64, atol, rtol, stat)
        results.append(OutputComparison(name, *stats_passed))
    return results


def _compare(want64: np.ndarray, got64: np.ndarray, atol: float, rtol: float, stat: str) -> tuple:
    """(max abs, mean abs, max rel, mean rel, max |expected|, passed) of one output."""
    diff = np.abs(got64 - want64)
    rel = diff / np.maximum(np.abs(want64), np.finfo(np.float64).tiny)
    finite = np.isfinite(want64) | np.isfinite(got64)
    same_nonfinite = np.array_equal(np.isnan(want64), np.isnan(got64))
    if diff.size == 0:
        passed = True
        stats = (0.0, 0.0, 0.0, 0.0, 0.0)
    else:
        if stat == "elemwise":
            passed = bool(np.all(diff[finite] <= atol + rtol * np.abs(want64[finite])))
        else:
            reduce = {"max": np.max, "mean": np.mean, "median": np.median}[stat]
            passed = bool(reduce(diff) <= atol or reduce(rel) <= rtol)
        passed = passed and same_nonfinite
        stats = (diff.max(), diff.mean(), rel.max(), rel.mean(), np.abs(want64).max())
    return (*map(float, stats), passed)


def run_models(original: Path, rewritten: Path, feeds: Feeds, optimization: str) -> tuple[dict, dict]:
    """Outputs of both models on ``feeds``."""
    outputs = []
    for path in (original, rewritten):
        session = create_session(path, optimization)
        names = [o.name for o in session.get_outputs()]
        outputs.append(dict(zip(names, run_session(session, names, feeds, str(path)), strict=True)))
    return outputs[0], outputs[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx verify",
        description="Run two models on the same inputs and compare every output (exit 1 on mismatch).",
    )
    parser.add_argument("original", type=Path)
    parser.add_argument("rewritten", type=Path)
    parser.add_argument("--atol", type=non_negative_float, default=1e-4, help="absolute tolerance (default 1e-4)")
    parser.add_argument("--rtol", type=non_negative_float, default=1e-3, help="relative tolerance (default 1e-3)")
    parser.add_argument(
        "--check-error-stat",
        choices=ERROR_STATS,
        default="elemwise",
        help="compare every element, or the max/mean/median error against the tolerances",
    )
    parser.add_argument("--feeds", type=Path, help="inputs (.npz); default: random inputs from the signature")
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--sequence", type=positive_int, default=16)
    parser.add_argument("--past", type=non_negative_int, default=4, help="past length for models with a KV cache")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--ort-optimization",
        choices=OPTIMIZATION_LEVELS,
        default="disable",
        help="ONNX Runtime graph optimisation level for both sessions",
    )
    parser.add_argument("--json", type=Path, help="also write the comparison as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    inputs = [*model_files(args.original), *model_files(args.rewritten), args.feeds]
    check_targets([args.json], inputs)
    original = load_model(args.original, load_weights=False)
    load_model(args.rewritten, load_weights=False)
    if args.feeds:
        feeds = load_feeds(args.feeds, original, label="feeds")[0]
    else:
        feeds = random_feeds(original, args.batch, args.sequence, args.past, args.seed)
    expected, actual = run_models(args.original, args.rewritten, feeds, args.ort_optimization)
    results = compare_outputs(expected, actual, args.atol, args.rtol, args.check_error_stat)
    tolerance = f"atol={args.atol:g} rtol={args.rtol:g} ({args.check_error_stat})"
    if args.json:
        with StagedWrites() as staged:
            document = {"tolerance": tolerance, "outputs": [asdict(r) for r in results]}
            staged.write_text(args.json, strict_json(document, indent=2))
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    print(f"inputs: {shapes}")
    header = ("output", "max abs", "mean abs", "max rel", "mean rel", "result")
    rows = [
        (r.name, *(f"{v:.3e}" for v in (r.max_abs, r.mean_abs, r.max_rel, r.mean_rel)), "PASS" if r.passed else "FAIL")
        for r in results
    ]
    print("\n".join(text_table(header, rows, right=(1, 2, 3, 4))))
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} outputs differ beyond {tolerance}")
        return 1
    print(f"PASSED: all {len(results)} outputs match within {tolerance}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
