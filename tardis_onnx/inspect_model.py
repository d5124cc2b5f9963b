"""Inspect: ``python -m tardis_onnx inspect MODEL [--why] [--json]`` says what ``optimize`` would do.

For a model not yet rewritten: every FFN candidate with its GELU spelling, ``d→h`` and whether it
folds; for each refusal its rule and reason, and with ``--why`` the best partial match (the GELU
region's nodes, the FFN nodes matched before the match stopped). For a rewritten model: the folded
FFNs (read off the ``tardis/<ffn>/...`` nodes and their initializers, with the GELU spelling and
coverage the rewrite recorded in the ``tardis_onnx.ffns`` metadata) and the ``tardis_onnx.*``
metadata. Exits 0, or 2 with one line on stderr when the model cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from tardis_onnx.contract import (
    DOMAIN,
    FALLBACK_OP,
    FOLDED_MATMUL,
    METADATA_CONFIG,
    METADATA_FFNS,
    METADATA_VERSION,
    ffn_of,
    ffn_prefix,
    is_emitted,
)
from tardis_onnx.errors import run_command
from tardis_onnx.files import strict_json
from tardis_onnx.graph import attribute, node_label
from tardis_onnx.io import load_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.passes.ffn import scope_indexes
from tardis_onnx.passes.gelu import GeluMatch, anchors, match_gelu
from tardis_onnx.subgraphs import walk
from tardis_onnx.tables import text_table


@dataclass
class Candidate:
    """One FFN candidate of a model not yet rewritten."""

    name: str
    folds: bool
    gelu: str | None  # spelling, when a GELU was recognised
    d: int | None = None
    hidden: int | None = None
    d_out: int | None = None
    rule: str | None = None  # refusals: the stable rule name
    reason: str | None = None
    gelu_nodes: list[str] = field(default_factory=list)
    ffn_nodes: list[str] = field(default_factory=list)  # matched around the GELU (all of them when it folds)


@dataclass
class FoldedFfn:
    """One FFN of a rewritten model, read off its ``tardis/<name>/`` nodes and initializers."""

    name: str
    fallback: str  # "custom" (ai.tardis::FfnFallback) or "portable"
    gelu: str | None
    d: int | None
    hidden: int | None
    d_out: int | None
    coverage: float | None
    nodes: list[str]
    ops: dict[str, int]
    weight_bytes: int
    doc: str = ""


def candidates(model: onnx.ModelProto) -> list[Candidate]:
    """Every FFN candidate of ``model``, foldable ones first, in graph order."""
    ffns, refusals = find_ffns(model)
    found = [
        Candidate(
            name=f.name,
            folds=True,
            gelu=f.gelu.spelling,
            d=int(f.w1_stored.shape[0]),
            hidden=f.hidden,
            d_out=int(f.w2_stored.shape[1]),
            gelu_nodes=[node_label(n) for n in f.gelu.nodes],
            ffn_nodes=[node_label(n) for n in f.nodes[len(f.gelu.nodes) :]],
        )
        for f in ffns
    ]
    regions = _gelu_regions(model)
    for refusal in refusals:
        gelu = regions.get(refusal.nodes[0]) if refusal.nodes else None
        count = len(gelu.nodes) if gelu is not None else 0
        found.append(
            Candidate(
                name=refusal.name,
                folds=False,
                gelu=gelu.spelling if gelu is not None else None,
                rule=refusal.rule,
                reason=refusal.reason,
                gelu_nodes=list(refusal.nodes[:count]),
                ffn_nodes=list(refusal.nodes[count:]),
            )
        )
    return found


def _gelu_regions(model: onnx.ModelProto) -> dict[str, GeluMatch]:
    """Every recognised GELU (subgraphs included), by the label of its first node (how a refusal's ``nodes``
    start)."""
    regions = {}
    for _, index in scope_indexes(model.graph):
        for anchor in anchors(index):
            gelu = match_gelu(index, anchor)
            if isinstance(gelu, GeluMatch):
                regions.setdefault(node_label(gelu.nodes[0]), gelu)
    return regions


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its dims and type (the data itself need not be loaded)."""
    count = 1
    for dim in tensor.dims:
        count *= dim
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return len(tensor.raw_data)
    return count * item


def folded_ffns(model: onnx.ModelProto) -> list[FoldedFfn]:
    """The FFNs a tardis-onnx rewrite put into ``model``, in graph order (subgraphs after the main graph; an
    FFN folded in several subgraphs once, with the nodes of the first)."""
    groups: dict[str, list[onnx.NodeProto]] = {}
    for _, graph in walk(model.graph):
        local: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            name = ffn_of(node.name)
            if name is not None and name not in groups:
                local.setdefault(name, []).append(node)
        groups.update(local)
    initializers = {t.name: t for t in model.graph.initializer}
    recorded = {f["name"]: f for f in _recorded_ffns(model)}
    result = []
    for name, nodes in groups.items():
        prefix = ffn_prefix(name) + "/"
        owned = [t for n, t in initializers.items() if n.startswith(prefix)]
        dims = {t.name[len(prefix) :]: list(t.dims) for t in owned}
        folded = next((n for n in nodes if n.name == prefix + FOLDED_MATMUL), None)
        doc = folded.doc_string if folded is not None else ""
        record = recorded.get(name, {})
        # folded_weight [d, d_out], or with columns appended (the low-rank code; the int8 predictor's x·W1)
        d = next((shape[0] for part, shape in dims.items() if part.startswith("folded_weight")), None)
        if folded is not None and folded.op_type == "MatMulNBits":  # packed [N, blocks, 16]: d is its K
            d = attribute(folded, "K")
        hidden, d_out = (dims.get("w2") or dims.get("w2_int8") or [None, None])[:2]
        ops: dict[str, int] = {}
        for node in nodes:
            ops[op_name(node)] = ops.get(op_name(node), 0) + 1
        custom = any(n.op_type == FALLBACK_OP and n.domain == DOMAIN for n in nodes)
        result.append(
            FoldedFfn(
                name=name,
                fallback="custom" if custom else "portable",
                gelu=record.get("gelu"),
                d=d,
                hidden=hidden,
                d_out=d_out,
                coverage=record.get("coverage"),
                nodes=[n.name for n in nodes],
                ops=ops,
                weight_bytes=sum(tensor_bytes(t) for t in owned),
                doc=doc,
            )
        )
    return result


