"""Where one FFN's fitting time goes: the pass's fit and emit steps for one FFN of a model under cProfile (its
calibration inputs captured first, as ``optimize`` does), the functions that took longest (cumulative), and
the most memory numpy and Python held at once meanwhile (tracemalloc; ONNX Runtime's own is not counted).
With ``--steps``, no profiler (it taxes numpy's temporaries unevenly): wall-clock seconds of the fit's steps
(:data:`STEPS`), each summed over its calls.

Explains the ``fit`` and ``emit`` stage times of docs/scale.md; it carries no headline. For a Falcon-7B FFN:

    python models/gelu_decoder.py --preset falcon-7b --layers 1 --dtype float32 --out /tmp/g1
    python benchmarks/scale.py --model /tmp/g1/model.onnx --baselines none     # writes /tmp/g1/tardis/feeds.npz
    python benchmarks/fit_profile.py /tmp/g1/model.onnx --calib /tmp/g1/tardis/feeds.npz --out out/fit_profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

from tardis_onnx import budget, calibrate, io, predictor, reference
from tardis_onnx.calibrate import capture_ffn_inputs
from tardis_onnx.config import TardisConfig
from tardis_onnx.emit import fallback_form
from tardis_onnx.errors import TardisError, non_negative_int, positive_int, run_command
from tardis_onnx.feeds import load_feeds
from tardis_onnx.files import StagedWrites
from tardis_onnx.passes import find_ffns, fit
from tardis_onnx.passes.fit import fit_ffns
from tardis_onnx.passes.rewrite import emit_fastest

OPSET = 18
# The fit's steps timed with --steps: (label, where the pass looks the function up, its name there).
STEPS = [
    ("z = x·W1 (FfnTokens)", calibrate.FfnTokens, "__init__"),
    ("window tables (plan_windows)", fit, "plan_windows"),
    ("folds' misses (line − GELU)·W2", calibrate.FfnTokens, "miss"),
    ("token kernel", budget, "token_products"),
    ("refit held-out predictions", budget.Refit, "predict"),
    ("refit correction", budget.Refit, "correction"),
    ("the fold W1·diag(a)·W2", reference, "fold"),
    ("predictor candidates (rank_predictors)", fit, "rank_predictors"),
    ("  their predictions", predictor, "_predictions"),
    ("  the int8 residual check", predictor, "predicted_residual_errors"),
]


@contextlib.contextmanager
def timed_steps(seconds: dict[str, float]):
    """Meanwhile, each of :data:`STEPS` adds its wall-clock seconds to ``seconds[label]``."""
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in STEPS]

    def timer(label, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - started

        return timed

    for (label, _, _), (owner, name, function) in zip(STEPS, originals, strict=True):
        setattr(owner, name, timer(label, function))
    try:
        yield seconds
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


@contextlib.contextmanager
def profiled(result: dict, top: int):
    """Meanwhile, cProfile and tracemalloc; then ``result["rows"]``: the ``top`` functions by cumulative seconds
    ``(name, cumulative, own)``, and ``result["peak_mib"]``: the most memory numpy and Python held at once."""
    profile = cProfile.Profile()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    profile.enable()
    try:
        yield result
    finally:
        profile.disable()
        result["peak_mib"] = (tracemalloc.get_traced_memory()[1] - base) / 2**20
        tracemalloc.stop()
    stats = pstats.Stats(profile)
    result["rows"] = sorted(
        (
            (f"{Path(file).name}:{line}({name})", cumulative, own)
            for (file, line, name), (_, _, own, cumulative, _) in stats.stats.items()
        ),
        key=lambda r: -r[1],
    )[:top]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fit_profile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an ONNX model (external data is memory-mapped)")
    parser.add_argument("--calib", type=Path, required=True, help="an .npz of calibration feeds")
    parser.add_argument("--ffn", type=non_negative_int, default=0, help="which FFN, in match order")
    parser.add_argument("--top", type=positive_int, default=30, help="functions listed")
    parser.add_argument("--no-speed-check", action="store_true", help="emit without the never-slower timing")
    parser.add_argument("--steps", action="store_true", help="time the fit's steps instead of profiling")
    parser.add_argument("--out", type=Path, help="write the profile as JSON")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file() or not args.calib.is_file():
        raise TardisError(f"'{args.model if not args.model.is_file() else args.calib}' not found")
    model, weights_dir = io.open_model(args.model)
    ffns, _ = find_ffns(model, weights_dir)
    if args.ffn >= len(ffns):
        raise TardisError(f"--ffn {args.ffn}: the model has {len(ffns)} foldable FFN(s)")
    ffn, config = ffns[args.ffn], TardisConfig()
    samples = capture_ffn_inputs(
        model, [ffn], load_feeds(args.calib, model), config.max_samples, weights_dir=weights_dir
    )
    form = fallback_form(config.fallback)
    steps: dict[str, float] = defaultdict(float)
    profile: dict = {}
    started = time.perf_counter()
    with timed_steps(steps) if args.steps else profiled(profile, args.top):
        fitted = next(fit_ffns([ffn], samples, config, form))
        fitted_s = time.perf_counter() - started
        choice, _, _, row = emit_fastest(fitted, form, OPSET, not args.no_speed_check, config, [])
    emitted_s = time.perf_counter() - started - fitted_s
    peak_mib, rows = profile.get("peak_mib"), profile.get("rows")
    d, h = ffn.w1_stored.shape
    peak = "" if peak_mib is None else f"; peak {peak_mib:.0f} MiB over the captured inputs"
    print(
        f"{ffn.name} ({d}→{h}, {samples[0].x.shape[0]} tokens): fit {fitted_s:.1f} s, emit {emitted_s:.1f} s; "
        f"predictor {choice.predictor.kind}, recipe {fitted.calibration.recipe}, speed {row.speedups}{peak}"
    )
    if args.steps:
        for label, _, _ in STEPS:
            print(f"{steps[label]:8.2f} s  {label}")
    else:
        for name, cumulative, own in rows:
            print(f"{cumulative:8.2f} s {own:8.2f} s  {name}")
    if args.out:
        result = {
            "ffn": ffn.name,
            "d": d,
            "h": h,
            "tokens": int(samples[0].x.shape[0]),
            "fit_s": fitted_s,
            "emit_s": emitted_s,
            "peak_traced_mib": peak_mib,
            "predictor": choice.predictor.kind,
            "recipe": fitted.calibration.recipe,
            "speedups": row.speedups,
        }
        if args.steps:
            result["steps"] = {label: steps[label] for label, _, _ in STEPS}
        else:
            result["functions"] = [{"name": n, "cumulative_s": c, "own_s": o} for n, c, o in rows]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with StagedWrites() as staged:
            staged.write_text(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
