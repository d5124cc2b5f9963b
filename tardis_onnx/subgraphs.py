"""Subgraphs: the branches of ``If`` and the bodies of ``Loop`` and ``Scan``, where FFNs are found too.

A scope is the path from the main graph to one subgraph, ``((node position, attribute name), ...)``;
``()`` is the main graph. A subgraph reads the values of the graphs around it (Optimum's merged decoder
keeps the weights its two ``If`` branches share as main-graph initializers), and may reuse a name a
sibling subgraph defines (both branches compute ``/model/decoder/layers.0/fc1/MatMul_output_0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

# The subgraph attributes walked, per standard control-flow op.
CONTROL_FLOW = {"If": ("then_branch", "else_branch"), "Loop": ("body",), "Scan": ("body",)}
Scope = tuple[tuple[int, str], ...]


def subgraphs(graph: onnx.GraphProto) -> Iterator[tuple[int, str, onnx.GraphProto]]:
    """``(node position, attribute name, subgraph)`` of every If/Loop/Scan subgraph directly in ``graph``."""
    for position, node in enumerate(graph.node):
        names = CONTROL_FLOW.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        for attr in node.attribute:
            if attr.name in names and attr.type == onnx.AttributeProto.GRAPH:
                yield position, attr.name, attr.g


def walk(graph: onnx.GraphProto, scope: Scope = ()) -> Iterator[tuple[Scope, onnx.GraphProto]]:
    """``graph`` and every If/Loop/Scan subgraph in it, depth first, with their scopes."""
    yield scope, graph
    for position, name, sub in subgraphs(graph):
        yield from walk(sub, (*scope, (position, name)))


def resolve(graph: onnx.GraphProto, scope: Scope) -> onnx.GraphProto:
    """The subgraph of ``graph`` at ``scope`` (in any copy of the model the scope was taken from)."""
    for position, name in scope:
        graph = next(a.g for a in graph.node[position].attribute if a.name == name)
    return graph


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The values ``graph`` (a subgraph, its own subgraphs included) reads from the graphs around it."""
    read, defined = set(), set()
    stack = [graph]
    while stack:
        g = stack.pop()
        defined.update(v.name for v in g.input)
        defined.update(t.name for t in g.initializer)
        for node in g.node:
            read.update(v for v in node.input if v)
            defined.update(node.output)
            for attr in node.attribute:
                stack.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))
    return read - defined


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """The values of the enclosing graphs that ``node``'s subgraphs read."""
    reads: set[str] = set()
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            reads |= outer_reads(sub)
    return reads


def prune(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """In place: ``graph`` (topologically sorted) computing ``outputs`` only: its other outputs, the nodes
    none of them needs, and the initializers no kept node reads (its inputs stay, used or not)."""
    wanted = set(outputs)
    needed, kept = set(wanted), []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed |= subgraph_reads(node)
    kept_outputs = [v for v in graph.output if v.name in wanted]
    kept_initializers = [t for t in graph.initializer if t.name in needed]
    for part, values in (("node", kept[::-1]), ("output", kept_outputs), ("initializer", kept_initializers)):
        graph.ClearField(part)
        getattr(graph, part).extend(values)


def expose(model: onnx.ModelProto, scope: Scope, value: str, elem_type: int, width: int, name: str) -> str:
    """In place: make ``value``, as the subgraph at ``scope`` sees it, readable as a main-graph output;
    returns the output's name (``value`` itself for a main-graph input read in the main graph).

    ONNX Runtime returns main-graph outputs only, so each node on the way out gets one more output: the
    value as rows ``[n, width]`` (named ``name/<depth>``). An ``If``'s other branch yields an empty
    ``[0, width]`` tensor in that slot, so a run returns the rows of the branch that ran (even for a value
    of an enclosing graph); a ``Loop`` or ``Scan`` stacks the rows of its iterations (which must then have
    one shape).
    """
    graphs = [model.graph]
    for step in scope:
        graphs.append(resolve(graphs[-1], (step,)))
    for level in range(len(scope), 0, -1):
        position, attribute = scope[level - 1]
        node = graphs[level - 1].node[position]
        rows = f"{name}/{level}"
        _output_rows(graphs[level], value, rows, elem_type, width)
        if node.op_type == "If":
            other = next(a.g for a in node.attribute if a.name != attribute and a.type == onnx.AttributeProto.GRAPH)
            _output_empty(other, rows, elem_type, width)
        elif node.op_type == "Scan":
            for attr in node.attribute:
                if attr.name in ("scan_output_axes", "scan_output_directions"):
                    attr.ints.append(0)
        node.output.append(rows)
        value = rows
    main = model.graph
    if value not in {v.name for v in (*main.input, *main.output)}:
        main.output.append(helper.make_tensor_value_info(value, elem_type, None))
    return value


def _output_rows(graph: onnx.GraphProto, value: str, rows: str, elem_type: int, width: int) -> None:
    shape = numpy_helper.from_array(np.array([-1, width], dtype=np.int64), f"{rows}/shape")
    graph.node.extend(
        [
            helper.make_node("Constant", [], [shape.name], name=shape.name, value=shape),
            helper.make_node("Reshape", [value, shape.name], [f"{rows}/rows"], name=f"{rows}/Reshape"),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(f"{rows}/rows", elem_type, [None, width]))


def _output_empty(graph: onnx.GraphProto, rows: str, elem_type: int, width: int) -> None:
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    empty = numpy_helper.from_array(np.zeros((0, width), dtype=dtype), f"{rows}/empty")
    graph.node.append(helper.make_node("Constant", [], [empty.name], name=empty.name, value=empty))
    graph.output.append(helper.make_tensor_value_info(empty.name, elem_type, [0, width]))
