"""The ai.tardis::FfnFallback custom op (C++ CPU kernel, CUDA kernel) against the numpy oracle.

Every case builds a one-node model with onnx.helper, runs it in ONNX Runtime with the library
registered, and compares with ``tardis_onnx.reference.fallback_op`` (float64).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from native_build import ort_headers
from onnx import TensorProto, helper

from tardis_onnx import runtime
from tardis_onnx.quantize import quantize_rows
from tardis_onnx.reference import fallback_op

ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ("x", "y_folded", "z_hat", "w1t", "b1", "w2", "lines")
# The low-rank predictor fused in: no z_hat, the code x·U in y_folded's last columns, V as input 8.
FUSED_INPUTS = ("x", "y_folded", "", "w1t", "b1", "w2", "lines", "predictor_v")
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
FORMS = {"none": "erf", "tanh": "tanh"}


def needs_library(cuda: bool = False) -> None:
    if not runtime.library_available(cuda):
        what = "CUDA custom-op library (needs nvcc)" if cuda else "custom-op library"
        pytest.skip(f"{what} not built: run `{runtime.BUILD_COMMAND}`")


def fallback_model(
    dtype,
    margin: float | None = None,
    approximate: str | None = None,
    fused: bool = False,
    w1t: bool = True,
    int8_rows: bool = False,
) -> bytes:
    elem = ELEM[dtype]
    names = [n if n != "w1t" or w1t else "" for n in (FUSED_INPUTS if fused else INPUTS)]
    if int8_rows:  # W1ᵀ and W2 int8, their row scales the ninth input
        names = [*names, "", "row_scales"][:9]
    types = {"lines": TensorProto.FLOAT, "row_scales": TensorProto.FLOAT}
    if int8_rows:
        types.update(w1t=TensorProto.INT8, w2=TensorProto.INT8)
    inputs = [helper.make_tensor_value_info(name, types.get(name, elem), None) for name in names if name]
    attrs = {}
    if margin is not None:
        attrs["margin"] = margin
    if approximate is not None:
        attrs["approximate"] = approximate
    node = helper.make_node("FfnFallback", list(names), ["y"], domain="ai.tardis", name="fallback", **attrs)
    graph = helper.make_graph([node], "ffn_fallback", inputs, [helper.make_tensor_value_info("y", elem, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.tardis", 1)]
    # IR 10: ONNX Runtime releases older than onnx reject its newer default IR version.
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def make_case(rng, lead: tuple[int, ...], d: int, h: int, dtype=np.float32, flagged: str = "some") -> dict:
    """Random inputs; ``flagged`` sets how many neurons fall outside their window: none/some/all."""
    x = rng.standard_normal((*lead, d))
    w1t = rng.standard_normal((h, d)) / np.sqrt(d)
    b1 = 0.1 * rng.standard_normal(h)
    z_hat = x @ w1t.T + b1 + 0.05 * rng.standard_normal((*lead, h))  # a noisy predictor
    half_width = rng.uniform(0.8, 2.0, h)
    centre = rng.uniform(-0.3, 0.3, h)
    lo, hi = centre - half_width, centre + half_width
    if flagged == "none":
        lo, hi = np.full(h, -1e4), np.full(h, 1e4)
    elif flagged == "all":
        lo, hi = np.full(h, np.inf), np.full(h, -np.inf)  # empty window: coverage 0
    lines = np.stack([rng.uniform(0.2, 0.9, h), rng.uniform(-0.2, 0.2, h), lo, hi]).astype(np.float32)
    case = {
        "x": x,
        "y_folded": rng.standard_normal((*lead, d)),
        "z_hat": z_hat,
        "w1t": w1t,
        "b1": b1,
        "w2": rng.standard_normal((h, d)) / np.sqrt(h),
        "lines": lines,
    }
    return {k: (v if k == "lines" else v.astype(dtype)) for k, v in case.items()}


def make_fused_case(rng, lead: tuple[int, ...], d: int, h: int, rank: int, dtype=np.float32, flagged="some") -> dict:
    """A case for the fused low-rank predictor: z_hat = (x·U)·V, the code x·U appended to y_folded.
    Window bounds closer than 1e-3 to any token's z_hat are moved (the kernel sums in float)."""
    case = make_case(rng, lead, d, h, dtype, flagged)
    u = rng.standard_normal((d, rank)) / np.sqrt(d)
    v = (rng.standard_normal((rank, h)) / np.sqrt(rank)).astype(dtype)
    code = (case["x"].astype(np.float64) @ u).astype(dtype)
    case["y_folded"] = np.concatenate([case["y_folded"], code], axis=-1)
    case["predictor_v"] = v
    del case["z_hat"]
    z_hat = (code.astype(np.float64) @ v.astype(np.float64)).reshape(-1, h)
    for row in (2, 3):
        bound = case["lines"][row]
        for _ in range(100):
            near = np.isfinite(bound) & (np.abs(z_hat - bound.astype(np.float64)) < 1e-3).any(axis=0)
            if not near.any():
                break
            bound[near] += np.float32(0.01)
    return case


