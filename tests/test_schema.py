"""Rewritten models pass onnx's full check and strict shape inference, and carry shapes on every new tensor."""

import numpy as np
import onnx
import pytest
from ffn_graphs import ffn_model, fp16_model, gpt2_gemm_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.inspect_model import folded_ffns
from tardis_onnx.optimize import optimize_model
from tardis_onnx.schema import annotate_shapes, emitted_tensors, register_schemas
from tardis_onnx.session import create_session

FORMS = [
    ("portable", "exact"),
    ("portable", "int4"),
    ("custom", "exact"),
    ("custom", "int4"),
    ("custom", "int2"),
    ("custom", "lowrank"),
]


def _rewrite(model, fallback, predictor="exact"):
    if fallback == "custom" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    return optimize_model(model, TardisConfig(coverage=0.9, fallback=fallback, predictor=predictor)).model


def _shape(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("fallback,predictor", FORMS, ids=[f"{f}-{p}" for f, p in FORMS])
def test_full_check_strict_inference_and_shapes_on_every_new_tensor(fallback, predictor):
    model = _rewrite(ffn_model("erf_div"), fallback, predictor)
    assert annotate_shapes(model) == []
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert _shape(inferred.graph.output[0]) == ["batch", "sequence", 16]  # through the fallback
    # The annotation survives a save/load: tools without the schema see it.
    reloaded = onnx.load_from_string(model.SerializeToString())
    shapes = {v.name: _shape(v) for v in reloaded.graph.value_info}
    new = emitted_tensors(reloaded)
    assert new and all(name in shapes for name in new)
    rank = min(TardisConfig.predictor_rank, 16)  # the fit caps the rank at d
    hidden = {64, 16, rank, 16 + rank}  # z, z_hat (h), the folded map and output (d), the fused low-rank factor
    assert all(s[:2] == ["batch", "sequence"] and s[2] in hidden for name, s in shapes.items() if name in new)
    fallback_out = next(n.output[0] for n in reloaded.graph.node if n.name.endswith(("FfnFallback", "/Output")))
    assert shapes[fallback_out] == ["batch", "sequence", 16]


@pytest.mark.parametrize("fallback", ["portable", "custom"])
def test_annotated_models_still_run_unchanged(fallback):
    model = _rewrite(ffn_model("tanh_pow"), fallback)
    x = {"x": np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32)}
    before = create_session(onnx.load_from_string(model.SerializeToString()), "disable", threads=1).run(None, x)[0]
    annotate_shapes(model)
    after = create_session(model, "all", threads=1).run(None, x)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [gpt2_gemm_model, fp16_model], ids=["gpt2-gemm", "fp16"])
def test_framed_and_fp16_ffns_get_shapes(build):
    model = _rewrite(build(), "custom")
    assert annotate_shapes(model) == []
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_the_schema_rejects_a_malformed_fallback_node():
    register_schemas()
    model = _rewrite(ffn_model("erf_div"), "custom")
    node = next(n for n in model.graph.node if n.op_type == "FfnFallback")
    del node.input[6:]  # no `lines`
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)


def test_annotation_works_without_the_weights(tmp_path):
    """Shapes come from a weightless view: a model loaded without its external data is annotated too."""
    path = tmp_path / "m.onnx"
    onnx.save(_rewrite(ffn_model("erf_div"), "portable"), path, save_as_external_data=True, size_threshold=0)
    light = onnx.load(path, load_external_data=False)
    assert annotate_shapes(light) == []
    assert len(light.graph.value_info) >= len(emitted_tensors(light))


def test_registration_is_idempotent():
    register_schemas()
    register_schemas()
    inputs = [p.name for p in onnx.defs.get_schema("FfnFallback", 1, "ai.tardis").inputs]
    assert inputs[6:] == ["lines", "predictor_v", "row_scales"]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_quantized_composition_passes_the_full_check_with_shapes(quantize):
    """--quantize int8 (int4): one DynamicQuantizeMatMul (MatMulNBits) for the fold and the predictor of the same
    kind, a Split, the op on int8 rows (its `R` type) with row scales; every new tensor keeps a shape, and
    `inspect` reads the FFN's sizes back."""
    if not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    config = TardisConfig(coverage=0.9, fallback="custom", predictor=quantize, quantize=quantize, speed_check=False)
    model = optimize_model(ffn_model("erf_div"), config).model
    (folded,) = folded_ffns(model)
    assert (folded.d, folded.hidden, folded.d_out) == (16, 64, 16)
    (fallback,) = [n for n in model.graph.node if n.op_type == "FfnFallback"]
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert types[fallback.input[5]] == onnx.TensorProto.INT8 and fallback.input[8].endswith("/row_scales")
    assert annotate_shapes(model) == []
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    shapes = {v.name: _shape(v) for v in model.graph.value_info}
    assert shapes[fallback.input[1]] == ["batch", "sequence", 16] and shapes[fallback.input[2]][2] == 64
