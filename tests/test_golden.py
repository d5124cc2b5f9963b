"""The rewrite's output is a fixed function of its input: what ``optimize`` writes for the test models
(every GELU spelling, Gemm framing, fp16; portable and custom-op forms; default settings, untimed) must
stay byte for byte the same across refactors. When a change means to alter it, regenerate the hashes
(``python tests/test_golden.py --update``) and say why in the commit."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from ffn_graphs import SPELLINGS, ffn_model, fp16_model, gpt2_gemm_model

from tardis_onnx import runtime
from tardis_onnx.config import TardisConfig
from tardis_onnx.optimize import optimize_model

GOLDEN = Path(__file__).with_name("golden_outputs.json")
BUILDERS = {**{s: (lambda s=s: ffn_model(s)) for s in SPELLINGS}, "gpt2_gemm": gpt2_gemm_model, "fp16": fp16_model}
CASES = [f"{name}/{form}" for name in BUILDERS for form in ("portable", "custom")]


def graph_hash(case: str) -> str:
    """sha256 of the rewritten graph (metadata aside: it names the tool's version)."""
    name, form = case.split("/")
    model = BUILDERS[name]()
    optimize_model(model, TardisConfig(fallback=form, speed_check=False))
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_the_rewrite_is_byte_identical_to_the_recorded_one(case):
    if case.endswith("/custom") and not runtime.library_available():
        pytest.skip("the ai.tardis library is not built")
    want = json.loads(GOLDEN.read_text())[case]
    assert graph_hash(case) == want, f"{case}: the rewritten graph changed (regenerate: python {__file__} --update)"


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.write_text(json.dumps({case: graph_hash(case) for case in CASES}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
