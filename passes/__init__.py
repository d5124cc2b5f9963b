"""The pass, one module per step, composed in this order by :func:`tardis_onnx.optimize.optimize_model`:

prepare (``prepare.py``) → match (``gelu.py``: GELU spellings, ``ffn.py``: the FFN around each) → calibrate
(``capture.py``) → fit (``fit.py``) → emit (``rewrite.py``) → finish (``finish.py``). Here: the matcher's API."""

from tardis_onnx.passes.ffn import FfnMatch, Refusal, find_ffns
from tardis_onnx.passes.gelu import GeluMatch, match_gelu

__all__ = ["FfnMatch", "GeluMatch", "Refusal", "find_ffns", "match_gelu"]
