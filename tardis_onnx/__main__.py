"""``python -m tardis_onnx {optimize,verify,inspect,diff,triton,evaluate} ...`` (also the ``tardis-onnx`` command).

``evaluate`` runs the experiments of a repository checkout (``experiments/``, not installed with the
package); installed alone it says so."""

from __future__ import annotations

import sys

COMMANDS = {
    "optimize": "tardis_onnx.optimize",
    "verify": "tardis_onnx.verify",
    "inspect": "tardis_onnx.inspect_model",
    "diff": "tardis_onnx.diff",
    "triton": "tardis_onnx.triton",
    "evaluate": "experiments.evaluate",
}
SUMMARIES = {
    "optimize": "fold every GELU FFN into one MatMul plus an outlier fallback (the defaults are the best recipe)",
    "verify": "run two models on the same inputs and compare their outputs (exit 1 on a mismatch)",
    "inspect": "list a model's FFN candidates, whether each folds and why not; a rewritten model's FFNs",
    "diff": "per-FFN node and byte differences between a model and its rewrite (text, HTML, JSON)",
    "triton": "write a Triton Inference Server model repository entry (op library copied in and registered)",
    "evaluate": "MiniLM on STS-B: TARDIS vs magnitude/Wanda/RIA pruning (from a repository checkout)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m tardis_onnx {{{','.join(COMMANDS)}}} ... (or tardis-onnx COMMAND ...)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage + "\n\ncommands (each takes --help):")
        for command, summary in SUMMARIES.items():
            print(f"  {command:<9} {summary}")
        return 0
    if argv and argv[0] == "--version":
        from tardis_onnx import __version__

        print(f"tardis-onnx {__version__}")
        return 0
    from tardis_onnx import errors

    if not argv or argv[0] not in COMMANDS:
        unknown = f"unknown command '{argv[0]}'; " if argv else ""
        return errors.report_error(errors.TardisError(f"{unknown}{usage}"))
    import importlib
    from pathlib import Path

    console = Path(sys.argv[0]).name == "tardis-onnx"
    errors.invoked_as = f"{'tardis-onnx' if console else 'python -m tardis_onnx'} {argv[0]}"
    try:
        try:
            module = importlib.import_module(COMMANDS[argv[0]])
        except ModuleNotFoundError as exc:
            if exc.name != COMMANDS[argv[0]].split(".")[0]:
                raise
            checkout = f"{argv[0]} runs from a checkout of the repository (python -m {COMMANDS[argv[0]]})"
            return errors.report_error(errors.TardisError(checkout))
        return module.main(argv[1:])
    finally:
        errors.invoked_as = None


if __name__ == "__main__":
    sys.exit(main())
