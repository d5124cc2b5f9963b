"""Nothing is ever destroyed, and every bad input is one `error:` line on stderr with exit code 2.

Data-loss tests hash every entry of the test folder before and after the command and require them
byte-identical. Error tests run each command's ``main`` and require exit code 2 and exactly one
stderr line, starting with ``error: ``, of at most 300 characters.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from ffn_graphs import D, GraphBuilder, erf_div, ffn_model
from onnx import TensorProto, helper

from experiments import evaluate, perplexity
from tardis_onnx import __main__ as entry
from tardis_onnx import diff, inspect_model, optimize, verify

PORTABLE = ["--fallback", "portable", "--predictor", "exact", "--coverage", "0.9", "-q"]
COMMANDS = {
    "optimize": optimize.main,
    "verify": verify.main,
    "inspect": inspect_model.main,
    "diff": diff.main,
    "evaluate": evaluate.main,
    "perplexity": perplexity.main,
    "entry": entry.main,
}


# --- helpers ----------------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind and content hash (files), link target (symlinks), or the kind alone."""
    entries = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            info = path.lstat()
            key = str(path.relative_to(folder))
            if stat.S_ISLNK(info.st_mode):
                entries[key] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), info.st_ino)
            elif stat.S_ISDIR(info.st_mode):
                entries[key] = ("dir",)
            else:
                entries[key] = ("special", stat.S_IFMT(info.st_mode), info.st_rdev)
    return entries