def _recorded_ffns(model: onnx.ModelProto) -> list[dict]:
    """The per-FFN records the rewrite stored in the ``tardis_onnx.ffns`` metadata ([] when absent)."""
    value = next((p.value for p in model.metadata_props if p.key == METADATA_FFNS), "[]")
    try:
        records = json.loads(value)
    except json.JSONDecodeError:
        return []
    return [r for r in records if isinstance(r, dict) and "name" in r] if isinstance(records, list) else []


def op_name(node: onnx.NodeProto) -> str:
    """``MatMul``, or ``domain::Op`` outside the default domain."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def metadata(model: onnx.ModelProto) -> dict:
    """The ``tardis_onnx.*`` metadata of a rewritten model (the config decoded), or ``{}``."""
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_VERSION not in props:
        return {}
    try:
        config = json.loads(props.get(METADATA_CONFIG, "{}"))
    except json.JSONDecodeError:
        config = props.get(METADATA_CONFIG)
    return {"version": props[METADATA_VERSION], "config": config}


def inspect(model: onnx.ModelProto) -> dict:
    """What ``inspect --json`` prints: the candidates, or for a rewritten model its folded FFNs."""
    meta = metadata(model)
    folded = folded_ffns(model)
    if meta or folded:
        left = [c for c in candidates(model) if not any(is_emitted(n) for n in c.gelu_nodes + c.ffn_nodes)]
        return {
            "rewritten": True,
            "metadata": meta,
            "folded": [asdict(f) for f in folded],
            "candidates": [asdict(c) for c in left],
        }
    return {"rewritten": False, "candidates": [asdict(c) for c in candidates(model)]}


def _dims(d: int | None, hidden: int | None) -> str:
    return f"{d}→{hidden}" if d is not None and hidden is not None else "-"


def print_inspection(path: Path, report: dict, why: bool) -> None:
    rows = report["candidates"]
    if report["rewritten"]:
        meta, folded = report["metadata"], report["folded"]
        version = f"tardis-onnx {meta['version']}" if meta else "tardis-onnx (no metadata)"
        print(f"{path}: rewritten by {version}; {len(folded)} folded FFN{'s' * (len(folded) != 1)}")
        config = meta.get("config") if meta else None
        if isinstance(config, dict):
            keys = ("fallback", "coverage", "target_reduction", "predictor", "window", "allocation", "refit")
            print("config: " + ", ".join(f"{k}={config[k]}" for k in keys if config.get(k) is not None))
        table = [("ffn", "gelu", "d→h", "fallback", "coverage", "nodes", "weights")]
        for f in folded:
            coverage = "-" if f["coverage"] is None else f"{f['coverage']:g}"
            table.append(
                (
                    f["name"],
                    f["gelu"] or "?",
                    _dims(f["d"], f["hidden"]),
                    f["fallback"],
                    coverage,
                    str(len(f["nodes"])),
                    human_bytes(f["weight_bytes"]),
                )
            )
        _print_table(table)
        if why:
            for f in folded:
                ops = ", ".join(f"{op}×{n}" if n > 1 else op for op, n in sorted(f["ops"].items()))
                print(f"  {f['name']}: {ops}")
        if rows:
            print("left unchanged:")
    else:
        folds = sum(c["folds"] for c in rows)
        print(f"{path}: {len(rows)} FFN candidate{'s' * (len(rows) != 1)}, {folds} would fold")
    if not rows:
        return
    table = [("ffn", "gelu", "d→h", "folds")]
    for c in rows:
        verdict = "yes" if c["folds"] else f"no: {c['rule']}"
        table.append((c["name"], c["gelu"] or "-", _dims(c["d"], c["hidden"]), verdict))
    _print_table(table)
    for c in rows:
        if not c["folds"]:
            print(f"  {c['name']}: {c['rule']}: {c['reason']}")
        if why:
            if c["gelu_nodes"]:
                print(f"    GELU region ({len(c['gelu_nodes'])} nodes): {', '.join(c['gelu_nodes'])}")
            if c["ffn_nodes"]:
                label = "FFN nodes" if c["folds"] else "FFN nodes matched" if c["gelu_nodes"] else "activation"
                print(f"    {label} ({len(c['ffn_nodes'])}): {', '.join(c['ffn_nodes'])}")
            if not c["folds"]:
                print(f"    match stopped: {c['reason']}")


def _print_table(rows: list[tuple[str, ...]]) -> None:
    print("\n".join(text_table(rows[0], rows[1:])))


def human_bytes(count: int) -> str:
    """``1536`` → ``1.5 KB``."""
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx inspect",
        description="List the GELU FFN candidates of a model and whether each would fold "
        "(or, for a rewritten model, the FFNs that were folded).",
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--why", action="store_true", help="show the nodes matched, and where a refused match stopped")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def run(args: argparse.Namespace) -> None:
    report = inspect(load_model(args.model))
    if args.json:
        print(strict_json({"model": str(args.model), **report}, indent=2))
    else:
        print_inspection(args.model, report, args.why)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
