"""Recognise every GELU spelling real exporters produce.

Single-op spellings (``Gelu``, ``com.microsoft`` ``Gelu``/``FastGelu``/``BiasGelu``)
are read off the node. Decomposed spellings are anchored on ``Erf`` or ``Tanh``:
the pre-activation ``h`` is the nearest upstream value from which a closed
elementwise region reaches the anchor, and the region is accepted only if,
evaluated numerically, it *is* GELU of ``h``. Constant placement, commutation,
``Div(√2)`` vs ``Mul(1/√2)``, ``Pow(h, 3)`` vs ``h·h·h``, fp16 ``Cast``s and
rounded constants are thus handled by one rule instead of one pattern each.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx

from tardis_onnx import reference
from tardis_onnx.graph import ELEMENTWISE, GraphIndex, attribute, evaluate_elementwise

MS = "com.microsoft"
_MAX_UPSTREAM = 6  # how many upstream values are tried as the pre-activation
_MAX_REGION = 16  # the longest spelling has ~9 nodes
_PROBE = np.linspace(-6.0, 6.0, 241)


@dataclass
class GeluMatch:
    """One GELU occurrence: ``output = GELU(input + bias)``."""

    form: str  # "erf" or "tanh": the math (reference.GELU_FORMS)
    spelling: str  # stable rule name used in reports, e.g. "erf-decomposed", "com.microsoft.BiasGelu"
    input: str
    output: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    bias: str | None = None  # BiasGelu/FastGelu fold the first bias into the op


class GeluRule:
    """One family of GELU spellings, in the shape of a rewrite rule: the ops it anchors on, and
    :meth:`match`, the GELU around an anchor or the reason it is not one. Adding a spelling is adding a
    rule to ``GELU_RULES``; the FFN around the GELU is :mod:`tardis_onnx.passes.ffn`'s."""

    anchors: ClassVar[frozenset[tuple[str, str]]]  # (domain, op type); "" is the standard domain

    def match(self, index: GraphIndex, anchor: onnx.NodeProto) -> GeluMatch | str:
        raise NotImplementedError


class OnnxGelu(GeluRule):
    """The standard ``Gelu`` op (opset 20), either form."""

    anchors = frozenset({("", "Gelu")})

    def match(self, index, anchor):
        form = "tanh" if attribute(anchor, "approximate", b"none") in (b"tanh", "tanh") else "erf"
        return GeluMatch(form, f"onnx.Gelu({form})", anchor.input[0], anchor.output[0], [anchor])


class ContribGelu(GeluRule):
    """ONNX Runtime's fused ops (what its transformer optimizer writes): ``Gelu``, ``FastGelu`` (tanh) and
    ``BiasGelu``, the last two with the first bias folded in."""

    anchors = frozenset({(MS, "Gelu"), (MS, "FastGelu"), (MS, "BiasGelu")})

    def match(self, index, anchor):
        form = "tanh" if anchor.op_type == "FastGelu" else "erf"
        bias = anchor.input[1] if len(anchor.input) > 1 and anchor.input[1] else None
        return GeluMatch(form, f"com.microsoft.{anchor.op_type}", anchor.input[0], anchor.output[0], [anchor], bias)


class DecomposedGelu(GeluRule):
    """GELU spelled in elementwise ops around ``Erf`` or ``Tanh``. The pattern: a closed elementwise region
    computed from one upstream value (the nearest that works) containing the anchor; the check
    (:meth:`check`): evaluated numerically, it is GELU of that value."""

    anchors = frozenset({("", "Erf"), ("", "Tanh")})

    def match(self, index, anchor):
        form = "erf" if anchor.op_type == "Erf" else "tanh"
        refused = None
        for candidate in _upstream_values(index, anchor):
            region = _region(index, candidate, anchor)
            if region is None:
                continue
            nodes, output = region
            refused = self.check(index, nodes, candidate, output, form)
            if refused is None:
                return GeluMatch(form, f"{form}-decomposed", candidate, output, nodes)
        why = f" ({refused})" if refused else ""
        return f"{anchor.op_type} '{anchor.name}' is not part of a GELU spelling{why}"

    def check(self, index: GraphIndex, nodes: list[onnx.NodeProto], h: str, output: str, form: str) -> str | None:
        """Why the region ``nodes`` (from ``h`` to ``output``) is not GELU of ``h`` in ``form``, or None."""
        if _computes_gelu(index, nodes, h, output, form):
            return None
        return f"the region from '{h}' to '{output}' does not compute {form} GELU"


