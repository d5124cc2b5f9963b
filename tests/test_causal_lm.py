"""Optimum's ORTModel classes load rewritten exports as they load the originals.

The rewritten file sits beside the export's ``config.json`` (where ``python -m tardis_onnx.optimize``
writes ``model.tardis.onnx``) and is picked with ``file_name=``; the custom-op form needs the
library registered through ``session_options=``. With every neuron falling back (coverage 0) greedy
generation with the KV cache must give the original's tokens and logits, single prompts and
left-padded batches alike (past length 0 and > 0 on raw feeds: ``test_exports.py``).
"""

import shutil

import numpy as np
import onnx
import pytest

import tardis_onnx
from tardis_onnx import runtime, text
from tardis_onnx.config import TardisConfig
from tardis_onnx.errors import TardisError
from tardis_onnx.optimize import optimize_model

zoo = pytest.importorskip("models.optimum_zoo", reason="needs torch, transformers and optimum-onnx (make test)")
torch = pytest.importorskip("torch", reason="needs torch")
optimum_ort = pytest.importorskip("optimum.onnxruntime", reason="needs optimum-onnx (pip install '.[export]')")

DECODERS = ["gpt2", "gpt_neo", "gpt_neox", "phi", "bloom", "falcon", "codegen"]
NEW_TOKENS = 20
PAD = 1
CONFIG_FILES = ("config.json", "generation_config.json")  # what ORTModel reads beside the .onnx
needs_library = pytest.mark.skipif(
    not runtime.library_available(), reason="the ai.tardis library is not built (make lib)"
)
FORM_PARAMS = [pytest.param("custom", marks=needs_library), "portable"]


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # "Setting pad_token_id to eos_token_id ..." on every generate()
    yield
    logging.set_verbosity(level)


