"""--quantize int8|int4: fold, then quantize the MatMuls as onnxruntime's quantize_dynamic (int8) or
MatMulNBitsQuantizer (int4) does, never slower than it."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from ffn_graphs import D, ffn_model, fp16_model, gpt2_gemm_model, if_model
from onnx import numpy_helper
from test_speed import _fake_timings, two_ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import ffn_prefix
from tardis_onnx.emit import CustomFallback, emit_ffn
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import main, optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import (
    ExactPredictor,
    Int4Predictor,
    Int8Predictor,
    dequantize_nbits,
    matmul_weight_bytes,
    quantize_activations_int8,
    quantize_activations_uint8,
)
from tardis_onnx.quantize import quantize_model
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


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_command_says_nothing_of_the_quantizers_own(monkeypatch, tmp_path, capsys, caplog, quantize):
    """quantize_dynamic advises pre-processing on the root logger for every model it is given (here each FFN timed and
    the whole model), MatMulNBitsQuantizer logs a line per node: the command's output is its own report. Where every
    FFN was kept, the summary names no predictor (it printed "(; reduction 0.0%)")."""
    _fake_timings(monkeypatch, slower={"layer.0/mlp"})
    path = tmp_path / "m.onnx"
    onnx.save(ffn_model("erf_div"), path)
    caplog.set_level(logging.INFO)
    assert main([str(path), "--quantize", quantize, "--speed-check"]) == 0
    out = capsys.readouterr()
    shown = [r for r in caplog.records if r.levelno >= logging.WARNING or r.name.endswith("matmul_nbits_quantizer")]
    assert not shown and "pre-processing" not in out.err + out.out
    summary = next(line for line in out.out.splitlines() if line.startswith("folded "))
    assert "(;" not in summary and "with the predictors (" in summary, summary


def test_int8_on_a_float16_model_is_refused_before_any_work_and_int4_takes_it(tmp_path, capsys):
    """quantize_dynamic cannot quantize float16 MatMuls (the model would not load): --quantize int8 says so at once,
    one error line, nothing written; MatMulNBits takes float16, so --quantize int4 folds and quantizes it."""
    path = tmp_path / "m.onnx"
    onnx.save(fp16_model(), path)
    assert main([str(path), "--quantize", "int8", "--no-speed-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "needs a float32 model" in err[0] and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    )
    model = fp16_model()
    feeds = random_feeds(model, seed=1)
    want = create_session(fp16_model()).run(None, feeds)[0].astype(np.float32)
    result = optimize_model(model, TardisConfig(coverage=0.9, quantize="int4", speed_check=False))
    for row in result.ffns:  # MatMulNBits keeps a float16 model's scales in float16: 2 bytes per 32 weights
        blocks_d, blocks_h = -(-row.d // 32), -(-row.hidden // 32)
        assert row.dense_bytes == row.hidden * blocks_d * (16 + 2) + row.d * blocks_h * (16 + 2)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    got = create_session(model).run(None, feeds)[0].astype(np.float32)
    assert np.abs(got - want).max() <= 0.3 * np.abs(want).max()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_folded_and_quantized_where_it_pays(monkeypatch, quantize):
    _fake_timings(monkeypatch, slower=set())
    original = two_ffn_model()
    feeds = random_feeds(original, seed=4)
    want = create_session(original).run(None, feeds)[0]
    model = two_ffn_model()
    result = optimize_model(model, TardisConfig(coverage=0.9, quantize=quantize, speed_check=True))
    ops = [n.op_type for n in model.graph.node]
    assert not any(r.kept_original for r in result.ffns)
    assert ops.count("FfnFallback") == 2 and "MatMul" not in ops  # every MatMul runs quantized
    assert (quantize == "int4") == ("MatMulNBits" in ops)
    for row in result.ffns:  # bytes as the quantized model reads them; the fallback's rows a byte a weight
        if quantize == "int8":
            assert row.dense_bytes == 2 * row.d * row.hidden and row.fold_bytes == row.d * row.d
        else:  # half a byte and a float32 scale per block of 32 inputs (d = 16: one block, padded)
            blocks_d, blocks_h = -(-row.d // 32), -(-row.hidden // 32)
            assert row.fold_bytes == row.d * blocks_d * 20
            assert row.dense_bytes == row.hidden * blocks_d * 20 + row.d * blocks_h * 20
        matrices = 1 if row.predictor == "int8" else 2  # W2's rows, or W1's and W2's, int8 in the op
        assert row.fallback_read_bytes - row.fold_bytes == int(row.flagged_fraction * matrices * row.hidden * row.d)
    assert any(n.name.startswith("tardis/") and "MatMul" in n.op_type for n in model.graph.node)
    assert {p.key for p in model.metadata_props} >= {"tardis_onnx.version", "tardis_onnx.config"}
    got = create_session(model).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_where_no_rewrite_pays_the_model_is_the_quantizer_s_own_of_the_original(monkeypatch, quantize):
    _fake_timings(monkeypatch, slower={"layer.0/mlp", "layer.1/mlp"})
    model = two_ffn_model()
    result = optimize_model(model, TardisConfig(coverage=0.9, quantize=quantize, speed_check=True))
    assert all(r.kept_original for r in result.ffns)
    for r in result.ffns:  # the quantized FFNs' bytes
        dense = matmul_weight_bytes(r.d, r.hidden, quantize, 4) + matmul_weight_bytes(r.hidden, r.d, quantize, 4)
        assert r.fallback_read_bytes == r.dense_bytes == dense
    baseline = quantize_model(two_ffn_model(), quantize)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in baseline.graph.node]
    feeds = random_feeds(model, seed=6)
    np.testing.assert_array_equal(
        create_session(model).run(None, feeds)[0], create_session(baseline).run(None, feeds)[0]
    )


@pytest.mark.parametrize(("quantize", "product"), [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_the_speed_check_compares_with_the_quantized_ffn(monkeypatch, quantize, product):
    seen = []

    def measure(dense, rewritten, inputs_per_shape):
        seen.append([n.op_type for n in onnx.load_from_string(dense).graph.node])
        return [(1.0, 0.5)] * len(inputs_per_shape)

    monkeypatch.setattr("tardis_onnx.speed.measure_pair", measure)
    optimize_model(
        ffn_model("erf_div"), TardisConfig(coverage=0.9, quantize=quantize, speed_check=True, shapes=((1, 4),))
    )
    assert seen and all("MatMul" not in ops and ops.count(product) == 2 for ops in seen)


@pytest.mark.parametrize(
    ("quantize", "product", "tolerance"), [("int8", "MatMulInteger", 0.05), ("int4", "MatMulNBits", 0.2)]
)
def test_gemm_layers_are_quantized_too(monkeypatch, quantize, product, tolerance):
    """GPT-2's export spells its linear layers as Gemm (one with transB): quantize_dynamic writes them as MatMul + Add
    and quantizes them; MatMulNBitsQuantizer would leave them float, so --quantize int4 does the same first. The
    speed check's baseline is then a quantized FFN, not a float one."""
    original = gpt2_gemm_model()
    quantized = quantize_model(gpt2_gemm_model(), quantize)
    ops = [n.op_type for n in quantized.graph.node]
    assert "Gemm" not in ops and "MatMul" not in ops and ops.count(product) == 2
    feeds = random_feeds(original, seed=3)
    want = create_session(original).run(None, feeds)[0]
    got = create_session(quantized).run(None, feeds)[0]
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()
    seen = []

    def measure(dense, rewritten, inputs_per_shape):
        seen.append([n.op_type for n in onnx.load_from_string(dense).graph.node])
        return [(1.0, 0.5)] * len(inputs_per_shape)

    monkeypatch.setattr("tardis_onnx.speed.measure_pair", measure)
    optimize_model(original, TardisConfig(coverage=0.9, quantize=quantize, speed_check=True, shapes=((1, 4),)))
    assert seen and all("Gemm" not in ops and ops.count(product) == 2 for ops in seen)