def oracle(case: dict, margin: float = 0.0, approximate: str = "none") -> np.ndarray:
    # The attribute is stored as float32: the oracle must see the same margin.
    inputs = [case.get(k) for k in INPUTS] + [case.get("predictor_v"), case.get("row_scales")]
    return fallback_op(*inputs, margin=float(np.float32(margin)), form=FORMS[approximate])


def run_op(case: dict, margin=None, approximate=None, threads: int = 1, cuda_library: bool = False) -> np.ndarray:
    dtype = case["x"].dtype.type
    so = runtime.session_options(threads=threads, optimization="disable", cuda=cuda_library)
    fused, int8_rows = "predictor_v" in case, "row_scales" in case
    model = fallback_model(dtype, margin, approximate, fused=fused, w1t="w1t" in case, int8_rows=int8_rows)
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return session.run(None, case)[0]


def assert_matches(y: np.ndarray, ref: np.ndarray, dtype) -> None:
    assert y.shape == ref.shape
    assert y.dtype == dtype
    if y.size == 0:
        return
    finite = np.isfinite(ref)
    scale = max(1.0, float(np.abs(ref[finite]).max())) if finite.any() else 1.0
    tol = 1e-5 if dtype == np.float32 else 2e-3
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol * scale, equal_nan=True)


# ---- CPU kernel -----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=False)
def cpu_library():
    needs_library()


