"""The never-slower check: faithful timing models, real timings, and the decision they drive."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from ffn_graphs import SPELLINGS, D, GraphBuilder, ffn_model

from tardis_onnx import reference, runtime, speed
from tardis_onnx.config import TardisConfig
from tardis_onnx.emit import CustomFallback, emit_ffn
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import main, optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.session import create_session


def two_ffn_model() -> onnx.ModelProto:
    """Two erf FFNs in a row, each with its residual Add."""
    b = GraphBuilder()
    x = "x"
    for layer in range(2):
        p = f"/layer.{layer}/mlp"
        h = b.op("Add", b.weight(64), b.op("MatMul", x, b.weight(D, 64), name=f"{p}/fc1/MatMul"), name=f"{p}/fc1/Add")
        y = b.op("MatMul", SPELLINGS["erf_div"][0](b, h), b.weight(64, D), name=f"{p}/fc2/MatMul")
        x = b.op("Add", b.op("Add", y, b.weight(D), name=f"{p}/fc2/Add"), x)
    return b.model("x", x)


def test_parse_shapes():
    assert speed.parse_shapes("1x1, 1X32,32×128,1x1") == ((1, 1), (1, 32), (32, 128))
    assert speed.parse_shapes("none") == ()
    for bad in ("1x0", "32", "ax2", "1x2x3", ""):
        with pytest.raises(TardisError, match="BATCHxSEQUENCE"):
            speed.parse_shapes(bad)


@pytest.mark.parametrize("spelling", ["erf_div", "tanh_pow"])
def test_the_timing_models_compute_the_ffn_and_its_rewrite(spelling):
    model = ffn_model(spelling)
    (ffn,), _ = find_ffns(model)
    x = np.random.default_rng(0).standard_normal((2, 5, D)).astype(np.float32)
    dense = ort.InferenceSession(speed.dense_ffn_model(ffn)).run(None, {ffn.x: x})[0]
    z = x.astype(np.float64) @ ffn.w1 + ffn.b1
    want = reference.gelu(z, ffn.gelu.form) @ ffn.w2 + ffn.b2
    assert np.abs(dense - want).max() <= 1e-5 * np.abs(want).max()
    lines = reference.NeuronLines(*(np.zeros(ffn.hidden) for _ in range(2)), np.zeros(ffn.hidden), np.zeros(ffn.hidden))
    # Windows of width zero: every neuron falls back, so the rewrite is the FFN itself.
    nodes, constants = emit_ffn(ffn, lines, CustomFallback(), 17, 0.0, 0.0)
    inits = constants.tensors()
    rewritten = runtime.make_session(speed.rewritten_ffn_model(ffn, nodes, inits)).run(None, {ffn.x: x})[0]
    assert np.abs(rewritten - want).max() <= 1e-5 * np.abs(want).max()


def test_real_timings_are_medians_of_alternated_runs():
    model = ffn_model("erf_div")
    (ffn,), _ = find_ffns(model)
    zeros = reference.NeuronLines(*(np.zeros(ffn.hidden),) * 4)
    nodes, constants = emit_ffn(ffn, zeros, CustomFallback(), 17, 0.0, 0.0)
    inits = constants.tensors()
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    check = speed.check_ffn(ffn, nodes, inits, x, [(4, 8), (1, 1)])
    timed = list(check.speedups)  # fewest tokens first, up to the first shape where the rewrite is slower
    assert timed and timed == ["1x1", "4x8"][: len(timed)] and check.skipped == 2 - len(timed)
    assert all(s >= 1 for s in list(check.speedups.values())[:-1])
    assert all(0 < t < 1 for t in [*check.dense_s.values(), *check.rewritten_s.values()])
    assert check.pays == (not check.skipped and all(s >= 1 for s in check.speedups.values()))


def test_large_shapes_are_timed_on_a_slice_that_decides_only_when_clear(monkeypatch):
    """A shape past TIMED_MULTIPLY_ADDS is timed on its first sequences; where that slice's speedup is within
    SLICE_DECIDES of 1, the whole shape is timed and decides."""
    assert speed.timed_shape((32, 128), 2 * 4544 * 18176) == (3, 128)  # a Falcon-7B-shaped FFN
    assert speed.timed_shape((32, 128), 2 * 384 * 1536) == (32, 128)  # MiniLM's: whole
    assert speed.timed_shape((4, 64), 1 << 40) == (1, 64)  # at least one sequence
    (ffn,), _ = find_ffns(ffn_model("erf_div"))
    per_token = ffn.w1_stored.size + ffn.w2_stored.size
    monkeypatch.setattr(speed, "TIMED_MULTIPLY_ADDS", per_token * 16 * 2)  # 2 sequences of 16 tokens
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    for sliced_speedup, full_speedup, want in [(2.0, 0.5, 2.0), (1.1, 0.9, 0.9), (0.5, 2.0, 0.5)]:
        seen = []

        def measure(dense, rewritten, inputs_per_shape, seen=seen, speedups=(sliced_speedup, full_speedup)):
            seen.append([i[0].shape[:2] for i in inputs_per_shape])
            return [(1.0, 1.0 / speedups[i[0].shape[0] == 8]) for i in inputs_per_shape]

        check = speed.check_ffn(ffn, [], [], x, [(8, 16), (1, 1)], measure=measure)
        assert seen[0] == [(1, 1), (2, 16)]
        assert seen[1:] == ([[(8, 16)]] if sliced_speedup == 1.1 else [])
        assert check.speedups["8x16"] == pytest.approx(want)
    with pytest.raises(TardisError, match="no usable time"):  # a zero time is refused, not divided by
        speed.check_ffn(ffn, [], [], x, [(8, 16)], measure=lambda d, r, inputs: [(1.0, 0.0)])


class _SleepingSession:
    """Stands in for an ONNX Runtime session: each run sleeps ``seconds[tokens]``."""

    def __init__(self, seconds: dict[int, float]) -> None:
        self.seconds = seconds

    def get_inputs(self):
        return [type("Input", (), {"name": "x"})()]

    def run(self, names, feeds):
        import time

        time.sleep(self.seconds[feeds["x"].shape[0] * feeds["x"].shape[1]])


def test_timing_stops_at_the_first_shape_where_the_rewrite_is_slower(monkeypatch):
    sessions = iter([_SleepingSession({1: 0.001, 32: 0.001}), _SleepingSession({1: 0.0005, 32: 0.003})])
    monkeypatch.setattr(speed, "_session", lambda model: next(sessions))
    inputs = [[np.zeros((1, n, D), np.float32)] for n in (1, 32, 4096)]
    times = speed.measure_pair(b"dense", b"rewritten", inputs)
    assert len(times) == 2 and times[0][1] < times[0][0] and times[1][1] > times[1][0]  # 1x4096 never run


def _fake_timings(monkeypatch, slower: set[str], slow_ops: tuple[str, ...] = ()) -> list[str]:
    """Timings where the rewrite runs 20% slower at 1x32 (else 2x faster) for the FFNs named in ``slower``
    and for any rewrite using one of ``slow_ops``; returns the names of the FFNs timed, once per try."""
    timed = []

    def check_ffn(ffn, nodes, initializers, x, shapes, measure=None, quantize="none"):
        timed.append(ffn.name)
        slow = ffn.name in slower or any(n.op_type in slow_ops for n in nodes)
        names = [speed.shape_name(s) for s in shapes]
        rewritten = {n: (1.2 if slow and n == "1x32" else 0.5) for n in names}
        return speed.SpeedCheck(dict.fromkeys(names, 1.0), rewritten)

    monkeypatch.setattr("tardis_onnx.passes.rewrite.check_ffn", check_ffn)
    return timed


def test_an_ffn_slower_rewritten_stays_as_it_was(monkeypatch):
    timed = _fake_timings(monkeypatch, slower={"layer.0/mlp"})
    # Slower by name, not by shape: the twin FFNs' timings must not stand for each other here.
    monkeypatch.setattr(speed.TimingCache, "lookup", lambda self, key, flagged: None)
    original = two_ffn_model()
    feeds = random_feeds(original, seed=3)
    rewritten = two_ffn_model()
    result = optimize_model(rewritten, TardisConfig(coverage=0.9, speed_check=True, shapes=((1, 1), (1, 32))))
    # Every predictor with enough recall was tried for the first FFN; the second paid at once.
    assert timed[-1] == "layer.1/mlp" and set(timed[:-1]) == {"layer.0/mlp"} and len(timed) >= 3
    kept, folded = result.ffns
    assert kept.kept_original and not folded.kept_original
    assert kept.speedups == {"1x1": 2.0, "1x32": pytest.approx(1 / 1.2)} and kept.slowest()[0] == "1x32"
    assert kept.fallback_read_bytes == kept.dense_bytes and kept.predictor_bytes == 0
    # The first FFN's nodes are the original ones; only the second was replaced.
    names = [n.name for n in rewritten.graph.node]
    assert "/layer.0/mlp/fc1/MatMul" in names and "/layer.1/mlp/fc1/MatMul" not in names
    assert any(n.startswith("tardis/layer.1/") for n in names) and not any(
        n.startswith("tardis/layer.0/") for n in names
    )
    totals = result.to_dict()["totals"]
    assert totals["ffns"] == 1 and totals["kept_original"] == 1
    assert any("kept 1 of 2 FFN(s)" in w and "layer.0/mlp 0.83× at 1x32" in w for w in result.warnings)
    # The model still computes what the original does (the second FFN within its fold's error).
    want = create_session(original).run(None, feeds)[0]
    got = create_session(rewritten).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 0.2 * np.abs(want).max()


def test_when_every_rewrite_is_slower_the_model_computes_as_before(monkeypatch, tmp_path, capsys):
    _fake_timings(monkeypatch, slower={"layer.0/mlp", "layer.1/mlp"})
    path = tmp_path / "m.onnx"
    onnx.save(two_ffn_model(), path)
    monkeypatch.delenv("TARDIS_SPEED_CHECK")
    assert main([str(path), "--shapes", "1x32", "-q"]) == 0
    out = onnx.load(tmp_path / "m.tardis.onnx")
    assert not any(n.domain == "ai.tardis" for n in out.graph.node)
    feeds = random_feeds(out, seed=1)
    want = create_session(two_ffn_model()).run(None, feeds)[0]
    assert np.array_equal(create_session(out).run(None, feeds)[0], want)
    report = json.loads((tmp_path / "m.tardis.json").read_text())
    assert report["config"]["speed_check"] is True and report["config"]["shapes"] == [[1, 32]]
    assert [r["kept_original"] for r in report["ffns"]] == [True, True]


def test_a_twin_ffn_takes_a_clear_timing_and_the_table_says_so(monkeypatch, capsys):
    timed = []

    def check_ffn(ffn, nodes, initializers, x, shapes, measure=None, quantize="none"):
        timed.append(ffn.name)
        names = [speed.shape_name(s) for s in shapes]
        return speed.SpeedCheck(dict.fromkeys(names, 1.0), dict.fromkeys(names, 0.1))  # 10x: clear

    monkeypatch.setattr("tardis_onnx.passes.rewrite.check_ffn", check_ffn)
    config = TardisConfig(coverage=0.9, speed_check=True, shapes=((1, 1), (1, 32)))
    result = optimize_model(two_ffn_model(), config)
    first, twin = result.ffns
    assert timed == ["layer.0/mlp"] and first.timing_of is None and twin.timing_of == "layer.0/mlp"
    assert twin.speedups == first.speedups and twin.predictor == first.predictor and not twin.kept_original
    assert result.to_dict()["ffns"][1]["timing_of"] == "layer.0/mlp"
    from tardis_onnx.report import print_report

    print_report(result, Path("m.tardis.onnx"), Path("m.tardis.json"))
    out = capsys.readouterr().out
    assert "10.00× @1x1*" in out and "* 1 FFN(s) took the timing of a twin" in out


def test_a_timing_stands_for_a_twin_where_its_verdict_holds():
    cache, key = speed.TimingCache(), ("twin",)
    names = ("1x1", "1x32")

    def timing(slowest: float, flagged: float) -> speed.TimedRewrite:
        return speed.TimedRewrite(
            "a", flagged, speed.SpeedCheck(dict.fromkeys(names, 1.0), {"1x1": 0.1, "1x32": 1 / slowest})
        )

    cache.add(key, timing(1.5, 0.10))  # a clear win at 10% flagged: holds up to 0.10 · 1.5 / 1.25 = 12%
    assert cache.lookup(key, 0.12).ffn == "a" and cache.lookup(key, 0.05) is not None
    assert cache.lookup(key, 0.121) is None and cache.lookup(("other",), 0.05) is None
    close = speed.TimingCache()
    close.add(key, timing(1.2, 0.10))  # a win by less than the margin: timed again
    assert close.lookup(key, 0.01) is None
    lost = speed.TimingCache()
    lost.add(key, timing(0.99, 0.10))  # a loss, however close, holds for as many flags or more
    assert lost.lookup(key, 0.10) is not None and lost.lookup(key, 0.5) is not None and lost.lookup(key, 0.09) is None


def test_the_check_tries_the_next_predictor_when_the_cheapest_is_slower(monkeypatch):
    untimed = optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, speed_check=False))
    cheapest = untimed.ffns[0].predictor
    op = {"int4": "MatMulNBits", "int8": "DynamicQuantizeMatMul"}[cheapest]
    _fake_timings(monkeypatch, slower=set(), slow_ops=(op,))
    model = ffn_model("erf_div")
    (row,) = optimize_model(model, TardisConfig(coverage=0.9, speed_check=True)).ffns
    assert row.predictor != cheapest and not row.kept_original and row.slowest()[1] == 1.0 / 0.5
    assert not any(n.op_type == op for n in model.graph.node)


@pytest.mark.parametrize(
    ("flags", "env", "timed"),
    [
        ([], "1", True),
        (["--no-speed-check"], "1", False),
        ([], "0", False),
        (["--speed-check"], "0", True),
        (["--shapes", "none"], "1", False),
    ],
)
def test_the_check_is_on_by_default_and_can_be_turned_off(monkeypatch, tmp_path, flags, env, timed):
    calls = _fake_timings(monkeypatch, slower=set())
    monkeypatch.setenv("TARDIS_SPEED_CHECK", env)
    path = tmp_path / "m.onnx"
    onnx.save(ffn_model("erf_div"), path)
    assert main([str(path), "-q", *flags]) == 0
    assert bool(calls) == timed
    (row,) = json.loads((tmp_path / "m.tardis.json").read_text())["ffns"]
    assert bool(row["speedups"]) == timed and not row["kept_original"]


def test_a_bad_shape_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(ffn_model("erf_div"), path)
    assert main([str(path), "--shapes", "1x0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "1x0" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_ffn_onnx_runtime_cannot_time_is_folded_with_a_warning_and_bugs_propagate(monkeypatch):
    def refuse(dense, rewritten, inputs_per_shape):
        raise RuntimeError("no kernel for this type\nsecond line")

    monkeypatch.setattr("tardis_onnx.speed.measure_pair", refuse)
    result = optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, speed_check=True))
    assert not result.ffns[0].kept_original and not result.ffns[0].speedups
    assert [w for w in result.warnings if "not timed" in w] == [
        "layer.0/mlp: not timed, rewrite kept (no kernel for this type)"
    ]

    def bug(dense, rewritten, inputs_per_shape):
        raise TypeError("a bug")

    monkeypatch.setattr("tardis_onnx.speed.measure_pair", bug)
    with pytest.raises(TypeError, match="a bug"):
        optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, speed_check=True))


def test_speedups_are_shown_rounded_down():
    from tardis_onnx.report import speedup_text

    assert [speedup_text(s) for s in (0.998, 1.0, 1.2349, 2.0)] == ["0.99×", "1.00×", "1.23×", "2.00×"]


def test_a_rewrite_onnx_runtime_cannot_run_is_never_kept(monkeypatch):
    """The original FFN loads but a rewrite does not (an invalid graph): that predictor is passed over for
    the next, and where none runs the original FFN stays."""
    real = speed._session
    refused = {"DynamicQuantizeMatMul"}

    def session(model: bytes):
        if any(n.op_type in refused for n in onnx.load_from_string(model).graph.node):
            raise RuntimeError("INVALID_GRAPH : Type Error\nmore")
        return real(model)

    monkeypatch.setattr("tardis_onnx.speed._session", session)
    model = ffn_model("erf_div")
    result = optimize_model(model, TardisConfig(coverage=0.9, speed_check=True, predictor="int8"))
    (row,) = result.ffns
    assert row.kept_original and not any(n.domain == "ai.tardis" for n in model.graph.node)
    assert any("cannot run the rewrite with the int8 predictor (INVALID_GRAPH" in w for w in result.warnings)
    refused.add("FfnFallback")
    assert optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, speed_check=True)).ffns[0].kept_original
