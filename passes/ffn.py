"""Find the non-gated GELU feed-forward networks of a graph.

An FFN is ``[Reshape] → MatMul|Gemm(x, W1) → [Add b1] → [Reshape|Cast] → GELU →
[Reshape|Cast] → MatMul|Gemm(·, W2) → [Add b2]`` with constant, unshared weights
and no intermediate value used outside it. Every GELU that is not such an FFN,
and every ReLU/SiLU between two projections, is reported with the reason.

The rule has the shape of a rewrite rule (onnxscript's, ORT's fusions): :func:`match_ffn` walks the pattern
from a GELU (:mod:`tardis_onnx.passes.gelu`), :func:`check_ffn` says why a complete match cannot fold (or
nothing), and :meth:`FfnMatch.rewrite` puts the emitted nodes in place of the matched ones.

The main graph and every If/Loop/Scan subgraph are searched; weights may be initializers of an enclosing
graph. An FFN whose weights several subgraphs read (Optimum's merged decoder: both branches of one ``If``)
is one match, with the other occurrences as its ``copies``: calibrated on the tokens of all, folded once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.graph import GraphIndex, attribute, node_label
from tardis_onnx.io import release
from tardis_onnx.passes.gelu import GeluMatch, anchors, match_gelu
from tardis_onnx.subgraphs import Scope, subgraphs

# Nodes allowed between a projection and the GELU: layout-only or dtype-only.
_PASSTHROUGH = {"Reshape", "Cast", "Identity"}
_OTHER_ACTIVATIONS = {"Relu": "ReLU", "Sigmoid": "SiLU/Swish", "LeakyRelu": "LeakyReLU", "Softplus": "Softplus"}
# An FFN whose two weights take more than this in float64 is large: fitted one at a time (its BLAS calls use
# every core) and in float32 (half the time and memory of its n·d·h products; their ~1e-6 relative error is
# far below what the fit measures: held-out errors of ~1e-1, windows at calibration quantiles).
LARGE_FFN_BYTES = 256 << 20


@dataclass
class FfnMatch:
    """One foldable FFN: ``output = GELU(x·W1 + b1)·W2 + b2``.

    The projections are kept as the model stores them (``w1_stored``, ``w2_stored``: fp16 stays fp16,
    memory-mapped for a model read graph-only) and read in the fit's precision (float64; float32 for a
    :attr:`large` FFN) through ``w1``/``w2``, a copy made on first use and dropped by :meth:`release`: the
    pass releases each FFN once it is done with it, so only the FFNs being fitted are held in that precision
    (all of a 7B model's would be 8 bytes per weight).
    """

    name: str
    gelu: GeluMatch
    x: str
    output: str
    w1_stored: np.ndarray  # [d, h]
    b1: np.ndarray | None  # [h], float64
    w2_stored: np.ndarray  # [h, d_out]
    b2: np.ndarray | None  # [d_out], float64
    dtype: np.dtype  # the model's compute dtype for this FFN
    nodes: list[onnx.NodeProto]
    shape_readers: list[onnx.NodeProto]  # Shape nodes of removed values, rewired to ``shape_source``
    shape_source: str | None
    scope: Scope = ()  # the subgraph holding the nodes (subgraphs.Scope; () is the main graph)
    copies: list[FfnMatch] = field(default_factory=list)  # the same FFN (same weights) in other subgraphs
    _w1: np.ndarray | None = field(default=None, repr=False, compare=False)
    _w2: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def sites(self) -> list[FfnMatch]:
        """This occurrence and its copies: where the FFN is computed."""
        return [self, *self.copies]

    @property
    def large(self) -> bool:
        """Its two weights take more than ``LARGE_FFN_BYTES`` in float64."""
        return 8 * (self.w1_stored.size + self.w2_stored.size) > LARGE_FFN_BYTES

    @property
    def precision(self) -> np.dtype:
        """The dtype it is fitted in: float64, float32 when :attr:`large`."""
        return np.dtype(np.float32 if self.large else np.float64)

    @property
    def w1(self) -> np.ndarray:
        """W1 ``[d, h]`` in :attr:`precision` (kept until :meth:`release`)."""
        if self._w1 is None:
            self._w1 = np.asarray(self.w1_stored, dtype=self.precision)
        return self._w1

    @property
    def w2(self) -> np.ndarray:
        """W2 ``[h, d_out]`` in :attr:`precision` (kept until :meth:`release`)."""
        if self._w2 is None:
            self._w2 = np.asarray(self.w2_stored, dtype=self.precision)
        return self._w2

    def times_w2(self, a: np.ndarray) -> np.ndarray:
        """``a·W2`` in :attr:`precision` (a float64 ``a`` against a large FFN's float32 W2 would convert W2 each
        time)."""
        return np.asarray(a, dtype=self.precision) @ self.w2

    @property
    def hidden(self) -> int:
        return int(self.w1_stored.shape[1])

    def release(self) -> None:
        """Drop the float64 copies and the memory-mapped pages of the weights (read again if used again)."""
        self._w1 = self._w2 = None
        release(self.w1_stored)
        release(self.w2_stored)

    def rewrite(
        self, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]
    ) -> list[tuple[list[onnx.NodeProto], list[onnx.NodeProto], list[onnx.TensorProto]]]:
        """The rewrite of this FFN: ``nodes`` (computing ``output`` from ``x``) in place of each site's nodes, as
        :func:`tardis_onnx.emit.replace_nodes` takes them (``initializers`` once); the Shape readers of removed
        values are rewired to ``shape_source`` now."""
        replacements = []
        for site in self.sites:
            site_nodes = nodes if site is self else _renamed(nodes, {self.x: site.x, self.output: site.output})
            replacements.append((site.nodes, site_nodes, initializers if site is self else []))
            for reader in site.shape_readers:
                reader.input[0] = site.shape_source
        return replacements


@dataclass
class Refusal:
    """A candidate that is left unchanged, with the reason (stable ``rule`` name + message)."""

    name: str
    rule: str
    reason: str
    nodes: list[str] = field(default_factory=list)  # the best partial match: GELU region first, then the FFN nodes


class _Refuse(Exception):
    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


def _renamed(nodes: list[onnx.NodeProto], names: dict[str, str]) -> list[onnx.NodeProto]:
    """Copies of ``nodes`` reading and writing ``names``' values instead (another site of the same FFN)."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for values in (copy.input, copy.output):
            values[:] = [names.get(v, v) for v in values]
        copies.append(copy)
    return copies


def find_ffns(model: onnx.ModelProto, weights_dir: Path | None = None) -> tuple[list[FfnMatch], list[Refusal]]:
    """Every foldable FFN of the model (main graph first, then its subgraphs depth first), and every refused
    candidate with its reason. ``weights_dir``: where a model read graph-only keeps its external data
    (weights are memory-mapped from there)."""
    matches: list[FfnMatch] = []
    refusals: list[Refusal] = []
    indexes = list(scope_indexes(model.graph, weights_dir=weights_dir))
    for scope, index in indexes:
        found, refused = _find_in(index, scope)
        matches += found
        refusals += refused
    if len(indexes) > 1:
        matches = _merge_copies(matches, dict(indexes), refusals)
    _make_unique(matches, _names_in(model.graph))
    for match in matches:
        for copy in match.copies:
            copy.name = match.name
    return matches, refusals


def scope_indexes(
    graph: onnx.GraphProto, parent: GraphIndex | None = None, scope: Scope = (), weights_dir: Path | None = None
) -> list[tuple[Scope, GraphIndex]]:
    """An index of ``graph`` and of each If/Loop/Scan subgraph in it (depth first), each with its scope."""
    index = GraphIndex(graph, parent, weights_dir)
    found = [(scope, index)]
    for position, name, sub in subgraphs(graph):
        found += scope_indexes(sub, index, (*scope, (position, name)))
    return found


def _find_in(index: GraphIndex, scope: Scope) -> tuple[list[FfnMatch], list[Refusal]]:
    """The FFNs and refusals of one graph."""
    matches: list[FfnMatch] = []
    refusals: list[Refusal] = []
    claimed: set[int] = set()
    for anchor in anchors(index):
        if id(anchor) in claimed:
            continue
        gelu = match_gelu(index, anchor)
        if isinstance(gelu, str):
            if _between_projections(index, anchor):
                refusals.append(Refusal(anchor.name or anchor.op_type, "not-gelu", gelu, [node_label(anchor)]))
            continue
        claimed.update(id(n) for n in gelu.nodes)
        matched: list[onnx.NodeProto] = []
        try:
            match = match_ffn(index, gelu, matched, scope)
            problem = check_ffn(index, match)
        except _Refuse as refusal:
            problem = refusal.rule, refusal.reason
        if problem is None:
            matches.append(match)
        else:
            labels = [node_label(n) for n in matched]
            refusals.append(Refusal(_name_of(gelu.nodes[0].name), *problem, labels))
    for node in index.graph.node:
        kind = _OTHER_ACTIVATIONS.get(node.op_type)
        if kind and _between_projections(index, node):
            reason = f"{kind} activation, not GELU: TARDIS folds GELU FFNs only"
            if node.op_type == "Sigmoid":
                reason = "gated FFN (SiLU/SwiGLU): the product of two projections does not fold into one matrix"
            refusals.append(Refusal(_name_of(node.name), "not-gelu", reason, [node_label(node)]))
    return matches, refusals


def _merge_copies(matches: list[FfnMatch], indexes: dict[Scope, GraphIndex], refusals: list[Refusal]) -> list[FfnMatch]:
    """One match per FFN: matches in different subgraphs that read the same weights become copies of the
    first. Refused (``shared-weight``): a weight of an enclosing graph that something else reads too, and
    copies that differ (bias, GELU form)."""
    groups: dict[tuple, list[FfnMatch]] = {}
    chains: dict[int, list[tuple[GraphIndex, str, onnx.NodeProto]]] = {}
    for match in matches:
        index = indexes[match.scope]
        first, second = [n for n in match.nodes[len(match.gelu.nodes) :] if n.op_type in ("MatMul", "Gemm")][:2]
        w1, w2 = _weight_chain(index, first), _weight_chain(index, second)
        chains[id(match)] = w1 + w2
        key = tuple((id(chain[-1][0]), chain[-1][1]) for chain in (w1, w2))
        groups.setdefault(key, []).append(match)
    merged = []
    for group in groups.values():
        problem = _sharing_problem(group, chains, indexes)
        if problem is None:
            group[0].copies = group[1:]
            merged.append(group[0])
            continue
        for match in group:
            refusals.append(Refusal(match.name, "shared-weight", problem, [node_label(n) for n in match.nodes]))
    return merged


def _weight_chain(index: GraphIndex, user: onnx.NodeProto) -> list[tuple[GraphIndex, str, onnx.NodeProto]]:
    """The weight projection ``user`` reads, up its constant chain (Transpose, Cast, ...) through the
    enclosing graphs: ``(index of the graph defining the value, value, the node reading it)``, root last."""
    chain, value = [], user.input[1]
    while True:
        owner = index
        while owner is not None and not _defines(owner, value):
            owner = owner.parent
        if owner is None:
            return chain
        chain.append((owner, value, user))
        producer = owner.producer.get(value)
        if producer is None or producer.op_type == "Constant" or not producer.input:
            return chain
        index, user, value = owner, producer, producer.input[0]


def _defines(index: GraphIndex, value: str) -> bool:
    return value in index.producer or value in index.initializers or value in index.graph_inputs


def _sharing_problem(group: list[FfnMatch], chains: dict, indexes: dict[Scope, GraphIndex]) -> str | None:
    """Why the matches of ``group`` (reading the same weights) cannot fold as one FFN, or None."""
    allowed: dict[tuple[int, str], set[int]] = {}
    outer: dict[tuple[int, str], tuple[GraphIndex, str]] = {}
    for match in group:
        for owner, value, user in chains[id(match)]:
            if owner is not indexes[match.scope]:
                allowed.setdefault((id(owner), value), set()).add(id(user))
                outer[(id(owner), value)] = (owner, value)
    for key, (owner, value) in outer.items():
        others = [n for n in _readers(owner.graph, value) if id(n) not in allowed[key]]
        if others:
            return f"weight '{value}' is shared with node {node_label(others[0])}"
    first = group[0]
    for other in group[1:]:
        if not _same_ffn(first, other):
            return f"its weights are shared with a different FFN (bias or GELU) in another subgraph: {other.name}"
    return None


def _readers(graph: onnx.GraphProto, value: str) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of all its subgraphs that read ``value``."""
    found = []
    for node in graph.node:
        if value in node.input:
            found.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                found += _readers(sub, value)
    return found


def _same_ffn(a: FfnMatch, b: FfnMatch) -> bool:
    def equal(x: np.ndarray | None, y: np.ndarray | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))

    arrays = ((a.w1_stored, b.w1_stored), (a.b1, b.b1), (a.w2_stored, b.w2_stored), (a.b2, b.b2))
    return a.gelu.form == b.gelu.form and a.dtype == b.dtype and all(equal(x, y) for x, y in arrays)


def match_ffn(index: GraphIndex, gelu: GeluMatch, nodes: list[onnx.NodeProto], scope: Scope) -> FfnMatch:
    """The rule's pattern: the FFN around ``gelu``, walked up to the first projection and down to the second;
    a :class:`_Refuse` where the graph is not shaped like one. ``nodes`` (filled in place) holds what
    matched so far when it refuses."""
    nodes += gelu.nodes
    # Upstream: [bias Add] ← projection.
    value, b1_parts = gelu.input, []
    if gelu.bias is not None:
        b1_parts.append(_const(index, gelu.bias, "first bias"))
    value, skipped = _skip_passthrough_up(index, value)
    nodes += skipped
    middle_reshape = any(n.op_type == "Reshape" for n in skipped)
    node = index.producer.get(value)
    if node is not None and node.op_type == "Add":
        bias, other = _split_constant(index, node)
        if bias is not None:
            b1_parts.append(bias)
            nodes.append(node)
            value, skipped = _skip_passthrough_up(index, other)
            nodes += skipped
            middle_reshape = middle_reshape or any(n.op_type == "Reshape" for n in skipped)
            node = index.producer.get(value)
    if node is None or node.op_type not in ("MatMul", "Gemm"):
        what = node.op_type if node is not None else "a graph input"
        raise _Refuse("no-first-projection", f"GELU input comes from {what}, not a MatMul/Gemm with constant weights")
    x, w1, gemm_bias = _projection(index, node, "W1")
    nodes.append(node)
    if gemm_bias is not None:
        b1_parts.append(gemm_bias)
    # Downstream: projection → [bias Add].
    value, skipped, shape_readers = _skip_passthrough_down(index, gelu.output)
    nodes += skipped
    # GPT-2's Conv1D frames the FFN as Reshape(x3d, [-1, d]) → Gemm → Reshape(·, [B, S, h]) → GELU →
    # Reshape(g, [-1, h]) → Gemm → Reshape(·, Shape(g)[:2] + [d]). The GELU output's Shape readers only
    # need its leading dims, which are those of x3d: they are rewired to read x3d.
    outer = index.producer.get(x)
    if shape_readers and not (outer is not None and outer.op_type == "Reshape" and middle_reshape):
        raise _Refuse("gelu-output-shared", f"the shape of GELU output '{gelu.output}' is read outside the FFN")
    users = index.consumers_of(value)
    if value in index.graph_outputs:
        raise _Refuse("gelu-output-shared", f"GELU output '{value}' is also a graph output")
    if len(users) != 1:
        raise _Refuse("gelu-output-shared", f"GELU output '{value}' is used by {len(users)} nodes")
    node = users[0]
    if node.op_type == "Mul":
        raise _Refuse("gated", "gated FFN (GeGLU): the GELU output is multiplied by another projection")
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != value:
        raise _Refuse("no-second-projection", f"GELU output feeds {node.op_type} '{node.name}', not a MatMul/Gemm")
    _, w2, b2 = _projection(index, node, "W2")
    nodes.append(node)
    output = node.output[0]
    users = index.consumers_of(output)
    if b2 is None and len(users) == 1 and users[0].op_type == "Add" and output not in index.graph_outputs:
        bias, _ = _split_constant(index, users[0])
        if bias is not None:
            b2 = bias
            nodes.append(users[0])
            output = users[0].output[0]
    d, h = w1.shape
    if min(d, h, w2.shape[1]) == 0:
        raise _Refuse("shape", f"W1 is {w1.shape} and W2 is {w2.shape}: an empty FFN has nothing to fold")
    b1 = _sum_biases(b1_parts, h)
    name = _name_of(_common_prefix(nodes[len(gelu.nodes) :]))
    return FfnMatch(
        name=name,
        gelu=gelu,
        x=x,
        output=output,
        w1_stored=w1,
        b1=b1,
        w2_stored=w2,
        b2=b2,
        dtype=_weight_dtype(index, node),
        nodes=nodes,
        shape_readers=shape_readers,
        shape_source=outer.input[0] if shape_readers else None,
        scope=scope,
    )


def check_ffn(index: GraphIndex, match: FfnMatch) -> tuple[str, str] | None:
    """The rule's check: why a matched FFN cannot fold, as ``(rule, reason)``, or None. Its shapes must
    agree, and no value computed inside it (but its output) may be used outside it (but by its Shape
    readers, rewired by :meth:`FfnMatch.rewrite`)."""
    w1, w2, h = match.w1_stored, match.w2_stored, match.hidden
    if w2.shape[0] != h:
        return "shape", f"W1 is {w1.shape} but W2 is {w2.shape}: hidden sizes differ"
    for label, bias, size in (("first bias", match.b1, h), ("second bias", match.b2, w2.shape[1])):
        if bias is not None and bias.shape != (size,):
            return "shape", f"{label} has shape {bias.shape}, expected ({size},)"
    reason = _used_outside(index, match.nodes, match.output, match.shape_readers)
    return None if reason is None else ("intermediate-used", reason)


def _projection(index: GraphIndex, node: onnx.NodeProto, label: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """(input, weight [in, out] as stored (float64 when Gemm scales it), bias or None) of a MatMul or Gemm."""
    weight = index.constant(node.input[1])
    if weight is None:
        raise _Refuse("non-constant-weight", f"{label} of {node_label(node)} is not a constant")
    _check_unshared(index, node.input[1], node, label)
    if weight.dtype.kind != "f":
        weight = weight.astype(np.float64)
    if weight.ndim != 2:
        raise _Refuse("shape", f"{label} of {node_label(node)} has rank {weight.ndim}, expected 2")
    if node.op_type == "MatMul":
        return node.input[0], weight, None
    if attribute(node, "transA", 0):
        raise _Refuse("unsupported", f"{node_label(node)} transposes its input (transA=1)")
    if attribute(node, "transB", 0):
        weight = weight.T
    if attribute(node, "alpha", 1.0) != 1.0:
        weight = weight.astype(np.float64) * attribute(node, "alpha", 1.0)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _const(index, node.input[2], f"bias of {node_label(node)}") * attribute(node, "beta", 1.0)
        bias = np.broadcast_to(bias, (weight.shape[1],)).astype(np.float64)
    return node.input[0], weight, bias


def _const(index: GraphIndex, value: str, label: str) -> np.ndarray:
    array = index.constant(value)
    if array is None:
        raise _Refuse("non-constant-weight", f"{label} '{value}' is not a constant")
    return array.astype(np.float64)


def _split_constant(index: GraphIndex, node: onnx.NodeProto) -> tuple[np.ndarray | None, str]:
    """For ``Add(a, b)`` with exactly one constant input: (that constant, the other input)."""
    a, b = node.input[0], node.input[1]
    if index.is_constant(a) and not index.is_constant(b):
        return index.constant(a).astype(np.float64).reshape(-1), b
    if index.is_constant(b) and not index.is_constant(a):
        return index.constant(b).astype(np.float64).reshape(-1), a
    return None, a


def _sum_biases(parts: list[np.ndarray], h: int) -> np.ndarray | None:
    if not parts:
        return None
    total = np.zeros(h)
    for part in parts:
        try:
            total = total + np.broadcast_to(part.reshape(-1), (h,))
        except ValueError:
            raise _Refuse("shape", f"first bias has shape {part.shape}, expected ({h},)") from None
    return total


def _skip_passthrough_up(index: GraphIndex, value: str) -> tuple[str, list[onnx.NodeProto]]:
    skipped = []
    node = index.producer.get(value)
    while node is not None and node.op_type in _PASSTHROUGH and node.domain in ("", "ai.onnx"):
        skipped.append(node)
        value = node.input[0]
        node = index.producer.get(value)
    return value, skipped


def _skip_passthrough_down(index: GraphIndex, value: str) -> tuple[str, list[onnx.NodeProto], list[onnx.NodeProto]]:
    """Follow Reshape/Cast/Identity below ``value``; also return the ``Shape`` nodes that read skipped values."""
    skipped, shape_readers = [], []
    while value not in index.graph_outputs:
        users = index.consumers_of(value)
        data_users = [u for u in users if u.op_type != "Shape"]
        if len(data_users) != 1 or data_users[0].op_type not in _PASSTHROUGH or data_users[0].input[0] != value:
            break
        shape_readers += [u for u in users if u.op_type == "Shape"]
        skipped.append(data_users[0])
        value = data_users[0].output[0]
    return value, skipped, shape_readers


def _check_unshared(index: GraphIndex, value: str, user: onnx.NodeProto, label: str) -> None:
    """Each value on the weight's constant chain (Transpose/Cast/... up to the initializer) feeds only that chain."""
    while True:
        others = [u for u in index.consumers_of(value) if u is not user]
        if others:
            raise _Refuse("shared-weight", f"{label} '{value}' is shared with node {node_label(others[0])}")
        producer = index.producer.get(value)
        if producer is None or producer.op_type == "Constant" or not producer.input:
            return
        user, value = producer, producer.input[0]


def _used_outside(
    index: GraphIndex, nodes: list[onnx.NodeProto], output: str, allowed_readers: list[onnx.NodeProto]
) -> str | None:
    """How a value computed inside the FFN (except its output) is used outside it (but by ``allowed_readers``),
    or None."""
    inside = {id(n) for n in nodes} | {id(n) for n in allowed_readers}
    for node in nodes:
        for value in node.output:
            if value == output:
                continue
            if value in index.graph_outputs:
                return f"intermediate value '{value}' is a graph output"
            for user in index.consumers_of(value):
                if id(user) not in inside:
                    return f"intermediate value '{value}' is also used by node {node_label(user)}"
    return None


def _between_projections(index: GraphIndex, node: onnx.NodeProto, depth: int = 4) -> bool:
    """Whether ``node`` sits between a constant-weight projection and another projection."""

    def is_projection(n: onnx.NodeProto | None) -> bool:
        return n is not None and n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and index.is_constant(n.input[1])

    found_above = found_below = False
    value = node.input[0] if node.input else ""
    for _ in range(depth):
        above = index.producer.get(value)
        if above is None or (found_above := is_projection(above)):
            break
        value = next((v for v in above.input if not index.is_constant(v)), "")
    value = node.output[0]
    for _ in range(depth):
        users = index.consumers_of(value)
        if not users or (found_below := is_projection(users[0])):
            break
        value = users[0].output[0]
    return found_above and found_below


def _weight_dtype(index: GraphIndex, node: onnx.NodeProto) -> np.dtype:
    """The dtype the projection computes in (that of its weight as fed to it)."""
    return index.constant(node.input[1]).dtype


def _common_prefix(nodes: list[onnx.NodeProto]) -> str:
    parts = [n.name.strip("/").split("/") for n in nodes if n.name]
    if not parts:
        return ""
    prefix = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        prefix.append(segment[0])
    return "/".join(prefix) or parts[0][0]


def _name_of(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", raw.strip("/"))
    return name or "ffn"


# The rewrite names everything it adds ``tardis/<ffn>/<part>`` (schema.EMITTED_PREFIX); the parts
# ``Fallback`` and ``Predictor`` are how readers find the FFN in such a name.
_EMITTED = "tardis/"
_RESERVED_SEGMENTS = {"Fallback", "Predictor", "Probe"}


def _names_in(graph: onnx.GraphProto) -> set[str]:
    """Every node, value and initializer name of ``graph`` and its subgraphs."""
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                names |= _names_in(sub)
    names.discard("")
    return names


def _make_unique(matches: list[FfnMatch], taken: set[str]) -> None:
    """Rename FFNs so that every name the rewrite adds (``tardis/<ffn>/...``) is new: no two FFNs share a
    name or nest (``a`` and ``a/b``), and no existing node, value or initializer starts with ``tardis/<ffn>/``."""
    occupied: set[str] = set()  # every "tardis/..." prefix of an existing name
    for name in taken:
        if name.startswith(_EMITTED):
            parts = name.split("/")
            occupied.update("/".join(parts[:i]) for i in range(2, len(parts) + 1))
    chosen: list[str] = []

    def free(name: str) -> bool:
        prefix = _EMITTED + name
        if prefix in occupied:
            return False
        return not any(
            other == name or other.startswith(name + "/") or name.startswith(other + "/") for other in chosen
        )

    for match in matches:
        first, *rest = [s + "_" if s in _RESERVED_SEGMENTS else s for s in match.name.split("/")]
        name, count = "/".join([first, *rest]), 0
        while not free(name):  # a suffix on the first segment also undoes a nesting (a, a/b → a, a_1/b)
            count += 1
            name = "/".join([f"{first}_{count}", *rest])
        match.name = name
        chosen.append(name)
