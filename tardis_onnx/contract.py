"""What a rewritten graph promises: the one place its op, input order, names and metadata are spelled.

The emitter writes these, the schema declares them, the runtime, ``inspect``, ``diff`` and the
evaluation read them; ``tests/test_contract.py`` checks the C++ kernel (``custom_ops/tardis_ops.cc``,
``tardis_math.h``) and the numpy reference against them. No imports: everything may import this.
"""

from __future__ import annotations

# The custom op: ai.tardis::FfnFallback, version 1.
DOMAIN = "ai.tardis"
FALLBACK_OP = "FfnFallback"
OP_VERSION = 1
# Its inputs, in order. z_hat and predictor_v: exactly one is given; w1t may be left out with z_hat;
# row_scales is given exactly when w1t and w2 are int8 rows (the --quantize int8 rewrite).
FALLBACK_INPUTS = ("x", "y_folded", "z_hat", "w1t", "b1", "w2", "lines", "predictor_v", "row_scales")
OPTIONAL_INPUTS = frozenset({"z_hat", "w1t", "predictor_v", "row_scales"})
# Rows of the packed `lines` input ([4, h] float32).
LINES_ROWS = ("slope", "intercept", "lo", "hi")
# Rows of the `row_scales` input ([2, h] float32): the scale of each int8 row of w1t, then of w2.
ROW_SCALES_ROWS = ("w1t", "w2")
# Attributes and their defaults.
ATTRIBUTES = {"margin": 0.0, "approximate": "none"}

# Every node and initializer the rewrite adds is named tardis/<ffn>/<part>; the parts below are the
# ones other code looks up (FFN names may themselves contain "/").
NODE_PREFIX = "tardis/"
FOLDED_MATMUL = "FoldedMatMul"
FALLBACK_PARTS = ("Fallback", "Predictor")  # sub-scopes of the portable fallback and the predictor
INSIDE_WINDOW = "Fallback/InsideWindow_output"  # portable form: bool [..., h], z_hat inside the window
PRE_ACTIVATION = "Fallback/PreActivation_output"  # portable form: z = x·W1 + b1 [..., h]

# Model metadata (metadata_props).
METADATA_VERSION = "tardis_onnx.version"  # the tardis-onnx version that wrote it
METADATA_CONFIG = "tardis_onnx.config"  # the settings, JSON
METADATA_FFNS = "tardis_onnx.ffns"  # per FFN, JSON list: name, gelu, d, hidden, coverage, predictor, kept


def ffn_prefix(ffn: str) -> str:
    """``tardis/<ffn>``: the scope of everything the rewrite of FFN ``ffn`` adds."""
    return f"{NODE_PREFIX}{ffn}"


def ffn_tensor(ffn: str, part: str) -> str:
    """The name of ``part`` (e.g. :data:`INSIDE_WINDOW`) in FFN ``ffn``'s rewrite."""
    return f"{ffn_prefix(ffn)}/{part}"


def is_emitted(name: str) -> bool:
    return name.startswith(NODE_PREFIX)


def ffn_of(name: str) -> str | None:
    """``tardis/<ffn>/<part>`` → ``<ffn>``; None for a name the rewrite did not add."""
    if not is_emitted(name):
        return None
    rest = name[len(NODE_PREFIX) :]
    for part in FALLBACK_PARTS:
        if f"/{part}/" in rest:
            return rest.split(f"/{part}/")[0]
    return rest.rsplit("/", 1)[0]
