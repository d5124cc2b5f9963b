"""``python -m tardis_onnx inspect``: candidates, refusals with their partial match, rewritten models."""

import json
import subprocess
import sys

import onnx
import pytest
from ffn_graphs import NEGATIVE_CASES, ffn_model, gpt2_gemm_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import ffn_of
from tardis_onnx.inspect_model import candidates, folded_ffns, main
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns


def _save(tmp_path, model, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _rewritten(fallback):
    if fallback == "custom" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    return optimize_model(
        ffn_model("erf_div"), TardisConfig(coverage=0.9, fallback=fallback, allocation="uniform")
    ).model


def test_a_foldable_model_lists_its_ffn(tmp_path, capsys):
    assert main([str(_save(tmp_path, ffn_model("tanh_pow"))), "--why"]) == 0
    out = capsys.readouterr().out
    assert "1 FFN candidate, 1 would fold" in out
    row = next(line for line in out.splitlines() if line.startswith("layer.0/mlp"))
    assert row.split() == ["layer.0/mlp", "tanh-decomposed", "16→64", "yes"]
    assert "GELU region (8 nodes)" in out and "/layer.0/mlp/fc2/MatMul" in out


@pytest.mark.parametrize("case", list(NEGATIVE_CASES))
def test_each_refusal_has_its_rule_reason_and_partial_match(tmp_path, case, capsys):
    build, rule = NEGATIVE_CASES[case]
    path = _save(tmp_path, build())
    assert main([str(path), "--why"]) == 0
    out = capsys.readouterr().out
    assert "0 would fold" in out and f"no: {rule}" in out and "match stopped: " in out
    assert main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewritten"] is False
    [candidate] = [c for c in report["candidates"] if not c["folds"]]
    assert candidate["rule"] == rule and candidate["reason"]
    refusal = next(r for r in find_ffns(build())[1] if r.rule == rule)
    assert refusal.nodes == candidate["gelu_nodes"] + candidate["ffn_nodes"] and refusal.nodes
    if rule == "not-gelu":  # no GELU: the partial match is the activation itself
        assert candidate["gelu"] is None and len(candidate["ffn_nodes"]) == 1
    else:  # the whole GELU region matched, then the FFN match stopped
        assert candidate["gelu"] == "erf-decomposed" and len(candidate["gelu_nodes"]) == 5


def test_the_partial_match_shows_how_far_the_ffn_match_got():
    """GeGLU: the first projection matched, then the GELU output feeds a Mul (the gate)."""
    [refused] = [c for c in candidates(NEGATIVE_CASES["geglu"][0]()) if not c.folds]
    assert refused.rule == "gated" and [n.split("_")[0] for n in refused.ffn_nodes] == ["matmul"]


def test_refusal_nodes_default_to_empty_and_do_not_change_matching():
    from tardis_onnx.passes import Refusal

    assert Refusal("n", "rule", "reason").nodes == []
    ffns, refused = find_ffns(ffn_model("erf_div"))
    assert len(ffns) == 1 and refused == []


def test_gpt2_framing_counts_its_reshapes_as_ffn_nodes():
    [ffn] = candidates(gpt2_gemm_model())
    assert ffn.folds and (ffn.d, ffn.hidden, ffn.d_out) == (16, 64, 16)
    assert sum(n.startswith("reshape") for n in ffn.ffn_nodes) == 2


@pytest.mark.parametrize("fallback", ["portable", "custom"])
def test_a_rewritten_model_lists_its_folded_ffns_and_metadata(tmp_path, fallback, capsys):
    path = _save(tmp_path, _rewritten(fallback), "model.tardis.onnx")
    assert main([str(path), "--why"]) == 0
    out = capsys.readouterr().out
    assert "rewritten by tardis-onnx" in out and "1 folded FFN" in out and f"fallback={fallback}" in out
    row = next(line for line in out.splitlines() if line.startswith("layer.0/mlp"))
    assert row.split()[:5] == ["layer.0/mlp", "erf-decomposed", "16→64", fallback, "0.9"]
    assert main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rewritten"] is True and report["candidates"] == []  # the fallback's own GELU is no candidate
    assert report["metadata"]["config"]["coverage"] == 0.9
    [folded] = report["folded"]
    assert (folded["d"], folded["hidden"], folded["d_out"], folded["fallback"]) == (16, 64, 16, fallback)
    assert all(n.startswith("tardis/layer.0/mlp/") for n in folded["nodes"])
    assert ("ai.tardis::FfnFallback" in folded["ops"]) == (fallback == "custom")


def test_folded_ffn_names_may_contain_slashes():
    assert ffn_of("tardis/h.0/mlp/Fallback/Gelu") == "h.0/mlp"
    assert ffn_of("tardis/h.0/mlp/Predictor/MatMul") == "h.0/mlp"
    assert ffn_of("tardis/h.0/mlp/FoldedMatMul") == "h.0/mlp"
    assert ffn_of("/h.0/mlp/fc1/MatMul") is None
    assert folded_ffns(ffn_model("erf_div")) == []


@pytest.mark.parametrize("content,message", [(None, "no such file"), (b"not a protobuf", "not an ONNX model")])
def test_bad_input_is_one_line_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_module_entry_point(tmp_path):
    path = _save(tmp_path, ffn_model("erf_div"))
    done = subprocess.run([sys.executable, "-m", "tardis_onnx", "inspect", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and "would fold" in done.stdout
