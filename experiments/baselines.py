"""One-shot pruning baselines on the same FFN weights and calibration data (docs/design.md §5).

Scores (ONNX layout ``W: [inputs, outputs]``, ``X`` the layer's input activations, ``‖X_j‖₂`` the
norm of input ``j`` over calibration tokens):

- magnitude: ``|W|``, the lowest fraction of each matrix zeroed;
- Wanda: ``|W_jk|·‖X_j‖₂``, compared within each output ``k`` (a column here, a row in PyTorch);
- RIA: ``(|W|/Σ_col|W| + |W|/Σ_row|W|)·‖X_j‖₂^0.5``, compared over the whole matrix.

W1 sees the FFN input ``x``, W2 the GELU output; both matrices are pruned to the same sparsity,
which is then the FFN weight reduction (the zeros are simply not read).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tardis_onnx import reference
from tardis_onnx.emit import remove_unused
from tardis_onnx.graph import GraphIndex
from tardis_onnx.passes import find_ffns
from tardis_onnx.passes.ffn import FfnMatch

METHODS = ("magnitude", "wanda", "ria")


def scores(method: str, weight: np.ndarray, input_norms: np.ndarray) -> np.ndarray:
    """Importance of each weight of ``weight: [inputs, outputs]`` given ``‖X_j‖₂`` per input ``j``."""
    w = np.abs(np.asarray(weight, dtype=np.float64))
    norms = np.asarray(input_norms, dtype=np.float64)[:, None]
    if method == "magnitude":
        return w
    if method == "wanda":
        return w * norms
    if method == "ria":
        # each weight relative to the other weights of its input (Σ over outputs) and of its output (Σ over inputs)
        rel = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30) + w / np.maximum(w.sum(axis=0, keepdims=True), 1e-30)
        return rel * np.sqrt(norms)
    raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")


def prune_mask(method: str, weight: np.ndarray, input_norms: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean keep-mask with exactly ``round(sparsity · count)`` zeros per comparison group.

    Groups: each output column for Wanda, the whole matrix for magnitude and RIA. Ties broken by index.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    s = scores(method, weight, input_norms)
    keep = np.ones(s.shape, dtype=bool)
    if method == "wanda":
        drop = int(round(sparsity * s.shape[0]))
        order = np.argsort(s, axis=0, kind="stable")[:drop]
        np.put_along_axis(keep, order, False, axis=0)
    else:
        drop = int(round(sparsity * s.size))
        keep.ravel()[np.argsort(s.ravel(), kind="stable")[:drop]] = False
    return keep


def activation_norms(ffn: FfnMatch, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(‖x_j‖₂ per FFN input, ‖GELU(z)_i‖₂ per neuron)`` over calibration tokens ``x: [n, d]``."""
    x = np.asarray(x, dtype=np.float64)
    sq_h = np.zeros(ffn.hidden)
    step = max(1, (1 << 22) // ffn.hidden)
    for start in range(0, x.shape[0], step):
        z = x[start : start + step] @ ffn.w1
        if ffn.b1 is not None:
            z = z + ffn.b1
        sq_h += (reference.gelu(z, ffn.gelu.form) ** 2).sum(axis=0)
    return np.sqrt((x * x).sum(axis=0)), np.sqrt(sq_h)


def prune_model(
    model: onnx.ModelProto,
    inputs: dict[str, np.ndarray],
    method: str,
    sparsity: float,
    norms: dict[str, tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> dict:
    """Zero the pruned FFN weights of ``model`` in place (new initializers ``baseline/<ffn>/w1|w2``).

    ``inputs[name]``: calibration inputs ``x`` of the FFN ``name`` (as :func:`find_ffns` names it).
    ``norms[name]``: :func:`activation_norms` already computed (else computed here). Returns
    ``{"sparsity": measured fraction of FFN weights zeroed, "ffns": count, "norms": the norms}``.
    """
    ffns, _ = find_ffns(model)
    index = GraphIndex(model.graph)
    zeros = total = 0
    norms = dict(norms or {})
    for ffn in ffns:
        if norms.get(ffn.name) is None:
            norms[ffn.name] = activation_norms(ffn, inputs[ffn.name])
        x_norm, g_norm = norms[ffn.name]
        for label, weight, input_norms in (("w1", ffn.w1, x_norm), ("w2", ffn.w2, g_norm)):
            node = _projection(index, ffn, weight)
            keep = prune_mask(method, weight, input_norms, sparsity)
            pruned = np.where(keep, weight, 0.0).astype(ffn.dtype)
            name = f"baseline/{ffn.name}/{label}"
            model.graph.initializer.append(numpy_helper.from_array(pruned, name))
            node.input[1] = name
            zeros += int((~keep).sum())
            total += keep.size
    remove_unused(model)
    return {"method": method, "sparsity": zeros / total if total else 0.0, "ffns": len(ffns), "norms": norms}


def _projection(index: GraphIndex, ffn: FfnMatch, weight: np.ndarray) -> onnx.NodeProto:
    """The MatMul/Gemm of ``ffn`` whose constant second input equals ``weight`` (untransposed)."""
    for node in ffn.nodes:
        if node.op_type in ("MatMul", "Gemm") and not any(
            a.name in ("transB", "transA") and a.i for a in node.attribute
        ):
            value = index.constant(node.input[1])
            if value is not None and value.shape == weight.shape and np.array_equal(value, weight.astype(value.dtype)):
                return node
    raise ValueError(f"FFN '{ffn.name}': no MatMul with the weight {weight.shape} as a plain initializer")
