"""FFNs inside If and Loop subgraphs (Optimum's merged decoder in small): found with their outer-scope weights,
calibrated on the tokens of the branch that ran, folded once for both branches, exact at coverage 0."""

import numpy as np
import onnx
import pytest
from ffn_graphs import D, H, if_model, loop_model
from onnx import helper, numpy_helper

from tardis_onnx import reference, runtime
from tardis_onnx.calibrate import capture_ffn_inputs
from tardis_onnx.config import TardisConfig
from tardis_onnx.diff import diff_models
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import random_feeds
from tardis_onnx.inspect_model import folded_ffns
from tardis_onnx.optimize import main, optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.session import create_session, uses_tardis_ops
from tardis_onnx.subgraphs import prune

THEN, ELSE = ((0, "then_branch"),), ((0, "else_branch"),)


def _feeds(cond: bool, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(2, 8, D)).astype(np.float32)
    return {"x": x, "cond": np.array([cond])}


CALIBRATION = [_feeds(cond, seed) for seed, cond in enumerate([True, False] * 4)]


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return create_session(model).run(None, feeds)[0].astype(np.float64)


def _branches(model: onnx.ModelProto) -> dict[str, onnx.GraphProto]:
    return {a.name: a.g for a in model.graph.node[0].attribute}


def _forms() -> list[str]:
    return ["portable", "custom"] if runtime.library_available() else ["portable"]


def test_the_ffn_both_branches_share_is_one_match_with_a_copy():
    (ffn,), refusals = find_ffns(if_model())
    assert refusals == []
    assert (ffn.name, ffn.gelu.spelling, ffn.scope) == ("model/layers.0", "erf-decomposed", ELSE)
    assert [(c.name, c.scope) for c in ffn.copies] == [("model/layers.0", THEN)]
    assert ffn.x != ffn.copies[0].x  # else: 2·x computed in the branch; then: the main graph's x
    # Its weights are the main graph's initializers, resolved through the enclosing scope.
    top = {t.name: numpy_helper.to_array(t) for t in if_model().graph.initializer}
    assert any(np.array_equal(ffn.w1_stored, w) for w in top.values())

    ffns, refusals = find_ffns(if_model(shared=False))
    assert refusals == [] and [(f.name, f.scope, f.copies) for f in ffns] == [
        ("model/layers.0", ELSE, []),
        ("model_1/layers.0", THEN, []),  # unique names: the branches' node names are the same
    ]


def test_outer_weights_read_elsewhere_or_unequal_copies_are_refused():
    model = if_model()
    w1 = model.graph.initializer[0].name
    model.graph.node.append(onnx.helper.make_node("MatMul", ["x", w1], ["other"], name="/other/MatMul"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("other", onnx.TensorProto.FLOAT, None))
    ffns, refusals = find_ffns(model)
    assert ffns == [] and [r.rule for r in refusals] == ["shared-weight"] * 2
    assert "shared with node /other/MatMul" in refusals[0].reason

    model = if_model()  # the same W1 and W2, but the then branch adds another first bias
    other_bias = numpy_helper.from_array(np.ones(H, np.float32), "other_b1")
    model.graph.initializer.append(other_bias)
    add = next(n for n in _branches(model)["then_branch"].node if n.name == "/model/layers.0/fc1/Add")
    add.input[0] = "other_b1"
    ffns, refusals = find_ffns(model)
    assert ffns == [] and [r.rule for r in refusals] == ["shared-weight"] * 2
    assert "differ" in refusals[0].reason


def test_calibration_reads_the_inputs_of_the_branch_that_ran():
    model = if_model()
    ffns, _ = find_ffns(model)
    (samples,) = capture_ffn_inputs(model, ffns, CALIBRATION, max_samples=10_000)
    # The else branch's FFN reads 2·x, the then branch's x: one row per token of the branch that ran.
    want = np.concatenate([(1.0 if f["cond"][0] else 2.0) * f["x"].reshape(-1, D) for f in CALIBRATION])
    assert samples.seen == len(CALIBRATION) * 16
    np.testing.assert_array_equal(np.sort(samples.x, axis=0), np.sort(want, axis=0))

    # An FFN whose branch never runs gets no token, and says so.
    ffns, _ = find_ffns(if_model(shared=False))
    with pytest.raises(TardisError, match="no calibration token reached FFN model/layers.0 .its subgraph never ran"):
        capture_ffn_inputs(if_model(shared=False), ffns, [f for f in CALIBRATION if f["cond"][0]], 10_000)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "unshared"])
@pytest.mark.parametrize("fallback", _forms())
def test_coverage_zero_is_exact_in_both_branches(tmp_path, fallback, shared):
    original = if_model(shared)
    path, out = tmp_path / "merged.onnx", tmp_path / "merged.tardis.onnx"
    onnx.save(original, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{f"{k}/{i}": v for i, feed in enumerate(CALIBRATION) for k, v in feed.items()})
    argv = [str(path), "--calib", str(calib), "--coverage", "0", "--fallback", fallback, "--no-speed-check", "-q"]
    assert main(argv) == 0
    rewritten = onnx.load(out)
    for cond in (True, False):
        feeds = _feeds(cond, seed=99)
        want = _run(original, feeds)
        assert np.abs(_run(rewritten, feeds) - want).max() <= 1e-5 * np.abs(want).max(), cond
    # Folded in both branches; the new weights once, in the main graph; the original weights gone.
    names = [t.name for t in rewritten.graph.initializer]
    assert len(names) == len(set(names)) and all(n.startswith("tardis/") for n in names)  # W1, b1, W2, b2 gone
    folded = [n for n in names if n.endswith("/folded_weight")]
    assert len(folded) == (1 if shared else 2)
    for branch in _branches(rewritten).values():
        matmuls = [n for n in branch.node if n.name.endswith("/FoldedMatMul")]
        assert len(matmuls) == 1 and matmuls[0].input[1] in folded and not branch.initializer
        assert not any(n.name.startswith("/model/layers.0/fc") for n in branch.node)
    assert uses_tardis_ops(rewritten) == (fallback == "custom")
    if fallback == "portable":
        onnx.checker.check_model(rewritten, full_check=True)
    assert [f.name for f in folded_ffns(rewritten)] == [f.name for f in find_ffns(original)[0]]
    assert all(len(f.nodes) == len({*f.nodes}) for f in folded_ffns(rewritten))  # each node once