@pytest.mark.parametrize(
    ("quantize", "product", "tolerance"), [("int8", "MatMulInteger", 0.05), ("int4", "MatMulNBits", 0.2)]
)
def test_matmuls_inside_branches_are_quantized_too(quantize, product, tolerance):
    """Optimum's merged decoder keeps both decoders in the branches of an If: quantize_dynamic leaves those
    float unless asked (EnableSubgraph); --quantize int8 asks (MatMulNBitsQuantizer walks them itself)."""

    def op_types(graph: onnx.GraphProto) -> list[str]:
        return [n.op_type for n in graph.node] + [t for n in graph.node for a in n.attribute for t in op_types(a.g)]

    original = if_model()
    quantized = quantize_model(if_model(), quantize)
    assert op_types(original.graph).count("MatMul") == 4
    assert "MatMul" not in op_types(quantized.graph) and op_types(quantized.graph).count(product) == 4
    for cond in (True, False):
        feeds = {"x": np.random.default_rng(1).normal(size=(2, 8, D)).astype(np.float32), "cond": np.array([cond])}
        want = create_session(original).run(None, feeds)[0]
        got = create_session(quantized).run(None, feeds)[0]
        assert np.abs(got - want).max() <= tolerance * np.abs(want).max()  # 4 bits at d = 16: coarse


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


