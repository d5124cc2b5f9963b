"""Emit: the folded MatMul and the outlier fallback that replace one FFN, and the graph surgery."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tardis_onnx import reference, runtime
from tardis_onnx.contract import DOMAIN, FALLBACK_INPUTS, FALLBACK_OP, FOLDED_MATMUL, ROW_SCALES_ROWS, ffn_prefix
from tardis_onnx.errors import TardisError
from tardis_onnx.io import ExternalDataWriter
from tardis_onnx.passes.ffn import FfnMatch
from tardis_onnx.predictor import (
    INT4_ACCURACY_LEVEL,
    INT4_BLOCK,
    ExactPredictor,
    Int4Predictor,
    Int8Predictor,
    LowRankPredictor,
    Predictor,
    quantize_int4,
    quantize_int8,
)
from tardis_onnx.quantize import quantize_rows
from tardis_onnx.subgraphs import Scope, prune, walk

MIN_OPSET = 13  # GreaterOrEqual/LessOrEqual (12), Where, MatMul on any rank


@dataclass
class Constants:
    """A rewrite's initializers before they are made, ``(name, values, dtype)`` each: converted and copied into
    tensors only for the rewrite that is kept (a 7B FFN's candidates hold ~0.7 GB each)."""

    pending: list[tuple[str, np.ndarray, np.dtype]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """The bytes the tensors will hold."""
        return sum(int(np.size(values)) * np.dtype(dtype).itemsize for _, values, dtype in self.pending)

    def tensors(self, writer: ExternalDataWriter | None = None) -> list[onnx.TensorProto]:
        """The tensors; with ``writer``, those it takes written to its external data as they are made."""
        made = []
        for name, values, dtype in self.pending:
            array = np.asarray(values).astype(dtype, copy=False)
            made.append(numpy_helper.from_array(array, name) if writer is None else writer.add_array(name, array))
        return made


class _Builder:
    """Collects nodes and (deferred) initializers under one name prefix."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.constants = Constants()

    def constant(self, name: str, array: np.ndarray, dtype: np.dtype | None = None) -> str:
        full = f"{self.prefix}/{name}"
        self.constants.pending.append((full, array, np.dtype(dtype or self.dtype)))
        return full

    def op(self, op_type: str, inputs: list[str], name: str, output: str | None = None, **attrs) -> str:
        out = output or f"{self.prefix}/{name}_output"
        domain = attrs.pop("domain", "")
        doc = attrs.pop("doc_string", None)
        node = helper.make_node(op_type, inputs, [out], name=f"{self.prefix}/{name}", domain=domain, **attrs)
        if doc:
            node.doc_string = doc
        self.nodes.append(node)
        return out


def emit_ffn(
    ffn: FfnMatch,
    lines: reference.NeuronLines,
    form: FallbackForm,
    opset: int,
    margin: float,
    coverage: float,
    predictor: Predictor | None = None,
    fold: tuple[np.ndarray, np.ndarray] | None = None,
    quantize: str = "none",
) -> tuple[list[onnx.NodeProto], Constants]:
    """Nodes and initializers (deferred: :meth:`Constants.tensors` makes them) computing ``ffn.output`` from
    ``ffn.x``: folded map + outlier fallback in ``form``.

    The fallback flags neuron ``i`` when the predictor's ``z_hat_i`` is outside its window and adds
    the exact residual ``GELU(z_i) − (a_i z_i + c_i)`` times ``W2[i, :]``. ``fold`` overrides the
    plain ``(Wf, bf)`` (the refit). ``quantize="int8"`` or ``"int4"``: the rewrite is composed with that
    quantization where the form can (:meth:`FallbackForm.quantized_in_op`); elsewhere the quantizer
    (:func:`tardis_onnx.quantize.quantize_model`) quantizes its MatMuls afterwards.
    """
    predictor = predictor or ExactPredictor()
    b = _Builder(ffn_prefix(ffn.name), ffn.dtype)
    wf, bf = fold if fold is not None else reference.fold(ffn.w1, ffn.b1, ffn.w2, ffn.b2, lines)
    d, h = ffn.w1_stored.shape
    d_out = ffn.w2_stored.shape[1]
    doc = (
        f"TARDIS fold of FFN '{ffn.name}': W1 [{d}x{h}] . diag(a) . W2 [{h}x{d_out}] -> one "
        f"[{d}x{d_out}] MatMul; GELU ({ffn.gelu.spelling}) replaced per neuron by a line fitted "
        f"at coverage {coverage:g}"
    )
    b1 = ffn.b1 if ffn.b1 is not None else np.zeros(h)
    quantized = quantize if form.quantized_in_op(ffn, quantize) else "none"
    form.emit(b, ffn, lines, predictor, wf=wf, bf=bf, b1=b1, doc=doc, margin=margin, opset=opset, quantized=quantized)
    return b.nodes, b.constants


class FallbackForm:
    """How the outlier fallback is written into the graph: one subclass per form, named on the command line
    (``--fallback``) and in the report by ``name``; adding a form is adding a class to ``FALLBACK_FORMS``."""

    name: ClassVar[str]
    standard_only: ClassVar[bool]  # standard ONNX ops only: predictors emit their portable form

    def missing(self) -> str | None:
        """Why this form cannot be emitted here (a one-line message), or None."""
        return None

    def domains(self, predictors: list[Predictor]) -> list[str]:
        """The domains, beyond the standard one, a model whose FFNs were folded with ``predictors`` declares."""
        return []

    def quantized_in_op(self, ffn: FfnMatch, quantize: str) -> bool:
        """Whether, under ``--quantize quantize``, this form emits ``ffn``'s rewrite quantized itself (the fold in
        int8 or int4, the fallback's rows in int8), rather than leaving its MatMuls to the quantizer."""
        return False

    def emit(
        self,
        b: _Builder,
        ffn: FfnMatch,
        lines: reference.NeuronLines,
        predictor: Predictor,
        *,
        wf: np.ndarray,
        bf: np.ndarray,
        b1: np.ndarray,
        doc: str,
        margin: float,
        opset: int,
        quantized: str = "none",
    ) -> None:
        """Through ``b``: the folded MatMul ``x·wf + bf`` (``doc`` its doc string) and the fallback writing
        ``ffn.output``; ``quantized``: "int8" or "int4" when emitted quantized (:meth:`quantized_in_op`)."""
        raise NotImplementedError


class CustomFallback(FallbackForm):
    """The ``ai.tardis::FfnFallback`` kernel (C++ CPU, CUDA): reads only the flagged neurons' rows."""

    name = "custom"
    standard_only = False

    def missing(self):
        if runtime.library_available():
            return None
        return "--fallback custom needs the ai.tardis library: build it with `make lib`"

    def domains(self, predictors):
        contrib = [p.contrib_domain for p in predictors if p.contrib_domain]
        return [DOMAIN, *dict.fromkeys(contrib)] if predictors else []

    def quantized_in_op(self, ffn, quantize):
        # ONNX Runtime's DynamicQuantizeMatMul computes in float32 only (and the int4 fold is kept alike).
        return quantize in ("int8", "int4") and np.dtype(ffn.dtype) == np.float32

    def emit(self, b, ffn, lines, predictor, *, wf, bf, b1, doc, margin, opset, quantized="none"):
        int8_rows = quantized != "none"
        w2 = "" if int8_rows else b.constant("w2", ffn.w2)  # int8 rows: made below
        # The flag test compares z_hat without b1 against windows shifted by −b1: one Add fewer.
        if int8_rows and not isinstance(predictor, LowRankPredictor):
            folded, z_hat = _folded_quantized(b, ffn, wf, bf, predictor, doc, quantized)
            fused_v = []
        elif isinstance(predictor, LowRankPredictor):
            # x·[Wf | U] in one MatMul: the folded output and the predictor's code, which the op reads
            # from the folded rows' last `rank` columns and multiplies by V itself.
            rank = predictor.rank
            folded = b.op(
                "MatMul",
                [ffn.x, b.constant("folded_weight_and_u", np.hstack([wf, predictor.u]))],
                FOLDED_MATMUL,
                doc_string=doc + f"; also the low-rank predictor's code x.U (rank {rank}) in the last columns",
            )
            folded = b.op(
                "Add", [folded, b.constant("folded_bias_and_zeros", np.concatenate([bf, np.zeros(rank)]))], "FoldedBias"
            )
            z_hat, fused_v = "", [b.constant("predictor_v", predictor.v)]
        else:
            folded = b.op("MatMul", [ffn.x, b.constant("folded_weight", wf)], FOLDED_MATMUL, doc_string=doc)
            folded = b.op("Add", [folded, b.constant("folded_bias", bf)], "FoldedBias")
            z_hat, fused_v = predictor.emit(b, ffn, self.standard_only), []
        shifted = reference.NeuronLines(lines.slope, lines.intercept, lines.lo - b1, lines.hi - b1)
        packed = b.constant("lines", reference.pack_lines(shifted), np.float32)
        # An accurate predictor stands for the pre-activation: no W1ᵀ, the residual is taken from z_hat.
        w1t = None if predictor.residual_from_prediction else np.ascontiguousarray(ffn.w1.T)
        given = {"x": ffn.x, "y_folded": folded, "z_hat": z_hat, "lines": packed, "row_scales": ""}
        if int8_rows:  # each with its scale
            (w2_rows, w2_scales), (w1t_rows, w1t_scales) = quantize_rows(ffn.w2), (None, np.ones(len(b1)))
            if w1t is not None:
                w1t_rows, w1t_scales = quantize_rows(w1t)
            given["w1t"] = "" if w1t_rows is None else b.constant("w1t_int8", w1t_rows, np.int8)
            w2 = b.constant("w2_int8", w2_rows, np.int8)
            scales = {"w1t": w1t_scales, "w2": w2_scales}
            given["row_scales"] = b.constant("row_scales", np.stack([scales[row] for row in ROW_SCALES_ROWS]))
        else:
            given["w1t"] = "" if w1t is None else b.constant("w1t", w1t)
        given.update(b1=b.constant("b1", b1), w2=w2, predictor_v=fused_v[0] if fused_v else "")
        inputs = [given[name] for name in FALLBACK_INPUTS]
        while inputs and not inputs[-1]:  # trailing optional inputs left out
            inputs.pop()
        approximate = "tanh" if ffn.gelu.form == "tanh" else "none"
        fallback_doc = "outlier fallback: adds GELU(z)-(a z+c) times W2 rows for neurons outside [lo, hi]"
        b.op(
            FALLBACK_OP,
            inputs,
            "FfnFallback",
            output=ffn.output,
            domain=DOMAIN,
            margin=float(margin),
            approximate=approximate,
            doc_string=fallback_doc,
        )


class PortableFallback(FallbackForm):
    """Standard ONNX ops only (runs in any ONNX Runtime and in ``onnx.reference``): every neuron's residual
    computed, the inliers' masked out."""

    name = "portable"
    standard_only = True

    def emit(self, b, ffn, lines, predictor, *, wf, bf, b1, doc, margin, opset, quantized="none"):
        w2 = b.constant("w2", ffn.w2)
        folded = b.op("MatMul", [ffn.x, b.constant("folded_weight", wf)], FOLDED_MATMUL, doc_string=doc)
        folded = b.op("Add", [folded, b.constant("folded_bias", bf)], "FoldedBias")
        b1_name = b.constant("b1", b1)
        z = b.op("MatMul", [ffn.x, b.constant("w1", ffn.w1)], "Fallback/PreActivationMatMul")
        z = b.op("Add", [z, b1_name], "Fallback/PreActivation")
        if not isinstance(predictor, ExactPredictor):
            z_hat = b.op("Add", [predictor.emit(b, ffn, self.standard_only), b1_name], "Predictor/Bias")
        else:
            z_hat = z
        inside = b.op(
            "And",
            [
                b.op("GreaterOrEqual", [z_hat, b.constant("lo", lines.lo - margin)], "Fallback/AboveLow"),
                b.op("LessOrEqual", [z_hat, b.constant("hi", lines.hi + margin)], "Fallback/BelowHigh"),
            ],
            "Fallback/InsideWindow",
        )
        gelu = _gelu(b, z, ffn.gelu.form, opset)
        line = b.op(
            "Add",
            [
                b.op("Mul", [z, b.constant("slope", lines.slope)], "Fallback/LineSlope"),
                b.constant("intercept", lines.intercept),
            ],
            "Fallback/Line",
        )
        residual = b.op("Sub", [gelu, line], "Fallback/Residual")
        outliers = b.op("Where", [inside, b.constant("zero", np.zeros(())), residual], "Fallback/OutliersOnly")
        correction = b.op("MatMul", [outliers, w2], "Fallback/Correction")
        b.op("Add", [folded, correction], "Output", output=ffn.output)


FALLBACK_FORMS: dict[str, FallbackForm] = {form.name: form for form in (PortableFallback(), CustomFallback())}


def fallback_form(choice: str) -> FallbackForm:
    """The form ``--fallback choice`` names; ``auto``: the custom op when its library is built."""
    if choice == "auto":
        return FALLBACK_FORMS["custom" if runtime.library_available() else "portable"]
    form = FALLBACK_FORMS[choice]
    problem = form.missing()
    if problem is not None:
        raise TardisError(problem)
    return form


def _folded_quantized(
    b: _Builder, ffn: FfnMatch, wf: np.ndarray, bf: np.ndarray, predictor: Predictor, doc: str, quantize: str
):
    """The folded map ``x·wf + bf`` as one quantized product, and the predictor's ``z_hat``: int8, a
    ``DynamicQuantizeMatMul`` (int8 weights with a scale per column, as the int8 predictor's:
    :func:`~tardis_onnx.predictor.quantize_int8`); int4, a ``MatMulNBits`` (4-bit blocks of 32, as the int4
    predictor's: :func:`~tardis_onnx.predictor.quantize_int4`). The predictor of the same kind shares that node:
    ``x·[Wf | W1]`` in one product (one rounding of x, one pass), split after."""
    d, d_out = wf.shape
    if quantize == "int8":
        weights, scales = quantize_int8(wf)
        share = isinstance(predictor, Int8Predictor)
        if share:
            weights, scales = np.hstack([weights, predictor.weights]), np.concatenate([scales, predictor.scales])
        h = predictor.scales.size if share else 0
        # A, B, B's scales, B's zero point (none: symmetric), bias
        inputs = [ffn.x, b.constant("folded_weight_int8", weights, np.int8), b.constant("folded_scales", scales), ""]
        op, attributes = "DynamicQuantizeMatMul", {}
    else:
        weights, scales = quantize_int4(wf)
        share = isinstance(predictor, Int4Predictor)
        if share:
            weights = np.concatenate([weights, predictor.packed])
            scales = np.concatenate([scales, predictor.scales])
        h = predictor.packed.shape[0] if share else 0
        # A, B, scales, zero points (none: the default 8), g_idx (none), bias
        inputs = [ffn.x, b.constant("folded_weight_int4", weights, np.uint8), b.constant("folded_scales", scales)]
        inputs += ["", ""]
        op = "MatMulNBits"
        attributes = {"K": d, "N": d_out + h, "bits": 4, "block_size": INT4_BLOCK}
        attributes["accuracy_level"] = INT4_ACCURACY_LEVEL
    inputs.append(b.constant("folded_bias", np.concatenate([bf, np.zeros(h)])))
    extra = f"; also the {predictor.kind} predictor's x.W1 in the last columns" if share else ""
    domain = "com.microsoft"
    product = b.op(op, inputs, FOLDED_MATMUL, domain=domain, doc_string=doc + extra, **attributes)
    if not share:
        return product, predictor.emit(b, ffn, False)
    folded, z_hat = f"{b.prefix}/FoldedOutput", f"{b.prefix}/Predictor/Output"
    sizes = b.constant("split_sizes", np.array([d_out, h]), np.int64)
    b.nodes.append(helper.make_node("Split", [product, sizes], [folded, z_hat], name=f"{b.prefix}/Split", axis=-1))
    return folded, z_hat


def _gelu(b: _Builder, z: str, form: str, opset: int) -> str:
    """GELU of ``z`` in standard ops: the ``Gelu`` op from opset 20, else its decomposition."""
    if opset >= 20:
        return b.op("Gelu", [z], "Fallback/Gelu", approximate="tanh" if form == "tanh" else "none")
    if form == "erf":
        inner = b.op("Mul", [z, b.constant("inv_sqrt2", np.array(1 / math.sqrt(2)))], "Fallback/GeluScale")
        cdf = b.op("Erf", [inner], "Fallback/GeluErf")
    else:
        cube = b.op("Mul", [b.op("Mul", [z, z], "Fallback/GeluSquare"), z], "Fallback/GeluCube")
        cubic = b.op(
            "Add",
            [z, b.op("Mul", [cube, b.constant("k", np.array(0.044715))], "Fallback/GeluCubic")],
            "Fallback/GeluPoly",
        )
        inner = b.op(
            "Mul", [cubic, b.constant("sqrt_2_over_pi", np.array(math.sqrt(2 / math.pi)))], "Fallback/GeluScale"
        )
        cdf = b.op("Tanh", [inner], "Fallback/GeluTanh")
    one_plus = b.op("Add", [cdf, b.constant("one", np.array(1.0))], "Fallback/GeluOnePlus")
    half_z = b.op("Mul", [z, b.constant("half", np.array(0.5))], "Fallback/GeluHalf")
    return b.op("Mul", [half_z, one_plus], "Fallback/Gelu")


def replace_nodes(
    model: onnx.ModelProto, replacements: list[tuple[list[onnx.NodeProto], list[onnx.NodeProto], list]]
) -> None:
    """In place: for each ``(old nodes, new nodes, new initializers)`` put the new nodes where the
    first old node stood (in the main graph or the If/Loop/Scan subgraph holding it), the initializers
    in the main graph, then drop nodes and initializers nothing uses any more."""
    owner = {id(n): (scope, g) for scope, g in walk(model.graph) for n in g.node}
    by_graph: dict[int, tuple[Scope, onnx.GraphProto, list]] = {}
    for replacement in replacements:
        scope, graph = owner[id(replacement[0][0])]
        by_graph.setdefault(id(graph), (scope, graph, []))[2].append(replacement)
    # Innermost first: rebuilding a graph's node list copies its nodes, subgraphs included.
    for scope, graph, items in sorted(by_graph.values(), key=lambda entry: -len(entry[0])):
        _replace_in(graph, items)
        if scope:
            _prune(graph)
    for _, _, initializers in replacements:
        model.graph.initializer.extend(initializers)
    remove_unused(model)


def _replace_in(graph: onnx.GraphProto, replacements: list) -> None:
    removed = {id(n) for old, _, _ in replacements for n in old}
    insert_at = {id(min(old, key=lambda n: _position(graph, n))): new for old, new, _ in replacements}
    nodes = []
    for node in graph.node:
        if id(node) in insert_at:
            nodes.extend(insert_at[id(node)])
        if id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _position(graph: onnx.GraphProto, node: onnx.NodeProto) -> int:
    for i, candidate in enumerate(graph.node):
        if candidate is node:
            return i
    raise ValueError("node not in graph")


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then unread initializers (subgraph reads count)."""
    _prune(model.graph)


def _prune(graph: onnx.GraphProto) -> None:
    prune(graph, [o.name for o in graph.output])