SHAPES = [(1,), (1, 1), (2, 3), (5,), (3, 40), (2, 70), (0,), (2, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("lead", SHAPES, ids=[str(s) for s in SHAPES])
def test_matches_reference(cpu_library, lead, threads, approximate, dtype):
    rng = np.random.default_rng(zlib.crc32(repr((lead, threads, approximate)).encode()))
    case = make_case(rng, lead, d=48, h=100, dtype=dtype)
    y = run_op(case, margin=0.05, approximate=approximate, threads=threads)
    assert_matches(y, oracle(case, 0.05, approximate), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("flagged", ["none", "some", "all"])
@pytest.mark.parametrize("lead", [(1,), (4, 9)], ids=["decode", "prefill"])
def test_flag_fraction(cpu_library, lead, flagged, dtype):
    rng = np.random.default_rng(7)
    case = make_case(rng, lead, d=33, h=70, dtype=dtype, flagged=flagged)  # odd d: vector-loop tails
    y = run_op(case, threads=2)
    if flagged == "none":
        np.testing.assert_array_equal(y, case["y_folded"])  # nothing touched, bit for bit
    assert_matches(y, oracle(case), dtype)


@pytest.mark.parametrize("lead", [(1,), (6,)], ids=["decode", "prefill"])
def test_window_boundaries(cpu_library, lead):
    """z_hat exactly on lo - margin / hi + margin stays unflagged; one ulp outside is flagged."""
    d = h = 16
    rng = np.random.default_rng(3)
    case = make_case(rng, lead, d=d, h=h)
    margin = 0.25
    lo, hi = np.float32(-0.5), np.float32(0.75)  # lo - margin and hi + margin are exact in float32
    case["lines"][2:] = [[lo] * h, [hi] * h]
    case["lines"][0], case["lines"][1] = 0.0, 5.0  # residual ~ -5: a wrong flag shows at once
    case["w2"] = np.eye(h, d, dtype=np.float32)  # neuron i writes column i only
    edges = np.array(
        [
            lo - np.float32(margin),
            hi + np.float32(margin),
            np.nextafter(lo - np.float32(margin), np.float32(-np.inf)),
            np.nextafter(hi + np.float32(margin), np.float32(np.inf)),
            lo,
            hi,
            np.nan,
            np.inf,
        ],
        dtype=np.float32,
    )
    case["z_hat"] = np.resize(edges, (*lead, h)).astype(np.float32)
    expected_flags = np.isin(np.arange(h) % len(edges), [2, 3, 6, 7])
    y = run_op(case, margin=margin)
    ref = oracle(case, margin)
    assert_matches(y, ref, np.float32)
    touched = np.abs(y - case["y_folded"]) > 1.0
    np.testing.assert_array_equal(touched, np.broadcast_to(expected_flags, touched.shape))


@pytest.mark.parametrize("lead", [(1,), (4,)], ids=["decode", "prefill"])
def test_fp16_every_value_round_trips(cpu_library, lead):
    """Unflagged tokens return y_folded unchanged: every half bit pattern survives half->float->half."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    d = bits.size // lead[0]
    case = make_case(np.random.default_rng(0), lead, d=d, h=3, dtype=np.float16, flagged="none")
    case["y_folded"] = bits.view(np.float16).reshape(*lead, d)
    y = run_op(case, threads=2)
    nan = np.isnan(case["y_folded"])
    np.testing.assert_array_equal(y.view(np.uint16)[~nan], case["y_folded"].view(np.uint16)[~nan])
    assert np.isnan(y[nan]).all()


def test_boundary_at_rounded_lo_minus_margin(cpu_library):
    """z_hat = float32(lo - margin) for arbitrary lo: kernel and oracle decide alike."""
    rng = np.random.default_rng(11)
    h = 200
    case = make_case(rng, (3,), d=24, h=h)
    margin = np.float32(0.1)
    lo = case["lines"][2].astype(np.float64)
    hi = case["lines"][3].astype(np.float64)
    z = np.where(np.arange(h) % 2 == 0, lo - np.float64(margin), hi + np.float64(margin)).astype(np.float32)
    case["z_hat"] = np.broadcast_to(z, (3, h)).copy()
    case["lines"][1] += 3.0  # make every flag decision visible in the output
    y = run_op(case, margin=float(margin))
    assert_matches(y, oracle(case, float(margin)), np.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (5,)], ids=["decode", "prefill"])
def test_nan_and_inf_propagate(cpu_library, lead, dtype):
    rng = np.random.default_rng(5)
    case = make_case(rng, lead, d=20, h=40, dtype=dtype)
    case["x"][0, 3] = np.nan
    if lead[0] > 1:
        case["x"][1, 0] = np.inf
        case["x"][2, 5] = -np.inf
        case["y_folded"][3, 7] = np.nan
        case["z_hat"][4, :5] = np.nan  # NaN prediction: flagged
    y = run_op(case, threads=2)
    ref = oracle(case)
    assert np.isnan(ref[0]).all()
    assert_matches(y, ref, dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows", ["float", "int8"])
def test_residuals_from_z_hat_at_every_value(cpu_library, rows, approximate):
    """Prefill without W1ᵀ (many tokens: the residuals eight at a time): pre-activations over the whole float
    range, ±inf and NaN, every neuron flagged, match the oracle (GELU(−inf) is NaN, GELU(inf) is inf)."""
    case = make_case(np.random.default_rng(8), (70,), d=24, h=40, flagged="all")
    del case["w1t"]
    case["b1"][:] = 0
    grid = np.concatenate([np.linspace(-40, 40, 70 * 40 - 6), [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-30]])
    case["z_hat"] = grid.astype(np.float32).reshape(70, 40)
    if rows == "int8":
        case = with_int8_rows(case)
    assert_matches(run_op(case, approximate=approximate, threads=2), oracle(case, 0.0, approximate), np.float32)


@pytest.mark.parametrize(("d", "h"), [(16, 0), (0, 8)], ids=["h=0", "d=0"])
@pytest.mark.parametrize("lead", [(1,), (3, 4)], ids=["decode", "prefill"])
def test_empty_hidden_or_model_dim(cpu_library, lead, d, h):
    case = make_case(np.random.default_rng(0), lead, d=d, h=h)
    y = run_op(case, threads=2)
    assert_matches(y, oracle(case), np.float32)
    np.testing.assert_array_equal(y, case["y_folded"])


def test_results_independent_of_threads(cpu_library):
    """Bitwise equal for any thread count: the fused decode schedule (1 and 2 tokens), the
    three-phase one (3 and 64 tokens; d=96: a full 64-column tile and a tail tile), and several
    blocks of tokens."""
    rng = np.random.default_rng(9)
    for lead, d in [((1,), 96), ((2,), 96), ((3,), 96), ((64,), 96), ((1200,), 1024)]:
        case = make_case(rng, lead, d=d, h=384 if d < 1024 else 256)
        y1 = run_op(case, threads=1)
        y4 = run_op(case, threads=4)
        np.testing.assert_array_equal(y1, y4)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
def test_many_token_blocks(cpu_library, dtype):
    """More tokens than one block holds (2 MiB of x rows: 512 tokens at d=1024): two blocks of 360."""
    rng = np.random.default_rng(13)
    case = make_case(rng, (3, 240), d=1024, h=96, dtype=dtype)
    assert_matches(run_op(case, margin=0.05, threads=2), oracle(case, 0.05), dtype)


def test_decode_size(cpu_library):
    """One token, d=1024, h=4096, ~5% flagged: the decode case the kernel is tuned for."""
    rng = np.random.default_rng(1)
    case = make_case(rng, (1, 1), d=1024, h=4096)
    flagged = ~((case["z_hat"] >= case["lines"][2]) & (case["z_hat"] <= case["lines"][3]))
    assert 0.0 < flagged.mean() < 0.5
    y = run_op(case, threads=2)
    assert_matches(y, oracle(case), np.float32)


def test_defaults_are_erf_and_zero_margin(cpu_library):
    rng = np.random.default_rng(2)
    case = make_case(rng, (3,), d=16, h=32)
    assert_matches(run_op(case), oracle(case, 0.0, "none"), np.float32)


def test_shape_mismatch_is_reported(cpu_library):
    rng = np.random.default_rng(4)
    case = make_case(rng, (2,), d=16, h=32)
    case["w2"] = case["w2"][:, :8].copy()
    with pytest.raises(Exception, match=r"ai\.tardis::FfnFallback: w2 shape \[32, 8\] must be \[h, d\]"):
        run_op(case)


FUSED_SHAPES = [(1,), (2,), (1, 1), (3,), (3, 40), (2, 70), (0,)]  # 1-2 tokens: the decode schedule


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("flagged", ["some", "all"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("lead", [(1,), (2,), (4, 9), (600,)], ids=["1", "2", "4x9", "600"])
def test_without_w1t_the_residual_comes_from_z_hat(cpu_library, lead, threads, flagged, dtype):
    """An accurate predictor (int8) stands for the pre-activation: no W1ᵀ input, z = z_hat + b1."""
    case = make_case(np.random.default_rng(21), lead, d=40, h=300, dtype=dtype, flagged=flagged)
    del case["w1t"]
    want = oracle(case, 0.05, "tanh")
    assert_matches(run_op(case, 0.05, "tanh", threads=threads), want, dtype)
    # It differs from the recomputed residual (z_hat is noisy): the op really read z_hat.
    recomputed = oracle({**case, "w1t": np.ones((300, 40), dtype)}, 0.05, "tanh")
    assert np.abs(want - recomputed).max() > 1e-2


def with_int8_rows(case: dict) -> dict:
    """``case`` with its W1ᵀ (when given) and W2 as int8 rows and their scales (``--quantize int8``)."""
    h = case["w2"].shape[0]
    w2, w2_scales = quantize_rows(case["w2"])
    w1t, w1t_scales = quantize_rows(case["w1t"]) if "w1t" in case else (None, np.ones(h, np.float32))
    rows = {"w2": w2, "row_scales": np.stack([w1t_scales, w2_scales])}
    return {**case, **rows} | ({} if w1t is None else {"w1t": w1t})


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("w1t", [True, False], ids=["w1t", "no-w1t"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("lead", [(1,), (2,), (4, 9), (600,)], ids=["1", "2", "4x9", "600"])
def test_int8_rows_match_reference(cpu_library, lead, threads, w1t, dtype):
    """W1ᵀ and W2 as int8 rows with a scale each: row k is float32(q)·scale_k, decode and prefill schedules."""
    case = make_case(np.random.default_rng(23), lead, d=40, h=300, dtype=dtype)
    if not w1t:
        del case["w1t"]
    quantized = with_int8_rows(case)
    want = oracle(quantized, 0.05, "tanh")
    assert_matches(run_op(quantized, 0.05, "tanh", threads=threads), want, dtype)
    if dtype == np.float32:  # the rounding shows: the op really read the int8 rows
        assert np.abs(want - oracle(case, 0.05, "tanh")).max() > 1e-4


@pytest.mark.parametrize("rows", ["int8 without scales", "float with scales"])
def test_row_scales_go_with_int8_rows(cpu_library, rows):
    case = make_case(np.random.default_rng(24), (2,), d=16, h=32)
    quantized = with_int8_rows(case)
    proto = onnx.load_from_string(fallback_model(np.float32, int8_rows=True))
    if rows == "float with scales":  # the same node with float W1ᵀ and W2
        quantized.update(w1t=case["w1t"], w2=case["w2"])
        for value in proto.graph.input:
            if value.name in ("w1t", "w2"):
                value.type.tensor_type.elem_type = TensorProto.FLOAT
    else:
        del quantized["row_scales"]
        proto.graph.node[0].input[8] = ""
        del proto.graph.input[-1]
    model = proto.SerializeToString()
    so = runtime.session_options(threads=1, optimization="disable")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="row_scales must be given exactly when w1t and w2 are int8 rows"):
        session.run(None, quantized)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("lead", FUSED_SHAPES, ids=[str(s) for s in FUSED_SHAPES])
def test_fused_lowrank_matches_reference(cpu_library, lead, threads, dtype):
    """z_hat computed in the kernel from the code in y_folded's last columns and V (h = 300: a
    64-neuron tile plus a tail in each decode part and prefill chunk)."""
    rng = np.random.default_rng(zlib.crc32(repr(("fused", lead, threads)).encode()))
    case = make_fused_case(rng, lead, d=40, h=300, rank=24, dtype=dtype)
    assert_matches(run_op(case, margin=0.05, threads=threads), oracle(case, 0.05), dtype)


@pytest.mark.parametrize("rank", [1, 3, 64, 130])  # odd ranks: pairs of V rows, then one
@pytest.mark.parametrize("flagged", ["none", "some", "all"])
@pytest.mark.parametrize("lead", [(1,), (9,)], ids=["decode", "prefill"])
def test_fused_lowrank_ranks_and_fractions(cpu_library, lead, flagged, rank):
    rng = np.random.default_rng(zlib.crc32(repr((lead, flagged, rank)).encode()))
    case = make_fused_case(rng, lead, d=33, h=200, rank=rank, flagged=flagged)
    y = run_op(case, approximate="tanh", threads=2)
    if flagged == "none":
        np.testing.assert_array_equal(y, case["y_folded"][..., :33])  # the folded columns, bit for bit
    assert_matches(y, oracle(case, 0.0, "tanh"), np.float32)


def test_fused_lowrank_threads_and_size(cpu_library):
    """The decode size the fusion is for (d = 1024, h = 4096, rank 64) and a prefill: bitwise equal
    for 1 and 4 threads, and equal to the oracle."""
    rng = np.random.default_rng(21)
    for lead in [(1,), (2,), (130,)]:
        case = make_fused_case(rng, lead, d=1024, h=4096, rank=64)
        y1, y4 = run_op(case, threads=1), run_op(case, threads=4)
        np.testing.assert_array_equal(y1, y4)
        assert_matches(y1, oracle(case), np.float32)


def test_concurrent_runs_of_one_session(cpu_library):
    """A server calls Run on one session from several threads at once: decode and prefill calls
    interleaved from four threads give, bit for bit, what each gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(33)
    cases = [make_fused_case(rng, lead, d=256, h=1024, rank=16) for lead in [(1,), (2,), (1, 1), (40,), (3, 70)]]
    so = runtime.session_options(threads=2, optimization="disable")
    session = ort.InferenceSession(fallback_model(np.float32, fused=True), so, providers=["CPUExecutionProvider"])
    alone = [session.run(None, case)[0] for case in cases]
    order = rng.permutation(np.repeat(np.arange(len(cases)), 8))
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lambda k: (k, session.run(None, cases[k])[0]), order))
    for k, y in together:
        np.testing.assert_array_equal(y, alone[k])
    assert_matches(alone[3], oracle(cases[3]), np.float32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop_v", "give exactly one of z_hat and predictor_v"),
        ("add_z_hat", "give exactly one of z_hat and predictor_v"),
        ("no_code", r"y_folded shape \[2, 16\] must be x's shape plus rank columns \(the code x·U\) = \[2, 24\]"),
        ("v_rank_1d", r"predictor_v shape \[64\] must be \[rank, h\]"),
        ("drop_w1t", r"w1t may be left out only with z_hat"),
    ],
)
def test_fused_lowrank_bad_inputs(cpu_library, change, message):
    rng = np.random.default_rng(5)
    case = make_fused_case(rng, (2,), d=16, h=64, rank=8)
    names = list(FUSED_INPUTS)
    if change == "drop_v":
        names, case = names[:-1], {k: v for k, v in case.items() if k != "predictor_v"}
    elif change == "add_z_hat":
        names[2] = "z_hat"
        case["z_hat"] = np.zeros((2, 64), np.float32)
    elif change == "no_code":
        case["y_folded"] = case["y_folded"][:, :16].copy()
    elif change == "drop_w1t":
        names[3] = ""
        del case["w1t"]
    else:
        case["predictor_v"] = case["predictor_v"][0].copy()
    node = helper.make_node("FfnFallback", names, ["y"], domain="ai.tardis")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.tardis", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()
    so = runtime.session_options(threads=1, optimization="disable")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"ai\.tardis::FfnFallback: " + message):
        session.run(None, case)


