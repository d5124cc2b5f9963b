"""Real Optimum exports (random weights plus noise, built from configs): with every neuron falling back the
rewritten model matches the original in ONNX Runtime; ReLU and SwiGLU models come back unchanged."""

import numpy as np
import onnx
import pytest

from tardis_onnx.config import TardisConfig
from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import optimize_model
from tardis_onnx.session import create_session

zoo = pytest.importorskip("models.optimum_zoo", reason="needs torch, transformers and optimum-onnx (make test)")

ENCODERS = ["bert", "roberta", "distilbert"]
DECODERS = ["gpt2", "gpt2_tanh", "gpt_neo", "gpt_neox", "phi", "bloom", "falcon", "codegen"]
CASES = [(a, None, None) for a in ENCODERS]
CASES += [(a, zoo.TEXT_GEN, None) for a in DECODERS] + [(a, zoo.TEXT_GEN_PAST, None) for a in DECODERS]
CASES += [("bert", None, 20), ("gpt2_tanh", zoo.TEXT_GEN, 20)]


def _outputs(model, feeds):
    session = create_session(model)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def _assert_exact(original, rewritten, past):
    feeds = random_feeds(original, batch=2, sequence=5, past=past, seed=42)
    want, got = _outputs(original, feeds), _outputs(rewritten, feeds)
    assert want.keys() == got.keys()
    for name in want:
        err = np.abs(got[name].astype(np.float64) - want[name]).max()
        assert err <= 1e-4 * np.abs(want[name]).max(), f"{name}: max abs error {err}"


@pytest.mark.parametrize("arch,task,opset", CASES, ids=[f"{a}-{t or 'default'}-{o or 'default'}" for a, t, o in CASES])
def test_every_neuron_falling_back_is_exact(arch, task, opset):
    path = zoo.export(arch, task=task, opset=opset)
    original = onnx.load(path)
    rewritten = onnx.load(path)
    result = optimize_model(rewritten, TardisConfig(coverage=0.0, fallback="portable", calib_sequence=8))
    assert len(result.ffns) == 2 and result.refusals == []
    for past in [0, 3] if task == zoo.TEXT_GEN_PAST else [0]:
        _assert_exact(original, rewritten, past)


@pytest.mark.parametrize("arch,rule", [("opt", "not-gelu"), ("llama", "not-gelu")])
def test_models_without_gelu_ffn_come_back_unchanged(arch, rule, tmp_path):
    path = zoo.export(arch, task=zoo.TEXT_GEN_PAST)
    model = onnx.load(path)
    before = model.SerializeToString()
    with pytest.raises(TardisError, match="no foldable GELU FFN"):
        optimize_model(model, TardisConfig(fallback="portable"))
    assert model.SerializeToString() == before


def test_ort_transformer_optimizer_output_still_folds(tmp_path):
    """BiasGelu/FastGelu from ONNX Runtime's transformer optimizer, second bias inside SkipLayerNormalization."""
    from onnxruntime.transformers.optimizer import optimize_model as ort_optimize

    optimized = ort_optimize(str(zoo.export("bert")), model_type="bert", num_heads=4, hidden_size=64, opt_level=1)
    original = optimized.model
    ops = {n.op_type for n in original.graph.node}
    assert "BiasGelu" in ops and "SkipLayerNormalization" in ops
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(original)
    result = optimize_model(rewritten, TardisConfig(coverage=0.0, fallback="portable", calib_sequence=8))
    assert [r.gelu for r in result.ffns] == ["com.microsoft.BiasGelu"] * 2
    assert all(r.name for r in result.ffns)
    _assert_exact(original, rewritten, 0)
