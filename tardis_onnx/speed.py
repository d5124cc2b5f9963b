"""Never slower: time each FFN's rewrite against the original FFN in ONNX Runtime at the serving shapes.

A rewrite pays only where ONNX Runtime runs it faster than the FFN it replaces, and that depends on
the machine, the shapes served and how many neurons the calibration inputs flag. So, per FFN, two
one-FFN models (the original ``GELU(x·W1 + b1)·W2 + b2`` and the emitted replacement, with the same
weights) are run in turn on real calibration inputs laid out as each serving shape ``batch×sequence``
(warm-up first, sessions alternated, medians; worker threads sleep between runs so that neither
session's spinning workers take the other's cores). The pass keeps the original FFN wherever the
rewrite is slower at any shape, and the report says so.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tardis_onnx import runtime
from tardis_onnx.errors import TardisError, first_line, is_onnxruntime_error
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.quantize import quantize_model

# Timing per (FFN, shape): at least MIN_RUNS runs of each model, more (up to MAX_RUNS) while under BUDGET_S
# seconds in all: small shapes get hundreds of runs, so their medians hold to a few percent. A shape whose
# warm-up alone passes BUDGET_S gets SLOW_RUNS.
WARMUP_RUNS = 2
MIN_RUNS = 5
SLOW_RUNS = 2
MAX_RUNS = 400
BUDGET_S = 0.6
# Distinct inputs per shape, rotated so that the flagged neurons change from run to run.
INPUTS_PER_SHAPE = 4
# A shape whose dense FFN takes more multiply-adds than this per run (about 0.3 s here) is timed on as many
# of its sequences as stay under it (at least one): a Falcon-7B-shaped FFN's full 32x128 run takes 4-8 s.
# The slice's speedup is not the whole shape's (there, at 384 or 1,536 tokens against 4,096: int8 predictor
# 1.98x / 2.00x against 1.80x / 1.86x, int4 1.02x against 1.17x), so it decides alone only outside
# [1 / SLICE_DECIDES, SLICE_DECIDES]; within, the whole shape is timed.
TIMED_MULTIPLY_ADDS = 1 << 36
SLICE_DECIDES = 1.25
OPSET = 20  # the timing models' standard opset (Gelu is an op from 20)
# An FFN whose rewrite is built like one already timed (weights of the same shapes and dtype, the same nodes,
# the same serving shapes: the 32 layers of a 7B model) takes that timing's verdict where it holds, as
# TensorRT's timing cache does. A rewrite's time grows with the flagged rows it reads, at most in proportion.
# So a win by CLEAR_MARGIN at every shape holds for flag rates up to ``speedup / CLEAR_MARGIN`` times the timed
# one's; a loss holds for flag rates at least the timed one's (taking a loss wrongly never makes a model
# slower: the next candidate must pay on its own). A closer win is timed again.
CLEAR_MARGIN = 1.25


class RewriteFailed(RuntimeError):
    """ONNX Runtime runs the original FFN but not its rewrite (the rewrite is then not used)."""


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x1,1x32,32x128"`` → ``((1, 1), (1, 32), (32, 128))``; ``"none"`` → ``()`` (no check)."""
    if text.strip().lower() == "none":
        return ()
    shapes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", part)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise TardisError(f"serving shape '{part.strip()}' is not BATCHxSEQUENCE with both >= 1 (e.g. 1x32)")
        shapes.append((int(match[1]), int(match[2])))
    return tuple(dict.fromkeys(shapes))


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def timed_shape(shape: tuple[int, int], multiply_adds_per_token: int) -> tuple[int, int]:
    """The part of serving shape ``(batch, sequence)`` that is timed: its first sequences, as many as keep a
    dense run under ``TIMED_MULTIPLY_ADDS`` (at least one)."""
    batch, sequence = shape
    fits = TIMED_MULTIPLY_ADDS // max(multiply_adds_per_token * sequence, 1)
    return (max(1, min(batch, fits)), sequence)


@dataclass
class SpeedCheck:
    """One FFN's timings: per serving shape, the original's and the rewrite's median seconds (shapes after
    the first where the rewrite is slower are not timed: ``skipped`` of them)."""

    dense_s: dict[str, float]
    rewritten_s: dict[str, float]
    skipped: int = 0

    @property
    def speedups(self) -> dict[str, float]:
        return {k: self.dense_s[k] / self.rewritten_s[k] for k in self.dense_s}

    @property
    def pays(self) -> bool:
        """True when the rewrite is at least as fast as the original at every shape."""
        return not self.skipped and all(s >= 1.0 for s in self.speedups.values())