HUGE_PAGE_PROBE = """
import re, sys
import numpy as np, onnxruntime as ort
from onnx import numpy_helper
sys.path.insert(0, {tests!r})
from test_custom_op import fallback_model, make_case, oracle
from tardis_onnx import runtime
def huge_kib():
    return int(re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1))
case = make_case(np.random.default_rng(11), (2,), d=1024, h=2048)
weights = {{k: case.pop(k) for k in ("w1t", "w2")}}
model = __import__("onnx").load_from_string(fallback_model(np.float32))
model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
kept = [i for i in model.graph.input if i.name not in weights]  # initializers, not inputs: constant
del model.graph.input[:]
model.graph.input.extend(kept)
before = huge_kib()
options = runtime.session_options(threads=2)
session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
after = huge_kib()
y = session.run(None, case)[0]
np.testing.assert_allclose(y, oracle({{**case, **weights}}), rtol=1e-5, atol=1e-5)
print(after - before)
"""


def huge_pages_supported() -> bool:
    enabled = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    release = tuple(int(p) for p in re.findall(r"\d+", os.uname().release)[:2]) if hasattr(os, "uname") else ()
    return enabled.exists() and "[never]" not in enabled.read_text() and release >= (6, 1)


@pytest.mark.parametrize("setting", ["", "0"])
def test_weight_rows_in_huge_pages(cpu_library, setting):
    """A kernel backs its W1ᵀ and W2 initializers (8 MiB each here) with huge pages in place
    (MADV_COLLAPSE), unless TARDIS_HUGE_PAGES=0; the outputs are the oracle's either way."""
    if not huge_pages_supported():
        pytest.skip("needs Linux >= 6.1 with transparent huge pages not set to 'never' (MADV_COLLAPSE)")
    env = {**os.environ, "TARDIS_HUGE_PAGES": setting}
    probe = HUGE_PAGE_PROBE.format(tests=str(ROOT / "tests"))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    gained_mib = int(result.stdout.split()[-1]) / 1024
    if setting == "0":
        assert gained_mib < 2
    else:
        assert gained_mib >= 2 * 6  # at least 3 whole 2 MiB pages inside each 8 MiB buffer