def test_diff_counts_both_branches_of_the_one_ffn():
    model = if_model()
    optimize_model(model, TardisConfig(coverage=0.9, fallback="portable", speed_check=False), CALIBRATION)
    (change,) = diff_models(if_model(), model).values()
    assert change.name == "model/layers.0"
    removed = {op: sum(c.op == op for c in change.removed) for op in {c.op for c in change.removed}}
    assert removed == {"MatMul": 4, "Add": 6, "Div": 2, "Erf": 2, "Mul": 4, "Constant": 6}  # 2 x (FFN + scalars)
    emitted = [n for n in _branches(model)["then_branch"].node if n.name.startswith("tardis/")]
    assert len(change.added) == 2 * len(emitted)
    assert change.removed_weight_bytes == (2 * D * H + H + D) * 4 + 6 * 4  # W1, b1, W2, b2 once; 2 x 3 scalars
    assert change.added_weight_bytes == sum(len(t.raw_data) for t in model.graph.initializer)


def test_partial_coverage_matches_the_numpy_reference_in_both_branches():
    original = if_model()
    (ffn,), _ = find_ffns(original)
    model = if_model()
    plain = {"window": "narrowest", "allocation": "uniform", "refit": False, "predictor": "exact"}
    config = TardisConfig(coverage=0.8, fallback="portable", speed_check=False, **plain)
    result = optimize_model(model, config, CALIBRATION)
    assert 0.1 < result.ffns[0].outlier_fraction < 0.35
    lines = {t.name.rsplit("/", 1)[1]: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    lines = reference.NeuronLines(lines["slope"], lines["intercept"], lines["lo"], lines["hi"])
    for cond, scale, sign in ((True, 1.0, 1.0), (False, 2.0, -1.0)):
        feeds = _feeds(cond, seed=11)
        x = feeds["x"].astype(np.float64)
        want = reference.tardis_ffn(scale * x, ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines, ffn.gelu.form) + sign * x
        got = _run(model, feeds)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
        assert np.abs(got - _run(original, feeds)).max() > 1e-3  # the lines really replace GELU


def test_an_ffn_in_a_loop_body_is_exact_at_coverage_zero():
    original = loop_model()
    (ffn,), _ = find_ffns(original)
    assert ffn.scope == ((0, "body"),) and ffn.name == "block"
    model = loop_model()
    calibration = [random_feeds(model, seed=s) for s in range(3)]
    result = optimize_model(model, TardisConfig(coverage=0.0, fallback="portable", speed_check=False), calibration)
    assert result.calibration["tokens"] == 3 * 32 * 2  # every iteration's tokens
    feeds = random_feeds(model, seed=7)
    want = _run(original, feeds)
    assert np.abs(_run(model, feeds) - want).max() <= 1e-5 * np.abs(want).max()


def test_prune_keeps_only_what_the_named_outputs_need_branches_reads_included():
    def branch(name):
        out = helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, [2, 3])
        return helper.make_graph([helper.make_node("Identity", ["b"], [f"{name}_out"])], name, [], [out])

    def model():
        f = onnx.TensorProto.FLOAT
        nodes = [
            helper.make_node("Relu", ["x"], ["a"], name="relu"),
            helper.make_node("Neg", ["x"], ["b"], name="neg"),  # read inside the If's branches only
            helper.make_node("If", ["cond"], ["c"], name="if", then_branch=branch("t"), else_branch=branch("e")),
            helper.make_node("MatMul", ["a", "head_w"], ["head"], name="head"),
        ]
        inputs = [helper.make_tensor_value_info("x", f, [2, 3]), helper.make_tensor_value_info("cond", 9, [1])]
        outputs = [helper.make_tensor_value_info(n, f, None) for n in ("c", "head")]
        w = numpy_helper.from_array(np.ones((3, 5), np.float32), "head_w")
        return helper.make_model(
            helper.make_graph(nodes, "g", inputs, outputs, [w]), opset_imports=[helper.make_opsetid("", 18)]
        )

    branch_only = model()
    prune(branch_only.graph, ["c"])
    assert [n.name for n in branch_only.graph.node] == ["neg", "if"]
    assert [v.name for v in branch_only.graph.output] == ["c"] and not branch_only.graph.initializer
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (c,) = create_session(branch_only).run(None, {"x": x, "cond": np.array([True])})
    np.testing.assert_array_equal(c, -x)

    head_only = model()
    prune(head_only.graph, ["head"])
    assert [n.name for n in head_only.graph.node] == ["relu", "head"]
    assert [t.name for t in head_only.graph.initializer] == ["head_w"]
