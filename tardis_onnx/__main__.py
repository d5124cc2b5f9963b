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
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m tardis_onnx {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