def test_unknown_approximate_is_rejected(cpu_library):
    rng = np.random.default_rng(4)
    case = make_case(rng, (2,), d=16, h=32)
    with pytest.raises(Exception, match="approximate must be 'none' or 'tanh'"):
        run_op(case, approximate="sigmoid")


def test_cuda_library_runs_cpu_nodes():
    """The CUDA build also registers the CPU kernels and loads without a GPU."""
    needs_library(cuda=True)
    rng = np.random.default_rng(6)
    case = make_case(rng, (2, 3), d=32, h=64)
    assert_matches(run_op(case, margin=0.1, cuda_library=True), oracle(case, 0.1), np.float32)


def test_old_onnxruntime_gets_a_clear_error():
    """RegisterCustomOps refuses an ONNX Runtime whose API is older than the headers it was built with."""
    needs_library()
    found = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so*"))
    if not found:
        pytest.skip("no libonnxruntime.so in the onnxruntime package")
    get_api = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)
    version_string = ctypes.CFUNCTYPE(ctypes.c_void_p)

    class ApiBase(ctypes.Structure):
        _fields_ = [("GetApi", get_api), ("GetVersionString", version_string)]

    ort_lib = ctypes.CDLL(str(found[0]))
    ort_lib.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
    real = ort_lib.OrtGetApiBase().contents
    old_version = ctypes.create_string_buffer(b"1.16.3")
    # An ONNX Runtime 1.16: it serves API versions up to 16 only.
    fake = ApiBase(
        get_api(lambda version: real.GetApi(version) if version <= 16 else None),
        version_string(lambda: ctypes.addressof(old_version)),
    )
    lib = ctypes.CDLL(str(runtime.library_path()))
    lib.RegisterCustomOps.restype = ctypes.c_void_p
    lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(ApiBase)]
    status = lib.RegisterCustomOps(None, ctypes.byref(fake))
    assert status, "registration against an old API must fail"
    api = ctypes.cast(real.GetApi(1), ctypes.POINTER(ctypes.c_void_p))
    get_error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(api[2])  # OrtApi::GetErrorMessage
    message = get_error_message(status).decode()
    assert "tardis-onnx custom ops need ONNX Runtime API >=" in message
    assert "1.16.3" in message and "older" in message


