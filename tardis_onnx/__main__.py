"""``python -m tardis_onnx {optimize,verify,inspect,diff} ...``"""

from __future__ import annotations

import sys

COMMANDS = {
    "optimize": "tardis_onnx.optimize",
    "verify": "tardis_onnx.verify",
    "inspect": "tardis_onnx.inspect_model",
    "diff": "tardis_onnx.diff",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m tardis_onnx {{{','.join(COMMANDS)}}} ..."
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        unknown = f"unknown command '{argv[0]}'; " if argv else ""
        print(f"error: {unknown}{usage}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
