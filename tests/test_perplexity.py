"""The perplexity scorer's log-probability head against numpy, for float32 and float16 logits."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from experiments.perplexity import LABELS, LOGPROB, with_token_logprobs
from tardis_onnx.errors import TardisError

VOCAB = 50


def _lookup_lm(dtype) -> onnx.ModelProto:
    """logits = table[input_ids]: a stand-in causal LM whose logits are known."""
    table = np.random.default_rng(0).normal(scale=4.0, size=(VOCAB, VOCAB)).astype(dtype)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"])],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", VOCAB])],
        [numpy_helper.from_array(table, "table")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_next_token_logprobs_match_numpy(dtype):
    model = _lookup_lm(dtype)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(3, 9))
    session = ort.InferenceSession(with_token_logprobs(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run([LOGPROB], {"input_ids": ids, LABELS: ids[:, 1:, None]})[0]
    assert got.dtype == np.float32 and got.shape == (3, 8, 1)
    logits = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)[ids[:, :-1]]
    logprob = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(logprob, ids[:, 1:, None], axis=2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_model_without_logits_is_refused():
    model = _lookup_lm(np.float32)
    model.graph.output[0].name = "hidden"
    with pytest.raises(TardisError, match="no 'logits' output"):
        with_token_logprobs(model)
