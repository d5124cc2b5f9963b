"""Schema: what ONNX tooling needs to see through a rewritten model.

* :func:`register_schemas` registers the ``OpSchema`` of ``ai.tardis::FfnFallback`` (inputs, types,
  attributes and a shape inference function) with onnx, in this process, so that
  ``onnx.checker.check_model(full_check=True)`` validates the node and
  ``onnx.shape_inference.infer_shapes(strict_mode=True)`` carries shapes through it.
* :func:`annotate_shapes` writes ``value_info`` (type and shape) for every tensor the rewrite added, so
  that tools without the schema (Netron, ONNX Runtime's optimizers, other processes) see them too.
  ``com.microsoft::MatMulNBits`` (the int4 predictor) and ``DynamicQuantizeMatMul`` (the int8 predictor,
  the ``--quantize int8`` fold) have no onnx schema: their output shape is read off ``N`` or the weight's
  columns.
"""

from __future__ import annotations

import onnx
from onnx import defs
from onnx.helper import make_attribute

from tardis_onnx.contract import (
    ATTRIBUTES,
    DOMAIN,
    FALLBACK_OP,
    OP_VERSION,
    OPTIONAL_INPUTS,
    is_emitted,
)
from tardis_onnx.subgraphs import resolve, walk

_SMALL_INITIALIZER = 1024  # elements: kept for shape inference's data propagation (Reshape targets)

# (name, type, description) of FfnFallback's inputs, in the contract's order; `lines` is float32
# whatever T is. z_hat and predictor_v are optional: exactly one is given; w1t is optional with z_hat;
# w1t and w2 are T, or int8 rows with row_scales.
INPUT_DOCS = (
    ("x", "T", "FFN input [..., d]"),
    ("y_folded", "T", "folded map x·Wf + bf [..., d]; with predictor_v, followed by the code x·U [..., d + rank]"),
    ("z_hat", "T", "predicted pre-activations [..., h]: a neuron falls back when outside its window (optional)"),
    ("w1t", "R", "first projection, transposed [h, d] (optional with z_hat: absent, z = z_hat + b1)"),
    ("b1", "T", "first bias [h]"),
    ("w2", "R", "second projection [h, d]"),
    ("lines", "tensor(float)", "rows slope, intercept, lo, hi per neuron [4, h] (float32; windows shifted by -b1)"),
    ("predictor_v", "T", "low-rank predictor's second factor [rank, h]: z_hat = code·V, computed in the op (optional)"),
    ("row_scales", "tensor(float)", "with int8 w1t and w2: each row's scale, w1t's then w2's [2, h] (optional)"),
)

ATTRIBUTE_DOCS = {
    "margin": "widen every window by this much when flagging",
    "approximate": "GELU: 'none' (erf) or 'tanh'",
}


def _infer_fallback(ctx) -> None:
    """The output has the type and shape of ``x`` (an FFN maps d to d)."""
    x = ctx.get_input_type(0)
    if x is not None and x.HasField("tensor_type"):
        ctx.set_output_type(0, x)


def _option(name: str) -> defs.OpSchema.FormalParameterOption:
    option = defs.OpSchema.FormalParameterOption
    return option.Optional if name in OPTIONAL_INPUTS else option.Single


def fallback_schema() -> defs.OpSchema:
    """The ``OpSchema`` of ``ai.tardis::FfnFallback`` version 1 (the kernel in ``custom_ops/``)."""
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    schema = defs.OpSchema(
        FALLBACK_OP,
        DOMAIN,
        OP_VERSION,
        "TARDIS outlier fallback: folded + sum over flagged neurons i of (GELU(z_i) - (a_i z_i + c_i)) * W2[i, :], "
        "z = x·W1 + b1 (without w1t: z = z_hat + b1); "
        "neuron i is flagged when z_hat_i is outside [lo_i - margin, hi_i + margin] (or NaN).",
        inputs=[param(name, kind, doc, param_option=_option(name)) for name, kind, doc in INPUT_DOCS],
        outputs=[param("y", "T", "folded plus the outliers' exact residuals [..., d]")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "compute type of the FFN"),
            ("R", ["tensor(float)", "tensor(float16)", "tensor(int8)"], "W1ᵀ and W2 rows: T, or int8 scaled per row"),
        ],
        attributes=[
            attr(name, make_attribute(name, default), ATTRIBUTE_DOCS[name]) for name, default in ATTRIBUTES.items()
        ],
        node_determinism=defs.OpSchema.NodeDeterminism.Deterministic,
    )
    schema.set_type_and_shape_inference_function(_infer_fallback)
    return schema


