"""Outlier predictors: the int4 layout ONNX Runtime reads, the low-rank fit, error-scaled flag windows,
and rewritten models that use them (custom op and portable forms agree)."""

import numpy as np
import onnx
import pytest
from ffn_graphs import ffn_model
from onnx import TensorProto, helper, numpy_helper

from tardis_onnx import predictor as predictor_module
from tardis_onnx import reference, runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.predictor import (
    INT4_ACCURACY_LEVEL,
    INT8_WEIGHT_LIMIT,
    PREDICTOR_CLASSES,
    PREDICTORS,
    ExactPredictor,
    Int2Predictor,
    Int4Predictor,
    Int8Predictor,
    LowRankPredictor,
    dequantize_nbits,
    fit_lowrank,
    flag_windows,
    predicted_residual_errors,
    predictor_candidates,
    predictor_class,
    quantize_activations_int8,
    quantize_activations_uint8,
    quantize_int4,
    quantize_int8,
    rank_predictors,
)
from tardis_onnx.session import create_session


def _matmulnbits(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, bits: int = 4, **attributes) -> np.ndarray:
    """``x`` times the ``bits``-bit matrix (blocks of 32), as ONNX Runtime's ``MatMulNBits`` computes it."""
    (n, d), h = x.shape, packed.shape[0]
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=d, N=h, bits=bits, block_size=32, **attributes
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, h])],
        [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.astype(np.float32), "S")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    return create_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("d", [64, 72])  # 72: a partial last block
def test_int4_layout_matches_matmulnbits_in_onnxruntime(d):
    rng = np.random.default_rng(0)
    h = 48
    w = rng.normal(size=(d, h)).astype(np.float32)
    packed, scales = quantize_int4(w)
    x = rng.normal(size=(3, d)).astype(np.float32)
    got = _matmulnbits(x, packed, scales)
    want = x.astype(np.float64) @ dequantize_nbits(packed, scales.astype(np.float32), d, 4)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # 4 bits: within half a quantisation step of the original weights.
    step = np.abs(w).max() / 7
    assert np.abs(dequantize_nbits(packed, scales, d, 4) - w).max() <= step / 2 + 1e-6


def test_the_int4_reference_models_matmulnbits_int8_activations_as_emitted():
    """The emitted predictor runs ``accuracy_level=4`` (int8 activations, ~3x faster): the reference that
    sets the flag windows and reports recall models that rounding, several times closer than fp32 is."""
    d, h = 384, 256
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((d, h)) * 0.05).astype(np.float32)
    x = rng.standard_normal((64, d)).astype(np.float32)
    packed, scales = quantize_int4(w)
    got = _matmulnbits(x, packed, scales, accuracy_level=INT4_ACCURACY_LEVEL)
    w4 = dequantize_nbits(packed, scales.astype(np.float32), d, 4)
    emulated = np.abs(got - quantize_activations_int8(x) @ w4).max()
    assert emulated < 0.3 * np.abs(got - x.astype(np.float64) @ w4).max()
    np.testing.assert_allclose(
        Int4Predictor.fit(x, w, 0).predict(x, w, None), quantize_activations_int8(x) @ w4, atol=1e-5
    )


