"""Render an ONNX model's graph, or the region around some nodes, to PNG through Netron.

    python tools/render_netron.py MODEL --out graph.png                            # the whole graph
    python tools/render_netron.py MODEL --out ffn.png --node tardis/layer.0/mlp    # one FFN (name or prefix)

``--node`` keeps the nodes whose name is NAME or starts with it, every node between them, and
``--context`` hops of neighbours (default 1); the region is written to a temporary model that Netron
opens. Needs PyPI ``netron`` and ``playwright`` (``pip install netron playwright``; never
``playwright install``: the browser is Debian's) and Debian ``chromium`` (``apt-get install chromium
fonts-wqy-microhei``; the font has the ``〈 〉`` Netron draws around weight shapes). ``$TARDIS_CHROMIUM``
names another Chromium. Netron serves its UI on 127.0.0.1; every other request is blocked, its
cookie-consent button is clicked, and the browser runs headless with a fresh profile.
Exits 0, or 2 with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tardis_onnx.errors import TardisError, finite_float, non_negative_int, run_command  # noqa: E402
from tardis_onnx.io import load_model  # noqa: E402
from tardis_onnx.schema import inferred_types, register_schemas  # noqa: E402

CHROMIUM_ENV = "TARDIS_CHROMIUM"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MAX_VIEWPORT = (4000, 8000)
PAD = 16  # pixels around the graph in the PNG


def find_chromium() -> str | None:
    """``$TARDIS_CHROMIUM``, else the first Chromium on PATH."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        return override if Path(override).is_file() else None
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def missing_requirements() -> list[str]:
    """What is missing to render, one phrase each (empty when everything is there)."""
    missing = [f"PyPI '{name}'" for name in ("netron", "playwright") if importlib.util.find_spec(name) is None]
    if find_chromium() is None:
        missing.append(f"a Chromium binary (apt-get install chromium, or set ${CHROMIUM_ENV})")
    return missing


def region(model: onnx.ModelProto, name: str, context: int = 1) -> onnx.ModelProto:
    """The nodes named ``name`` or under the prefix ``name``, every node between them and ``context``
    hops of neighbours, as a model of their own (inputs and outputs typed where shapes are known)."""
    graph = model.graph
    selected = {i for i, n in enumerate(graph.node) if n.name == name or n.name.startswith(name)}
    if not selected:
        raise TardisError(f"no node is named '{name}' or starts with it")
    producer = {v: i for i, n in enumerate(graph.node) for v in n.output}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for value in node.input:
            consumers.setdefault(value, []).append(i)

    def reach(start: set[int], step) -> set[int]:
        seen, todo = set(start), list(start)
        while todo:
            for j in step(todo.pop()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    def up(i: int) -> list[int]:
        return [producer[v] for v in graph.node[i].input if v in producer]

    def down(i: int) -> list[int]:
        return [j for v in graph.node[i].output for j in consumers.get(v, [])]

    keep = selected | (reach(selected, down) & reach(selected, up))
    for _ in range(context):
        keep |= {j for i in keep for j in up(i) + down(i)}
    keep |= {
        producer[v] for i in keep for v in graph.node[i].input if v in producer and _is_constant(graph, producer[v])
    }
    nodes = [graph.node[i] for i in sorted(keep)]
    produced = {v for n in nodes for v in n.output}
    initializers = {t.name: t for t in graph.initializer}
    register_schemas()
    types = {name: onnx.helper.make_value_info(name, kind) for name, kind in inferred_types(model).items()}
    read = [v for n in nodes for v in n.input if v and v not in produced]
    inputs = [v for v in dict.fromkeys(read) if v not in initializers]
    graph_outputs = {o.name for o in graph.output}
    outputs = [
        v for n in nodes for v in n.output if v in graph_outputs or any(j not in keep for j in consumers.get(v, []))
    ]
    sub = onnx.helper.make_graph(
        nodes,
        f"{graph.name or 'graph'}: {name}",
        [types.get(v) or onnx.helper.make_empty_tensor_value_info(v) for v in inputs],
        [types.get(v) or onnx.helper.make_empty_tensor_value_info(v) for v in outputs],
        [initializers[v] for v in dict.fromkeys(read) if v in initializers],
        value_info=[types[v] for n in nodes for v in n.output if v in types and v not in outputs],
    )
    result = onnx.helper.make_model(sub, opset_imports=list(model.opset_import))
    result.ir_version = model.ir_version
    return result


def _is_constant(graph: onnx.GraphProto, index: int) -> bool:
    return graph.node[index].op_type == "Constant"


@contextmanager
def netron_page(model_path: Path, names: bool = False, scale: float = 1.0, timeout: float = 60.0) -> Iterator:
    """A Playwright page showing ``model_path`` in Netron (consent clicked, graph drawn)."""
    import netron
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise TardisError(f"no Chromium found (apt-get install chromium, or set ${CHROMIUM_ENV})")
    logging.getLogger("netron").setLevel(logging.WARNING)
    address = netron.serve(str(model_path), address=("127.0.0.1", 0), browse=False)
    url = f"http://{address[0]}:{address[1]}/"

    def local_only(route) -> None:
        with suppress(Exception):  # the page may close while a request is in flight
            route.continue_() if route.request.url.startswith(url) else route.abort()

    try:
        with tempfile.TemporaryDirectory(prefix="tardis-netron-") as profile, sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile,
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1000},
                device_scale_factor=scale,
            )
            try:
                page = context.new_page()
                page.route("**/*", local_only)
                page.goto(url)
                _wait_for_graph(page, timeout)
                if names:
                    page.keyboard.press("Control+U")  # View > Show Names
                    page.wait_for_timeout(300)
                yield page
            finally:
                context.close()
    finally:
        netron.stop(address)