def register_schemas() -> None:
    """Register ``ai.tardis::FfnFallback`` with onnx in this process (once; later calls do nothing)."""
    if not defs.has(FALLBACK_OP, DOMAIN):
        defs.register_schema(fallback_schema())


def emitted_tensors(model: onnx.ModelProto) -> list[str]:
    """The tensors computed by the rewrite's nodes (named ``tardis/...``), graph outputs excepted."""
    return _emitted(model.graph)


def _emitted(graph: onnx.GraphProto) -> list[str]:
    outputs = {o.name for o in graph.output}
    return [v for n in graph.node if is_emitted(n.name) for v in n.output if v not in outputs]


def annotate_shapes(model: onnx.ModelProto) -> list[str]:
    """In place: ``value_info`` with type and shape for every emitted tensor (in the main graph and in its
    If/Loop/Scan subgraphs); returns those still unknown.

    Shapes come from onnx's shape inference (with the FfnFallback schema registered) on a weightless
    view of the graph, so this works on models over 2 GB and on models loaded without their weights.
    """
    register_schemas()
    graphs = list(walk(model.graph))
    wanted = [_emitted(graph) for _, graph in graphs]
    annotated = [{v.name for v in graph.value_info} for _, graph in graphs]
    for _ in range(3):  # a contrib op's shape lets the next round infer what reads it
        inferred = _inferred_model(model).graph
        progress = False
        for (scope, graph), names, done in zip(graphs, wanted, annotated, strict=True):
            known = {}
            for depth in range(len(scope) + 1):  # a subgraph sees the values around it
                known.update(_types(resolve(inferred, scope[:depth])))
            known.update(_contrib_types(graph, known))
            added = [name for name in names if name not in done and _has_shape(known.get(name))]
            for name in added:
                graph.value_info.append(onnx.helper.make_value_info(name, known[name]))
            done.update(added)
            progress = progress or bool(added)
        if not progress:
            break
    return [name for names, done in zip(wanted, annotated, strict=True) for name in names if name not in done]


def inferred_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Every value's type as inferred on a copy whose large initializers are graph inputs (no data)."""
    return _types(_inferred_model(model).graph)


def _inferred_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference on a copy whose large initializers are graph inputs (no data)."""
    graph = model.graph
    light = onnx.helper.make_graph(
        list(graph.node),
        graph.name,
        list(graph.input),
        list(graph.output),
        value_info=list(graph.value_info),
    )
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        if elements <= _SMALL_INITIALIZER and tensor.data_location != onnx.TensorProto.EXTERNAL:
            light.initializer.append(tensor)
        elif tensor.name not in inputs:
            light.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    view = onnx.helper.make_model(light, opset_imports=list(model.opset_import), functions=list(model.functions))
    view.ir_version = model.ir_version
    return onnx.shape_inference.infer_shapes(view, check_type=False, strict_mode=False, data_prop=True)


def _types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    values = [*graph.input, *graph.value_info, *graph.output]
    return {v.name: v.type for v in values if v.type.HasField("tensor_type")}


def _contrib_types(graph: onnx.GraphProto, known: dict[str, onnx.TypeProto]) -> dict[str, onnx.TypeProto]:
    """``com.microsoft::MatMulNBits(A, ...)`` and ``DynamicQuantizeMatMul(A, B, ...)``: A's type (float) with the
    last dimension replaced by ``N`` or by B's columns."""
    found = {}
    for node in graph.node:
        if node.domain != "com.microsoft" or _has_shape(known.get(node.output[0])):
            continue
        a = known.get(node.input[0])
        if node.op_type == "MatMulNBits":
            n = next((attr.i for attr in node.attribute if attr.name == "N"), None)
        elif node.op_type == "DynamicQuantizeMatMul" and _has_shape(known.get(node.input[1])):
            n = known[node.input[1]].tensor_type.shape.dim[-1].dim_value or None
        else:
            continue
        if not _has_shape(a) or not a.tensor_type.shape.dim or n is None:
            continue
        out = onnx.TypeProto()
        out.CopyFrom(a)
        dims = out.tensor_type.shape.dim
        dims[len(dims) - 1].Clear()
        dims[len(dims) - 1].dim_value = n
        found[node.output[0]] = out
    return found


def _has_shape(value: onnx.TypeProto | None) -> bool:
    return value is not None and value.tensor_type.elem_type != 0 and value.tensor_type.HasField("shape")
