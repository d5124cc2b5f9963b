"""Rewrite rules: recognising GELU spellings and the FFNs around them."""

from tardis_onnx.passes.ffn import FfnMatch, Refusal, find_ffns
from tardis_onnx.passes.gelu import GeluMatch, match_gelu

__all__ = ["FfnMatch", "GeluMatch", "Refusal", "find_ffns", "match_gelu"]