# ---- runtime helpers and build --------------------------------------------------------------


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.LIBRARY_ENV, raising=False)
    monkeypatch.setattr(runtime, "LIB_DIR", tmp_path)
    assert not runtime.library_available()
    with pytest.raises(FileNotFoundError, match="custom_ops/build.py"):
        runtime.library_path()


def test_bad_optimization_level():
    needs_library()
    with pytest.raises(ValueError, match="optimization must be one of"):
        runtime.session_options(optimization="fast")


def test_make_session_runs_the_op():
    needs_library()
    rng = np.random.default_rng(8)
    case = make_case(rng, (2,), d=16, h=32)
    session = runtime.make_session(fallback_model(np.float32), threads=1, optimization="all")
    assert_matches(session.run(None, case)[0], oracle(case), np.float32)
    # The public names: registered by hand, as a host that builds its own options does.
    import tardis_onnx

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(tardis_onnx.library_path()))
    by_hand = ort.InferenceSession(fallback_model(np.float32), so, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(by_hand.run(None, case)[0], session.run(None, case)[0])
    with pytest.raises(Exception, match="FfnFallback"):  # without the library: refused at load
        ort.InferenceSession(fallback_model(np.float32), providers=["CPUExecutionProvider"])


def test_readme_example_runs():
    """custom_ops/README.md's Python example is executed, so it cannot rot."""
    needs_library()
    readme = ROOT / "custom_ops" / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(readme), "exec"), {})