def run_main(command: str, args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = COMMANDS[command]([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and len(err) - 1 <= 300, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=256)
    else:
        onnx.save(model, path)
    return path


def ids_model(vocabulary: int = 50, reshape: bool = True) -> onnx.ModelProto:
    """GPT-2-like: ``input_ids → [Reshape] → Gather(wte) → FFN``; a vocabulary under 1000."""
    b = GraphBuilder()
    flat = b.op("Reshape", "input_ids", b.const([0, -1], np.int64)) if reshape else "input_ids"
    x = b.op("Gather", b.weight(vocabulary, D), flat)
    h = b.op("Add", b.op("MatMul", x, b.weight(D, 64), name="/h.0/mlp/fc1"), b.weight(64), name="/h.0/mlp/add1")
    y = b.op("MatMul", erf_div(b, h), b.weight(64, D), name="/h.0/mlp/fc2")
    graph = helper.make_graph(
        b.nodes,
        "ids",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        b.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def chain_model(names: list[str], hidden: int = 64, extra_initializer: str | None = None) -> onnx.ModelProto:
    """FFNs one after another, FFN ``i`` named ``names[i]`` (its nodes are ``/<name>/fc1_<i>`` ...)."""
    b = GraphBuilder()
    x = "x"
    for i, name in enumerate(names):
        h = b.op("MatMul", x, b.weight(D, hidden), name=f"/{name}/fc1_{i}")
        h = b.op("Add", h, b.weight(hidden), name=f"/{name}/add1_{i}")
        y = b.op("MatMul", erf_div(b, h), b.weight(hidden, D), name=f"/{name}/fc2_{i}")
        x = b.op("Add", y, b.weight(D), name=f"/{name}/add2_{i}")
    extra = ()
    if extra_initializer:
        b.initializers.append(onnx.numpy_helper.from_array(np.ones(D, np.float32), extra_initializer))
        x = b.op("Add", x, extra_initializer, name="/tail/add")
    return b.model("x", x, extra_outputs=extra)


def custom_op_model() -> onnx.ModelProto:
    """A model with an ``ai.tardis`` node (enough for "the library is needed")."""
    node = helper.make_node("FfnFallback", ["x"], ["y"], domain="ai.tardis", name="tardis/f/FfnFallback")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.tardis", 1)])
    model.ir_version = 9
    return model


def _device(path: Path) -> None:
    """A character device like /dev/null, in the test folder (never the real one)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pytest.skip("cannot create a device node here")


@pytest.fixture
def model_path(tmp_path):
    return save(ffn_model("erf_div"), tmp_path / "model.onnx")


@pytest.fixture
def external_path(tmp_path):
    return save(ffn_model("erf_div"), tmp_path / "ext.onnx", external=True)


# --- optimize never destroys anything ----------------------------------------------------------------------------


def _destructive_case(tmp_path: Path, case: str) -> list[str]:
    model = tmp_path / "model.onnx"
    ext = tmp_path / "ext.onnx"
    if case == "output-is-input-external-data":
        return [ext, "-o", tmp_path / "ext.onnx.data"]
    if case == "output-data-is-input-external-data":  # out.onnx's .data sibling is the input's data file
        save(ffn_model("erf_div"), tmp_path / "in.onnx", external=False)
        moved = onnx.load(model)
        onnx.save(moved, tmp_path / "in.onnx", save_as_external_data=True, location="out.onnx.data", size_threshold=0)
        return [tmp_path / "in.onnx", "-o", tmp_path / "out.onnx"]
    if case == "report-is-input":
        return [model, "-o", tmp_path / "y.onnx", "--report", model]
    if case == "report-is-input-data":
        return [ext, "-o", tmp_path / "y.onnx", "--report", tmp_path / "ext.onnx.data"]
    if case == "report-is-output":
        (tmp_path / "y.onnx").write_bytes(b"previous output")
        return [model, "-o", tmp_path / "y.onnx", "--report", tmp_path / "y.onnx"]
    if case == "report-is-calibration":
        np.savez(tmp_path / "calib.npz", x=np.ones((2, 4, D), np.float32))
        return [model, "-o", tmp_path / "y.onnx", "--calib", tmp_path / "calib.npz", "--report", tmp_path / "calib.npz"]
    if case == "output-symlink-to-input":
        (tmp_path / "link.onnx").symlink_to(model)
        return [model, "-o", tmp_path / "link.onnx"]
    if case == "output-hardlink-to-input":
        os.link(model, tmp_path / "hard.onnx")
        return [model, "-o", tmp_path / "hard.onnx"]
    if case == "output-dotdot-input":
        (tmp_path / "sub").mkdir()
        return [model, "-o", f"{tmp_path}/sub/../model.onnx"]
    if case == "report-symlink-to-input":
        (tmp_path / "r.json").symlink_to(model)
        return [model, "-o", tmp_path / "y.onnx", "--report", tmp_path / "r.json"]
    if case == "existing-output-report-folder-missing":
        (tmp_path / "y.onnx").write_bytes(b"previous output")
        return [model, "-o", tmp_path / "y.onnx", "--report", tmp_path / "missing" / "r.json"]
    if case == "existing-output-report-is-folder":
        (tmp_path / "y.onnx").write_bytes(b"previous output")
        (tmp_path / "r.json").mkdir()
        return [model, "-o", tmp_path / "y.onnx", "--report", tmp_path / "r.json"]
    if case == "output-is-fifo":
        os.mkfifo(tmp_path / "fifo")
        return [model, "-o", tmp_path / "fifo"]
    if case == "output-is-folder":
        (tmp_path / "dir.onnx").mkdir()
        return [model, "-o", tmp_path / "dir.onnx"]
    if case == "output-empty":
        return [model, "-o", ""]
    if case == "output-is-device":
        _device(tmp_path / "null")
        return [model, "-o", tmp_path / "null"]
    raise AssertionError(case)


DESTRUCTIVE = [
    "output-is-input-external-data",
    "output-data-is-input-external-data",
    "report-is-input",
    "report-is-input-data",
    "report-is-output",
    "report-is-calibration",
    "output-symlink-to-input",
    "output-hardlink-to-input",
    "output-dotdot-input",
    "report-symlink-to-input",
    "existing-output-report-folder-missing",
    "existing-output-report-is-folder",
    "output-is-fifo",
    "output-is-folder",
    "output-empty",
    "output-is-device",
]


@pytest.mark.parametrize("case", DESTRUCTIVE)
def test_optimize_refuses_to_destroy_any_file(tmp_path, model_path, external_path, case, capsys, monkeypatch):
    from tardis_onnx import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)  # every output gets external data
    args = _destructive_case(tmp_path, case)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_main("optimize", [*args, *PORTABLE], capsys)
    assert_one_error_line(code, err)
    assert snapshot(tmp_path) == before


def test_optimize_keeps_the_existing_output_when_the_report_fails(tmp_path, model_path, capsys, monkeypatch):
    """The model, its external data and the report are committed together, or not at all."""
    from tardis_onnx import io
    from tardis_onnx.errors import TardisError

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    for name in ("y.onnx", "y.onnx.data", "y.json"):
        (tmp_path / name).write_bytes(b"previous " + name.encode())

    def fail(self):
        raise TardisError("the report cannot be made")

    monkeypatch.setattr(optimize.OptimizeResult, "to_dict", fail)
    before = snapshot(tmp_path)
    code, _, err = run_main("optimize", [model_path, "-o", tmp_path / "y.onnx", *PORTABLE], capsys)
    assert_one_error_line(code, err, "the report cannot be made")
    assert snapshot(tmp_path) == before


def test_optimize_replaces_outputs_and_leaves_no_temporaries(tmp_path, model_path, capsys, monkeypatch):
    from tardis_onnx import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    for name in ("y.onnx", "y.onnx.data", "y.json"):
        (tmp_path / name).write_bytes(b"previous")
    code, _, err = run_main("optimize", [model_path, "-o", tmp_path / "y.onnx", *PORTABLE], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "y.json", "y.onnx", "y.onnx.data"]
    assert json.loads((tmp_path / "y.json").read_text())["ffns"]
    assert verify.main([str(model_path), str(tmp_path / "y.onnx"), "--atol", "100"]) == 0


def test_large_output_ignores_a_same_named_file_in_the_cwd(tmp_path, model_path, capsys, monkeypatch):
    """onnx.save_model(save_as_external_data=True) refuses when the data file's name exists in the cwd."""
    from tardis_onnx import io

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    (tmp_path / "out").mkdir()
    (tmp_path / "y.onnx.data").write_bytes(b"unrelated file in the cwd")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main("optimize", [model_path, "-o", tmp_path / "out" / "y.onnx", *PORTABLE], capsys)
    assert code == 0, err
    assert (tmp_path / "y.onnx.data").read_bytes() == b"unrelated file in the cwd"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["y.json", "y.onnx", "y.onnx.data"]
    assert verify.main([str(model_path), str(tmp_path / "out" / "y.onnx"), "--atol", "100"]) == 0


def test_optimize_writes_through_a_symlinked_output(tmp_path, model_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "y.onnx").write_bytes(b"previous")
    (tmp_path / "y.onnx").symlink_to(tmp_path / "real" / "y.onnx")
    code, _, err = run_main("optimize", [model_path, "-o", tmp_path / "y.onnx", *PORTABLE], capsys)
    assert code == 0, err
    assert (tmp_path / "y.onnx").is_symlink()
    onnx.checker.check_model(onnx.load(tmp_path / "real" / "y.onnx"))


def test_files_api(tmp_path, external_path):
    from tardis_onnx import files
    from tardis_onnx.errors import TardisError

    assert files.model_files(external_path) == [external_path.resolve(), (tmp_path / "ext.onnx.data").resolve()]
    files.check_targets([tmp_path / "a.onnx", tmp_path / "a.json"], files.model_files(external_path))
    with pytest.raises(TardisError, match="refusing to overwrite"):
        files.check_targets([tmp_path / "ext.onnx.data"], files.model_files(external_path))
    with pytest.raises(TardisError, match="twice"):
        files.check_targets([tmp_path / "a.onnx", tmp_path / "sub" / ".." / "a.onnx"], [])
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), files.StagedWrites() as staged:
        staged.write_text(tmp_path / "ext.onnx", "replaced")
        raise RuntimeError("fails before the commit")
    assert snapshot(tmp_path) == before
    with files.StagedWrites() as staged:
        staged.write_text(tmp_path / "new.txt", "new")
        staged.path(tmp_path / "other.txt").write_text("other")
    assert (tmp_path / "new.txt").read_text() == "new" and (tmp_path / "other.txt").read_text() == "other"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- one error line, exit 2, for every command -------------------------------------------------------------------


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "feeds.npz"
    np.savez(path, **arrays)
    return path


def _bad_case(tmp_path: Path, model: Path, case: str) -> tuple[str, list, str]:
    """(command, arguments, text the error must contain)."""
    good = np.random.default_rng(0).normal(size=(2, 4, D)).astype(np.float32)
    if case == "optimize-seed-negative":
        return "optimize", [model, "--seed", "-1"], "--seed"
    if case == "optimize-coverage-nan":
        return "optimize", [model, "--coverage", "nan"], "--coverage"
    if case == "optimize-margin-inf":
        return "optimize", [model, "--margin", "inf"], "--margin"
    if case == "optimize-unknown-flag":
        return "optimize", [model, "--no-such-flag"], "--no-such-flag"
    if case == "optimize-no-model":
        return "optimize", [], "model"
    if case == "optimize-model-is-folder":
        return "optimize", [tmp_path], "not a file"
    if case == "optimize-npz-corrupt":
        (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 garbage that is not a zip")
        return "optimize", [model, "--calib", tmp_path / "c.npz"], "c.npz"
    if case == "optimize-npz-empty-file":
        (tmp_path / "c.npz").write_bytes(b"")
        return "optimize", [model, "--calib", tmp_path / "c.npz"], "c.npz"
    if case == "optimize-npz-is-npy":
        np.save(tmp_path / "c.npy", good)
        (tmp_path / "c.npy").rename(tmp_path / "c.npz")
        return "optimize", [model, "--calib", tmp_path / "c.npz"], "c.npz"
    if case == "optimize-npz-dtype":
        return "optimize", [model, "--calib", _npz(tmp_path, x=good.astype(np.float64))], "float64"
    if case == "optimize-npz-int-dtype":
        return "optimize", [model, "--calib", _npz(tmp_path, x=np.ones((2, 4, D), np.int64))], "int64"
    if case == "optimize-npz-rank":
        return "optimize", [model, "--calib", _npz(tmp_path, x=good[0])], "rank"
    if case == "optimize-npz-fixed-dim":
        return "optimize", [model, "--calib", _npz(tmp_path, x=good[..., :5])], "dimension"
    if case == "optimize-npz-nan":
        bad = good.copy()
        bad[0, 0, 0] = np.nan
        return "optimize", [model, "--calib", _npz(tmp_path, x=bad)], "finite"
    if case == "optimize-npz-inf":
        bad = good.copy()
        bad[1, 2, 3] = -np.inf
        return "optimize", [model, "--calib", _npz(tmp_path, x=bad)], "finite"
    if case == "optimize-npz-object":
        np.savez(tmp_path / "c.npz", x=np.array([{"a": 1}], dtype=object))
        return "optimize", [model, "--calib", tmp_path / "c.npz"], "c.npz"
    if case == "optimize-npz-strings":
        return "optimize", [model, "--calib", _npz(tmp_path, x=np.array(["a", "b"]))], "x"
    if case == "optimize-npz-no-arrays":
        np.savez(tmp_path / "c.npz")
        return "optimize", [model, "--calib", tmp_path / "c.npz"], "empty"
    if case == "optimize-calib-folder":
        (tmp_path / "texts").mkdir()
        return "optimize", [model, "--calib", tmp_path / "texts"], "texts"
    if case == "optimize-hidden-zero":
        save(chain_model(["a"], hidden=0), tmp_path / "h0.onnx")
        return "optimize", [tmp_path / "h0.onnx"], ""
    if case == "verify-atol-nan":
        return "verify", [model, model, "--atol", "nan"], "--atol"
    if case == "verify-rtol-negative":
        return "verify", [model, model, "--rtol", "-1"], "--rtol"
    if case == "verify-batch-zero":
        return "verify", [model, model, "--batch", "0"], "--batch"
    if case == "verify-huge-random-feeds":
        return "verify", [model, model, "--batch", "100000", "--sequence", "100000"], "too large"
    if case == "verify-seed-negative":
        return "verify", [model, model, "--seed", "-1"], "--seed"
    if case == "verify-json-missing-folder":
        return "verify", [model, model, "--json", tmp_path / "no" / "v.json"], "does not exist"
    if case == "verify-json-is-input":
        return "verify", [model, model, "--json", model], "refusing to overwrite"
    if case == "verify-json-is-folder":
        return "verify", [model, model, "--json", tmp_path], "folder"
    if case == "verify-feeds-dtype":
        return "verify", [model, model, "--feeds", _npz(tmp_path, x=good.astype(np.float16))], "float16"
    if case == "verify-feeds-rank":
        return "verify", [model, model, "--feeds", _npz(tmp_path, x=good[None])], "rank"
    if case == "verify-feeds-nan":
        return "verify", [model, model, "--feeds", _npz(tmp_path, x=good * np.nan)], "finite"
    if case == "verify-feeds-corrupt":
        (tmp_path / "c.npz").write_bytes(b"PK\x05\x06" + b"\0" * 18)
        return "verify", [model, model, "--feeds", tmp_path / "c.npz"], "c.npz"
    if case == "verify-feeds-missing":
        return "verify", [model, model, "--feeds", tmp_path / "none.npz"], "none.npz"
    if case == "verify-rewritten-is-folder":
        return "verify", [model, tmp_path], "not a file"
    if case == "verify-ort-refuses-model":
        broken = onnx.load(model)
        broken.graph.node[0].op_type = "NoSuchOp"
        save(broken, tmp_path / "broken.onnx")
        return "verify", [model, tmp_path / "broken.onnx"], "broken.onnx"
    if case == "verify-ort-run-fails":
        other = ffn_model("erf_div")
        other.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64  # x: int64 into a float MatMul
        save(other, tmp_path / "wrong.onnx")
        return "verify", [model, tmp_path / "wrong.onnx"], "wrong.onnx"
    if case == "verify-custom-op-without-library":
        save(custom_op_model(), tmp_path / "custom.onnx")
        return "verify", [model, tmp_path / "custom.onnx"], "library"
    if case == "inspect-folder":
        return "inspect", [tmp_path], "not a file"
    if case == "inspect-empty":
        (tmp_path / "empty.onnx").write_bytes(b"")
        return "inspect", [tmp_path / "empty.onnx"], "not an ONNX model"
    if case == "inspect-missing":
        return "inspect", [tmp_path / "none.onnx"], "no such file"
    if case == "inspect-missing-external-data":
        save(ffn_model("erf_div"), tmp_path / "e2.onnx", external=True)
        (tmp_path / "e2.onnx.data").unlink()
        return "inspect", [tmp_path / "e2.onnx"], "e2.onnx"
    if case == "inspect-unknown-flag":
        return "inspect", [model, "--bogus"], "--bogus"
    if case == "diff-html-is-input":
        return "diff", [model, model, "--html", model], "refusing to overwrite"
    if case == "diff-html-is-json":
        return "diff", [model, model, "--html", tmp_path / "d.out", "--json", tmp_path / "d.out"], "twice"
    if case == "diff-json-missing-folder":
        return "diff", [model, model, "--json", tmp_path / "no" / "d.json"], "does not exist"
    if case == "diff-html-is-device":  # (a FIFO would block today's writer forever)
        _device(tmp_path / "null")
        return "diff", [model, model, "--html", tmp_path / "null"], "not a regular file"
    if case == "diff-missing":
        return "diff", [model, tmp_path / "none.onnx"], "no such file"
    if case == "evaluate-reduction-nan":
        return "evaluate", ["--reductions", "nan", "--out", tmp_path / "e"], "--reductions"
    if case == "evaluate-bad-predictor":
        return "evaluate", ["--predictors", "lowrank-abc", "--out", tmp_path / "e"], "lowrank-abc"
    if case == "evaluate-model-missing":
        return "evaluate", ["--model", tmp_path / "none.onnx", "--out", tmp_path / "e"], "no such file"
    if case == "evaluate-pairs-negative":
        return "evaluate", ["--pairs", "-3", "--out", tmp_path / "e"], "--pairs"
    if case == "perplexity-minutes-nan":
        return "perplexity", ["--minutes", "nan", "--out", tmp_path / "p"], "--minutes"
    if case == "perplexity-context-zero":
        return "perplexity", ["--context", "0", "--out", tmp_path / "p"], "--context"
    if case == "perplexity-model-missing":
        (tmp_path / "t.txt").write_text("some text " * 50)
        args = ["--model", tmp_path / "none.onnx", "--calib", tmp_path / "t.txt", "--heldout", tmp_path / "t.txt"]
        return "perplexity", [*args, "--out", tmp_path / "p"], "no such file"
    if case == "perplexity-text-not-utf8":
        args = ["--model", model, "--calib", model, "--heldout", model, "--out", tmp_path / "p"]
        return "perplexity", args, "not UTF-8"
    if case == "perplexity-calib-missing":
        args = ["--model", model, "--calib", tmp_path / "none.txt", "--heldout", model, "--out", tmp_path / "p"]
        return "perplexity", args, "none.txt"
    if case == "perplexity-plot-is-model":
        args = ["--model", model, "--calib", model, "--heldout", model, "--out", tmp_path / "p", "--plot", model]
        return "perplexity", args, "refusing to overwrite"
    if case == "perplexity-plot-format":
        args = ["--model", model, "--calib", model, "--heldout", model, "--out", tmp_path / "p", "--plot", "x.xyz"]
        return "perplexity", args, "xyz"
    if case == "optimize-output-folder-is-file":
        return "optimize", [model, "-o", model / "out.onnx"], "not a folder"
    if case == "entry-unknown-command":
        return "entry", ["frobnicate"], "frobnicate"
    if case == "entry-nothing":
        return "entry", [], "usage"
    raise AssertionError(case)


BAD_CASES = [
    "optimize-seed-negative",
    "optimize-coverage-nan",
    "optimize-margin-inf",
    "optimize-unknown-flag",
    "optimize-no-model",
    "optimize-model-is-folder",
    "optimize-npz-corrupt",
    "optimize-npz-empty-file",
    "optimize-npz-is-npy",
    "optimize-npz-dtype",
    "optimize-npz-int-dtype",
    "optimize-npz-rank",
    "optimize-npz-fixed-dim",
    "optimize-npz-nan",
    "optimize-npz-inf",
    "optimize-npz-object",
    "optimize-npz-strings",
    "optimize-npz-no-arrays",
    "optimize-calib-folder",
    "optimize-hidden-zero",
    "optimize-output-folder-is-file",
    "verify-atol-nan",
    "verify-rtol-negative",
    "verify-batch-zero",
    "verify-seed-negative",
    "verify-huge-random-feeds",
    "verify-json-missing-folder",
    "verify-json-is-input",
    "verify-json-is-folder",
    "verify-feeds-dtype",
    "verify-feeds-rank",
    "verify-feeds-nan",
    "verify-feeds-corrupt",
    "verify-feeds-missing",
    "verify-rewritten-is-folder",
    "verify-ort-refuses-model",
    "verify-ort-run-fails",
    "verify-custom-op-without-library",
    "inspect-folder",
    "inspect-empty",
    "inspect-missing",
    "inspect-missing-external-data",
    "inspect-unknown-flag",
    "diff-html-is-input",
    "diff-html-is-json",
    "diff-json-missing-folder",
    "diff-html-is-device",
    "diff-missing",
    "evaluate-reduction-nan",
    "evaluate-bad-predictor",
    "evaluate-model-missing",
    "evaluate-pairs-negative",
    "perplexity-minutes-nan",
    "perplexity-context-zero",
    "perplexity-model-missing",
    "perplexity-text-not-utf8",
    "perplexity-calib-missing",
    "perplexity-plot-is-model",
    "perplexity-plot-format",
    "entry-unknown-command",
    "entry-nothing",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, model_path, case, capsys, monkeypatch):
    from tardis_onnx import runtime

    monkeypatch.setattr(runtime, "library_available", lambda cuda=False: False)
    command, args, needle = _bad_case(tmp_path, model_path, case)
    if command == "optimize" and args:
        output = [] if "-o" in args else ["-o", tmp_path / "out.onnx"]
        args = [*args, *output, "--fallback", "portable", "--predictor", "exact", "-q"]
    before = snapshot(tmp_path)
    code, _, err = run_main(command, args, capsys)
    assert_one_error_line(code, err, needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_thread_count_is_one_error_line(tmp_path, model_path, value, capsys, monkeypatch):
    monkeypatch.setenv("TARDIS_THREADS", value)
    before = snapshot(tmp_path)
    code, _, err = run_main("optimize", [model_path, "-o", tmp_path / "out.onnx", *PORTABLE], capsys)
    assert_one_error_line(code, err, "TARDIS_THREADS")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "tardis_onnx", "optimize", "{model}", "--seed", "-1"],
        ["-m", "tardis_onnx.optimize", "{model}", "-o", ""],
        ["-m", "tardis_onnx", "verify", "{model}", "{model}", "--json", "{tmp}/no/v.json"],
    ],
)
def test_module_entry_points_print_one_line(tmp_path, model_path, args):
    args = [a.format(model=model_path, tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path)
    assert_one_error_line(result.returncode, result.stderr)


# --- what used to fail on good input -----------------------------------------------------------------------------


@pytest.mark.parametrize("reshape", [False, True])
def test_verify_resolves_external_data_beside_the_model_not_the_cwd(tmp_path, reshape, capsys, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "elsewhere").mkdir()
    source = save(ids_model(reshape=reshape), tmp_path / "models" / "ids.onnx", external=True)
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = run_main("verify", ["../models/ids.onnx", source], capsys)
    assert code == 0, err
    assert "PASSED" in out


@pytest.mark.parametrize("vocabulary", [1, 50, 999])
def test_random_feeds_follow_the_embedding_behind_a_reshape(vocabulary):
    from tardis_onnx.feeds import random_feeds

    feeds = random_feeds(ids_model(vocabulary), batch=4, sequence=64)
    assert feeds["input_ids"].max() < vocabulary


def test_verify_small_vocabulary_model(tmp_path, capsys):
    source = save(ids_model(50), tmp_path / "ids.onnx")
    code, _, err = run_main("verify", [source, source], capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("names", "extra"),
    [
        (["a", "a", "a_1"], None),
        (["a", "a_1", "a"], None),
        (["a", "a/b"], None),
        (["a"], "tardis/a/w2"),
        (["a", "b"], "tardis/b/folded_weight"),
    ],
)
@pytest.mark.parametrize("fallback", ["portable", "custom"])
def test_rewrite_names_never_collide(tmp_path, names, extra, fallback, capsys):
    from tardis_onnx import runtime
    from tardis_onnx.session import create_session

    if fallback == "custom" and not runtime.library_available():
        pytest.skip("custom-op library not built")
    source = save(chain_model(names, extra_initializer=extra), tmp_path / "m.onnx")
    out = tmp_path / "out.onnx"
    args = [source, "-o", out, "--fallback", fallback, "--predictor", "exact", "--coverage", "0.9", "-q"]
    code, _, err = run_main("optimize", args, capsys)
    assert code == 0, err
    model = onnx.load(out)
    node_names = [n.name for n in model.graph.node]
    assert len(node_names) == len(set(node_names))
    produced = [o for n in model.graph.node for o in n.output]
    assert len(produced) == len(set(produced))
    initializers = [t.name for t in model.graph.initializer]
    assert len(initializers) == len(set(initializers))
    assert not set(produced) & set(initializers)
    onnx.checker.check_model(model)
    create_session(out)
    assert len(inspect_model.folded_ffns(model)) == len(names)
    code, _, err = run_main("verify", [source, out, "--atol", "100", "--rtol", "100"], capsys)
    assert code == 0, err


def test_verify_json_is_strict_json(tmp_path, capsys):
    """Non-finite outputs give ``null`` in the JSON, never ``NaN``."""
    b = GraphBuilder()
    y = b.op("Div", "x", b.const(np.zeros(D)))  # x / 0: inf and nan
    source = save(b.model("x", y), tmp_path / "inf.onnx")
    code, _, err = run_main("verify", [source, source, "--json", tmp_path / "v.json"], capsys)
    assert code in (0, 1), err
    assert err == ""
    text = (tmp_path / "v.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
