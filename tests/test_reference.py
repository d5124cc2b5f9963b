"""The numpy reference: the identities everything else relies on."""

import math

import numpy as np
import pytest
import torch

from tardis_onnx import parallel, reference


@pytest.mark.parametrize("form,approximate", [("erf", "none"), ("tanh", "tanh")])
def test_gelu_matches_torch(form, approximate):
    z = np.linspace(-8, 8, 1001)
    want = torch.nn.functional.gelu(torch.from_numpy(z), approximate=approximate).numpy()
    np.testing.assert_allclose(reference.gelu(z, form), want, atol=1e-12)


@pytest.mark.parametrize("form", reference.GELU_FORMS)
def test_gelu_in_float32_where_asked_is_float64_to_float32_rounding(form):
    z = np.linspace(-8, 8, 4001).astype(np.float32)
    got = reference.gelu(z, form, np.float32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference.gelu(z, form), rtol=1e-6, atol=1e-6)
    lines = reference.NeuronLines(np.full(1, 0.4), np.full(1, 0.1), np.full(1, -1.0), np.full(1, 1.0))
    residual = reference.residual(z[:, None], lines, form, np.float32)
    assert residual.dtype == np.float32
    np.testing.assert_allclose(residual, reference.residual(z[:, None], lines, form), rtol=1e-6, atol=1e-6)
    # A float32 z is compared as float64 would be: the same outliers, bit for bit
    np.testing.assert_array_equal(
        reference.outside_window(z[:, None], lines), reference.outside_window(z[:, None].astype(np.float64), lines)
    )


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu_and_residual_of_a_large_array_are_those_of_one_call(form, threads, monkeypatch):
    monkeypatch.setenv("TARDIS_THREADS", threads)
    z = np.random.default_rng(3).standard_normal((700, 1000)).astype(np.float32)  # 2.8 MB: 3 blocks of rows
    lines = reference.NeuronLines(*np.random.default_rng(4).standard_normal((4, 1000)))
    assert z.nbytes > 2 * parallel.ROW_BLOCK_BYTES
    whole = reference._gelu(z, form)
    np.testing.assert_array_equal(reference.gelu(z, form, np.float32), whole)
    np.testing.assert_array_equal(
        reference.residual(z, lines, form, np.float32), whole - reference.line(z, lines, np.float32)
    )


@pytest.mark.parametrize("form", reference.GELU_FORMS)
def test_gelu_derivative_matches_finite_difference(form):
    z, eps = np.linspace(-5, 5, 201), 1e-6
    numeric = (reference.gelu(z + eps, form) - reference.gelu(z - eps, form)) / (2 * eps)
    np.testing.assert_allclose(reference.gelu_derivative(z, form), numeric, atol=1e-7)


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="unknown GELU form"):
        reference.gelu(np.zeros(3), "relu")


def test_narrowest_window_is_narrowest_by_brute_force():
    rng = np.random.default_rng(1)
    samples = np.concatenate([rng.normal(0, 1, 200), rng.normal(5, 0.1, 50)])
    for coverage in (0.1, 0.5, 0.9, 1.0):
        lo, hi = reference.narrowest_window(samples, coverage)
        k = math.ceil(coverage * samples.size)
        assert np.sum((samples >= lo) & (samples <= hi)) >= k
        s = np.sort(samples)
        best = min(s[i + k - 1] - s[i] for i in range(s.size - k + 1))
        assert hi - lo == pytest.approx(best)


def test_coverage_zero_is_the_empty_window_and_bad_coverage_raises():
    assert reference.narrowest_window(np.arange(10.0), 0.0) == (math.inf, -math.inf)
    with pytest.raises(ValueError, match="coverage"):
        reference.narrowest_window(np.arange(10.0), 1.5)


def test_fit_line_is_least_squares_and_tangent_when_degenerate():
    z = np.linspace(-1, 2, 50)
    a, c = reference.fit_line(z)
    want = np.polyfit(z, reference.gelu(z), 1)
    assert (a, c) == pytest.approx(tuple(want))
    a, c = reference.fit_line(np.full(5, 1.5))
    assert a == pytest.approx(reference.gelu_derivative(1.5))
    assert a * 1.5 + c == pytest.approx(reference.gelu(1.5))


def _ffn(seed=0, d=8, h=32, n=40):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(d, h)), rng.normal(size=h)
    w2, b2 = rng.normal(size=(h, d)), rng.normal(size=d)
    x = rng.normal(size=(n, d))
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("form", reference.GELU_FORMS)
@pytest.mark.parametrize("coverage", [0.0, 0.5, 0.95, 1.0])
def test_fold_plus_residual_of_every_neuron_is_exact(form, coverage):
    x, w1, b1, w2, b2 = _ffn()
    lines = reference.calibrate_lines(x @ w1 + b1, coverage, form)
    every = np.ones((x.shape[0], w1.shape[1]), bool)
    got = reference.tardis_ffn(x, w1, b1, w2, b2, lines, form, flagged=every)
    np.testing.assert_allclose(got, reference.dense_ffn(x, w1, b1, w2, b2, form), atol=1e-10)


def test_fold_without_biases_and_lines_fit_in_window_samples():
    x, w1, _, w2, _ = _ffn(seed=3)
    z = x @ w1
    lines = reference.calibrate_lines(z, 0.8)
    for i in range(5):
        col = z[:, i]
        inside = col[(col >= lines.lo[i]) & (col <= lines.hi[i])]
        assert inside.size >= math.ceil(0.8 * col.size)
        assert (lines.slope[i], lines.intercept[i]) == pytest.approx(reference.fit_line(inside))
    got = reference.tardis_ffn(x, w1, None, w2, None, lines)
    in_window = ~reference.outside_window(z, lines)
    manual = (
        x @ reference.fold(w1, None, w2, None, lines)[0] + np.where(in_window, 0, reference.residual(z, lines)) @ w2
    )
    manual += reference.fold(w1, None, w2, None, lines)[1]
    np.testing.assert_allclose(got, manual, atol=1e-10)


def test_outside_window_flags_nan_and_respects_margin():
    lines = reference.NeuronLines(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    z = np.array([[0.0, 1.0, np.nan], [-0.1, 1.05, 0.5]])
    np.testing.assert_array_equal(reference.outside_window(z, lines), [[False, False, True], [True, True, False]])
    np.testing.assert_array_equal(reference.outside_window(z, lines, margin=0.1)[1], [False, False, False])


def test_fallback_op_oracle_matches_tardis_ffn():
    x, w1, b1, w2, b2 = _ffn(seed=4)
    z = x @ w1 + b1
    packed = reference.pack_lines(reference.calibrate_lines(z, 0.7))
    lines = reference.unpack_lines(packed)
    wf, bf = reference.fold(w1, b1, w2, b2, lines)
    got = reference.fallback_op(x, x @ wf + bf, z, w1.T, b1, w2, packed)
    want = reference.tardis_ffn(x, w1, b1, w2, b2, lines)
    np.testing.assert_allclose(got, want, atol=1e-9)
