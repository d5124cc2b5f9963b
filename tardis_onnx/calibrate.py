"""Calibrate: run the original model, capture each FFN's pre-activations, fit windows and lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from tardis_onnx import reference
from tardis_onnx.feeds import Feeds
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.session import create_session


@dataclass
class Calibration:
    """Per FFN: the fitted lines and the measured outlier fraction on the calibration tokens."""

    lines: reference.NeuronLines
    outlier_fraction: float
    tokens: int


class SampleReservoir:
    """A uniform random subsample of at most ``capacity`` rows from a stream (memory ``capacity × h``)."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.rows: np.ndarray | None = None
        self.keys = np.empty(0)
        self.seen = 0

    def add(self, rows: np.ndarray) -> None:
        self.seen += rows.shape[0]
        keys = self.rng.random(rows.shape[0])
        rows = rows.astype(np.float32)
        if self.rows is not None:
            rows = np.concatenate([self.rows, rows])
            keys = np.concatenate([self.keys, keys])
        keep = np.argsort(keys)[: self.capacity]
        self.rows, self.keys = rows[keep], keys[keep]

    def samples(self) -> np.ndarray:
        if self.rows is None:
            raise ValueError("no calibration samples were captured")
        return self.rows.astype(np.float64)


def capture_preactivations(
    model: onnx.ModelProto, ffns: list[FfnMatch], feeds: Iterable[Feeds], max_samples: int, seed: int = 0
) -> list[np.ndarray]:
    """Each FFN's pre-activations ``[tokens, h]`` (float64) over ``feeds``, padding tokens dropped."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    names = []
    for ffn in ffns:
        names.append(ffn.preactivation)
        if ffn.preactivation not in existing:
            elem = onnx.helper.np_dtype_to_tensor_dtype(ffn.preactivation_dtype)
            probe.graph.output.append(onnx.helper.make_tensor_value_info(ffn.preactivation, elem, None))
            existing.add(ffn.preactivation)
    session = create_session(probe)
    reservoirs = [SampleReservoir(max_samples, seed + i) for i in range(len(ffns))]
    for batch in feeds:
        outputs = session.run(names, batch)
        keep = _real_tokens(batch)
        for ffn, reservoir, value in zip(ffns, reservoirs, outputs, strict=True):
            rows = value.reshape(-1, ffn.hidden).astype(np.float64)
            if ffn.preactivation_bias is not None:
                rows = rows + ffn.preactivation_bias
            if keep is not None and keep.size == rows.shape[0]:
                rows = rows[keep]
            reservoir.add(rows)
    return [r.samples() for r in reservoirs]


def calibrate(preactivations: np.ndarray, coverage: float, form: str) -> Calibration:
    """Windows and lines at ``coverage`` for one FFN, and its measured outlier fraction."""
    lines = reference.calibrate_lines(preactivations, coverage, form)
    fraction = float(reference.outside_window(preactivations, lines).mean())
    return Calibration(lines, fraction, int(preactivations.shape[0]))


def _real_tokens(batch: Feeds) -> np.ndarray | None:
    """Flat boolean mask of non-padding tokens, from ``attention_mask`` when its shape allows."""
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    if mask is None or ids is None or mask.shape != ids.shape:
        return None
    return mask.reshape(-1).astype(bool)