def _rewrite(export_dir, folder, form: str) -> str:
    """Write the coverage-0 rewrite of ``export_dir/model.onnx`` beside a copy of its configs; its file name."""
    for name in CONFIG_FILES:
        if (export_dir / name).is_file():
            shutil.copy(export_dir / name, folder / name)
    model = onnx.load(export_dir / "model.onnx")
    result = optimize_model(model, TardisConfig(coverage=0.0, fallback=form, calib_sequence=8))
    assert result.fallback == form and result.ffns
    name = f"model.tardis-{form}.onnx"
    onnx.save(model, folder / name)
    return name


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Per architecture: the export folder, and a folder holding both rewritten forms (built on first use)."""
    built = {}

    def get(arch: str, form: str):
        if arch not in built:
            built[arch] = (zoo.export(arch, task=zoo.TEXT_GEN_PAST).parent, tmp_path_factory.mktemp(arch), {})
        export_dir, folder, names = built[arch]
        if form not in names:
            names[form] = _rewrite(export_dir, folder, form)
        return export_dir, folder, names[form]

    return get


def _load(folder, file_name: str = "model.onnx", form: str | None = None, cls=None):
    cls = cls or optimum_ort.ORTModelForCausalLM
    options = tardis_onnx.session_options() if form == "custom" else None
    return cls.from_pretrained(folder, file_name=file_name, session_options=options)


def _generate(model, ids, mask):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        use_cache=True,
        pad_token_id=PAD,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, 1).numpy()


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, zoo.VOCAB, (n,), generator=g) for n in lengths]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def _assert_same(got, want, what):
    tokens, logits = got
    want_tokens, want_logits = want
    assert torch.equal(tokens, want_tokens), f"{what}: tokens differ\n{tokens}\n{want_tokens}"
    err = np.abs(logits.astype(np.float64) - want_logits).max()
    assert err <= 1e-4 * np.abs(want_logits).max(), f"{what}: logits max abs error {err}"


@pytest.mark.parametrize("form", FORM_PARAMS)
@pytest.mark.parametrize("arch", DECODERS)
def test_generate_matches_original(decoders, arch, form):
    export_dir, folder, name = decoders(arch, form)
    rewritten = _load(folder, name, form)
    domains = {n.domain for n in onnx.load(folder / name).graph.node}
    assert ("ai.tardis" in domains) == (form == "custom")
    ids = _prompts([7])[0][None]
    mask = torch.ones_like(ids)
    want = _generate(_load(export_dir), ids, mask)
    _assert_same(_generate(rewritten, ids, mask), want, f"{arch} {form}")


@pytest.mark.parametrize("form", FORM_PARAMS)
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "falcon", "bloom"])
def test_left_padded_batch_matches_original_and_single_prompts(decoders, arch, form):
    export_dir, folder, name = decoders(arch, form)
    original = _load(export_dir)
    prompts = _prompts([3, 8, 5])
    ids, mask = _left_padded(prompts)
    want = _generate(original, ids, mask)
    _assert_same(_generate(_load(folder, name, form), ids, mask), want, f"{arch} {form} batch")
    for row, prompt in enumerate(prompts):  # the dense export itself handles the padding
        alone = _generate(original, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        _assert_same(alone, (want[0][row : row + 1], want[1][row : row + 1]), f"{arch} prompt {row} alone")


@pytest.mark.parametrize("form", FORM_PARAMS)
def test_feature_extraction_last_hidden_state(tmp_path, form):
    export_dir = zoo.export("bert").parent
    name = _rewrite(export_dir, tmp_path, form)
    cls = optimum_ort.ORTModelForFeatureExtraction
    ids, mask = _left_padded(_prompts([6, 9]))
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    want = _load(export_dir, cls=cls)(**feeds).last_hidden_state.numpy()
    got = _load(tmp_path, name, form, cls=cls)(**feeds).last_hidden_state.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _word_tokenizer(paragraphs, vocab_size: int = zoo.VOCAB):
    """A word-level tokenizer (default: the tiny models' vocabulary), without a padding token (like GPT-2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        paragraphs, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_a_tokenizer_beyond_the_embedding_is_refused(arch):
    """Token ids the model's embedding does not have: a clear error, not ONNX Runtime's Gather failure."""
    model = onnx.load(zoo.export(arch, task=zoo.TEXT_GEN_PAST))
    assert text.embedding_rows(model) == zoo.VOCAB
    paragraphs = [" ".join(f"w{i}" for i in range(k, k + 40)) for k in range(0, 2 * zoo.VOCAB, 40)]
    tokenizer = _word_tokenizer(paragraphs, vocab_size=2 * zoo.VOCAB)
    with pytest.raises(TardisError, match=rf"token id \d+ but the model's embedding has {zoo.VOCAB} rows"):
        text.text_feeds(tokenizer, paragraphs[::-1], model, samples=4, seq_len=16, batch=2)


def test_text_calibration_of_a_decoder_export():
    """Text feeds for a with-past export: empty past, positions from the mask; padding is not calibrated on."""
    paragraphs = text.builtin_paragraphs()[:6]
    model = onnx.load(zoo.export("gpt2", task=zoo.TEXT_GEN_PAST))
    tokenizer = _word_tokenizer(paragraphs)
    feeds = text.text_feeds(tokenizer, paragraphs, model, samples=6, seq_len=16, batch=3)
    assert tokenizer.pad_token is None  # padded with <eos> on a copy, the caller's tokenizer untouched
    inputs = {i.name for i in model.graph.input}
    for batch in feeds:
        assert set(batch) == inputs
        mask = batch["attention_mask"]
        assert batch["past_key_values.0.key"].shape[2] == 0 and mask.shape == batch["input_ids"].shape
        np.testing.assert_array_equal(
            batch["position_ids"][mask == 1], np.concatenate([np.arange(n) for n in mask.sum(1)])
        )
    result = optimize_model(model, TardisConfig(coverage=0.9, fallback="portable"), feeds)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in feeds)
    assert result.calibration["tokens"] == result.calibration["kept_tokens_per_ffn"] == real_tokens
    assert [r.calibration_tokens for r in result.ffns] == [result.calibration["fit_tokens_per_ffn"]] * 2