@pytest.mark.parametrize("d", [64, 72])  # 72: a partial last block
def test_int2_reference_is_matmulnbits_in_onnxruntime(d):
    """Four codes a byte, low bits first, the default zero point 2; with ``accuracy_level=4`` ONNX Runtime
    rounds the activations to int8 per block of 32 exactly as the reference does."""
    rng = np.random.default_rng(2)
    h = 40
    w = (rng.standard_normal((d, h)) * np.linspace(0.02, 0.2, h)).astype(np.float32)
    x = (rng.standard_normal((300, d)) * np.linspace(2, 0.2, d)).astype(np.float32)
    predictor = Int2Predictor.fit(x, w, 0)
    packed, scales = predictor.packed, predictor.scales.astype(np.float32)
    assert packed.shape == (h, -(-d // 32), 8) and packed.dtype == np.uint8
    w2 = dequantize_nbits(packed, scales, d, 2)
    np.testing.assert_allclose(_matmulnbits(x, packed, scales, bits=2), x.astype(np.float64) @ w2, atol=1e-4)
    got = _matmulnbits(x, packed, scales, bits=2, accuracy_level=INT4_ACCURACY_LEVEL)
    np.testing.assert_allclose(got, predictor.predict(x, w, None), atol=1e-4)
    assert np.abs(got - x.astype(np.float64) @ w2).max() > 100 * np.abs(got - predictor.predict(x, w, None)).max()


def test_int2_rounding_keeps_the_preactivations_close_on_held_out_inputs():
    """GPTQ-style rounding (errors spread over the inputs still to round) beats rounding each weight
    to the nearest of MatMulNBits' own symmetric grid ``(q − 2)·max|w|/2``, on inputs it was not fitted on."""
    d, h = 128, 64
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((d, d)) * np.linspace(1.5, 0.1, d)
    x_fit, x_test = rng.standard_normal((2000, d)) @ mix, rng.standard_normal((500, d)) @ mix
    w = rng.standard_normal((d, h)) * 0.1
    predictor = Int2Predictor.fit(x_fit, w, 0)
    w2 = dequantize_nbits(predictor.packed, predictor.scales, d, 2)
    codes = w2.T.reshape(h, -1, 32) / predictor.scales.reshape(h, -1, 1)
    assert set(np.unique(np.round(codes, 9))) <= {-2.0, -1.0, 0.0, 1.0}
    blocks = w.T.reshape(h, -1, 32)
    peaks = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[..., None], 2) / -2
    plain = ((np.clip(np.rint(blocks / peaks) + 2, 0, 3) - 2) * peaks).reshape(h, d).T
    error = np.square(x_test @ (w2 - w)).mean()
    assert error < 0.7 * np.square(x_test @ (plain - w)).mean()


def test_the_int8_reference_is_dynamic_quantize_matmul_in_onnxruntime():
    """int8 W1 (a scale per neuron) times the activations rounded to uint8 over the whole input tensor; on every
    CPU: with weights up to ±127 a CPU without VNNI (AVX2) saturated and missed by 11% of the output's range."""
    d, h = 96, 40
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((d, h)) * np.linspace(0.01, 0.3, h)).astype(np.float32)
    x = (rng.standard_normal((2, 7, d)) + 0.3).astype(np.float32)
    weights, scales = quantize_int8(w)
    assert weights.dtype == np.int8 and np.abs(weights * scales - w).max() <= scales.max() / 2 + 1e-7
    assert np.abs(weights).max() == INT8_WEIGHT_LIMIT == 64
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "B", "S"], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, h])],
        [numpy_helper.from_array(weights, "B"), numpy_helper.from_array(scales.astype(np.float32), "S")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    got = create_session(helper.make_model(graph, opset_imports=opsets)).run(None, {"x": x})[0]
    want = Int8Predictor.fit(x, w, 0).predict(x.reshape(-1, d), w, None).reshape(2, 7, h)
    exact = x.astype(np.float64) @ w
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    assert np.abs(got - exact).max() > 100 * np.abs(got - want).max()  # the rounding is modelled, not ignored
    assert np.abs(quantize_activations_uint8(x) - x).max() <= (x.max() - min(x.min(), 0)) / 255


@pytest.mark.skipif(not runtime.library_available(), reason="the ai.tardis library is not built (make lib)")
def test_with_int8_every_flagged_residual_comes_from_the_prediction():
    """At coverage 0 every neuron falls back, with its residual from the int8 pre-activation
    ``ẑ``: the rewritten FFN is the fold plus ``(GELU(ẑ) − a ẑ − c)·W2``, and no W1ᵀ is stored."""
    model = ffn_model("erf_div")
    (ffn,) = find_ffns(ffn_model("erf_div"))[0]
    result = optimize_model(model, TardisConfig(coverage=0.0, fallback="custom", predictor="int8"))
    arrays = {t.name.rsplit("/", 1)[-1]: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    assert "w1t" not in arrays and "w1_int8" in arrays
    row = result.ffns[0]
    assert row.predictor == "int8" and row.fallback_read_bytes == row.fold_bytes + ffn.w2_stored.size * 4
    feeds = random_feeds(model, seed=5)
    x = feeds["x"].astype(np.float64)
    z_hat = (
        Int8Predictor.fit(x, ffn.w1, 0).predict(x.reshape(-1, x.shape[-1]), ffn.w1, ffn.b1).reshape(*x.shape[:-1], -1)
    )
    folded = x @ arrays["folded_weight"] + arrays["folded_bias"]
    want = folded + reference.residual(z_hat, result.lines[0]) @ ffn.w2 + x  # the model adds its input back
    got = create_session(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    # The exact residual would differ: the op really took it from the prediction.
    z = x @ ffn.w1 + ffn.b1
    assert np.abs(reference.residual(z, result.lines[0]) - reference.residual(z_hat, result.lines[0])).max() > 1e-2


def test_lowrank_is_exact_at_full_rank_and_beats_a_plain_svd():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 32)) * np.linspace(4, 0.05, 32)  # anisotropic inputs
    w1 = rng.normal(size=(32, 96))
    u, v = fit_lowrank(x, w1, 32)
    np.testing.assert_allclose(x @ u @ v, x @ w1, atol=1e-8)
    u, v = fit_lowrank(x, w1, 8)
    left, s, right = np.linalg.svd(w1, full_matrices=False)
    plain = (left[:, :8] * s[:8]) @ right[:8]
    assert np.square(x @ (u @ v - w1)).sum() < 0.7 * np.square(x @ (plain - w1)).sum()


def test_lowrank_with_fewer_tokens_than_inputs_equals_the_second_moment_construction():
    """Below d tokens (a 7B FFN's calibration) the factors come from the n × n Gram matrix: the same predictor."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 80)) * np.linspace(3, 0.1, 80)
    w1 = rng.normal(size=(80, 200))
    u, v = fit_lowrank(x, w1, 8)
    second = x.T @ x / x.shape[0]
    sigma = np.sqrt(np.einsum("ki,kl,li->i", w1, second, w1) - (x.mean(axis=0) @ w1) ** 2)
    eigenvalues, vectors = np.linalg.eigh(second)
    eigenvalues = np.maximum(eigenvalues, 1e-6 * eigenvalues.max())
    root, inverse_root = (vectors * np.sqrt(eigenvalues)) @ vectors.T, (vectors / np.sqrt(eigenvalues)) @ vectors.T
    left, s, right = np.linalg.svd(root @ w1 / sigma, full_matrices=False)
    want = x @ (inverse_root @ (left[:, :8] * s[:8])) @ (right[:8] * sigma)
    np.testing.assert_allclose(x @ u @ v, want, atol=1e-9 * np.abs(want).max())


def test_flag_windows_narrow_by_the_error_scale_and_catch_more_outliers():
    lines = reference.NeuronLines(np.ones(2), np.zeros(2), np.array([-1.0, 0.0]), np.array([1.0, 0.1]))
    flags = flag_windows(lines, np.array([0.25, 0.1]), 2.0)
    np.testing.assert_allclose(flags.lo, [-0.5, 0.2])
    np.testing.assert_allclose(flags.hi, [0.5, -0.1])
    z_hat = np.array([[0.9, 0.05]])
    assert reference.outside_window(z_hat, flags).tolist() == [[True, True]]  # an emptied window always flags
    assert reference.outside_window(z_hat, lines).tolist() == [[False, False]]


@pytest.mark.parametrize("kind", ["int2", "int4", "int8", "lowrank"])
def test_every_neuron_falling_back_stays_exact_with_any_predictor(kind):
    original = ffn_model("erf_div")
    feeds = random_feeds(original, seed=21)
    want = create_session(original).run(None, feeds)[0]
    rewritten = ffn_model("erf_div")
    config = TardisConfig(coverage=0.0, fallback="portable", predictor=kind, predictor_rank=4)
    result = optimize_model(rewritten, config)
    assert result.ffns[0].flagged_fraction == 1.0 and result.ffns[0].recall == 1.0
    got = create_session(rewritten).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.skipif(not runtime.library_available(), reason="the ai.tardis library is not built (make lib)")
@pytest.mark.parametrize("kind", ["exact", "int2", "int4", "int8", "lowrank"])
def test_custom_and_portable_forms_agree(kind):
    feeds = random_feeds(ffn_model("tanh_pow"), seed=33)
    outputs, reports = [], []
    for fallback in ("custom", "portable"):
        model = ffn_model("tanh_pow")
        result = optimize_model(model, TardisConfig(coverage=0.9, fallback=fallback, predictor=kind, predictor_rank=8))
        onnx.checker.check_model(model)
        outputs.append(create_session(model).run(None, feeds)[0])
        reports.append(result.ffns[0])
    if kind in ("int2", "int4", "int8"):
        # The kernel rounds activations to int8 (int2, int4: accuracy_level 4; int8: per tensor), the portable fp32
        # MatMul does not, so a few near-edge neurons flag differently, and the int8 kernel takes the flagged
        # residuals from its prediction: both stay as close to the original FFN.
        want = create_session(ffn_model("tanh_pow")).run(None, feeds)[0]
        errors = [np.abs(out - want).mean() for out in outputs]
        assert errors[0] <= 1.5 * errors[1] + 1e-4
    else:
        np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    assert reports[0].predictor_bytes == reports[1].predictor_bytes
    if kind == "exact":
        assert reports[0].recall == 1.0 and reports[0].predictor_bytes == 16 * 64 * 4
    else:
        assert reports[0].predictor_bytes < 16 * 64 * 4
        assert 0.0 < reports[0].recall <= 1.0


def test_lowrank_predict_and_unknown_kinds():
    rng = np.random.default_rng(3)
    x_cal = rng.normal(size=(500, 16))
    w1 = rng.normal(size=(16, 64))
    predictor = LowRankPredictor(*fit_lowrank(x_cal, w1, 4))
    z = predictor.predict(x_cal[:2], w1, np.ones(64))
    assert z.shape == (2, 64)
    np.testing.assert_allclose(z, x_cal[:2] @ predictor.u @ predictor.v + 1)
    with pytest.raises(ValueError, match="unknown predictor"):
        predictor_class("oracle")
    assert predictor_class("lowrank") is LowRankPredictor and predictor_candidates("int4", True) == (Int4Predictor,)
    # auto: the quantized predictors only where they run as quantized kernels (the custom-op form)
    assert predictor_candidates("auto", True) == (ExactPredictor,)
    assert predictor_candidates("auto", False) == (Int4Predictor, Int8Predictor, ExactPredictor)
    # int2 (not in auto: it missed the recall floor on MiniLM) and lowrank (never chosen on a real model)
    # only when asked for
    assert predictor_candidates("int2", False) == (Int2Predictor,)
    assert predictor_candidates("lowrank", True) == (LowRankPredictor,)


def test_int8_fallback_rows_are_ranked_at_a_byte_a_weight():
    """Under --quantize the fallback reads int8 rows: a candidate's bytes count its flagged rows at one byte a
    weight, not the model's four."""
    model = ffn_model("erf_div")
    (ffn,) = find_ffns(model)[0]
    x = np.random.default_rng(3).standard_normal((500, ffn.w1_stored.shape[0]))
    z = x @ ffn.w1 + ffn.b1
    lines = reference.NeuronLines(
        np.zeros(ffn.hidden), np.zeros(ffn.hidden), np.quantile(z, 0.1, axis=0), np.quantile(z, 0.9, axis=0)
    )
    (plain,), (int8_rows,) = (rank_predictors((ExactPredictor,), ffn, x, x, lines, rows_itemsize=n) for n in (None, 1))
    d, h = ffn.w1_stored.shape
    rows = plain.flagged_fraction * (ffn.w1_stored.size + ffn.w2_stored.size)
    assert 0 < plain.flagged_fraction < 1 and int8_rows.flagged_fraction == plain.flagged_fraction
    assert plain.read_bytes == pytest.approx(d * h * 4 + rows * 4) and int8_rows.read_bytes == pytest.approx(
        d * h * 4 + rows
    )


def test_int8_is_left_out_where_residuals_from_it_would_raise_the_error():
    """At coverage 0 the exact residuals make the rewrite exact: residuals from an int8 prediction would
    not, so the auto choice passes over int8 there (asked for alone, it is taken as it is)."""
    model = ffn_model("erf_div")
    (ffn,) = find_ffns(model)[0]
    x = np.random.default_rng(2).standard_normal((500, ffn.w1_stored.shape[0]))
    lines = reference.NeuronLines(
        np.zeros(ffn.hidden), np.zeros(ffn.hidden), np.full(ffn.hidden, np.inf), np.zeros(ffn.hidden)
    )
    exact, predicted = predicted_residual_errors(Int8Predictor.fit(x, ffn.w1, 0), ffn, x, lines, lines)
    assert exact < 1e-20 < 1e-6 < predicted
    kinds = [c.predictor.kind for c in rank_predictors((Int8Predictor, ExactPredictor), ffn, x, x, lines)]
    assert kinds == ["exact"]
    assert [c.predictor.kind for c in rank_predictors((Int8Predictor,), ffn, x, x, lines)] == ["int8"]
    feeds = random_feeds(model, seed=8)
    want = create_session(ffn_model("erf_div")).run(None, feeds)[0]
    result = optimize_model(model, TardisConfig(coverage=0.0, fallback="custom"))
    assert result.ffns[0].predictor != "int8"
    np.testing.assert_allclose(create_session(model).run(None, feeds)[0], want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kind", PREDICTORS)
def test_each_predictor_class_emits_what_its_reference_computes(kind):
    """A predictor is one class: its emitted nodes (portable form) compute its own reference, and its
    bytes per token are what the report counts."""
    from tardis_onnx.emit import _Builder

    (ffn,) = find_ffns(ffn_model("erf_div"))[0]
    x = np.random.default_rng(9).standard_normal((40, ffn.w1_stored.shape[0]))
    predictor = PREDICTOR_CLASSES[kind].fit(x, ffn.w1, 4)
    assert predictor.kind == kind and isinstance(predictor, PREDICTOR_CLASSES[kind])
    b = _Builder("tardis/p", np.dtype(np.float32))
    out = predictor.emit(b, ffn, standard_only=True)
    graph = helper.make_graph(
        b.nodes,
        "p",
        [helper.make_tensor_value_info(ffn.x, TensorProto.FLOAT, [None, ffn.w1_stored.shape[0]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        b.constants.tensors(),
    )
    got = create_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])).run(
        None, {ffn.x: x.astype(np.float32)}
    )[0]
    # The portable form multiplies by the dequantized copy in fp32 (no activation rounding).
    dequantized = {
        "int2": lambda: predictor.prepare(ffn.w1),
        "int4": lambda: dequantize_nbits(*quantize_int4(ffn.w1), ffn.w1_stored.shape[0], 4),
        "int8": lambda: np.multiply(*quantize_int8(ffn.w1)),
    }
    want = x @ dequantized[kind]() if kind in dequantized else predictor.predict(x, ffn.w1, None)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    d, h = ffn.w1_stored.shape
    assert predictor.read_bytes(d, h, 4) == type(predictor).bytes_per_token(d, h, 4, predictor.rank) > 0


def test_a_large_ffns_error_scale_is_measured_on_tokens_spread_over_the_fit_set():
    rows = np.arange(3277)[predictor_module._error_scale_rows(3277, large=True)]
    assert predictor_module.ERROR_SCALE_TOKENS_LARGE // 2 <= rows.size <= predictor_module.ERROR_SCALE_TOKENS_LARGE
    assert rows[0] == 0 and rows[-1] >= 3277 - 4 and set(np.diff(rows)) == {4}
    small = np.arange(10_000)[predictor_module._error_scale_rows(10_000, large=False)]
    np.testing.assert_array_equal(small, np.arange(predictor_module.ERROR_SCALE_TOKENS))
