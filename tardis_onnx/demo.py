"""``make demo``: the main job on an embedded default, printed step by step.

Exports a small GELU decoder with Optimum (built from a config: random weights), folds
its FFNs at coverage 0.9, then proves the rewrite exact with every neuron falling back
(coverage 0) using ``verify``. Run from the repository root (it uses ``models/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tardis_onnx import optimize, verify

OUT = Path("out/demo")


def main() -> int:
    from models.optimum_zoo import TEXT_GEN_PAST, export

    OUT.mkdir(parents=True, exist_ok=True)
    print("== 1. export: gpt2-shaped decoder with KV cache (Optimum, random weights from a config)")
    source = export("gpt2", task=TEXT_GEN_PAST)
    model = OUT / "gpt2.onnx"
    model.write_bytes(source.read_bytes())
    print(f"   {model}")
    print("\n== 2. optimize at coverage 0.9: per-FFN table")
    status = optimize.main([str(model), "--coverage", "0.9"])
    if status:
        return status
    print("\n== 3. optimize at coverage 0 (every neuron falls back) and verify it is exact")
    exact = OUT / "gpt2.exact.onnx"
    status = optimize.main([str(model), "-o", str(exact), "--coverage", "0", "-q"])
    if status:
        return status
    return verify.main([str(model), str(exact), "--atol", "1e-4", "--rtol", "1e-3"])


if __name__ == "__main__":
    sys.exit(main())
