"""The FFN benchmark's model stack: every copy computes what the one-FFN model computes."""

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tardis_onnx import runtime
from tardis_onnx.predictor import PREDICTORS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from ffn_latency import dense_model, never_flagging, rewrite, stacked  # noqa: E402


@pytest.mark.parametrize("form", ["dense", "rewritten"])
def test_every_copy_of_the_stack_is_the_model(form):
    if form == "rewritten" and not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    rng = np.random.default_rng(0)
    model = dense_model(16, 64, rng)
    if form == "rewritten":  # the fused low-rank fallback: an absent optional input ("") must stay absent
        model = rewrite(model, rng.normal(size=(256, 16)), 0.05, "lowrank", 4, 0.0)[0]
    options = runtime.session_options(threads=1, optimization="disable")
    x = {"x": rng.normal(size=(3, 16)).astype(np.float32)}
    one = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x)[0]
    stack = stacked(model, 3)
    assert len({t.name for t in stack.graph.initializer}) == 3 * len(model.graph.initializer)
    session = ort.InferenceSession(stack.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, x)
    assert len(outputs) == 3
    for y in outputs:
        np.testing.assert_array_equal(y, one)


def test_never_flagging_rewrite_is_the_folded_output():
    """The benchmark's row-read baseline: with its windows widened to everything, the rewritten FFN
    outputs the folded MatMul's first d columns (no neuron falls back), while the real rewrite differs."""
    if not runtime.library_available():
        pytest.skip(f"custom-op library not built: run `{runtime.BUILD_COMMAND}`")
    rng = np.random.default_rng(1)
    d = 16
    model = rewrite(dense_model(d, 64, rng), rng.normal(size=(256, d)), 0.2, "lowrank", 4, 0.0)[0]
    fallback = next(n for n in model.graph.node if n.op_type == "FfnFallback")
    options = runtime.session_options(threads=1, optimization="disable")
    x = {"x": rng.normal(size=(5, d)).astype(np.float32)}
    outputs = {}
    for name, m in (("rewritten", model), ("never", never_flagging(model))):
        m.graph.output.extend([onnx.helper.make_tensor_value_info(fallback.input[1], onnx.TensorProto.FLOAT, None)])
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs[name] = session.run(None, x)
    y, y_folded = outputs["never"]
    np.testing.assert_array_equal(y, y_folded[:, :d])
    np.testing.assert_array_equal(outputs["rewritten"][1], y_folded)
    assert np.abs(outputs["rewritten"][0] - y).max() > 1e-3


