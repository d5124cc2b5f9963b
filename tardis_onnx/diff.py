"""Diff: ``python -m tardis_onnx diff ORIGINAL REWRITTEN [--html OUT.html] [--json OUT.json]``.

What a rewrite changed: per FFN (the ``tardis/<ffn>/`` nodes) the nodes removed and added, the op
histogram of the whole graph (If/Loop/Scan subgraphs included) before and after, weight bytes and file
sizes on disk (external data files included). Prints text; ``--html`` also writes a standalone page (no
external assets).
Exits 0, or 2 with one line on stderr when a model cannot be read.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from tardis_onnx.contract import ffn_of
from tardis_onnx.errors import run_command
from tardis_onnx.files import StagedWrites, check_targets, model_files, strict_json
from tardis_onnx.graph import node_label
from tardis_onnx.inspect_model import human_bytes, op_name, tensor_bytes
from tardis_onnx.io import load_model
from tardis_onnx.passes import find_ffns
from tardis_onnx.subgraphs import subgraphs
from tardis_onnx.tables import text_table

OTHER = "(outside any FFN)"


@dataclass
class NodeChange:
    name: str
    op: str


@dataclass
class FfnChange:
    """One FFN's share of the diff."""

    name: str
    removed: list[NodeChange] = field(default_factory=list)
    added: list[NodeChange] = field(default_factory=list)
    removed_weight_bytes: int = 0
    added_weight_bytes: int = 0


@dataclass
class ModelDiff:
    original: str
    rewritten: str
    ffns: list[FfnChange]
    ops_before: dict[str, int]
    ops_after: dict[str, int]
    weight_bytes_before: int
    weight_bytes_after: int
    disk_before: dict[str, int]  # file name → bytes (the model and its external data files)
    disk_after: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def disk_files(path: Path) -> dict[str, int]:
    """The model file and every external data file its tensors name, with their sizes."""
    files = {path.name: path.stat().st_size}
    for tensor in _tensors(load_model(path, load_weights=False)):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        target = path.parent / location if location else None
        if target is not None and location not in files and target.is_file():
            files[location] = target.stat().st_size
    return files


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers and Constant-node values of the main graph."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return tensors


def _nodes(model: onnx.ModelProto) -> list[tuple[tuple, onnx.NodeProto]]:
    """Every node, subgraphs included, with where it is: ``((If/Loop/Scan node name, attribute), ...)``."""
    found = []

    def visit(graph: onnx.GraphProto, where: tuple) -> None:
        found.extend((where, node) for node in graph.node)
        for position, attribute, sub in subgraphs(graph):
            visit(sub, (*where, (graph.node[position].name, attribute)))

    visit(model.graph, ())
    return found


