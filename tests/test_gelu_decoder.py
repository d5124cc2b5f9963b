"""The streamed GELU decoder generator (``models/gelu_decoder.py``), on its tiny preset: a valid ONNX model that ONNX
Runtime runs in fp32 and fp16, logits equal to a numpy forward pass of the same architecture reading the weights
back from the files, KV-cache decoding equal to one full pass, every FFN found by the matcher, aligned external
data, and one-line errors that write nothing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models import gelu_decoder as gd
from tardis_onnx.passes import find_ffns

ort = pytest.importorskip("onnxruntime")
TINY = gd.PRESETS["tiny"]
_erf = np.vectorize(math.erf)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gelu_decoder")
    return {dtype: str(gd.write_model(TINY, root / dtype, dtype, seed=3)) for dtype in ("float32", "float16")}


def session(path: str):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def feeds(ids: np.ndarray, mask: np.ndarray, dtype: str, past: dict | None = None) -> dict:
    empty = np.zeros((ids.shape[0], TINY.kv_heads, 0, TINY.head_dim), gd.DTYPES[dtype][0])
    names = [f"past_key_values.{i}.{kind}" for i in range(TINY.layers) for kind in ("key", "value")]
    return {"input_ids": ids, "attention_mask": mask} | (past or dict.fromkeys(names, empty))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + TINY.eps) * weight + bias


def reference(path: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Falcon's parallel block in float64 (no past), the weights read back from the files."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in onnx.load(path).graph.initializer}
    p, (batch, seq) = TINY, ids.shape
    h, kv, hd = p.heads, p.kv_heads, p.head_dim
    allowed = np.tril(np.ones((seq, seq), bool)) & (mask[:, None, None, :] > 0)
    x = w["transformer.word_embeddings.weight"][ids]
    for i in range(p.layers):
        pre = f"transformer.h.{i}."
        ln = layer_norm(x, w[pre + "input_layernorm.weight"], w[pre + "input_layernorm.bias"])
        q, k, v = np.split(ln @ w[pre + "self_attention.query_key_value.weight"], [h * hd, (h + kv) * hd], axis=-1)
        q = q.reshape(batch, seq, h, hd).transpose(0, 2, 1, 3)
        k, v = (np.repeat(t.reshape(batch, seq, kv, hd).transpose(0, 2, 1, 3), h // kv, axis=1) for t in (k, v))
        scores = np.where(allowed, q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd), -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        ctx = (probs / probs.sum(-1, keepdims=True) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, h * hd)
        up = ln @ w[pre + "mlp.dense_h_to_4h.weight"]
        mlp = 0.5 * up * (1 + _erf(up / math.sqrt(2))) @ w[pre + "mlp.dense_4h_to_h.weight"]
        x = x + ctx @ w[pre + "self_attention.dense.weight"] + mlp
    return layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"]) @ w["lm_head.weight"]


def test_checker_and_runtime(models):
    ids = np.array([[5, 17, 3, 99]])
    for dtype, path in models.items():
        onnx.checker.check_model(path, full_check=True)
        logits, *presents = session(path).run(None, feeds(ids, np.ones_like(ids), dtype))
        assert logits.shape == (1, 4, TINY.vocab) and logits.dtype == gd.DTYPES[dtype][0]
        assert np.isfinite(logits).all() and len(presents) == 2 * TINY.layers
        assert all(t.shape == (1, TINY.kv_heads, 4, TINY.head_dim) for t in presents)


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-5), ("float16", 2e-3)])
def test_prefill_equals_numpy_reference(models, dtype, tolerance):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY.vocab, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # the second row left-padded: its real tokens must not see the padding
    expected = reference(models[dtype], ids, mask)
    logits = session(models[dtype]).run(["logits"], feeds(ids, mask, dtype))[0].astype(np.float64)
    error = np.abs(logits - expected)[mask > 0].max()
    assert error <= tolerance * np.abs(expected).max(), error


def test_kv_cache_decoding_equals_full_pass(models):
    sess = session(models["float32"])
    ids = np.random.default_rng(1).integers(0, TINY.vocab, (1, 7))
    full = sess.run(["logits"], feeds(ids, np.ones_like(ids), "float32"))[0]
    outputs = [o.name for o in sess.get_outputs()]
    past, steps = None, [ids[:, :3]] + [ids[:, [j]] for j in range(3, 7)]
    pieces, length = [], 0
    for step in steps:
        length += step.shape[1]
        mask = np.ones((1, length), np.int64)
        result = dict(zip(outputs, sess.run(outputs, feeds(step, mask, "float32", past)), strict=True))
        past = {k.replace("present", "past_key_values"): v for k, v in result.items() if k != "logits"}
        pieces.append(result["logits"])
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    tokens, seconds = gd.decode(sess, ids[0, :3], steps=4)
    greedy = ids[:, :3]
    for _ in range(4):
        logits = sess.run(["logits"], feeds(greedy, np.ones_like(greedy), "float32"))[0]
        greedy = np.concatenate([greedy, logits[:, -1:].argmax(-1)], axis=1)
    assert tokens.tolist() == greedy[:, 3:].tolist() and len(seconds) == 4


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_ffn_matches(models, dtype):
    matches, refusals = find_ffns(onnx.load(models[dtype]))
    assert [m.name for m in matches] == [f"transformer/h.{i}/mlp" for i in range(TINY.layers)]
    assert refusals == [] and all(m.w1_stored.shape == (TINY.d_model, TINY.hidden) for m in matches)


def test_external_data_is_aligned(models):
    for dtype, path in models.items():
        model = onnx.load(path, load_external_data=False)
        spans = []
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                assert info["location"] == gd.DATA_FILE
                spans.append((int(info["offset"]), int(info["length"])))
        assert all(offset % gd.ALIGN == 0 for offset, _ in spans)
        assert sum(length for _, length in spans) == TINY.parameters() * gd.DTYPES[dtype][0].itemsize
        ends = [offset + length for offset, length in spans]
        assert all(
            0 <= start - end < gd.ALIGN for (start, _), end in zip(spans[1:], ends[:-1], strict=True)
        )  # only padding between
        assert (Path(path).parent / gd.DATA_FILE).stat().st_size == ends[-1]


def test_build_caches(tmp_path):
    path = gd.build("tiny", "float32", layers=1, cache_dir=tmp_path)
    assert path.parent.name == gd.cache_key("tiny", "float32", 1, 0) and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert gd.build("tiny", "float32", layers=1, cache_dir=tmp_path) == path and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.parent.name]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "--preset"),
        (["--layers", "0"], "--layers"),
        (["--dtype", "int8"], "--dtype"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments(tmp_path, capsys, args, message):
    assert gd.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.onnx").write_bytes(b"mine")
    assert gd.main(["--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "model.onnx").read_bytes() == b"mine"
    assert gd.main(["--out", str(tmp_path / "new"), "--layers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [gd.MODEL_FILE, gd.DATA_FILE]
