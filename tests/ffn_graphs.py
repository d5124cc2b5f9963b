"""Tiny FFN graphs built in code: one per GELU spelling seen in real exports (docs/design.md §4),
and the negative cases the pass must leave unchanged."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D, H = 16, 64
SQRT2 = math.sqrt(2.0)
K = math.sqrt(2.0 / math.pi)


class GraphBuilder:
    """Accumulates nodes; constants become initializers (or Constant nodes when asked)."""

    def __init__(self, dtype=np.float32, constant_nodes: bool = False, seed: int = 0) -> None:
        self.dtype = np.dtype(dtype)
        self.constant_nodes = constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        name = self.name("c")
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name)))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, *shape: int, scale: float = 0.3) -> str:
        return self.const(self.rng.normal(scale=scale, size=shape))

    def op(self, op_type: str, *inputs: str, domain: str = "", name: str = "", **attrs) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name or out, domain=domain, **attrs))
        return out

    def model(
        self, x: str, y: str, opset: int = 17, d: int = D, extra_outputs: tuple[str, ...] = ()
    ) -> onnx.ModelProto:
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        graph = helper.make_graph(
            self.nodes,
            "ffn",
            [helper.make_tensor_value_info(x, elem, ["batch", "sequence", d])],
            [helper.make_tensor_value_info(v, elem, [None, None, None]) for v in (y, *extra_outputs)],
            self.initializers,
        )
        opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets)
        model.ir_version = 9
        return model


# --- GELU spellings: each takes (builder, h) and returns GELU(h) ---------------------------------------------


def erf_div(b: GraphBuilder, h: str) -> str:  # optimum opset 18: Div(√2) → Erf → Add(1) → Mul(h, ·) → Mul(0.5)
    e = b.op("Erf", b.op("Div", h, b.const(SQRT2)))
    return b.op("Mul", b.op("Mul", h, b.op("Add", e, b.const(1.0))), b.const(0.5))


def erf_mul_commuted(b: GraphBuilder, h: str) -> str:  # Mul(1/√2), constants on the left, 0.5·h first
    e = b.op("Erf", b.op("Mul", b.const(1 / SQRT2), h))
    return b.op("Mul", b.op("Mul", b.const(0.5), h), b.op("Add", b.const(1.0), e))


def erf_sqrt_node(b: GraphBuilder, h: str) -> str:  # √2 computed by a Sqrt node
    e = b.op("Erf", b.op("Div", h, b.op("Sqrt", b.const(2.0))))
    return b.op("Mul", b.op("Mul", h, b.const(0.5)), b.op("Add", e, b.const(1.0)))


def megatron(b: GraphBuilder, h: str) -> str:  # x * 0.5 * (1 + erf(x * 0.70710678))
    e = b.op("Erf", b.op("Mul", h, b.const(0.70710678)))
    return b.op("Mul", b.op("Mul", h, b.const(0.5)), b.op("Add", b.const(1.0), e))


def tanh_pow(b: GraphBuilder, h: str) -> str:  # gelu_new: phi, gpt_neo, codegen, gpt2
    cubic = b.op("Add", h, b.op("Mul", b.const(0.044715), b.op("Pow", h, b.const(3.0))))
    t = b.op("Tanh", b.op("Mul", b.const(0.7978845608), cubic))
    return b.op("Mul", b.op("Mul", b.const(0.5), h), b.op("Add", b.const(1.0), t))


def tanh_torchscript(b: GraphBuilder, h: str) -> str:  # x·x·x as two Muls, constants on the left
    cube = b.op("Mul", b.op("Mul", h, h), h)
    cubic = b.op("Add", h, b.op("Mul", b.const(0.044715), cube))
    t = b.op("Tanh", b.op("Mul", b.const(K), cubic))
    return b.op("Mul", b.op("Mul", h, b.op("Add", b.const(1.0), t)), b.const(0.5))


def tanh_bloom(b: GraphBuilder, h: str) -> str:  # x*0.5*(1+tanh(0.79788456*x*(1+0.044715*x*x)))
    inner = b.op("Add", b.const(1.0), b.op("Mul", b.op("Mul", b.const(0.044715), h), h))
    t = b.op("Tanh", b.op("Mul", b.op("Mul", b.const(0.79788456), h), inner))
    return b.op("Mul", b.op("Mul", h, b.const(0.5)), b.op("Add", b.const(1.0), t))


def onnx_gelu(b: GraphBuilder, h: str) -> str:
    return b.op("Gelu", h, approximate="none")


def onnx_gelu_tanh(b: GraphBuilder, h: str) -> str:
    return b.op("Gelu", h, approximate="tanh")


def ms_gelu(b: GraphBuilder, h: str) -> str:
    return b.op("Gelu", h, domain="com.microsoft")


def ms_fast_gelu(b: GraphBuilder, h: str) -> str:
    return b.op("FastGelu", h, domain="com.microsoft")


SPELLINGS: dict[str, tuple[Callable[[GraphBuilder, str], str], str]] = {
    "erf_div": (erf_div, "erf"),
    "erf_mul_commuted": (erf_mul_commuted, "erf"),
    "erf_sqrt_node": (erf_sqrt_node, "erf"),
    "megatron": (megatron, "erf"),
    "tanh_pow": (tanh_pow, "tanh"),
    "tanh_torchscript": (tanh_torchscript, "tanh"),
    "tanh_bloom": (tanh_bloom, "tanh"),
    "onnx_gelu": (onnx_gelu, "erf"),
    "onnx_gelu_tanh": (onnx_gelu_tanh, "tanh"),
    "ms_gelu": (ms_gelu, "erf"),
    "ms_fast_gelu": (ms_fast_gelu, "tanh"),
}


def ffn_model(spelling: str, *, bias: bool = True, constant_nodes: bool = False, opset: int = 17) -> onnx.ModelProto:
    """``MatMul(x, W1) → Add(b1) → GELU → MatMul(W2) → Add(b2)`` followed by a residual Add."""
    gelu, _ = SPELLINGS[spelling]
    b = GraphBuilder(constant_nodes=constant_nodes)
    h = b.op("MatMul", "x", b.weight(D, H), name="/layer.0/mlp/fc1/MatMul")
    if bias:
        h = b.op("Add", b.weight(H), h, name="/layer.0/mlp/fc1/Add")
    y = b.op("MatMul", gelu(b, h), b.weight(H, D), name="/layer.0/mlp/fc2/MatMul")
    if bias:
        y = b.op("Add", y, b.weight(D), name="/layer.0/mlp/fc2/Add")
    out = b.op("Add", y, "x", name="/layer.0/residual")
    return b.model("x", out, opset=max(opset, 20) if spelling.startswith("onnx_gelu") else opset)


def bias_gelu_model(op_type: str = "BiasGelu") -> onnx.ModelProto:
    """ORT transformer optimizer output: ``MatMul → com.microsoft.BiasGelu|FastGelu(·, b1) → MatMul → Add``."""
    b = GraphBuilder()
    h = b.op("MatMul", "x", b.weight(D, H), name="/layer.0/intermediate/MatMul")
    g = b.op(op_type, h, b.weight(H), domain="com.microsoft")
    y = b.op("Add", b.op("MatMul", g, b.weight(H, D), name="/layer.0/output/MatMul"), b.weight(D))
    return b.model("x", b.op("Add", y, "x"))


def gpt2_gemm_model() -> onnx.ModelProto:
    """GPT-2 (optimum): Reshape → Gemm(x, W1, b1) → Reshape → tanh GELU → Reshape → Gemm(W2, b2) → Reshape."""
    b = GraphBuilder()
    shape_in = b.op("Shape", "x")
    flat = b.op("Reshape", "x", b.const([-1, D], np.int64))
    h = b.op("Gemm", flat, b.weight(D, H), b.weight(H), name="/h.0/mlp/c_fc/Gemm")
    batch_seq = b.op("Slice", shape_in, b.const([0], np.int64), b.const([2], np.int64))
    h3 = b.op("Reshape", h, b.op("Concat", batch_seq, b.const([H], np.int64), axis=0))
    g = tanh_pow(b, h3)
    g2 = b.op("Reshape", g, b.const([-1, H], np.int64))
    y = b.op("Gemm", g2, b.weight(D, H), b.weight(D), transB=1, name="/h.0/mlp/c_proj/Gemm")
    y3 = b.op("Reshape", y, b.op("Concat", batch_seq, b.const([D], np.int64), axis=0))
    return b.model("x", b.op("Add", y3, "x"))


def dynamo_model() -> onnx.ModelProto:
    """torch dynamo with optimize=False: weights behind Transpose, bias second, opset-20 Gelu."""
    b = GraphBuilder()
    w1 = b.op("Transpose", b.weight(H, D), perm=[1, 0])
    h = b.op("Add", b.op("MatMul", "x", w1), b.weight(H))
    w2 = b.op("Transpose", b.weight(D, H), perm=[1, 0])
    y = b.op("Add", b.op("MatMul", b.op("Gelu", h, approximate="none"), w2), b.weight(D))
    return b.model("x", y, opset=20)


def fp16_model(spelling: str = "erf_div") -> onnx.ModelProto:
    """An fp16 export: fp16 weights and rounded fp16 constants, GELU computed in fp16."""
    gelu, _ = SPELLINGS[spelling]
    b = GraphBuilder(dtype=np.float16)
    h = b.op("Add", b.op("MatMul", "x", b.weight(D, H)), b.weight(H))
    y = b.op("Add", b.op("MatMul", gelu(b, h), b.weight(H, D)), b.weight(D))
    return b.model("x", y)


def fp16_cast_model() -> onnx.ModelProto:
    """fp16 projections with the GELU computed in fp32 between Casts."""
    b = GraphBuilder(dtype=np.float16)
    h = b.op("Add", b.op("MatMul", "x", b.weight(D, H)), b.weight(H))
    h32 = b.op("Cast", h, to=TensorProto.FLOAT)
    b32 = GraphBuilder(dtype=np.float32)
    b32.count = 1000
    g32 = erf_div(b32, h32)
    b.nodes += b32.nodes
    b.initializers += b32.initializers
    g = b.op("Cast", g32, to=TensorProto.FLOAT16)
    y = b.op("Add", b.op("MatMul", g, b.weight(H, D)), b.weight(D))
    return b.model("x", y)


# --- Negative cases -------------------------------------------------------------------------------------------


def shared_weight_model() -> onnx.ModelProto:
    b = GraphBuilder()
    w1 = b.weight(D, H)
    h = b.op("Add", b.op("MatMul", "x", w1), b.weight(H))
    y = b.op("MatMul", erf_div(b, h), b.weight(H, D))
    other = b.op("MatMul", "x", w1)
    return b.model("x", y, extra_outputs=(other,))


def non_constant_weight_model() -> onnx.ModelProto:
    b = GraphBuilder()
    w1 = b.op("Mul", b.op("Shape", "x"), b.const(1, np.int64))  # any computed value
    w1f = b.op("Expand", b.weight(D, 1), b.op("Concat", b.const([D], np.int64), b.const([H], np.int64), axis=0))
    h = b.op("MatMul", "x", b.op("Add", w1f, b.op("Cast", b.op("ReduceSum", w1), to=TensorProto.FLOAT)))
    y = b.op("MatMul", erf_div(b, h), b.weight(H, D))
    return b.model("x", y)


def gelu_output_used_model() -> onnx.ModelProto:
    b = GraphBuilder()
    h = b.op("MatMul", "x", b.weight(D, H))
    g = erf_div(b, h)
    y = b.op("MatMul", g, b.weight(H, D))
    return b.model("x", y, extra_outputs=(g,))


def geglu_model() -> onnx.ModelProto:
    b = GraphBuilder()
    gate = b.op("MatMul", "x", b.weight(D, H))
    up = b.op("MatMul", "x", b.weight(D, H))
    y = b.op("MatMul", b.op("Mul", erf_div(b, gate), up), b.weight(H, D))
    return b.model("x", y)


def swiglu_model() -> onnx.ModelProto:
    b = GraphBuilder()
    gate = b.op("MatMul", "x", b.weight(D, H))
    silu = b.op("Mul", gate, b.op("Sigmoid", gate))
    up = b.op("MatMul", "x", b.weight(D, H))
    y = b.op("MatMul", b.op("Mul", silu, up), b.weight(H, D))
    return b.model("x", y)


def relu_model() -> onnx.ModelProto:
    b = GraphBuilder()
    h = b.op("Add", b.op("MatMul", "x", b.weight(D, H)), b.weight(H))
    y = b.op("Add", b.op("MatMul", b.op("Relu", h), b.weight(H, D)), b.weight(D))
    return b.model("x", y)


NEGATIVE_CASES = {
    "shared_weight": (shared_weight_model, "shared-weight"),
    "non_constant_weight": (non_constant_weight_model, "non-constant-weight"),
    "gelu_output_used": (gelu_output_used_model, "gelu-output-shared"),
    "geglu": (geglu_model, "gated"),
    "swiglu": (swiglu_model, "not-gelu"),
    "relu": (relu_model, "not-gelu"),
}


# --- FFNs inside If branches -----------------------------------------------------------------------------------


def if_model(shared: bool = True) -> onnx.ModelProto:
    """Optimum's merged decoder in small: ``If(cond)`` whose branches both run a GELU FFN, ``FFN(x) + x``
    (then) and ``FFN(2·x) − x`` (else), with the same node and value names in both. The weights are
    main-graph initializers the branches read (``shared``: one set for both, else one set each); the
    GELU's scalars are Constant nodes inside each branch."""
    top = GraphBuilder()
    weights = [(top.weight(D, H), top.weight(H), top.weight(H, D), top.weight(D))]
    if not shared:
        weights.append((top.weight(D, H), top.weight(H), top.weight(H, D), top.weight(D)))

    def branch(name: str, w1: str, b1: str, w2: str, b2: str, scale: float, residual: str) -> onnx.GraphProto:
        b = GraphBuilder(constant_nodes=True)
        b.count = 100  # names apart from the main graph's (a subgraph may not shadow them), the same in both
        x = b.op("Mul", "x", b.const(scale)) if scale != 1.0 else "x"
        h = b.op("Add", b1, b.op("MatMul", x, w1, name="/model/layers.0/fc1/MatMul"), name="/model/layers.0/fc1/Add")
        y = b.op("MatMul", erf_div(b, h), w2, name="/model/layers.0/fc2/MatMul")
        y = b.op(residual, b.op("Add", b2, y, name="/model/layers.0/fc2/Add"), "x", name="/model/layers.0/residual")
        return helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)])

    then_branch = branch("with_past", *weights[0], 1.0, "Add")
    else_branch = branch("no_past", *weights[-1], 2.0, "Sub")
    top.nodes.append(
        helper.make_node("If", ["cond"], ["y"], name="optimum::if", then_branch=then_branch, else_branch=else_branch)
    )
    graph = helper.make_graph(
        top.nodes,
        "merged",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", D]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", D])],
        top.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def loop_model(steps: int = 2) -> onnx.ModelProto:
    """A ``Loop`` of ``steps`` iterations whose body applies a GELU FFN with a residual, ``y ← FFN(y) + y``,
    reading its weights from the main graph's initializers."""
    top = GraphBuilder()
    w1, b1, w2, b2 = top.weight(D, H, scale=0.1), top.weight(H), top.weight(H, D, scale=0.1), top.weight(D)
    b = GraphBuilder(constant_nodes=True)
    b.count = 100
    h = b.op("Add", b.op("MatMul", "y_in", w1, name="/block/fc1/MatMul"), b1, name="/block/fc1/Add")
    y = b.op("Add", b.op("MatMul", erf_div(b, h), w2, name="/block/fc2/MatMul"), b2, name="/block/fc2/Add")
    y = b.op("Add", y, "y_in", name="/block/residual")
    cond = b.op("Identity", "cond_in")
    body = helper.make_graph(
        b.nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("y_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
            helper.make_tensor_value_info(y, TensorProto.FLOAT, None),
        ],
    )
    trips = top.const(steps, np.int64)
    top.nodes.append(helper.make_node("Loop", [trips, "", "x"], ["y"], name="/loop", body=body))
    return top.model("x", "y")
