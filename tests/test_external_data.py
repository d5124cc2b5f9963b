"""Models with external data are rewritten FFN by FFN: read graph-only with weights memory-mapped, new
weights written to the output's external data as they come, and the result equal to the in-memory rewrite."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import pytest
from ffn_graphs import fp16_model
from test_safety import chain_model, save

from tardis_onnx import io, optimize
from tardis_onnx.passes import find_ffns
from tardis_onnx.session import create_session

PORTABLE = ["--fallback", "portable", "--no-speed-check", "--calib-samples", "4"]


def _weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return create_session(path).run(None, {"x": x})


def test_open_model_maps_external_weights(tmp_path):
    path = save(chain_model(["a", "b"]), tmp_path / "m.onnx", external=True)
    model, folder = io.open_model(path)
    assert folder == tmp_path.resolve()
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and not any(t.raw_data for t in external)  # nothing loaded
    array = io.tensor_array(external[0], folder)
    assert isinstance(array, np.memmap) and not array.flags.writeable
    np.testing.assert_array_equal(array, onnx.numpy_helper.to_array(external[0], str(tmp_path)))
    ffns, _ = find_ffns(model, folder)
    assert len(ffns) == 2 and isinstance(ffns[0].w1_stored, np.memmap)
    before = np.array(ffns[0].w1_stored)
    assert any(np.array_equal(before, w) for w in _weights(path).values())
    ffns[0].release()  # pages dropped, values intact
    np.testing.assert_array_equal(ffns[0].w1_stored, before)
    with pytest.raises(io.TardisError, match="external file"):
        io.tensor_array(external[0])
    inline, none = io.open_model(save(chain_model(["a"]), tmp_path / "inline.onnx"))
    assert none is None and not io.has_external_data(inline)


@pytest.mark.parametrize("make", [lambda: chain_model(["a", "b", "c"]), lambda: fp16_model()], ids=["fp32", "fp16"])
def test_external_rewrite_equals_the_in_memory_rewrite(tmp_path, make, capsys):
    inline = save(make(), tmp_path / "inline.onnx")
    external = save(make(), tmp_path / "external.onnx", external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for path in (inline, external):
        assert optimize.main([str(path), "-o", str(path.with_suffix(".tardis.onnx")), *PORTABLE]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before  # inputs intact
    rewritten = tmp_path / "external.tardis.onnx"
    data = tmp_path / "external.tardis.onnx.data"
    assert data.is_file() and not (tmp_path / "inline.tardis.onnx.data").exists()
    graph = onnx.load(str(rewritten), load_external_data=False)
    for tensor in graph.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = onnx.external_data_helper.ExternalDataInfo(tensor)
            assert info.location == data.name and info.offset % io.ExternalDataWriter.ALIGNMENT == 0
    got, want = _weights(rewritten), _weights(tmp_path / "inline.tardis.onnx")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    dtype = next(iter(want.values())).dtype
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(dtype)
    for a, b in zip(_outputs(rewritten, x), _outputs(tmp_path / "inline.tardis.onnx", x), strict=True):
        np.testing.assert_array_equal(a, b)
    report = json.loads((tmp_path / "external.tardis.json").read_text())
    assert set(report["stages"]) == {"match", "calibrate", "fit", "emit", "save"}
    assert all(s["seconds"] >= 0 and s["peak_rss_mib"] > 0 for s in report["stages"].values())


def _prefill_logits(path: Path, prompt: np.ndarray) -> np.ndarray:
    session = create_session(path)
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((prompt.shape[0], value.shape[1], 0, value.shape[3]), np.float16)
    return session.run(["logits"], feeds)[0].astype(np.float32)


def test_coverage_zero_is_the_identity_on_an_external_fp16_decoder(tmp_path):
    """The generator's decoder (fp16, external data, KV cache): at coverage 0 the rewrite's logits equal the
    original's within fp16 rounding, and greedy decoding with the cache picks the same tokens."""
    from models import gelu_decoder

    path = gelu_decoder.write_model(gelu_decoder.PRESETS["tiny"], tmp_path / "dec", "float16")
    data = path.with_name(gelu_decoder.DATA_FILE)
    before = data.read_bytes()
    out = tmp_path / "dec.tardis.onnx"
    args = [str(path), "-o", str(out), "--coverage", "0", "--no-speed-check", "--fallback", "portable"]
    assert optimize.main(args) == 0
    assert data.read_bytes() == before
    prompt = np.array([[3, 17, 42, 5, 99, 1]], dtype=np.int64)
    want, got = _prefill_logits(path, prompt), _prefill_logits(out, prompt)
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    ids = [gelu_decoder.decode(create_session(p), prompt, steps=4)[0] for p in (path, out)]
    np.testing.assert_array_equal(ids[0], ids[1])