@pytest.mark.parametrize("predictor", [Int4Predictor, Int8Predictor, ExactPredictor])
def test_the_int4_composition_is_one_4_bit_product_then_the_fallback_on_int8_rows(predictor):
    """Composed with int4 in the op's form: the fold (and the int4 predictor, which shares its node) is one
    MatMulNBits (4-bit blocks of 32, int8 activations), the fallback reads int8 rows and recomputes each flagged
    pre-activation from W1ᵀ's. The product is what its numpy reference computes, to the activations' rounding
    (emulated: MLAS rounds a little differently); the fallback on ONNX Runtime's own product is exactly the op's
    reference."""
    model = ffn_model("erf_div")
    (ffn,), _ = find_ffns(model)
    x = np.random.default_rng(1).standard_normal((3, 5, D)).astype(np.float32)
    rows = x.reshape(-1, D)
    z = rows.astype(np.float64) @ ffn.w1 + ffn.b1
    h, d_out = ffn.hidden, ffn.w2.shape[1]
    lines = NeuronLines(np.full(h, 0.5), np.zeros(h), np.quantile(z, 0.15, axis=0), np.quantile(z, 0.85, axis=0))
    chosen = predictor.fit(rows, ffn.w1, 0)
    nodes, constants = emit_ffn(ffn, lines, CustomFallback(), 17, 0.0, 0.0, chosen, quantize="int4")
    ops = [n.op_type for n in nodes]
    assert ops.count("MatMulNBits") == 1 and ("Split" in ops) == (predictor is Int4Predictor)
    initializers = constants.tensors()
    weights = {t.name.removeprefix(ffn_prefix(ffn.name) + "/"): numpy_helper.to_array(t) for t in initializers}
    assert weights["w2_int8"].dtype == np.int8 and weights["row_scales"].shape == (2, h)
    assert ("w1t_int8" in weights) == (predictor is not Int8Predictor)  # int4 and exact: z recomputed
    # ONNX Runtime's folded output and z_hat, as the fallback op reads them.
    graph = onnx.load_from_string(rewritten_ffn_model(ffn, nodes, initializers))
    fallback = next(n for n in graph.graph.node if n.op_type == "FfnFallback")
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in fallback.input[1:3])
    got, folded, z_hat = runtime.make_session(graph.SerializeToString()).run(None, {ffn.x: x})
    folded, z_hat = folded.reshape(-1, d_out), z_hat.reshape(-1, h)

    product = quantize_activations_int8(rows) @ dequantize_nbits(
        weights["folded_weight_int4"], weights["folded_scales"], D, 4
    )
    product += weights["folded_bias"]
    assert np.abs(folded - product[:, :d_out]).max() <= 0.01 * np.abs(product[:, :d_out]).max()
    if predictor is Int4Predictor:
        assert np.abs(z_hat - product[:, d_out:]).max() <= 0.01 * np.abs(product[:, d_out:]).max()
    args = (weights["b1"], weights["w2_int8"], weights["lines"], None, weights["row_scales"])
    want = fallback_op(rows, folded, z_hat, weights.get("w1t_int8"), *args).reshape(got.shape)
    flagged = ~((z_hat >= weights["lines"][2]) & (z_hat <= weights["lines"][3]))
    assert 0.05 < flagged.mean() < 0.95  # the fallback added rows
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_exact_predictor_stays_exact_under_the_quantizer(quantize):
    """A predictor's precision is its own: the quantizer leaves the exact predictor's x·W1 in float (its windows
    were fitted for it) while it quantizes every other MatMul; the report counts it at float width."""
    model = two_ffn_model()
    config = TardisConfig(coverage=0.9, predictor="exact", quantize=quantize, speed_check=False)
    result = optimize_model(model, config)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls == [f"tardis/layer.{k}/mlp/Predictor/MatMul" for k in range(2)]
    assert all(r.predictor_bytes == r.d * r.hidden * 4 for r in result.ffns)
    product = "DynamicQuantizeMatMul" if quantize == "int8" else "MatMulNBits"
    assert sum(n.op_type == product for n in model.graph.node) == 2  # the folds