@dataclass
class TimedRewrite:
    """One FFN's timing, kept for its twins: the FFN's name, its rewrite's flag rate and the check."""

    ffn: str
    flagged: float
    check: SpeedCheck


class TimingCache:
    """The never-slower checks of one ``optimize`` run, looked up by what decides a rewrite's speed
    (:func:`timing_key`); a loss or a clear win is reused (``CLEAR_MARGIN``), a closer win timed again."""

    def __init__(self) -> None:
        self._timed: dict[tuple, list[TimedRewrite]] = {}

    def lookup(self, key: tuple, flagged: float) -> TimedRewrite | None:
        """A timing whose verdict holds for a twin rewrite flagging ``flagged`` of its neurons, or None."""
        for timed in self._timed.get(key, ()):
            slowest = min(timed.check.speedups.values())
            if timed.check.pays and slowest >= CLEAR_MARGIN and flagged * CLEAR_MARGIN <= timed.flagged * slowest:
                return timed
            if not timed.check.pays and flagged >= timed.flagged:
                return timed
        return None

    def add(self, key: tuple, timed: TimedRewrite) -> None:
        self._timed.setdefault(key, []).append(timed)


def timing_key(
    ffn: FfnMatch, predictor: str, nodes: list[onnx.NodeProto], shapes: Sequence[tuple[int, int]], quantize: str
) -> tuple:
    """What two rewrites must share for one's timing to stand for the other's (flag rate aside)."""
    return (
        ffn.w1_stored.shape,
        ffn.w2_stored.shape,
        np.dtype(ffn.dtype).str,
        ffn.b1 is None,
        ffn.b2 is None,
        ffn.gelu.form,
        predictor,
        tuple((n.domain, n.op_type) for n in nodes),
        tuple(shapes),
        quantize,
    )


def _io(name: str, dtype: np.dtype, d: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", "seq", d])


def _model(nodes, initializers, ffn: FfnMatch, d_out: int, domains: dict[str, int]) -> bytes:
    inputs, outputs = [_io(ffn.x, ffn.dtype, ffn.w1_stored.shape[0])], [_io(ffn.output, ffn.dtype, d_out)]
    graph = helper.make_graph(nodes, ffn.name, inputs, outputs, initializers)
    opsets = [helper.make_opsetid(domain, version) for domain, version in {"": OPSET, **domains}.items()]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def dense_ffn_model(ffn: FfnMatch) -> bytes:
    """The original FFN alone, as ONNX Runtime runs it: MatMul, bias, Gelu, MatMul, bias."""
    cast = np.dtype(ffn.dtype)

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value).astype(cast), f"{ffn.name}/{name}")

    h, d_out = ffn.w2_stored.shape
    b1 = ffn.b1 if ffn.b1 is not None else np.zeros(h)
    b2 = ffn.b2 if ffn.b2 is not None else np.zeros(d_out)
    inits = [const("w1", ffn.w1), const("b1", b1), const("w2", ffn.w2), const("b2", b2)]
    p = ffn.name
    approximate = "tanh" if ffn.gelu.form == "tanh" else "none"
    nodes = [
        helper.make_node("MatMul", [ffn.x, f"{p}/w1"], [f"{p}/z0"]),
        helper.make_node("Add", [f"{p}/z0", f"{p}/b1"], [f"{p}/z"]),
        helper.make_node("Gelu", [f"{p}/z"], [f"{p}/g"], approximate=approximate),
        helper.make_node("MatMul", [f"{p}/g", f"{p}/w2"], [f"{p}/y0"]),
        helper.make_node("Add", [f"{p}/y0", f"{p}/b2"], [ffn.output]),
    ]
    return _model(nodes, inits, ffn, d_out, {})


