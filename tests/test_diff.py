"""``python -m tardis_onnx diff``: nodes removed and added per FFN, op histograms, weight and file bytes."""

import json
import subprocess
import sys
from collections import Counter

import onnx
import pytest
from ffn_graphs import dynamo_model, ffn_model, gpt2_gemm_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.diff import OTHER, compare, diff_models, main
from tardis_onnx.optimize import optimize_model

ITEM = 4  # float32


def _rewrite(model, fallback="portable"):
    if fallback == "custom" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    return optimize_model(model, TardisConfig(coverage=0.9, fallback=fallback)).model


def _pair(tmp_path, fallback="portable", build=lambda: ffn_model("erf_div")):
    original, rewritten = tmp_path / "model.onnx", tmp_path / "model.tardis.onnx"
    onnx.save(build(), original)
    onnx.save(_rewrite(build(), fallback), rewritten)
    return original, rewritten


@pytest.mark.parametrize("fallback", ["portable", "custom"])
def test_nodes_removed_and_added_per_ffn(fallback):
    original = ffn_model("erf_div")
    rewritten = _rewrite(ffn_model("erf_div"), fallback)
    changes = diff_models(original, rewritten)
    assert list(changes) == ["layer.0/mlp"]  # nothing outside the FFN changed
    change = changes["layer.0/mlp"]
    # MatMul, Add (b1), the 5 GELU nodes, MatMul, Add (b2): the residual Add stays.
    assert Counter(n.op for n in change.removed) == {"Add": 3, "MatMul": 2, "Mul": 2, "Div": 1, "Erf": 1}
    emitted = [n for n in rewritten.graph.node if n.name.startswith("tardis/layer.0/mlp/")]
    assert [n.name for n in change.added] == [n.name for n in emitted]
    assert ({"ai.tardis::FfnFallback"} <= {n.op for n in change.added}) == (fallback == "custom")
    # Every original weight was the FFN's: W1, b1, W2, b2 and the GELU's three scalars.
    assert change.removed_weight_bytes == (16 * 64 + 64 + 64 * 16 + 16 + 3) * ITEM
    assert change.added_weight_bytes == sum(onnx.numpy_helper.to_array(t).nbytes for t in rewritten.graph.initializer)


def test_histograms_bytes_and_disk_sizes(tmp_path):
    original, rewritten = _pair(tmp_path)
    result = compare(original, rewritten)
    before, after = onnx.load(original), onnx.load(rewritten)
    assert result.ops_before == dict(Counter(n.op_type for n in before.graph.node))
    assert result.ops_after == dict(Counter(n.op_type for n in after.graph.node))
    assert result.weight_bytes_before == sum(onnx.numpy_helper.to_array(t).nbytes for t in before.graph.initializer)
    assert result.weight_bytes_after == sum(onnx.numpy_helper.to_array(t).nbytes for t in after.graph.initializer)
    assert result.disk_before == {"model.onnx": original.stat().st_size}
    assert result.disk_after == {"model.tardis.onnx": rewritten.stat().st_size}


def test_external_data_files_count_on_disk(tmp_path):
    source = tmp_path / "ext.onnx"
    onnx.save(ffn_model("erf_div"), source, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    rewritten = tmp_path / "ext.tardis.onnx"
    onnx.save(_rewrite(ffn_model("erf_div")), rewritten)
    result = compare(source, rewritten)
    assert set(result.disk_before) == {"ext.onnx", "ext.onnx.data"}
    assert result.disk_before["ext.onnx.data"] == (tmp_path / "ext.onnx.data").stat().st_size
    assert result.weight_bytes_before == (16 * 64 + 64 + 64 * 16 + 16 + 3) * ITEM


@pytest.mark.parametrize("build", [gpt2_gemm_model, dynamo_model], ids=["gpt2-gemm", "dynamo-transpose"])
def test_what_became_unused_with_an_ffn_is_counted_in_it(build):
    """GPT-2's shape Concat and dynamo's weight Transposes go with their FFN, not to the 'outside' group."""
    changes = diff_models(build(), _rewrite(build()))
    assert OTHER not in changes and len(changes) == 1
    [change] = changes.values()
    assert change.removed_weight_bytes >= (16 * 64 * 2) * ITEM


def test_text_and_html_reports(tmp_path, capsys):
    original, rewritten = _pair(tmp_path)
    page, data = tmp_path / "diff.html", tmp_path / "diff.json"
    assert main([str(original), str(rewritten), "--html", str(page), "--json", str(data), "--nodes"]) == 0
    out = capsys.readouterr().out
    assert "layer.0/mlp: -9 nodes +" in out and "- /layer.0/mlp/fc1/MatMul (MatMul)" in out
    assert "+ tardis/layer.0/mlp/FoldedMatMul (MatMul)" in out
    assert next(line for line in out.splitlines() if line.startswith("Div")).split() == ["Div", "1", "0", "-1"]
    assert "weights" in out and "on disk" in out
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "layer.0/mlp" in html and "tardis/layer.0/mlp/FoldedMatMul" in html
    assert "<script" not in html and "src=" not in html and "://" not in html  # standalone: no external assets
    assert json.loads(data.read_text())["ffns"][0]["name"] == "layer.0/mlp"


def test_bad_input_exits_2(tmp_path, capsys):
    original, _ = _pair(tmp_path)
    assert main([str(original), str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert main([str(original), str(original), "--html", str(tmp_path / "no" / "dir" / "x.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_module_entry_point(tmp_path):
    original, rewritten = _pair(tmp_path)
    cmd = [sys.executable, "-m", "tardis_onnx", "diff", str(original), str(rewritten)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0 and "layer.0/mlp" in done.stdout
