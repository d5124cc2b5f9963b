"""The rewritten graph's contract (tardis_onnx/contract.py) is what the C++ kernel, the schema, the numpy
reference and the emitter actually use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from ffn_graphs import ffn_model

from tardis_onnx import contract, reference, schema
from tardis_onnx.config import TardisConfig
from tardis_onnx.optimize import optimize_model

OPS = Path(__file__).resolve().parent.parent / "custom_ops"
CC = (OPS / "tardis_ops.cc").read_text()
MATH = (OPS / "tardis_math.h").read_text()


def _cpp_constants(text: str) -> dict[str, str]:
    """``constexpr`` scalars and enumerators: name → value as written."""
    found = dict(re.findall(r"\b(k\w+)\s*=\s*(\"[^\"]*\"|\d+)", text))
    return {k: v.strip('"') for k, v in found.items()}


def test_the_cpp_kernel_registers_the_contracts_op_and_input_order():
    cpp = _cpp_constants(CC)
    assert cpp["kDomain"] == contract.DOMAIN and cpp["kFfnFallback"] == contract.FALLBACK_OP
    assert int(cpp["kInputs"]) == len(contract.FALLBACK_INPUTS)
    indices = {"kZHat": "z_hat", "kW1t": "w1t", "kW2": "w2", "kLines": "lines", "kPredictorV": "predictor_v"}
    indices["kRowScales"] = "row_scales"
    for constant, name in indices.items():
        assert int(cpp[constant]) == contract.FALLBACK_INPUTS.index(name), constant
    optional = re.search(r"const bool optional = (index == .*?);", CC).group(1)
    assert {indices[c] for c in re.findall(r"index == (k\w+)", optional)} == contract.OPTIONAL_INPUTS


def test_the_cpp_attribute_defaults_and_lines_rows_are_the_contracts():
    assert re.search(r"float margin = ([\d.]+)f;", CC).group(1) == str(contract.ATTRIBUTES["margin"])
    assert re.search(r'std::string approximate = "(\w+)";', CC).group(1) == contract.ATTRIBUTES["approximate"]
    rows = dict(re.findall(r"(k\w+) = (\d)", re.search(r"enum LinesRow \{([^}]*)\}", MATH).group(1)))
    assert [int(rows[f"k{n.capitalize()}"]) for n in contract.LINES_ROWS] == [0, 1, 2, 3]
    packed = reference.pack_lines(reference.NeuronLines(*(np.array([float(k)]) for k in range(4))))
    assert packed[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]  # slope, intercept, lo, hi: the same order


def test_the_cpp_row_scales_rows_are_the_contracts():
    cpu = (OPS / "ffn_fallback_cpu.cc").read_text()
    rows = dict(re.findall(r"(k\w+) = (\d)", re.search(r"enum Matrix \{([^}]*)\}", cpu).group(1)))
    assert [int(rows[k]) for k in ("kW1", "kW2")] == [contract.ROW_SCALES_ROWS.index(r) for r in ("w1t", "w2")]


def test_the_schema_declares_the_contract():
    op = schema.fallback_schema()
    assert (op.name, op.domain, op.since_version) == (contract.FALLBACK_OP, contract.DOMAIN, contract.OP_VERSION)
    assert tuple(p.name for p in op.inputs) == contract.FALLBACK_INPUTS
    optional = {p.name for p in op.inputs if p.option == op.FormalParameterOption.Optional}
    assert optional == contract.OPTIONAL_INPUTS
    assert set(op.attributes) == set(contract.ATTRIBUTES)


def test_a_rewritten_model_keeps_the_contract():
    model = ffn_model("tanh_pow")
    result = optimize_model(model, TardisConfig(coverage=0.9, fallback="custom", predictor="int4"))
    (row,) = result.ffns
    emitted = [n for n in model.graph.node if contract.is_emitted(n.name)]
    assert emitted and all(contract.ffn_of(n.name) == row.name for n in emitted)
    (fallback,) = [n for n in emitted if (n.domain, n.op_type) == (contract.DOMAIN, contract.FALLBACK_OP)]
    for position, name in enumerate(contract.FALLBACK_INPUTS[3:7], start=3):
        assert fallback.input[position] == contract.ffn_tensor(row.name, name)
    assert any(n.name == contract.ffn_tensor(row.name, contract.FOLDED_MATMUL) for n in emitted)
    props = {p.key: p.value for p in model.metadata_props}
    (record,) = json.loads(props[contract.METADATA_FFNS])
    want = {"name": row.name, "gelu": row.gelu, "d": row.d, "hidden": row.hidden, "coverage": row.coverage}
    assert record == want | {"predictor": "int4", "kept": False}
    assert json.loads(props[contract.METADATA_CONFIG])["fallback"] == "custom" and props[contract.METADATA_VERSION]