@pytest.mark.parametrize(
    "probe",
    [
        ["benchmarks/row_reads.c", "-mavx2", "-mfma"],
        ["benchmarks/nbit_gemv.c", "-mavx2", "-mfma"],
        ["benchmarks/decode_kernel.cc", "custom_ops/ffn_fallback_cpu.cc"],
    ],
    ids=["row_reads", "nbit_gemv", "decode_kernel"],
)
def test_c_probes_build(probe, tmp_path):
    """The C/C++ probes cited for kernel choices still build against the kernel as it is (their
    numbers are timings, not run here)."""
    import shutil
    import subprocess

    compiler = "gcc" if probe[0].endswith(".c") else "g++"
    if shutil.which(compiler) is None:
        pytest.skip(f"no {compiler}")
    root = Path(__file__).resolve().parent.parent
    flags = ["-O1", "-fopenmp", "-Icustom_ops"] + (["-std=c++17", "-Wno-psabi"] if compiler == "g++" else [])
    result = subprocess.run(
        [compiler, *flags, *probe, "-o", str(tmp_path / "probe")], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_cuda_benchmark_plumbing_on_cpu(monkeypatch):
    """The CUDA benchmark's rewrite in both forms (z_hat from a MatMul; fused: the kernel computes it
    from the code and V against windows shifted by −b1), run here on CPU tensors with the op's numpy
    oracle standing in for the CUDA entry point (same pointer arguments): every neuron flagged gives
    the dense FFN, and the two forms agree. The CUDA kernel itself is tested on a GPU."""
    import ctypes
    from types import SimpleNamespace

    torch = pytest.importorskip("torch")
    import ffn_latency_cuda as bench

    from tardis_onnx.reference import fallback_op

    def oracle_entry(x, y_folded, z_hat, w1t, b1, w2, lines, v, y, tokens, d, h, rank, margin, approximate, stream):
        def view(address, *shape):
            return np.ctypeslib.as_array((ctypes.c_float * int(np.prod(shape))).from_address(address)).reshape(shape)

        z = None if z_hat is None else view(z_hat, tokens, h)
        v = None if v is None else view(v, rank, h)
        args = (view(x, tokens, d), view(y_folded, tokens, d + rank), z, view(w1t, h, d), view(b1, h), view(w2, h, d))
        view(y, tokens, d)[:] = fallback_op(*args, view(lines, 4, h), v, margin=margin, form="erf")
        return 0

    class CpuTorch:  # torch, with a CUDA stream that is never used
        cuda = SimpleNamespace(current_stream=lambda: SimpleNamespace(cuda_stream=None))

        def __getattr__(self, name):
            return getattr(torch, name)

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    cpu = CpuTorch()
    entry = (oracle_entry, lambda code: b"oracle")
    layer = bench.Layer(cpu, 32, 0.1, 4, torch.float32, np.random.default_rng(5))
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    dense = bench.dense(cpu, layer, x)
    for fused in (False, True):
        every = bench.rewritten(cpu, entry, layer, x, fused, all_flagged=True)
        torch.testing.assert_close(every, dense, rtol=1e-5, atol=1e-5)
    z_hat_form = bench.rewritten(cpu, entry, layer, x)
    fused_form = bench.rewritten(cpu, entry, layer, x, fused=True)
    torch.testing.assert_close(fused_form, z_hat_form, rtol=1e-5, atol=1e-5)
    unflagged = bench.folded(cpu, layer, x)[:, :32]
    assert (fused_form - unflagged).abs().max() > 1e-3  # some neurons were flagged


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_the_scale_benchmark_runs_end_to_end_on_the_tiny_decoder(tmp_path, monkeypatch, dtype):
    """benchmarks/scale.py on the generator's tiny decoder: the plain command's stages, both decodes,
    and bytes per token consistent with the report; beside them what users would pick instead, each
    baseline the dtype rules out skipped with its reason."""
    import json

    import scale

    monkeypatch.setenv("TARDIS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--dtype", dtype, "--sequences", "4", "--seq-len", "16", "--decode-steps", "2"]
    argv += ["--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(out), "--plot", str(out / "s.png")]
    assert scale.main(argv) == 0
    result = json.loads((out / "scale.json").read_text())
    assert set(result["optimize"]["stages"]) == set(scale.STAGES)
    assert result["optimize"]["totals"]["ffns"] == 2 and (out / "s.png").stat().st_size > 0
    dense, tardis = result["decode"]["dense"], result["decode"]["tardis"]
    assert len(dense["tokens"]) == len(tardis["tokens"]) == 3 and dense["s_per_token"] > 0
    saved = result["optimize"]["totals"]["dense_bytes"] - result["optimize"]["totals"]["total_read_bytes"]
    # (to a few bytes: the rewrite's small tensors, e.g. Reshape shapes, count as the rest of the model's)
    assert dense["read_gib_per_token"] - tardis["read_gib_per_token"] == pytest.approx(saved / 2**30, rel=1e-3)
    # What users would pick instead, decoded beside: fewer bytes than what each quantizes.
    decode, skipped = result["decode"], result["skipped_baselines"]
    ruled_out = "tardis+int8" if dtype == "float16" else "float32"
    assert set(skipped) == {ruled_out} and set(decode) == {"dense", "tardis", *scale.BASELINES} - {ruled_out}
    assert decode["int4"]["read_gib_per_token"] < dense["read_gib_per_token"]
    assert decode["int8"]["read_gib_per_token"] < dense["read_gib_per_token"]
    assert decode["tardis+int4"]["read_gib_per_token"] < tardis["read_gib_per_token"]
    if dtype == "float16":
        assert decode["float32"]["read_gib_per_token"] == pytest.approx(2 * dense["read_gib_per_token"], rel=0.01)
    else:
        assert decode["tardis+int8"]["read_gib_per_token"] < tardis["read_gib_per_token"]
    assert all(len(row["tokens"]) == 3 and row["s_per_token"] > 0 for row in decode.values())


def test_the_scale_benchmark_counts_a_quantized_rewrite_s_bytes_as_quantized(tmp_path, monkeypatch):
    """With ``--optimize-args "--quantize int8"`` the rewrite's attention is int8 as well: a token reads int8's
    weights but for the FFNs, whose reads are the report's (the float model's attention was counted before)."""
    import json

    import scale

    monkeypatch.setenv("TARDIS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--dtype", "float32", "--sequences", "4", "--seq-len", "16", "--decode-steps", "2"]
    argv += ["--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(out), "--baselines", "int8"]
    assert scale.main([*argv, "--optimize-args", "--quantize int8"]) == 0
    result = json.loads((out / "scale.json").read_text())
    totals, decode = result["optimize"]["totals"], result["decode"]
    assert totals["ffns"] == 2 and totals["kept_original"] == 0
    ffn_saving = (totals["dense_bytes"] - totals["total_read_bytes"]) / 2**30  # int8 FFNs' reads less the rewrite's
    int8, tardis = decode["int8"]["read_gib_per_token"], decode["tardis"]["read_gib_per_token"]
    assert int8 - tardis == pytest.approx(ffn_saving, rel=0.05)


def test_the_fit_profile_names_where_one_ffns_time_goes(tmp_path):
    """benchmarks/fit_profile.py on the tiny decoder's second FFN: the fit and emit times, the choice, and
    the profiled functions (the pass's fit among them), slowest first; a bad FFN index is one error line."""
    import json

    import fit_profile
    import scale

    from models import gelu_decoder

    model = gelu_decoder.build("tiny", "float32", cache_dir=tmp_path / "cache")
    feeds = scale.calibration_feeds(onnx.load(str(model), load_external_data=False), tmp_path / "f.npz", 4, 16, 2, 0)
    out = tmp_path / "profile.json"
    argv = [str(model), "--calib", str(feeds), "--ffn", "1", "--no-speed-check", "--out", str(out)]
    assert fit_profile.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["ffn"].endswith("h.1/mlp") and result["fit_s"] > 0 and result["emit_s"] > 0
    assert result["predictor"] in PREDICTORS and result["recipe"] and result["peak_traced_mib"] > 0
    times = [f["cumulative_s"] for f in result["functions"]]
    assert times == sorted(times, reverse=True) and any("fit_ffns" in f["name"] for f in result["functions"])
    assert fit_profile.main([*argv, "--steps"]) == 0  # wall-clock steps, none left patched
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == [label for label, _, _ in fit_profile.STEPS] and sum(steps.values()) > 0
    assert steps["z = x·W1 (FfnTokens)"] > 0 and steps["window tables (plan_windows)"] > 0
    assert all(getattr(owner, name).__name__ != "timed" for _, owner, name in fit_profile.STEPS)
    assert fit_profile.main([str(model), "--calib", str(feeds), "--ffn", "9"]) == 2


def test_the_ffn_share_baseline_is_the_model_with_free_ffns(tmp_path, capsys):
    """benchmarks/ffn_share.py's baseline: every FFN computes x · 0, so two residual FFNs leave x as it was and no
    MatMul is left; the command times both and prints the ceiling."""
    import json

    import ffn_share
    from ffn_graphs import D
    from test_speed import two_ffn_model

    model = two_ffn_model()
    bare, replaced = ffn_share.without_ffns(model)
    assert replaced == 2 and not any(n.op_type == "MatMul" for n in bare.graph.node)
    x = np.random.default_rng(0).normal(size=(2, 3, D)).astype(np.float32)
    session = ort.InferenceSession(bare.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    argv = ["--model", str(path), "--shape", "2x3", "--past", "0", "--runs", "3", "--out", str(tmp_path / "out")]
    assert ffn_share.main(argv) == 0
    result = json.loads((tmp_path / "out" / "ffn_share_m_2x3.json").read_text())
    assert (
        result["ffns"] == 2
        and result["run_ms"] > 0
        and result["ceiling"] == result["run_ms"] / result["run_without_ffns_ms"]
    )
    assert "no FFN rewrite can make it more than" in capsys.readouterr().out
    assert ffn_share.main([*argv[:2], "--shape", "1x1,1x2"]) == 2  # one shape only


BENCHMARKS = [
    "decode_tokens",
    "defaults",
    "ffn_composition",
    "ffn_latency",
    "ffn_latency_cuda",
    "ffn_share",
    "real_models",
    "scale",
    "triton_load",
    "whisper_asr",
]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_benchmark_refuses_an_output_folder_that_is_a_file_before_any_work(name, tmp_path, capsys):
    import importlib

    module = importlib.import_module(name)
    taken = tmp_path / "taken"
    taken.write_bytes(b"keep me")
    required = ["--model", str(tmp_path / "absent.onnx")] if name == "ffn_share" else []
    assert module.main([*required, "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output folder") and "is not a folder" in err[0]
    assert taken.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
