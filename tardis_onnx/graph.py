"""A read-only index over an ONNX graph: producers, consumers and constant values.

A subgraph's index has its enclosing graph's as ``parent``: constants resolve through the enclosing scopes.
A node whose subgraphs read a value counts as one of its consumers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.special import erf

from tardis_onnx.io import tensor_array
from tardis_onnx.subgraphs import subgraph_reads

# Elementwise ops that GELU spellings are made of; ``evaluate_elementwise`` runs them.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Cast", "Identity", "Neg", "Reciprocal"}
# Ops through which a constant is folded when resolving a weight (dynamo exports
# put weights behind Transpose, fp16 exports behind Cast).
_FOLDABLE = {"Identity", "Cast", "Transpose"}


def node_label(node: onnx.NodeProto) -> str:
    """A human-readable name for messages: the node's name, or its op and first output."""
    return node.name or f"{node.op_type}->{node.output[0] if node.output else '?'}"


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (decoded), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


class GraphIndex:
    """Producer and consumer maps of one graph, and constant resolution (through ``parent``, the index of the
    enclosing graph, for a subgraph)."""

    def __init__(self, graph: onnx.GraphProto, parent: GraphIndex | None = None, weights_dir: Path | None = None):
        self.graph = graph
        self.parent = parent
        # Where external data is memory-mapped from (io.open_model); a subgraph's is its parent's.
        self.weights_dir = weights_dir if parent is None else parent.weights_dir
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.position: dict[int, int] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for pos, node in enumerate(graph.node):
            self.position[id(node)] = pos
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
            for value in sorted(subgraph_reads(node) - set(node.input)):
                self.consumers.setdefault(value, []).append(node)
        self._constant_cache: dict[str, np.ndarray | None] = {}

    def consumers_of(self, value: str) -> list[onnx.NodeProto]:
        return self.consumers.get(value, [])

    def constant(self, value: str) -> np.ndarray | None:
        """The value of ``value`` if it is a constant (folded through Identity/Cast/Transpose), else None."""
        if value in self._constant_cache:
            return self._constant_cache[value]
        result = self._resolve_constant(value)
        self._constant_cache[value] = result
        return result

    def is_constant(self, value: str) -> bool:
        return value == "" or self.constant(value) is not None

    def _resolve_constant(self, value: str) -> np.ndarray | None:
        if value in self.initializers and value not in self.graph_inputs:
            return tensor_array(self.initializers[value], self.weights_dir)
        node = self.producer.get(value)
        if node is None:
            outer = self.parent is not None and value not in self.graph_inputs and value not in self.initializers
            return self.parent.constant(value) if outer else None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _constant_node_value(node)
        if node.op_type in _FOLDABLE and node.domain in ("", "ai.onnx"):
            inner = self.constant(node.input[0])
            if inner is None:
                return None
            if node.op_type == "Cast":
                return inner.astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
            if node.op_type == "Transpose":
                return np.transpose(inner, attribute(node, "perm"))
            return inner
        if node.op_type in ELEMENTWISE and node.domain in ("", "ai.onnx"):
            args = [self.constant(v) for v in node.input]
            if any(a is None for a in args):
                return None
            with np.errstate(all="ignore"):
                return evaluate_elementwise(node, args)
        return None


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def evaluate_elementwise(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray:
    """numpy evaluation of one ``ELEMENTWISE`` node (used for constant folding and GELU probing)."""
    op = node.op_type
    if op == "Add":
        return args[0] + args[1]
    if op == "Sub":
        return args[0] - args[1]
    if op == "Mul":
        return args[0] * args[1]
    if op == "Div":
        return args[0] / args[1]
    if op == "Pow":
        return np.power(args[0], args[1]).astype(args[0].dtype)
    if op == "Sqrt":
        return np.sqrt(args[0])
    if op == "Neg":
        return -args[0]
    if op == "Reciprocal":
        return 1.0 / args[0]
    if op == "Erf":
        return erf(args[0]).astype(args[0].dtype)
    if op == "Tanh":
        return np.tanh(args[0])
    if op == "Cast":
        return args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attribute(node, "to")))
    if op == "Identity":
        return args[0]
    raise ValueError(f"not an elementwise op: {op}")
