"""The command line: outputs, report, verify's verdicts, and clear one-line errors on bad input."""

import json
import os
import subprocess
import sys

import onnx
import pytest
from ffn_graphs import NEGATIVE_CASES, ffn_model

from tardis_onnx import optimize
from tardis_onnx.optimize import main as optimize_main
from tardis_onnx.verify import main as verify_main


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(ffn_model("erf_div"), path)
    return path


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_optimize_writes_model_and_report_beside_it_and_prints_the_table(model_path, capsys):
    assert optimize_main([str(model_path), "--coverage", "0.9", "--fallback", "portable"]) == 0
    out = capsys.readouterr().out
    assert _files(model_path.parent) == ["model.onnx", "model.tardis.json", "model.tardis.onnx"]
    assert "layer.0/mlp" in out and "erf-decomposed" in out and "16→64" in out
    report = json.loads((model_path.parent / "model.tardis.json").read_text())
    assert report["config"]["coverage"] == 0.9
    row = report["ffns"][0]
    assert row["dense_bytes"] == (16 * 64 * 2) * 4 and row["fold_bytes"] == 16 * 16 * 4
    assert 0 < row["outlier_fraction"] < 0.3
    onnx.checker.check_model(onnx.load(model_path.parent / "model.tardis.onnx"))