def test_build_without_headers_fails_clearly(tmp_path):
    empty = tmp_path / "include"
    empty.mkdir()
    env = {**os.environ, "ORT_INCLUDE_DIR": str(empty)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "custom_ops" / "build.py"), "--out", str(tmp_path / "lib"), "--no-cuda"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    assert "ORT_INCLUDE_DIR" in result.stderr and "onnxruntime_c_api.h" in result.stderr
    assert not (tmp_path / "lib" / runtime.CPU_LIBRARY).exists()


def test_cpp_host_runs_a_rewritten_export(tmp_path):
    """Deployment without Python: custom_ops/host_run.cc, built against ONNX Runtime's C++ API and the
    wheel's libonnxruntime, registers the library as ORT-based servers do and runs a rewritten BERT
    export (custom op with the fused low-rank predictor); its outputs equal the Python session's bit
    for bit."""
    needs_library()
    include = ort_headers()
    wheel_lib = sorted((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    if include is None or not wheel_lib or shutil.which("g++") is None:
        pytest.skip("needs g++, ONNX Runtime headers (python custom_ops/build.py fetches them) and libonnxruntime.so")
    import onnx

    from models import optimum_zoo as zoo
    from tardis_onnx.config import TardisConfig
    from tardis_onnx.feeds import random_feeds
    from tardis_onnx.optimize import optimize_model

    lib_dir = tmp_path / "lib"  # the wheel's library under its soname
    lib_dir.mkdir()
    for name in ("libonnxruntime.so.1", "libonnxruntime.so"):
        (lib_dir / name).symlink_to(wheel_lib[0])
    host = tmp_path / "host_run"
    source = ROOT / "custom_ops" / "host_run.cc"
    compile_command = ["g++", "-std=c++17", "-O1", f"-I{include}", str(source), f"-L{lib_dir}", "-lonnxruntime"]
    subprocess.run([*compile_command, f"-Wl,-rpath,{lib_dir}", "-o", str(host)], check=True)

    model = onnx.load(zoo.export("bert"))
    result = optimize_model(model, TardisConfig(coverage=0.8, fallback="custom", predictor="lowrank", predictor_rank=8))
    assert any(n.op_type == "FfnFallback" for n in result.model.graph.node)
    model_file = tmp_path / "model.tardis.onnx"
    onnx.save(result.model, model_file)
    feeds = random_feeds(result.model, batch=2, sequence=7, seed=3)
    args = [str(host), "--threads", "2", str(model_file), str(runtime.library_path()), str(tmp_path)]
    for name, value in feeds.items():
        raw = tmp_path / f"{name}.raw"
        value.tofile(raw)
        kind = {np.dtype(np.float32): "f32", np.dtype(np.int64): "i64"}[value.dtype]
        args.append(f"{name}={kind}:{'x'.join(map(str, value.shape))}:{raw}")
    printed = subprocess.run(args, capture_output=True, text=True, check=True).stdout.splitlines()

    session = runtime.make_session(model_file.read_bytes(), threads=2)
    expected = session.run(None, feeds)
    assert len(printed) == len(expected)
    for line, want in zip(printed, expected, strict=True):
        k, name, kind, shape = line.split()
        got = np.fromfile(tmp_path / f"{k}.bin", dtype=np.float32 if kind == "f32" else np.int64)
        assert shape == "x".join(map(str, want.shape))
        np.testing.assert_array_equal(got.reshape(want.shape), want)

    bad_runs = {
        "Failed to load library": [*args[:4], str(tmp_path / "no_such_library.so"), *args[5:]],
        "is not like 1x7x384": [*args[:6], "input_ids=i64:2xseven:/dev/null"],
        "bytes, shape needs 112": [*args[:6], "input_ids=i64:2x7:/dev/null"],
    }
    for message, bad in bad_runs.items():
        run = subprocess.run(bad, capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
        assert message in run.stderr


# ---- CUDA kernel through its C entry point --------------------------------------------------


def cuda_entry(dtype):
    lib = ctypes.CDLL(str(runtime.library_path(cuda=True)))
    fn = lib.tardis_ffn_fallback_cuda_f32 if dtype == np.float32 else lib.tardis_ffn_fallback_cuda_f16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int, ctypes.c_void_p]
    lib.tardis_cuda_error_string.restype = ctypes.c_char_p
    lib.tardis_cuda_error_string.argtypes = [ctypes.c_int]
    return fn, lib.tardis_cuda_error_string


def torch_cuda():
    torch = pytest.importorskip("torch", reason="torch not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


CUDA_SHAPES = [(1,), (1, 1), (2, 4), (3, 5), (300,), (0,)]  # ≤ 8 tokens: the decode path
FORMS_CODE = {"none": 0, "tanh": 1}


def run_cuda(case: dict, margin: float, approximate: str = "none") -> np.ndarray:
    """The CUDA kernel on ``case`` through its C entry point (torch device pointers)."""
    needs_library(cuda=True)
    torch = torch_cuda()
    device = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in case.items()}
    y = torch.empty_like(device["x"])
    fn, error_string = cuda_entry(case["x"].dtype.type)
    d, h = case["x"].shape[-1], case["w2"].shape[0]
    rank = case["predictor_v"].shape[0] if "predictor_v" in case else 0
    tokens = int(np.prod(case["x"].shape[:-1]))
    stream = torch.cuda.current_stream().cuda_stream
    pointers = [device[k].data_ptr() if k in device else None for k in (*INPUTS, "predictor_v")]
    code = fn(*pointers, y.data_ptr(), tokens, d, h, rank, margin, FORMS_CODE[approximate], stream)
    torch.cuda.synchronize()
    assert code == 0, error_string(code).decode()
    return y.cpu().numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lead", CUDA_SHAPES, ids=[str(s) for s in CUDA_SHAPES])
def test_cuda_kernel_matches_reference(lead, approximate, dtype):
    needs_library(cuda=True)
    torch_cuda()
    rng = np.random.default_rng(12)
    case = make_case(rng, lead, d=200, h=300, dtype=dtype)  # h > 2 chunks of 128, d not a multiple of 32
    if lead[0] > 2:
        case["x"][1, 0] = np.nan
        case["z_hat"][2, :4] = np.nan
    assert_matches(run_cuda(case, 0.05, approximate), oracle(case, 0.05, approximate), dtype)


@pytest.mark.parametrize("tokens", [1, 512])
@pytest.mark.parametrize("flagged", ["some", "all"])
def test_cuda_kernel_at_model_size(tokens, flagged):
    """d = 1024, h = 4096 (a GPT-2-medium FFN), fp16, decode and prefill."""
    needs_library(cuda=True)
    torch_cuda()
    case = make_case(np.random.default_rng(14), (tokens,), d=1024, h=4096, dtype=np.float16, flagged=flagged)
    assert_matches(run_cuda(case, 0.0), oracle(case, 0.0), np.float16)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("lead", [(1,), (2, 4), (300,), (1,), (0,)], ids=["1", "2x4", "300", "1-big", "0"])
def test_cuda_kernel_fused_lowrank(lead, dtype, request):
    """The low-rank predictor fused in: z_hat = code·V in the kernel, code in y_folded's last columns."""
    needs_library(cuda=True)
    torch_cuda()
    d, h = (1024, 4096) if "big" in request.node.callspec.id else (200, 300)
    case = make_fused_case(np.random.default_rng(16), lead, d=d, h=h, rank=64, dtype=dtype)
    assert_matches(run_cuda(case, 0.05), oracle(case, 0.05), dtype)


@pytest.mark.parametrize("lead", [(1,), (2, 4), (300,)], ids=["1", "2x4", "300"])
def test_cuda_kernel_without_w1t(lead):
    """No W1ᵀ: the residual from z_hat + b1, on the decode and the chunk paths."""
    needs_library(cuda=True)
    torch_cuda()
    case = make_case(np.random.default_rng(17), lead, d=200, h=300, dtype=np.float32)
    del case["w1t"]
    assert_matches(run_cuda(case, 0.05), oracle(case, 0.05), np.float32)


def test_cuda_kernel_token_slices():
    """More tokens than one 64 MiB scratch slice of partial rows holds (1024 at d = 256, h = 8192)."""
    needs_library(cuda=True)
    torch_cuda()
    case = make_case(np.random.default_rng(15), (1100,), d=256, h=8192, dtype=np.float32)
    assert_matches(run_cuda(case, 0.0), oracle(case, 0.0), np.float32)


def test_cuda_entry_point_reports_errors():
    """Without a GPU the entry point returns a CUDA error code instead of crashing."""
    needs_library(cuda=True)
    try:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present: covered by test_cuda_kernel_matches_reference")
    except ImportError:
        pass
    fn, error_string = cuda_entry(np.float32)
    assert fn(*([None] * 9), 0, 8, 8, 0, 0.0, 0, None) == 0  # zero tokens: nothing to launch
    code = fn(*([None] * 9), 1, 8, 8, 0, 0.0, 0, None)
    assert code != 0
    assert error_string(code)
