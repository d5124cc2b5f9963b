"""Finish, the pass's last step: the rewrites put into the graph, the domains they use declared, the model
quantized when asked (``--quantize int8|int4``), what was done recorded in the metadata, and the new tensors'
shapes annotated (:func:`tardis_onnx.schema.annotate_shapes`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import onnx

from tardis_onnx import __version__
from tardis_onnx.config import TardisConfig
from tardis_onnx.contract import METADATA_CONFIG, METADATA_FFNS, METADATA_VERSION
from tardis_onnx.emit import FallbackForm, replace_nodes
from tardis_onnx.io import ExternalDataWriter, save_whole
from tardis_onnx.predictor import Predictor
from tardis_onnx.quantize import quantize_model
from tardis_onnx.report import FfnReport
from tardis_onnx.schema import annotate_shapes


def finish(
    model: onnx.ModelProto,
    replacements: list,
    rows: list[FfnReport],
    predictors: list[Predictor],
    form: FallbackForm,
    config: TardisConfig,
    weights_dir: Path | None = None,
    weights: ExternalDataWriter | None = None,
) -> None:
    """In place: ``replacements`` (:meth:`FfnMatch.rewrite`) made; ``rows`` and ``predictors``: per FFN, its
    report row and predictor (the FFNs kept as they were included). A model read graph-only (``weights_dir``, its
    new tensors in ``weights``) is written whole to a temporary file for the quantizer, which reads it from there."""
    replace_nodes(model, replacements)
    folded_predictors = [p for p, r in zip(predictors, rows, strict=True) if not r.kept_original]
    for domain in form.domains(folded_predictors):
        if not any(o.domain == domain for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    if config.quantize != "none":
        if weights_dir is None and weights is None:
            model.CopyFrom(quantize_model(model, config.quantize))
        else:  # the quantizer reads a whole model from a file (once: a copy in memory costs the model's size again)
            folder = weights.path.parent if weights is not None else None  # beside the output's staged data
            with tempfile.TemporaryDirectory(prefix="tardis-quantize-", dir=folder) as temporary:
                whole = Path(temporary) / "model.onnx"
                save_whole(model, whole, weights_dir, weights)
                model.CopyFrom(quantize_model(whole, config.quantize))
            if weights is not None:
                weights.restart()  # the quantized model is written afresh
    _set_metadata(model, config, form.name, rows)
    annotate_shapes(model)


def _set_metadata(model: onnx.ModelProto, config: TardisConfig, fallback: str, rows: list[FfnReport]) -> None:
    settings = json.dumps({**config.to_dict(), "fallback": fallback}, sort_keys=True)
    ffns = json.dumps(
        [
            {"name": r.name, "gelu": r.gelu, "d": r.d, "hidden": r.hidden, "coverage": r.coverage}
            | {"predictor": r.predictor, "kept": r.kept_original}
            for r in rows
        ]
    )
    for key, value in ((METADATA_VERSION, __version__), (METADATA_CONFIG, settings), (METADATA_FFNS, ffns)):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