GELU_RULES: tuple[GeluRule, ...] = (OnnxGelu(), ContribGelu(), DecomposedGelu())
_RULE_OF = {kind: rule for rule in GELU_RULES for kind in rule.anchors}


def anchors(index: GraphIndex) -> list[onnx.NodeProto]:
    """Nodes a GELU can be recognised from, in graph order."""
    return [n for n in index.graph.node if (_domain(n), n.op_type) in _RULE_OF]


def match_gelu(index: GraphIndex, anchor: onnx.NodeProto) -> GeluMatch | str:
    """The GELU around ``anchor``, or a one-line reason why it is not one."""
    return _RULE_OF[(_domain(anchor), anchor.op_type)].match(index, anchor)


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _is_elementwise(node: onnx.NodeProto) -> bool:
    return _domain(node) == "" and node.op_type in ELEMENTWISE


def _upstream_values(index: GraphIndex, anchor: onnx.NodeProto) -> list[str]:
    """Non-constant values above ``anchor`` through elementwise nodes, nearest first."""
    seen: list[str] = []
    queue = deque(v for v in anchor.input if v and not index.is_constant(v))
    while queue and len(seen) < _MAX_UPSTREAM:
        value = queue.popleft()
        if value in seen:
            continue
        seen.append(value)
        node = index.producer.get(value)
        if node is not None and _is_elementwise(node):
            queue.extend(v for v in node.input if v and not index.is_constant(v))
    return seen


def _region(index: GraphIndex, h: str, anchor: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str] | None:
    """The closed elementwise region computed from ``h`` alone that contains ``anchor``, and its output."""
    start = index.position[id(index.producer[h])] + 1 if h in index.producer else 0
    available, members = {h}, []
    for node in index.graph.node[start:]:
        if len(members) >= _MAX_REGION or index.position[id(node)] > index.position[id(anchor)] + _MAX_REGION:
            break
        inputs = [v for v in node.input if v and not index.is_constant(v)]
        if _is_elementwise(node) and inputs and all(v in available for v in inputs):
            members.append(node)
            available.update(node.output)
    if not any(n is anchor for n in members):
        return None
    # The output: follow single consumers inside the region from the anchor.
    member_ids = {id(n) for n in members}
    output = anchor.output[0]
    while True:
        users = index.consumers_of(output)
        if len(users) != 1 or id(users[0]) not in member_ids or output in index.graph_outputs:
            break
        output = users[0].output[0]
    # Keep the members that feed the output.
    needed, stack = set(), [output]
    while stack:
        node = index.producer.get(stack.pop())
        if node is None or id(node) not in member_ids or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in members if id(n) in needed]
    if not any(n is anchor for n in nodes):
        return None
    # Closed: internal values are used only inside the region.
    internal = {v for n in nodes for v in n.output} - {output}
    for value in internal:
        if value in index.graph_outputs or any(id(u) not in needed for u in index.consumers_of(value)):
            return None
    return nodes, output


def _computes_gelu(index: GraphIndex, nodes: list[onnx.NodeProto], h: str, output: str, form: str) -> bool:
    """Evaluate the region on probe points and compare with the reference GELU."""
    values: dict[str, np.ndarray] = {h: _PROBE.astype(np.float32)}
    try:
        with np.errstate(all="ignore"):
            for node in nodes:
                args = [values[v] if v in values else index.constant(v) for v in node.input]
                values[node.output[0]] = evaluate_elementwise(node, args)
    except (KeyError, ValueError, TypeError):
        return False
    got = np.asarray(values[output], dtype=np.float64)
    if got.shape != _PROBE.shape:
        return False
    want = reference.gelu(_PROBE, form)
    return bool(np.all(np.abs(got - want) <= 2e-3 * (1.0 + np.abs(want))))