def test_verify_passes_on_an_exact_rewrite_and_fails_on_an_approximate_one(model_path, tmp_path, capsys):
    exact, approx = tmp_path / "exact.onnx", tmp_path / "approx.onnx"
    assert optimize_main([str(model_path), "-o", str(exact), "--coverage", "0", "--fallback", "portable", "-q"]) == 0
    assert optimize_main([str(model_path), "-o", str(approx), "--coverage", "0.9", "--fallback", "portable", "-q"]) == 0
    capsys.readouterr()
    assert verify_main([str(model_path), str(exact)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert verify_main([str(model_path), str(approx), "--json", str(tmp_path / "v.json")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "max abs" in out
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["outputs"][0]["max_abs"] > 1e-3
    # Loose enough tolerances accept it.
    assert verify_main([str(model_path), str(approx), "--atol", "10"]) == 0


def test_module_entry_points_run(model_path):
    out = model_path.parent / "m.onnx"
    cmd = [sys.executable, "-m", "tardis_onnx.optimize", str(model_path), "-o", str(out), "--fallback", "portable"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    cmd = [sys.executable, "-m", "tardis_onnx", "verify", str(model_path), str(out), "--atol", "100"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0


def _bad_input_case(tmp_path, case):
    source = tmp_path / "model.onnx"
    args = [str(source), "--fallback", "portable"]
    if case == "missing":
        source = tmp_path / "nope.onnx"
        args[0] = str(source)
    elif case == "not-onnx":
        source.write_text("this is not a protobuf\n")
    elif case == "truncated":
        data = ffn_model("erf_div").SerializeToString()
        source.write_bytes(data[: len(data) // 2])
    elif case == "empty":
        source.write_bytes(b"")
    elif case == "no-ffn":
        onnx.save(NEGATIVE_CASES["relu"][0](), source)
    elif case == "already-rewritten":
        onnx.save(ffn_model("erf_div"), source)
        assert optimize_main([str(source), "-o", str(tmp_path / "first.onnx"), "--fallback", "portable", "-q"]) == 0
        (tmp_path / "first.tardis.json").unlink() if (tmp_path / "first.tardis.json").exists() else None
        (tmp_path / "first.json").unlink()
        source.unlink()
        source = tmp_path / "first.onnx"
        args[0] = str(source)
    elif case == "same-output":
        onnx.save(ffn_model("erf_div"), source)
        args += ["-o", str(source)]
    elif case == "unwritable-output":
        onnx.save(ffn_model("erf_div"), source)
        args += ["-o", str(tmp_path / "no" / "such" / "dir" / "out.onnx")]
    elif case == "bad-coverage":
        onnx.save(ffn_model("erf_div"), source)
        args += ["--coverage", "1.5"]
    elif case == "bad-calibration":
        onnx.save(ffn_model("erf_div"), source)
        (tmp_path / "calib.npz").write_bytes(b"PK not really")
        args += ["--calib", str(tmp_path / "calib.npz")]
    return source, args


BAD_INPUTS = {
    "missing": "no such file",
    "not-onnx": "not an ONNX model",
    "truncated": "not an ONNX model",
    "empty": "not an ONNX model",
    "no-ffn": "no foldable GELU FFN",
    "already-rewritten": "already rewritten",
    "same-output": "refusing to overwrite the input",
    "unwritable-output": "does not exist",
    "bad-coverage": "coverage must be in",
    "bad-calibration": "not a readable .npz",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, capsys):
    source, args = _bad_input_case(tmp_path, case)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert optimize_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and BAD_INPUTS[case] in err
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # no partial output, the input untouched


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder(tmp_path, model_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    assert optimize_main([str(model_path), "-o", str(folder / "out.onnx"), "--fallback", "portable"]) == 2


def test_verify_bad_input_exits_2(model_path, tmp_path, capsys):
    assert verify_main([str(model_path), str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_calibration_feeds_from_npz(model_path, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    batches = {f"x/{i}": rng.normal(size=(2, 8, 16)).astype(np.float32) for i in range(3)}
    np.savez(tmp_path / "calib.npz", **batches)
    out = tmp_path / "out.onnx"
    args = [str(model_path), "-o", str(out), "--calib", str(tmp_path / "calib.npz"), "--fallback", "portable", "-q"]
    assert optimize_main(args) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["calibration"]["tokens"] == report["calibration"]["kept_tokens_per_ffn"] == 3 * 2 * 8
    np.savez(tmp_path / "wrong.npz", y=batches["x/0"])
    args[args.index(str(tmp_path / "calib.npz"))] = str(tmp_path / "wrong.npz")
    assert optimize_main(args) == 2


def test_large_models_keep_external_data(tmp_path, monkeypatch, capsys):
    """Over the protobuf limit (lowered here) the output is written as model + .onnx.data, and an input
    with external data is read with it."""
    from tardis_onnx import io

    source = tmp_path / "ext.onnx"
    onnx.save(ffn_model("erf_div"), source, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1024)
    out = tmp_path / "out" / "m.tardis.onnx"
    out.parent.mkdir()
    assert optimize_main([str(source), "-o", str(out), "--fallback", "portable", "--coverage", "0", "-q"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.tardis.json", "m.tardis.onnx", "m.tardis.onnx.data"]
    assert (out.parent / "m.tardis.onnx.data").stat().st_size > 16 * 64 * 4  # W1 at least went outside
    assert verify_main([str(source), str(out)]) == 0


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ([], ("least-error", "layer", True)),
        (["--preset", "plain"], ("narrowest", "uniform", False)),
        (["--preset", "accurate", "--no-refit", "--window", "narrowest"], ("narrowest", "layer", False)),
        (["--preset", "plain", "--refit", "--allocation", "global"], ("narrowest", "global", True)),
    ],
)
def test_preset_then_explicit_flags(flags, want):
    """A preset fills --window/--allocation/--refit; those flags, when given, override it."""
    config = optimize.config_from_args(optimize.build_parser().parse_args(["model.onnx", *flags]))
    assert (config.window, config.allocation, config.refit) == want


def test_evaluate_runs_from_a_checkout_and_says_so_elsewhere(tmp_path):
    import subprocess
    import sys

    inside = subprocess.run([sys.executable, "-m", "tardis_onnx", "evaluate", "--help"], capture_output=True, text=True)
    assert inside.returncode == 0 and "--data" in inside.stdout
    outside = subprocess.run(
        [sys.executable, "-m", "tardis_onnx", "evaluate", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert outside.returncode == 2 and outside.stderr.count("\n") == 1
    assert outside.stderr.startswith("error: evaluate runs from a checkout")