def rewritten_ffn_model(ffn: FfnMatch, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> bytes:
    """The emitted replacement of ``ffn`` alone (it reads only ``ffn.x`` and its own initializers)."""
    domains = {n.domain: 1 for n in nodes if n.domain not in ("", "ai.onnx")}
    return _model(nodes, initializers, ffn, ffn.w2_stored.shape[1], domains)


def serving_inputs(x: np.ndarray, shape: tuple[int, int], dtype: np.dtype, seed: int = 0) -> list[np.ndarray]:
    """``INPUTS_PER_SHAPE`` inputs ``[batch, sequence, d]`` made of calibration rows ``x`` (drawn at random,
    repeated when there are fewer rows than tokens)."""
    rng = np.random.default_rng(seed)
    tokens = shape[0] * shape[1]
    out = []
    for _ in range(INPUTS_PER_SHAPE):
        rows = rng.integers(0, x.shape[0], tokens)
        out.append(np.ascontiguousarray(x[rows].reshape(shape[0], shape[1], x.shape[1]), dtype=dtype))
    return out


def _session(model: bytes):
    import onnxruntime as ort

    options = runtime.session_options(custom_ops=runtime.library_available())
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def measure_pair(
    dense: bytes, rewritten: bytes, inputs_per_shape: Sequence[Sequence[np.ndarray]]
) -> list[tuple[float, float]]:
    """Per shape, median seconds per run of the two one-FFN models on that shape's inputs (rotated), runs
    alternated, until the first shape where the rewrite is slower; one session per model serves every shape
    (creating one prepacks the weights)."""
    sessions = [_session(dense)]
    try:
        sessions.append(_session(rewritten))
        sessions[1].run(None, {sessions[1].get_inputs()[0].name: inputs_per_shape[0][0]})
    except Exception as exc:
        if not (is_onnxruntime_error(exc) or isinstance(exc, RuntimeError)):
            raise
        raise RewriteFailed(first_line(exc)) from None
    names = [s.get_inputs()[0].name for s in sessions]
    medians = []
    for inputs in inputs_per_shape:
        times: list[list[float]] = [[], []]
        started = time.perf_counter()
        for _ in range(WARMUP_RUNS):
            for k, (session, name) in enumerate(zip(sessions, names, strict=True)):
                t0 = time.perf_counter()
                session.run(None, {name: inputs[0]})
                times[k].append(time.perf_counter() - t0)
            # A shape whose runs take seconds (a 7B FFN over thousands of tokens) is steady from run to
            # run: its warm-up run counts, and SLOW_RUNS in all.
            slow = time.perf_counter() - started > BUDGET_S
            if slow:
                break
        if not slow:
            times = [[], []]
        started = time.perf_counter()
        for r in range(MAX_RUNS):
            done = len(times[0])
            if done >= (SLOW_RUNS if slow else MIN_RUNS) and time.perf_counter() - started > BUDGET_S:
                break
            x = inputs[r % len(inputs)]
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for k in order:
                t0 = time.perf_counter()
                sessions[k].run(None, {names[k]: x})
                times[k].append(time.perf_counter() - t0)
        medians.append((statistics.median(times[0]), statistics.median(times[1])))
        if medians[-1][1] > medians[-1][0]:  # slower here: the rewrite cannot pay, the larger shapes can wait
            break
    return medians


def check_ffn(
    ffn: FfnMatch,
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    x: np.ndarray,
    shapes: Sequence[tuple[int, int]],
    measure: Callable[[bytes, bytes, Sequence[Sequence[np.ndarray]]], list[tuple[float, float]]] | None = None,
    quantize: str = "none",
) -> SpeedCheck:
    """Times ``ffn`` against its replacement (``nodes``, ``initializers``) at every shape (:func:`timed_shape`
    of it), fewest tokens first and up to the first where the rewrite is slower, on calibration rows ``x``; with
    ``quantize="int8"`` or ``"int4"`` both run as that quantizer leaves them."""
    measure = measure or measure_pair
    dense, rewritten = dense_ffn_model(ffn), rewritten_ffn_model(ffn, nodes, initializers)
    if quantize != "none":
        dense, rewritten = (
            quantize_model(onnx.load_from_string(m), quantize).SerializeToString() for m in (dense, rewritten)
        )
    shapes = sorted(shapes, key=lambda shape: shape[0] * shape[1])
    timed = [timed_shape(shape, ffn.w1_stored.size + ffn.w2_stored.size) for shape in shapes]
    times = measure(dense, rewritten, [serving_inputs(x, shape, ffn.dtype) for shape in timed])
    if not times or len(times) > len(shapes):
        raise TardisError(f"timing {ffn.name} gave {len(times)} results for {len(shapes)} shapes")
    for k, (dense_s, rewritten_s) in enumerate(times):
        if timed[k] != shapes[k] and 1 / SLICE_DECIDES < dense_s / max(rewritten_s, 1e-300) < SLICE_DECIDES:
            times[k] = measure(dense, rewritten, [serving_inputs(x, shapes[k], ffn.dtype)])[0]
    check = SpeedCheck({}, {}, skipped=len(shapes) - len(times))
    for shape, (dense_s, rewritten_s) in zip(shapes[: len(times)], times, strict=True):
        if not (math.isfinite(dense_s) and math.isfinite(rewritten_s) and min(dense_s, rewritten_s) > 0):
            raise TardisError(f"timing {ffn.name} at {shape_name(shape)} gave no usable time")
        check.dense_s[shape_name(shape)] = dense_s
        check.rewritten_s[shape_name(shape)] = rewritten_s
    return check