def _weights(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of each initializer and Constant node output (subgraphs included), by value name."""
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    for _, node in _nodes(model):
        if node.op_type == "Constant":
            sizes[node.output[0]] = sum(
                tensor_bytes(a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR
            )
    return sizes


def _key(where: tuple, node: onnx.NodeProto) -> tuple:
    """What identifies a node across the two models: its subgraph, name, op and outputs."""
    return where, node.name, op_name(node), tuple(node.output)


def diff_models(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> dict[str, FfnChange]:
    """Per FFN name: the nodes the rewrite removed (the FFN's matched nodes, and what became unused
    with them) and the nodes it added (``tardis/<name>/...``), with the weight bytes of each side."""
    before = {_key(w, n): n for w, n in _nodes(original)}
    after = {_key(w, n): n for w, n in _nodes(rewritten)}
    removed = [n for k, n in before.items() if k not in after]
    added = [n for k, n in after.items() if k not in before]
    changes: dict[str, FfnChange] = {}
    owner: dict[int, str] = {}
    for match in find_ffns(original)[0]:
        for node in (n for site in match.sites for n in site.nodes):
            owner[id(node)] = match.name
    for node in added:
        name = ffn_of(node.name) or OTHER
        changes.setdefault(name, FfnChange(name)).added.append(NodeChange(node_label(node), op_name(node)))
    _adopt_orphans(removed, owner)
    for node in removed:
        name = owner.get(id(node), OTHER)
        changes.setdefault(name, FfnChange(name)).removed.append(NodeChange(node_label(node), op_name(node)))
    # Weights: an initializer gone from the rewrite belongs to the FFN whose removed nodes read it.
    weights_before, weights_after = _weights(original), _weights(rewritten)
    original_weights = set(weights_before)
    for node in removed:
        name = owner.get(id(node), OTHER)
        for value in node.input:
            if value in weights_before and value not in weights_after:
                changes[name].removed_weight_bytes += weights_before.pop(value)
        if node.op_type == "Constant" and node.output[0] in weights_before and node.output[0] not in weights_after:
            changes[name].removed_weight_bytes += weights_before.pop(node.output[0])
    for tensor in rewritten.graph.initializer:
        if tensor.name not in original_weights:
            name = ffn_of(tensor.name) or OTHER
            changes.setdefault(name, FfnChange(name)).added_weight_bytes += tensor_bytes(tensor)
    ordered = [c for n, c in changes.items() if n != OTHER] + [c for n, c in changes.items() if n == OTHER]
    return {c.name: c for c in ordered}


def _adopt_orphans(removed: list[onnx.NodeProto], owner: dict[int, str]) -> None:
    """A removed node outside every match (a weight's Constant/Transpose/Cast) joins the FFN that
    all its removed readers belong to."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in removed:
        for value in node.input:
            readers.setdefault(value, []).append(node)
    changed = True
    while changed:
        changed = False
        for node in removed:
            if id(node) in owner:
                continue
            owners = {owner.get(id(r)) for v in node.output for r in readers.get(v, [])}
            if len(owners) == 1 and None not in owners:
                owner[id(node)] = owners.pop()
                changed = True


def compare(original_path: Path, rewritten_path: Path) -> ModelDiff:
    original = load_model(original_path)
    rewritten = load_model(rewritten_path, load_weights=False)
    changes = diff_models(original, rewritten)
    return ModelDiff(
        original=str(original_path),
        rewritten=str(rewritten_path),
        ffns=list(changes.values()),
        ops_before=dict(Counter(op_name(n) for _, n in _nodes(original))),
        ops_after=dict(Counter(op_name(n) for _, n in _nodes(rewritten))),
        weight_bytes_before=sum(_weights(original).values()),
        weight_bytes_after=sum(_weights(rewritten).values()),
        disk_before=disk_files(original_path),
        disk_after=disk_files(rewritten_path),
    )


def _op_summary(changes: list[NodeChange]) -> str:
    counts = Counter(c.op for c in changes)
    return ", ".join(f"{op}×{n}" if n > 1 else op for op, n in sorted(counts.items()))


def _histogram_rows(d: ModelDiff) -> list[tuple[str, int, int]]:
    ops = sorted(set(d.ops_before) | set(d.ops_after))
    return [(op, d.ops_before.get(op, 0), d.ops_after.get(op, 0)) for op in ops]


def _signed(n: int) -> str:
    return f"{n:+d}" if n else "0"


def format_text(d: ModelDiff, nodes: bool = False) -> str:
    lines = [f"original:  {d.original}", f"rewritten: {d.rewritten}", ""]
    for c in d.ffns:
        lines.append(
            f"{c.name}: -{len(c.removed)} nodes +{len(c.added)} nodes; weights -{human_bytes(c.removed_weight_bytes)} "
            f"+{human_bytes(c.added_weight_bytes)}"
        )
        lines.append(f"  removed: {_op_summary(c.removed) or '-'}")
        lines.append(f"  added:   {_op_summary(c.added) or '-'}")
        if nodes:
            lines += [f"    - {n.name} ({n.op})" for n in c.removed] + [f"    + {n.name} ({n.op})" for n in c.added]
    total_a, total_b = sum(d.ops_before.values()), sum(d.ops_after.values())
    ops = [(op, a, b, _signed(b - a)) for op, a, b in _histogram_rows(d)]
    lines += [
        "",
        *text_table(
            ("op", "before", "after", "change"),
            [*ops, ("total", total_a, total_b, _signed(total_b - total_a))],
            right=(1, 2),
        ),
    ]
    disk_a, disk_b = sum(d.disk_before.values()), sum(d.disk_after.values())
    sizes = [
        (
            "weights",
            human_bytes(d.weight_bytes_before),
            human_bytes(d.weight_bytes_after),
            _ratio(d.weight_bytes_after, d.weight_bytes_before),
        ),
        ("on disk", human_bytes(disk_a), human_bytes(disk_b), _ratio(disk_b, disk_a)),
    ]
    lines += ["", *text_table(("", "before", "after", "ratio"), sizes, right=(1, 2))]
    for label, files in (("before", d.disk_before), ("after", d.disk_after)):
        if len(files) > 1:
            lines.append(f"  files {label}: " + ", ".join(f"{n} {human_bytes(s)}" for n, s in files.items()))
    return "\n".join(lines)


def _ratio(after: int, before: int) -> str:
    return f"×{after / before:.2f}" if before else "-"


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.minus{color:#b3261e}.plus{color:#1b7f3b}code{font-size:.95em}
.bar{display:inline-block;height:.8em;vertical-align:middle}.b{background:#9db4d6}.a{background:#e7a561}
details{margin:.3em 0 .8em 1em}summary{cursor:pointer}ul{margin:.2em 0;columns:2}
"""


def format_html(d: ModelDiff) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>tardis-onnx diff: {esc(Path(d.rewritten).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>tardis-onnx diff</h1>",
        f"<p>original <code>{esc(d.original)}</code><br>rewritten <code>{esc(d.rewritten)}</code></p>",
        "<h2>Per FFN</h2>",
        '<table><tr><th>FFN</th><th class="n">removed</th><th class="n">added</th>'
        '<th class="n">weights removed</th><th class="n">weights added</th></tr>',
    ]
    for c in d.ffns:
        out.append(
            f'<tr><td><a href="#ffn-{esc(c.name)}"><code>{esc(c.name)}</code></a></td>'
            f'<td class="n minus">−{len(c.removed)}</td><td class="n plus">+{len(c.added)}</td>'
            f'<td class="n">{human_bytes(c.removed_weight_bytes)}</td>'
            f'<td class="n">{human_bytes(c.added_weight_bytes)}</td>'
            "</tr>"
        )
    out.append("</table>")
    for c in d.ffns:
        out.append(f'<h3 id="ffn-{esc(c.name)}"><code>{esc(c.name)}</code></h3>')
        for label, changes, cls in (("removed", c.removed, "minus"), ("added", c.added, "plus")):
            items = "".join(f"<li><code>{esc(n.name)}</code> {esc(n.op)}</li>" for n in changes)
            summary = esc(_op_summary(changes) or "-")
            out.append(
                f'<details><summary><span class="{cls}">{label} {len(changes)}</span>: {summary}</summary>'
                f"<ul>{items}</ul></details>"
            )
    rows = _histogram_rows(d)
    peak = max([1] + [max(a, b) for _, a, b in rows])
    out += [
        "<h2>Ops, whole graph</h2>",
        '<table><tr><th>op</th><th class="n">before</th><th class="n">after</th><th class="n">change</th>'
        '<th><span class="bar b" style="width:1em"></span> before <span class="bar a" style="width:1em"></span> after'
        "</th></tr>",
    ]
    for op, a, b in rows:
        cls = "plus" if b > a else "minus" if b < a else ""
        bars = (
            f'<span class="bar b" style="width:{120 * a / peak:.1f}px"></span><br>'
            f'<span class="bar a" style="width:{120 * b / peak:.1f}px"></span>'
        )
        out.append(
            f'<tr><td><code>{esc(op)}</code></td><td class="n">{a}</td><td class="n">{b}</td>'
            f'<td class="n {cls}">{_signed(b - a)}</td><td>{bars}</td></tr>'
        )
    total_a, total_b = sum(d.ops_before.values()), sum(d.ops_after.values())
    out.append(
        f'<tr><th>total</th><th class="n">{total_a}</th><th class="n">{total_b}</th>'
        f'<th class="n">{_signed(total_b - total_a)}</th><th></th></tr></table>'
    )
    disk_a, disk_b = sum(d.disk_before.values()), sum(d.disk_after.values())
    out += [
        "<h2>Bytes</h2>",
        '<table><tr><th></th><th class="n">before</th><th class="n">after</th><th class="n">ratio</th></tr>',
        f'<tr><td>weights</td><td class="n">{human_bytes(d.weight_bytes_before)}</td>'
        f'<td class="n">{human_bytes(d.weight_bytes_after)}</td>'
        f'<td class="n">{_ratio(d.weight_bytes_after, d.weight_bytes_before)}</td></tr>',
        f'<tr><td>on disk</td><td class="n">{human_bytes(disk_a)}</td><td class="n">{human_bytes(disk_b)}</td>'
        f'<td class="n">{_ratio(disk_b, disk_a)}</td></tr></table>',
        '<table><tr><th>file</th><th class="n">bytes</th></tr>',
    ]
    for files in (d.disk_before, d.disk_after):
        out += [f'<tr><td><code>{esc(n)}</code></td><td class="n">{s:,}</td></tr>' for n, s in files.items()]
    out += ["</table>", "</body></html>", ""]
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx diff",
        description="What a tardis-onnx rewrite changed: nodes per FFN, op counts, weight bytes, file sizes.",
    )
    parser.add_argument("original", type=Path)
    parser.add_argument("rewritten", type=Path)
    parser.add_argument("--nodes", action="store_true", help="list every removed and added node")
    parser.add_argument("--html", type=Path, help="also write a standalone HTML page")
    parser.add_argument("--json", type=Path, help="also write the diff as JSON")
    return parser


def run(args: argparse.Namespace) -> None:
    check_targets([args.html, args.json], [*model_files(args.original), *model_files(args.rewritten)])
    result = compare(args.original, args.rewritten)
    with StagedWrites() as staged:
        if args.html is not None:
            staged.write_text(args.html, format_html(result) + "\n")
        if args.json is not None:
            staged.write_text(args.json, strict_json(result.to_dict()) + "\n")
    print(format_text(result, args.nodes))


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
