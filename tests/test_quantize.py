"""--quantize int8: fold, then quantize the MatMuls as onnxruntime's quantize_dynamic does, never slower than it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from ffn_graphs import D, ffn_model, if_model
from onnx import numpy_helper
from test_speed import _fake_timings, two_ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import ffn_prefix
from tardis_onnx.emit import CustomFallback, emit_ffn
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import main, optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import ExactPredictor, Int8Predictor, quantize_activations_uint8
from tardis_onnx.quantize import quantize_int8
from tardis_onnx.reference import NeuronLines, fallback_op
from tardis_onnx.session import create_session
from tardis_onnx.speed import rewritten_ffn_model

pytestmark = pytest.mark.skipif(not runtime.library_available(), reason="the ai.tardis library is not built")


def test_unknown_quantization_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="quantize must be one of"):
        TardisConfig(quantize="int3")
    path = tmp_path / "m.onnx"
    onnx.save(ffn_model("erf_div"), path)
    assert main([str(path), "--quantize", "int3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_folded_and_quantized_where_it_pays(monkeypatch):
    _fake_timings(monkeypatch, slower=set())
    original = two_ffn_model()
    feeds = random_feeds(original, seed=4)
    want = create_session(original).run(None, feeds)[0]
    model = two_ffn_model()
    result = optimize_model(model, TardisConfig(coverage=0.9, quantize="int8", speed_check=True))
    ops = [n.op_type for n in model.graph.node]
    assert not any(r.kept_original for r in result.ffns)
    assert ops.count("FfnFallback") == 2 and "MatMul" not in ops  # every MatMul runs in int8
    for row in result.ffns:  # bytes as the int8 model reads them: a byte per W1, W2, fold weight and fallback row
        assert row.dense_bytes == 2 * row.d * row.hidden and row.fold_bytes == row.d * row.d
        matrices = 1 if row.predictor == "int8" else 2  # W2's rows, or W1's and W2's, int8 in the op
        assert row.fallback_read_bytes - row.fold_bytes == int(row.flagged_fraction * matrices * row.hidden * row.d)
    assert any(n.name.startswith("tardis/") and "MatMul" in n.op_type for n in model.graph.node)
    assert {p.key for p in model.metadata_props} >= {"tardis_onnx.version", "tardis_onnx.config"}
    got = create_session(model).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max()


def test_where_no_rewrite_beats_int8_the_model_is_quantize_dynamic_of_the_original(monkeypatch):
    _fake_timings(monkeypatch, slower={"layer.0/mlp", "layer.1/mlp"})
    model = two_ffn_model()
    result = optimize_model(model, TardisConfig(coverage=0.9, quantize="int8", speed_check=True))
    assert all(r.kept_original for r in result.ffns)
    assert all(r.fallback_read_bytes == r.dense_bytes == 2 * r.d * r.hidden for r in result.ffns)  # int8 FFNs
    baseline = quantize_int8(two_ffn_model())
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in baseline.graph.node]
    feeds = random_feeds(model, seed=6)
    np.testing.assert_array_equal(
        create_session(model).run(None, feeds)[0], create_session(baseline).run(None, feeds)[0]
    )


def test_the_speed_check_compares_with_the_int8_ffn(monkeypatch):
    seen = []

    def measure(dense, rewritten, inputs_per_shape):
        seen.append([n.op_type for n in onnx.load_from_string(dense).graph.node])
        return [(1.0, 0.5)] * len(inputs_per_shape)

    monkeypatch.setattr("tardis_onnx.speed.measure_pair", measure)
    optimize_model(
        ffn_model("erf_div"), TardisConfig(coverage=0.9, quantize="int8", speed_check=True, shapes=((1, 4),))
    )
    assert seen and all("MatMul" not in ops and "MatMulInteger" in ops for ops in seen)


def test_matmuls_inside_branches_are_quantized_too():
    """Optimum's merged decoder keeps both decoders in the branches of an If: quantize_dynamic leaves those
    float unless asked (EnableSubgraph); --quantize int8 asks."""

    def op_types(graph: onnx.GraphProto) -> list[str]:
        return [n.op_type for n in graph.node] + [t for n in graph.node for a in n.attribute for t in op_types(a.g)]

    original = if_model()
    quantized = quantize_int8(if_model())
    assert op_types(original.graph).count("MatMul") == 4
    assert "MatMul" not in op_types(quantized.graph) and op_types(quantized.graph).count("MatMulInteger") == 4
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).normal(size=(2, 8, D)).astype(np.float32), "cond": np.array([cond])}
        want = create_session(original).run(None, feeds)[0]
        got = create_session(quantized).run(None, feeds)[0]
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


@pytest.mark.parametrize("predictor", [Int8Predictor, ExactPredictor])
def test_the_composed_rewrite_is_one_int8_product_then_the_fallback_on_int8_rows(predictor):
    """Composed with int8 in the op's form: the fold (and the int8 predictor, which shares its node) is one
    DynamicQuantizeMatMul with a scale per column, the fallback reads int8 rows; ONNX Runtime computes what
    the numpy reference of exactly that computes."""
    model = ffn_model("erf_div")
    (ffn,), _ = find_ffns(model)
    x = np.random.default_rng(1).standard_normal((3, 5, D)).astype(np.float32)
    z = x.reshape(-1, D).astype(np.float64) @ ffn.w1 + ffn.b1
    h = ffn.hidden
    lines = NeuronLines(np.full(h, 0.5), np.zeros(h), np.quantile(z, 0.15, axis=0), np.quantile(z, 0.85, axis=0))
    chosen = predictor.fit(x.reshape(-1, D), ffn.w1, 0)
    nodes, constants = emit_ffn(ffn, lines, CustomFallback(), 17, 0.0, 0.0, chosen, quantize="int8")
    ops = [n.op_type for n in nodes]
    assert ops.count("DynamicQuantizeMatMul") == 1 and ("Split" in ops) == (predictor is Int8Predictor)
    initializers = constants.tensors()
    got = runtime.make_session(rewritten_ffn_model(ffn, nodes, initializers)).run(None, {ffn.x: x})[0]

    weights = {t.name.removeprefix(ffn_prefix(ffn.name) + "/"): numpy_helper.to_array(t) for t in initializers}
    assert weights["w2_int8"].dtype == np.int8 and weights["row_scales"].shape == (2, h)
    product = quantize_activations_uint8(x.reshape(-1, D)) @ (weights["folded_weight_int8"] * weights["folded_scales"])
    product += weights["folded_bias"]
    d_out = ffn.w2.shape[1]
    z_hat = product[:, d_out:] if predictor is Int8Predictor else x.reshape(-1, D) @ weights["w1"]
    w1t = weights.get("w1t_int8")
    assert (w1t is None) == (predictor is Int8Predictor)  # the int8 predictor's residuals come from z_hat
    args = (weights["b1"], weights["w2_int8"], weights["lines"], None, weights["row_scales"])
    want = fallback_op(x.reshape(-1, D), product[:, :d_out], z_hat, w1t, *args).reshape(got.shape)
    flagged = ~((z_hat >= weights["lines"][2]) & (z_hat <= weights["lines"][3]))
    assert 0.05 < flagged.mean() < 0.95  # the fallback added rows
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