def test_a_terminated_run_leaves_no_temporary_behind(tmp_path):
    """SIGTERM while a model with external data is being rewritten (its output's data already staged):
    the staging folder is deleted and no output appears."""
    import os
    import signal
    import subprocess
    import sys
    import time

    path = save(chain_model(["a", "b", "c"], hidden=512), tmp_path / "m.onnx", external=True)
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "feeds.npz", **{f"x/{i}": rng.standard_normal((8, 64, 16), dtype=np.float32) for i in range(400)}
    )
    command = [sys.executable, "-m", "tardis_onnx.optimize", str(path), "--calib", str(tmp_path / "feeds.npz"), "-q"]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".tardis-staging-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be stopped"
    os.kill(process.pid, signal.SIGTERM)
    # 143 (128 + SIGTERM); 1 when the signal lands inside an import that wraps it in an ImportError
    assert process.wait(60) in (1, 128 + signal.SIGTERM), process.stderr.read()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feeds.npz", "m.onnx", "m.onnx.data"]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantize_on_a_model_with_external_data_equals_the_in_memory_rewrite(tmp_path, quantize):
    """--quantize writes a graph-only model whole to a temporary file for the quantizer (the original's weights copied
    from its data file, the rewrite's from the output's, which is then written afresh): the same model as from the
    inline input, and no temporary left behind."""
    inline = save(chain_model(["a", "b", "c"]), tmp_path / "inline.onnx")
    external = save(chain_model(["a", "b", "c"]), tmp_path / "external.onnx", external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    flags = ["--quantize", quantize, "--no-speed-check", "--calib-samples", "4"]
    for path in (inline, external):
        assert optimize.main([str(path), "-o", str(path.with_suffix(".tardis.onnx")), *flags]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before  # inputs intact
    outputs = {f"{m}.tardis.{e}" for m in ("inline", "external") for e in ("onnx", "json")} | {
        "external.tardis.onnx.data"
    }
    assert {p.name for p in tmp_path.iterdir()} == set(before) | outputs  # the whole temporary model is gone
    rewritten = tmp_path / "external.tardis.onnx"
    graph = onnx.load(str(rewritten), load_external_data=False)
    assert io.has_external_data(graph) and "MatMul" not in {n.op_type for n in graph.graph.node}
    # written afresh: the file holds the tensors the model refers to, back to back (aligned), and nothing else
    spans = sorted(
        (int(info.offset), int(info.length))
        for t in graph.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for info in [onnx.external_data_helper.ExternalDataInfo(t)]
    )
    align = io.ExternalDataWriter.ALIGNMENT
    assert spans[0][0] == 0 and all(b[0] == -(-(a[0] + a[1]) // align) * align for a, b in pairwise(spans))
    assert (tmp_path / "external.tardis.onnx.data").stat().st_size == spans[-1][0] + spans[-1][1]
    got, want = _weights(rewritten), _weights(tmp_path / "inline.tardis.onnx")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # both run with the same session options (a session on an external-data file runs memory-frugal, without
    # prepacking, and MatMulNBits then takes another path)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    runs = [create_session(onnx.load(str(p))).run(None, {"x": x}) for p in (rewritten, tmp_path / "inline.tardis.onnx")]
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_file_with_external_data_keeps_prepacking_where_it_fits_in_memory(tmp_path, monkeypatch):
    """A session on an external-data model file runs memory-frugal, and prepacks its weights unless they would not
    fit in memory three times: without prepacking ONNX Runtime's MatMulNBits runs ~150× slower at 7B sizes (the
    4-layer stack's --quantize int8 rewrite, whose predictor is one, decoded 0.68 tokens/s against 28.9). The pass's
    own sessions on a graph-only model (``weights_dir``) stay frugal in full, as do models too large to prepack."""
    from tardis_onnx import session as sessions

    def prepacking_disabled(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # not set
            return False

    path = save(chain_model(["a", "b"]), tmp_path / "m.onnx", external=True)
    assert not prepacking_disabled(create_session(path))
    graph, folder = io.open_model(path)
    assert prepacking_disabled(create_session(graph, weights_dir=folder))
    assert not prepacking_disabled(create_session(save(chain_model(["a"]), tmp_path / "inline.onnx")))
    weights = sum(f.stat().st_size for f in (path, tmp_path / "m.onnx.data"))
    pages = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 3 * weights - 1}
    monkeypatch.setattr(sessions.os, "sysconf", pages.__getitem__)  # a machine with less than three times them
    assert prepacking_disabled(create_session(path))
