"""Pruning baselines: hand-checked scores and masks, exact sparsity, models that run."""

import numpy as np
import pytest
from ffn_graphs import D, ffn_model

from experiments import baselines
from tardis_onnx.calibrate import capture_ffn_inputs
from tardis_onnx.feeds import random_feeds
from tardis_onnx.passes import find_ffns
from tardis_onnx.session import create_session

# ONNX layout: 3 inputs (rows) x 2 outputs (columns); input norms ‖X_j‖.
W = np.array([[1.0, -4.0], [2.0, 1.0], [-3.0, 0.5]])
NORMS = np.array([1.0, 2.0, 0.5])


def test_hand_checked_scores():
    np.testing.assert_allclose(baselines.scores("wanda", W, NORMS), [[1, 4], [4, 2], [1.5, 0.25]])
    # RIA: |W|/Σ over the input's outputs (rows 5, 3, 3.5) + |W|/Σ over the output's inputs (6, 5.5), · √‖X‖
    ria = np.array(
        [
            [(1 / 5 + 1 / 6) * 1, (4 / 5 + 4 / 5.5) * 1],
            [(2 / 3 + 2 / 6) * np.sqrt(2), (1 / 3 + 1 / 5.5) * np.sqrt(2)],
            [(3 / 3.5 + 3 / 6) * np.sqrt(0.5), (0.5 / 3.5 + 0.5 / 5.5) * np.sqrt(0.5)],
        ]
    )
    np.testing.assert_allclose(baselines.scores("ria", W, NORMS), ria)


def test_hand_checked_masks():
    keep = {m: baselines.prune_mask(m, W, NORMS, 0.5) for m in baselines.METHODS}
    np.testing.assert_array_equal(keep["magnitude"], [[False, True], [True, False], [True, False]])
    np.testing.assert_array_equal(keep["wanda"], [[False, True], [True, False], [False, False]])  # 2 of 3 per output
    np.testing.assert_array_equal(keep["ria"], [[False, True], [True, False], [True, False]])


@pytest.mark.parametrize("method", baselines.METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_pruned_model_has_the_requested_sparsity_and_runs(method, sparsity):
    model = ffn_model("erf_div")
    feeds = [random_feeds(model, 2, 8, seed=i) for i in range(2)]
    ffns, _ = find_ffns(model)
    (sample,) = capture_ffn_inputs(model, ffns, feeds, 1000)
    dense = create_session(model).run(None, feeds[0])[0]
    info = baselines.prune_model(model, {sample.name: sample.x}, method, sparsity)
    assert info["sparsity"] == pytest.approx(sparsity, abs=1.0 / D)
    weights = [t for t in model.graph.initializer if t.name.startswith("baseline/")]
    assert len(weights) == 2
    for t in weights:
        arr = np.frombuffer(t.raw_data, dtype=np.float32)
        assert (arr == 0).mean() == pytest.approx(sparsity, abs=1.0 / D)
    pruned = create_session(model).run(None, feeds[0])[0]
    assert np.isfinite(pruned).all() and not np.allclose(pruned, dense)