def _wait_for_graph(page, timeout: float) -> None:
    """Click Netron's cookie-consent button when it shows, until the graph is drawn."""
    button, nodes = page.locator("#message-button"), page.locator("#canvas g.node")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if button.is_visible():
            text = (page.locator("#message-text").text_content() or "").strip()
            if "update" in text.lower():
                raise TardisError(f"netron asks to be updated ('{text}'): pip install -U netron")
            if "cookies" not in text.lower():
                raise TardisError(f"netron cannot show the model: {text}")
            button.click()
        elif nodes.count() > 0 and "spinner" not in (page.locator("body").get_attribute("class") or ""):
            return
        page.wait_for_timeout(200)
    raise TardisError(f"netron did not draw the graph within {timeout:g} s")


def screenshot(page, out: Path) -> tuple[int, int]:
    """PNG of the drawn graph, cropped to it (the viewport is grown to fit, up to a limit); its pixel size."""
    box = page.locator("#canvas").bounding_box()
    width = min(MAX_VIEWPORT[0], int(box["width"]) + 400)
    height = min(MAX_VIEWPORT[1], int(box["height"]) + 400)
    page.set_viewport_size({"width": max(width, 800), "height": max(height, 600)})
    page.wait_for_timeout(300)
    box = page.locator("#origin").bounding_box() or page.locator("#canvas").bounding_box()  # the drawing, unpadded
    x, y = max(box["x"] - PAD, 0), max(box["y"] - PAD, 0)
    clip = {
        "x": x,
        "y": y,
        "width": min(box["width"] + 2 * PAD, width - x),
        "height": min(box["height"] + 2 * PAD, height - y),
    }
    page.screenshot(path=str(out), clip=clip)
    width, height = struct.unpack(">II", out.read_bytes()[16:24])  # the PNG's IHDR
    return width, height


def render(
    model_path: Path, out: Path, node: str | None = None, context: int = 1, names: bool = False, scale: float = 1.0
) -> tuple[int, int]:
    """Write the PNG of ``model_path`` (or of the region around ``node``) to ``out``; return its size."""
    missing = missing_requirements()
    if missing:
        raise TardisError("cannot render: missing " + ", ".join(missing))
    with tempfile.TemporaryDirectory(prefix="tardis-render-") as folder:
        view = model_path
        if node is not None:
            model = load_model(model_path)
            view = Path(folder) / model_path.name
            onnx.save(region(model, node, context), view)
        with netron_page(view, names, scale) as page:
            return screenshot(page, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Render an ONNX graph (or the region around a node) to PNG via Netron."
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--node", help="a node name, or a name prefix such as tardis/layer.0/mlp")
    parser.add_argument("--context", type=non_negative_int, default=1, help="hops of neighbours kept around --node")
    parser.add_argument("--names", action="store_true", help="show node and tensor names instead of op types")
    parser.add_argument("--scale", type=finite_float, default=1.0, help="device pixels per CSS pixel")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        raise TardisError(f"{args.model}: no such file")
    width, height = render(args.model, args.out, args.node, args.context, args.names, args.scale)
    print(f"{args.out}: {width}×{height} px, {args.out.stat().st_size / 1024:.0f} KB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
