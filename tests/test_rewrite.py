"""The rewritten graph: exact with every neuron falling back, equal to the numpy reference otherwise,
and runnable in stock ONNX Runtime and in ``onnx.reference``."""

import numpy as np
import onnx
import pytest
from ffn_graphs import SPELLINGS, bias_gelu_model, dynamo_model, ffn_model, fp16_cast_model, fp16_model, gpt2_gemm_model
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from tardis_onnx import reference
from tardis_onnx.config import TardisConfig
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.passes.prepare import is_rewritten
from tardis_onnx.session import create_session

BUILDERS = {name: (lambda name=name: ffn_model(name)) for name in SPELLINGS}
BUILDERS.update(
    bias_gelu=bias_gelu_model,
    fast_gelu_bias=lambda: bias_gelu_model("FastGelu"),
    gpt2_gemm=gpt2_gemm_model,
    dynamo=dynamo_model,
    no_bias=lambda: ffn_model("erf_div", bias=False),
)


def _run(model, feeds):
    return create_session(model).run(None, feeds)[0].astype(np.float64)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_coverage_zero_is_exact_in_onnxruntime(name):
    original = BUILDERS[name]()
    feeds = random_feeds(original, seed=7)
    want = _run(original, feeds)
    rewritten = BUILDERS[name]()
    result = optimize_model(rewritten, TardisConfig(coverage=0.0, fallback="portable"))
    assert result.ffns[0].outlier_fraction == 1.0
    got = _run(rewritten, feeds)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # The folded matrix is real (lines fitted on all samples), not zero.
    folded = next(t for t in rewritten.graph.initializer if t.name.endswith("/folded_weight"))
    assert np.abs(numpy_helper.to_array(folded)).max() > 0.01


@pytest.mark.parametrize("build", [fp16_model, fp16_cast_model], ids=["fp16", "fp16-casts"])
def test_coverage_zero_fp16_within_half_precision(build):
    feeds = random_feeds(build(), seed=7)
    want = _run(build(), feeds)
    rewritten = build()
    optimize_model(rewritten, TardisConfig(coverage=0.0, fallback="portable"))
    assert rewritten.graph.initializer[0].data_type == onnx.TensorProto.FLOAT16
    assert np.abs(_run(rewritten, feeds) - want).max() <= 3e-3 * np.abs(want).max()


@pytest.mark.parametrize("predictor", ["exact", "int8", "int4", "int2", "lowrank"])
def test_every_predictor_runs_on_an_fp16_model_with_the_custom_op(predictor):
    """Each predictor's nodes accept the model's fp16 activations (DynamicQuantizeMatMul is float32 only:
    it gets Casts), and at coverage 0 the rewrite stays within half precision of the original (within the
    int8 prediction's error for int8, whose flagged residuals are taken from the prediction)."""
    from tardis_onnx import runtime

    if not runtime.library_available():
        pytest.skip("the ai.tardis library is not built (make lib)")
    feeds = random_feeds(fp16_model(), seed=7)
    want = _run(fp16_model(), feeds)
    rewritten = fp16_model()
    optimize_model(rewritten, TardisConfig(coverage=0.0, fallback="custom", predictor=predictor, speed_check=False))
    tolerance = 1e-2 if predictor == "int8" else 3e-3
    assert np.abs(_run(rewritten, feeds) - want).max() <= tolerance * np.abs(want).max()


def _lines_of(model: onnx.ModelProto) -> reference.NeuronLines:
    arrays = {t.name.rsplit("/", 1)[1]: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return reference.NeuronLines(arrays["slope"], arrays["intercept"], arrays["lo"], arrays["hi"])


@pytest.mark.parametrize("name", ["erf_div", "tanh_pow", "onnx_gelu", "ms_fast_gelu"])
def test_partial_coverage_matches_the_numpy_reference(name):
    original = BUILDERS[name]()
    ffn = find_ffns(original)[0][0]
    feeds = random_feeds(original, seed=11)
    rewritten = BUILDERS[name]()
    result = optimize_model(rewritten, TardisConfig(coverage=0.8, fallback="portable"))
    assert 0.1 < result.ffns[0].outlier_fraction < 0.35
    lines = _lines_of(rewritten)
    x = feeds["x"].astype(np.float64)
    want = reference.tardis_ffn(x, ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines, ffn.gelu.form) + x  # + residual Add
    got = _run(rewritten, feeds)
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
    # ...and it is not the dense model: the lines really replace GELU inside the windows.
    dense = _run(original, feeds)
    assert np.abs(got - dense).max() > 1e-3


def test_portable_form_runs_in_onnx_reference_evaluator():
    rewritten = ffn_model("erf_div")
    optimize_model(rewritten, TardisConfig(coverage=0.9, fallback="portable"))
    feeds = random_feeds(rewritten, seed=101)  # not a calibration batch: no z on a window edge
    want = _run(rewritten, feeds)
    got = ReferenceEvaluator(rewritten).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_rewritten_model_is_valid_named_and_documented():
    model = ffn_model("tanh_pow")
    optimize_model(model, TardisConfig(coverage=0.9, fallback="portable"))
    onnx.checker.check_model(model, full_check=True)
    assert is_rewritten(model)
    names = [n.name for n in model.graph.node]
    assert "tardis/layer.0/mlp/FoldedMatMul" in names
    folded = next(n for n in model.graph.node if n.name == "tardis/layer.0/mlp/FoldedMatMul")
    assert "TARDIS fold" in folded.doc_string and "tanh" in folded.doc_string
    # The original FFN weights and GELU nodes are gone, one folded MatMul added.
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Pow") == 0 and ops.count("Tanh") == 1  # the fallback's own tanh GELU
    metadata = {p.key: p.value for p in model.metadata_props}
    assert '"coverage": 0.9' in metadata["tardis_onnx.config"]


def test_second_run_refuses_an_already_rewritten_model():
    model = ffn_model("erf_div")
    optimize_model(model, TardisConfig(coverage=0.5, fallback="portable"))
    before = model.SerializeToString()
    with pytest.raises(TardisError, match="already rewritten"):
        optimize_model(model, TardisConfig(fallback="portable"))
    assert model.SerializeToString() == before
