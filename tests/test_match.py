"""Every GELU spelling of docs/design.md §4 is recognised; every refusal is reported and leaves the model unchanged."""

import onnx
import pytest
from ffn_graphs import NEGATIVE_CASES, SPELLINGS, bias_gelu_model, dynamo_model, ffn_model, fp16_cast_model, fp16_model
from ffn_graphs import gpt2_gemm_model as gpt2_model

from tardis_onnx.config import TardisConfig
from tardis_onnx.errors import TardisError
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns


@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("constant_nodes", [False, True], ids=["initializers", "constant-nodes"])
def test_each_spelling_is_one_ffn_with_its_form(spelling, constant_nodes):
    model = ffn_model(spelling, constant_nodes=constant_nodes)
    ffns, refusals = find_ffns(model)
    assert refusals == []
    assert len(ffns) == 1
    ffn = ffns[0]
    assert ffn.gelu.form == SPELLINGS[spelling][1]
    assert ffn.name == "layer.0/mlp"
    assert ffn.w1_stored.shape == (16, 64) and ffn.w2_stored.shape == (64, 16)
    assert ffn.b1 is not None and ffn.b2 is not None
    # The residual Add after the FFN is not part of it.
    assert all(n.name != "/layer.0/residual" for n in ffn.nodes)


@pytest.mark.parametrize(
    "build,spelling,has_b1,has_b2",
    [
        (bias_gelu_model, "com.microsoft.BiasGelu", True, True),
        (lambda: bias_gelu_model("FastGelu"), "com.microsoft.FastGelu", True, True),
        (gpt2_model, "tanh-decomposed", True, True),
        (dynamo_model, "onnx.Gelu(erf)", True, True),
        (fp16_model, "erf-decomposed", True, True),
        (fp16_cast_model, "erf-decomposed", True, True),
        (lambda: ffn_model("erf_div", bias=False), "erf-decomposed", False, False),
    ],
    ids=["BiasGelu", "FastGelu-bias", "gpt2-gemm-reshape", "dynamo-transpose", "fp16", "fp16-casts", "no-bias"],
)
def test_exporter_variants(build, spelling, has_b1, has_b2):
    ffns, refusals = find_ffns(build())
    assert refusals == [] and len(ffns) == 1
    assert ffns[0].gelu.spelling == spelling
    assert (ffns[0].b1 is not None, ffns[0].b2 is not None) == (has_b1, has_b2)


def test_falcon_residual_add_is_not_taken_as_bias():
    ffns, _ = find_ffns(ffn_model("erf_div", bias=False))
    assert ffns[0].b2 is None
    assert ffns[0].output.startswith("matmul")


@pytest.mark.parametrize("case", list(NEGATIVE_CASES))
def test_refusals_have_reasons_and_leave_the_model_unchanged(case):
    build, rule = NEGATIVE_CASES[case]
    model = build()
    before = model.SerializeToString()
    ffns, refusals = find_ffns(model)
    assert ffns == []
    assert [r.rule for r in refusals] == [rule]
    assert refusals[0].reason
    with pytest.raises(TardisError, match="no foldable GELU FFN"):
        optimize_model(model, TardisConfig(fallback="portable"))
    assert model.SerializeToString() == before


def test_a_refused_ffn_next_to_a_foldable_one_stays_as_it_was():
    good = ffn_model("erf_div")
    bad = NEGATIVE_CASES["geglu"][0]()
    # Chain the GeGLU block after the foldable FFN: its input is the first block's output.
    rename = {"x": good.graph.output[0].name}
    for node in bad.graph.node:
        node.name = "geglu/" + (node.name or node.output[0])
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, "g_" + name)
        for i, name in enumerate(node.output):
            node.output[i] = "g_" + name
    for tensor in bad.graph.initializer:
        tensor.name = "g_" + tensor.name
    good.graph.node.extend(bad.graph.node)
    good.graph.initializer.extend(bad.graph.initializer)
    good.graph.output[0].name = "g_" + bad.graph.output[0].name
    onnx.checker.check_model(good)
    geglu_nodes = [n.SerializeToString() for n in good.graph.node if n.name.startswith("geglu/")]
    result = optimize_model(good, TardisConfig(coverage=0.5, fallback="portable"))
    assert [r.name for r in result.ffns] == ["layer.0/mlp"]
    assert [r.rule for r in result.refusals] == ["gated"]
    assert [n.SerializeToString() for n in good.graph.node if n.name.startswith("geglu/")] == geglu_nodes
