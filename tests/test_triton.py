"""Triton model repositories: ``python -m tardis_onnx triton`` writes what Triton's ONNX Runtime backend
loads (config read off the model, the op library copied in and registered), and never replaces one."""

import hashlib

import onnx
import pytest
from ffn_graphs import ffn_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.optimize import optimize_model
from tardis_onnx.triton import main, model_config


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
    assert 'name: "x"\n    data_type: TYPE_FP32\n    dims: [ -1, 16 ]' in config  # batch dimension left out
    assert "dynamic_batching { }" in config and "count: 2 kind: KIND_CPU" in config
    assert "serve with: tritonserver --model-repository" in capsys.readouterr().out


def test_a_portable_model_needs_no_library_and_unbatched_configs_keep_full_shapes(tmp_path):
    source = _rewritten(tmp_path, "portable")
    assert main([str(source), "--out", str(tmp_path / "repo"), "--name", "m", "--max-batch", "0"]) == 0
    folder = tmp_path / "repo" / "m"
    assert not (folder / "libtardis_ops.so").exists()
    config = (folder / "config.pbtxt").read_text()
    assert "model_operations" not in config and "dynamic_batching" not in config
    assert "max_batch_size: 0" in config and "dims: [ -1, -1, 16 ]" in config


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
