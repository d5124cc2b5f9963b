"""Netron shows rewritten models: the fallback node is in the drawn graph, and the PNG renders.

Needs PyPI ``netron`` and ``playwright`` and a Chromium binary (Debian ``chromium``); skipped, saying
which is missing, where they are not installed.
"""

import sys
from pathlib import Path

import onnx
import pytest
from ffn_graphs import ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.optimize import optimize_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import render_netron  # noqa: E402

MISSING = render_netron.missing_requirements()
needs_browser = pytest.mark.skipif(bool(MISSING), reason="Netron rendering needs " + ", ".join(MISSING))


def _rewritten(tmp_path, fallback):
    if fallback == "custom" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    path = tmp_path / f"model.{fallback}.onnx"
    onnx.save(optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, fallback=fallback)).model, path)
    return path


@needs_browser
def test_netron_draws_the_fallback_node(tmp_path):
    path = _rewritten(tmp_path, "custom")
    with render_netron.netron_page(path) as page:
        drawn = page.locator("#canvas").text_content()
        assert "FfnFallback" in drawn and "MatMul" in drawn
        assert page.locator('[id="node-name-tardis/layer.0/mlp/FfnFallback"]').count() == 1
        width, height = render_netron.screenshot(page, tmp_path / "graph.png")
    assert (tmp_path / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


@needs_browser
def test_render_the_region_around_a_portable_ffn(tmp_path):
    path = _rewritten(tmp_path, "portable")
    out = tmp_path / "ffn.png"
    assert render_netron.main([str(path), "--out", str(out), "--node", "tardis/layer.0/mlp"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 300_000
    assert render_netron.main([str(path), "--out", str(out), "--node", "no/such/node"]) == 2


def test_region_keeps_the_nodes_between_the_selected_ones():
    model = ffn_model("erf_div")
    sub = render_netron.region(model, "/layer.0/mlp", context=0)
    ops = [n.op_type for n in sub.graph.node]
    assert ops.count("MatMul") == 2 and "Erf" in ops and len(ops) == 9  # the GELU nodes have other names
    assert [i.name for i in sub.graph.input] == ["x"] and len(sub.graph.output) == 1
    onnx.checker.check_model(sub)
