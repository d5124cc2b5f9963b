"""Calibration statistics, budgets and the refit: vectorised math equals the scalar definitions,
streaming capture equals the exact reference, budgets are met, the refit lowers calibration error."""

import gc
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from ffn_graphs import D, H, ffn_model

from tardis_onnx import budget, reference
from tardis_onnx.calibrate import SampleReservoir, capture_ffn_inputs
from tardis_onnx.config import TardisConfig
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.session import create_session


def _samples(seed=0, n=500, h=40):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, h)) * rng.uniform(0.5, 3, h) + rng.uniform(-2, 1, h)
    z[:, 3] = 0.25  # one distinct value: the tangent
    z[::7, 4] = z[0, 4]  # ties
    return z


@pytest.mark.parametrize("coverage", [0.0, 0.3, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_vectorised_lines_equal_the_scalar_definitions(coverage, form):
    z = _samples()
    lines = reference.calibrate_lines(z, coverage, form)
    for i in range(z.shape[1]):
        lo, hi = reference.narrowest_window(z[:, i], coverage)
        col = z[:, i]
        a, c = reference.fit_line(col[(col >= lo) & (col <= hi)] if lo <= hi else col, form)
        assert (lines.lo[i], lines.hi[i]) == (lo, hi)
        np.testing.assert_allclose([lines.slope[i], lines.intercept[i]], [a, c], rtol=1e-9, atol=1e-12)


def test_candidate_table_matches_the_reference_and_its_errors_are_in_window_sse():
    z = _samples(1)[:, 5:]  # continuous columns: no ties at window edges
    grid = (0.5, 0.8, 0.95, 1.0)
    table = budget.candidate_table(z, grid, "erf", "narrowest")
    best = budget.candidate_table(z, grid, "erf", "least-error")
    for g, t in enumerate(grid):
        want = reference.calibrate_lines(z, t)
        lines = table.lines(np.full(z.shape[1], g))
        np.testing.assert_array_equal(lines.lo, want.lo)
        np.testing.assert_allclose(lines.slope, want.slope, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(lines.intercept, want.intercept, rtol=1e-9, atol=1e-12)
        for tab in (table, best):
            chosen = tab.lines(np.full(z.shape[1], g))
            inside = ~reference.outside_window(z, chosen)
            sse = (np.where(inside, reference.residual(z, chosen), 0.0) ** 2).sum(axis=0) / z.shape[0]
            np.testing.assert_allclose(tab.sse[g], sse, rtol=1e-7, atol=1e-12)
            assert inside.sum(axis=0).min() >= np.ceil(t * z.shape[0] - 1e-9)
        assert np.all(best.sse[g] <= table.sse[g] + 1e-12)  # least-error windows never fit worse
    # The least-error window is the least of every window of k consecutive sorted samples, fitted one by one
    k, n = math.ceil(0.8 * z.shape[0] - 1e-9), z.shape[0]
    for col in range(3):
        s = np.sort(z[:, col])
        sse = [
            np.linalg.lstsq(np.c_[w, np.ones(k)], reference.gelu(w, "erf"), rcond=None)[1][0]
            for w in (s[i : i + k] for i in range(n - k + 1))
        ]
        np.testing.assert_allclose(best.sse[grid.index(0.8), col], min(sse) / n, rtol=1e-7, atol=1e-15)
    # Both from one sort: the same tables
    together = budget.candidate_tables(z, [(grid, "narrowest"), ((0.9,), "least-error")], "erf")
    for one, alone in zip(together, [table, budget.candidate_table(z, (0.9,), "erf", "least-error")], strict=True):
        for field in ("grid", "lo", "hi", "slope", "intercept", "sse", "fraction"):
            np.testing.assert_array_equal(getattr(one, field), getattr(alone, field))


def test_candidate_tables_on_threads_and_from_float32_are_the_same_tables():
    z = np.random.default_rng(4).standard_normal((1 << 12, 2500)).astype(np.float32)  # 3 blocks of columns
    specs = [((0.8, 0.9), "narrowest"), ((0.9,), "least-error")]
    assert len(reference.column_blocks(*z.shape)) == 3
    alone = budget.candidate_tables(z.astype(np.float64), specs, "erf")
    for threads in (1, 2):
        for one, want in zip(budget.candidate_tables(z, specs, "erf", threads), alone, strict=True):
            for field in ("grid", "lo", "hi", "slope", "intercept", "sse", "fraction"):
                np.testing.assert_array_equal(getattr(one, field), getattr(want, field))


@pytest.mark.parametrize("tokens", [30, 80])  # fewer tokens than the 51 unknowns (the kernel form), and more
def test_the_refit_solves_its_ridge_problem_in_either_form(tokens):
    rng = np.random.default_rng(5)
    d, d_out, ridge = 50, 7, 0.1
    x, held = rng.standard_normal((tokens, d)), rng.standard_normal((9, d))
    target, wf, bf = rng.standard_normal((tokens, d_out)), rng.standard_normal((d, d_out)), rng.standard_normal(d_out)
    a = np.concatenate([x, np.ones((tokens, 1))], axis=1)
    b0 = np.concatenate([wf, bf[None, :]])
    refit = budget.Refit(x, budget.token_products(x), a @ b0 - target)  # from the fold's miss alone
    assert refit.dual == (tokens < d + 1)
    for r in (ridge, 1.0, ridge):  # the held-out tokens' products are kept across ridges
        rho = r * (d + 1) * np.mean(x * x)
        want = np.linalg.solve(a.T @ a + rho * np.eye(d + 1), a.T @ target + rho * b0)  # the normal equations
        delta_w, delta_b, square = refit.correction(r)
        np.testing.assert_allclose(np.concatenate([wf + delta_w, (bf + delta_b)[None, :]]), want, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(square, np.square(a @ want - target).sum(), rtol=1e-9)
        moved = held @ (want[:-1] - wf) + (want[-1] - bf)
        np.testing.assert_allclose(refit.predict(held, r), moved, rtol=1e-9, atol=1e-10)


def test_reservoir_is_bounded_and_keeps_everything_below_capacity():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((37, 8)) for _ in range(10)]
    full, small = SampleReservoir(1000), SampleReservoir(50)
    for r in rows:
        full.add(r)
        small.add(r)
    np.testing.assert_array_equal(full.samples(), np.concatenate(rows).astype(np.float32))
    assert small.rows.shape == (50, 8) and small.seen == 370
    assert small.nbytes <= 50 * (4 * 8 + 8)
    stream = {tuple(r) for r in np.concatenate(rows).astype(np.float32)}
    assert all(tuple(r) in stream for r in small.rows)


@pytest.mark.parametrize("capacity", [50, 120, 1000])  # dropping rows at 2x capacity and at the end; none
def test_a_reservoir_spilled_to_a_file_keeps_the_rows_it_keeps_in_memory(tmp_path, capacity):
    rng = np.random.default_rng(1)
    rows = [rng.standard_normal((37, 8)).astype(np.float16) for _ in range(10)]
    memory = SampleReservoir(capacity, seed=3, dtype=np.float16)
    spilled = SampleReservoir(capacity, seed=3, dtype=np.float16, spill=tmp_path / "r.bin")
    for r in rows:
        memory.add(r)
        spilled.add(r)
        assert spilled.rows is None and spilled.keys.size < 2 * capacity  # in the file, not in memory
    kept = spilled.kept()
    assert isinstance(kept, np.memmap) and kept.dtype == np.float16 and spilled.seen == memory.seen == 370
    np.testing.assert_array_equal(kept, memory.rows)
    assert (tmp_path / "r.bin").stat().st_size == kept.nbytes and not (tmp_path / "r.kept").exists()


def test_a_large_models_calibration_inputs_are_spilled_to_a_temporary_folder(monkeypatch):
    model = ffn_model("erf_div")
    feeds = [random_feeds(model, 2, 8, seed=i) for i in range(3)]
    (small,) = capture_ffn_inputs(model, find_ffns(model)[0], feeds, max_samples=20)
    monkeypatch.setattr("tardis_onnx.passes.ffn.LARGE_FFN_BYTES", 0)
    ffns, _ = find_ffns(model)
    (spilled,) = capture_ffn_inputs(model, ffns, feeds, max_samples=20)
    folder = Path(spilled.store.name)
    assert isinstance(spilled.x, np.memmap) and sorted(p.name for p in folder.iterdir()) == ["0.x", "0.y"]
    np.testing.assert_array_equal(spilled.x, small.x)
    np.testing.assert_array_equal(spilled.y, small.y)
    fit, held = spilled.split(0.2)
    spilled.release()  # once folded: the split copies go, the file stays until the samples do
    assert not spilled.tables and folder.is_dir()
    del spilled, fit, held
    gc.collect()
    assert not folder.exists()


def test_streaming_capture_equals_the_exact_preactivations_and_outputs():
    model = ffn_model("erf_div")
    feeds = [random_feeds(model, 2, 8, seed=i) for i in range(3)]
    ffns, _ = find_ffns(model)
    ffn = ffns[0]
    (everything,) = capture_ffn_inputs(model, ffns, feeds, max_samples=10_000)
    z = everything.preactivations(ffn)
    x = np.concatenate([f["x"].reshape(-1, D) for f in feeds]).astype(np.float64)
    np.testing.assert_allclose(z, x @ ffn.w1 + ffn.b1, rtol=1e-6, atol=1e-5)

    def outputs(x):  # the FFN in numpy: what the model computes from x
        return reference.gelu(np.asarray(x, np.float64) @ ffn.w1 + ffn.b1, ffn.gelu.form) @ ffn.w2 + ffn.b2

    np.testing.assert_allclose(everything.y, outputs(x), rtol=1e-5, atol=1e-5)
    (kept,) = capture_ffn_inputs(model, ffns, feeds, max_samples=20)
    assert kept.x.shape == (20, D) and kept.y.shape == (20, D) and kept.seen == 48
    np.testing.assert_allclose(kept.y, outputs(kept.x), rtol=1e-5, atol=1e-5)  # each kept output its input's
    fit, held = kept.split(0.25)
    for part in (fit, held):
        np.testing.assert_allclose(part.y, outputs(part.x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("allocation", ["uniform", "layer", "global"])
@pytest.mark.parametrize("target", [0.5, 0.8])
def test_target_reduction_is_met_on_the_calibration_tokens(allocation, target):
    model = ffn_model("erf_div")
    config = TardisConfig(fallback="portable", target_reduction=target, allocation=allocation, calib_batches=16)
    result = optimize_model(model, config)
    (row,) = result.ffns
    # The budget is met exactly on the fit tokens; the report's bytes read are measured on held-out tokens.
    fit_reduction = 1 - (row.fold_bytes + row.outlier_fraction * row.dense_bytes) / row.dense_bytes
    assert target - 1e-9 <= fit_reduction <= target + 0.02
    assert abs(result.to_dict()["totals"]["fallback_reduction"] - target) < 0.05
    assert result.calibration["heldout_tokens_per_ffn"] == round(0.2 * 1024)


def test_per_neuron_allocation_costs_less_than_uniform_coverage():
    z = _samples(2, n=2000)[:, 5:]
    importance = np.random.default_rng(3).uniform(0.1, 10, z.shape[1])
    grid = (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
    table = budget.candidate_table(z, grid, "erf", "narrowest")
    (choice,) = budget.allocate([table], [importance], [0.1], [1.0], "layer")
    assert table.fraction[choice].mean() <= 0.1 + 1e-12
    uniform = grid.index(0.9)
    assert (table.sse[choice, np.arange(z.shape[1])] * importance).sum() <= (table.sse[uniform] * importance).sum()


def test_refit_lowers_the_in_sample_error_and_stays_a_true_rewrite():
    rows = {}
    for refit in (False, True):
        model = ffn_model("erf_div")
        config = TardisConfig(
            fallback="portable", coverage=0.8, window="least-error", refit=refit, holdout=0, calib_batches=16
        )
        result = optimize_model(model, config)
        rows[refit] = result.ffns[0].calibration_error
        assert result.ffns[0].recipe == "least-error/layer" + ("+refit" if refit else "")
        feeds = random_feeds(model, seed=99)
        assert np.isfinite(create_session(result.model).run(None, feeds)[0]).all()
    assert rows[True] < rows[False]


@pytest.mark.parametrize("batches", [1, 3, 16])
def test_the_recipe_kept_never_has_a_larger_heldout_error_than_the_plain_recipe(batches):
    errors = {}
    for preset in ("plain", "accurate"):
        recipe = {"window": "narrowest", "allocation": "uniform", "refit": False} if preset == "plain" else {}
        config = TardisConfig(fallback="portable", predictor="exact", calib_batches=batches, **recipe)
        (row,) = optimize_model(ffn_model("erf_div"), config).ffns
        errors[preset] = row.heldout_error
    assert errors["accurate"] <= errors["plain"] + 1e-12


def test_a_refit_that_overfits_few_tokens_is_rejected_on_the_heldout_tokens():
    """64 tokens for 17 unknowns per output: the unchecked refit fits the noise; the check keeps the fold."""
    config = dict(fallback="portable", predictor="exact", coverage=0.8, calib_batches=1, refit_ridge=0.0)
    (unchecked,) = optimize_model(ffn_model("erf_div"), TardisConfig(holdout=0, **config)).ffns
    result = optimize_model(ffn_model("erf_div"), TardisConfig(**config))
    (checked,) = result.ffns
    assert unchecked.recipe.endswith("+refit") and not checked.recipe.endswith("+refit")
    assert any("a trustworthy refit needs" in w for w in result.warnings)


def test_exact_fallback_still_exact_with_every_idea_on():
    original = ffn_model("erf_div")
    feeds = random_feeds(original, seed=5)
    want = create_session(original).run(None, feeds)[0]
    model = ffn_model("erf_div")
    config = TardisConfig(fallback="portable", coverage=0.0, window="least-error", allocation="uniform")
    got = create_session(optimize_model(model, config).model).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert H == 64


@pytest.mark.parametrize("holdout", [0.2, 0.0])  # 0: the refit is kept unchecked (its float32 path runs)
def test_a_large_ffn_is_fitted_in_float32_to_the_float64_result(monkeypatch, holdout):
    """An FFN past LARGE_FFN_BYTES is fitted in float32 (half the time of its products): the same recipe and
    predictor as in float64, its windows, fold and errors within float32's rounding."""
    results = {}
    for large in (False, True):
        if large:
            monkeypatch.setattr("tardis_onnx.passes.ffn.LARGE_FFN_BYTES", 0)
        model = ffn_model("erf_div")
        (ffn,), _ = find_ffns(model)
        assert ffn.large == large and ffn.w1.dtype == (np.float32 if large else np.float64)
        config = TardisConfig(fallback="portable", speed_check=False, calib_batches=16, holdout=holdout)
        results[large] = optimize_model(model, config)
    (full,), (single,) = results[False].ffns, results[True].ffns
    assert [results[k].calibration["reservoir_in_files"] for k in (False, True)] == [False, True]
    assert full.recipe == "least-error/layer" + ("+refit" if holdout == 0 else "")
    assert (single.recipe, single.predictor) == (full.recipe, full.predictor)
    assert single.calibration_error == pytest.approx(full.calibration_error, rel=1e-4)
    if holdout:
        assert single.heldout_error == pytest.approx(full.heldout_error, rel=1e-4)
    for field in ("lo", "hi", "slope", "intercept"):
        want, got = (getattr(results[k].lines[0], field) for k in (False, True))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    arrays = [
        {t.name: onnx.numpy_helper.to_array(t) for t in results[k].model.graph.initializer} for k in (False, True)
    ]
    (folded,) = [name for name in arrays[0] if name.endswith("folded_weight")]
    np.testing.assert_allclose(arrays[1][folded], arrays[0][folded], rtol=1e-4, atol=1e-5)
