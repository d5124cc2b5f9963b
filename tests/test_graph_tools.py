"""The rewritten graph stays usable by the graph tools people edit ONNX with: onnx-graphsurgeon (TensorRT's
toolkit) imports it, cleans it up, sorts it and exports it without losing or breaking a node, and the result
runs to the same outputs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from test_speed import two_ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import DOMAIN, FALLBACK_OP
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import optimize_model
from tardis_onnx.session import create_session

gs = pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is in the dev extra")


@pytest.mark.parametrize("form", ["portable", "custom"])
def test_graphsurgeon_round_trip_keeps_the_rewrite(form):
    if form == "custom" and not runtime.library_available():
        pytest.skip("the ai.tardis library is not built")
    model = two_ffn_model()
    optimize_model(model, TardisConfig(coverage=0.9, fallback=form, speed_check=False))
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    edited = gs.export_onnx(graph)
    onnx.checker.check_model(edited)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert sorted(ops) == sorted((n.domain, n.op_type) for n in edited.graph.node)  # nothing dead to clean up
    assert ((DOMAIN, FALLBACK_OP) in ops) == (form == "custom")
    feeds = random_feeds(model, seed=3)
    want = create_session(model).run(None, feeds)
    got = create_session(edited).run(None, feeds)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)
