"""A GELU decoder-only language model of a chosen size, random weights, written straight to ONNX, cached outside git.

The paper's scale (a 7B GELU model) cannot be built in torch on a 24 GB machine, so this recipe writes the graph with
``onnx.helper`` and streams the weights, one tensor at a time in chunks, into **one** external-data file beside
the model (``model.onnx.data``), each at a 4096-byte aligned offset so ONNX Runtime can memory-map it. Peak memory
is a few chunks, whatever the model's size.

Architecture (Falcon-7B's, ``parallel_attn``): ``h = x + attn(ln(x)) + mlp(ln(x))`` with one LayerNorm per layer,
no linear biases, multi-query attention (fused ``query_key_value``), exact GELU spelled as torch exports it
(``Div √2 → Erf → Add 1 → Mul x → Mul 0.5``) between ``dense_h_to_4h`` and ``dense_4h_to_h``, a final LayerNorm and
an LM head. Differences from Falcon: **no rotary positions** (they add no weights; attention here is
position-blind apart from the causal mask) and the **LM head is stored separately** (``lm_head.weight``, ``[d,
vocab]``), not tied to the embedding, as Optimum's Falcon export also stores it: a tied head would need a
Transpose of the embedding on every run, or a Gather on a transposed table that tools reading the vocabulary from
the embedding would misread. Matrix weights are stored in MatMul layout ``[in, out]`` (torch's ``Linear.weight``
transposed) under Hugging Face's module names; node names follow Optimum's (``/transformer/h.0/mlp/...``).

Interface as Optimum's ``text-generation-with-past``: inputs ``input_ids`` ``[batch, seq]`` int64,
``attention_mask`` ``[batch, past+seq]`` int64 (zeros mask keys: padding), ``past_key_values.{i}.key|value``
``[batch, kv_heads, past, head_dim]``; outputs ``logits`` ``[batch, seq, vocab]`` and ``present.{i}.key|value``.
No ``position_ids`` (nothing uses them). Opset 17, standard ops only; fp16 runs on ONNX Runtime's CPU provider (it
inserts casts where it has no fp16 kernel); bfloat16 is written but has no CPU kernels there.

Weights: ``numpy.random.default_rng([seed, k])`` for the k-th tensor, normal with std ``1/sqrt(fan_in)`` (the
embedding std 1), LayerNorm weights ``1 + 0.02·N`` and biases ``0.02·N``.

    from models.gelu_decoder import build, decode
    path = build("falcon-7b")       # <cache>/gelu-decoder__falcon-7b__float16__L32__seed0__v1/model.onnx
    ids, seconds = decode(session, prompt_ids, steps=8)

CLI: ``python models/gelu_decoder.py --preset falcon-7b [--layers N] [--dtype float16] [--out DIR] [--seed S]``
writes the model to ``DIR`` (created; an existing non-empty one is refused) or to the cache, and prints the
files, parameters, bytes, seconds and peak memory.

Cost on the 2-core machine, falcon-7b in fp16 (7.22 B parameters, 14.4 GB): written in 2-2.3 min at 230 MiB peak
memory. ONNX Runtime's CPU provider (no graph optimisation, no memory arena, no prepacking) opens it in 0.2 s (the
weights are mapped, not read), prefills 4 tokens in 12 s and decodes 5-7 s per token; peak RSS 14.5 GB, of which
0.1 GB anonymous (the rest is the mapped data file, page cache the kernel can drop).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tardis_onnx from a checkout

from optimum_zoo import _clean_stale_tmp, default_cache_dir  # noqa: E402

from tardis_onnx.errors import TardisError, non_negative_int, positive_int, run_command  # noqa: E402
from tardis_onnx.io import ExternalDataWriter  # noqa: E402

RECIPE_VERSION = 1
OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGN = ExternalDataWriter.ALIGNMENT  # external-data offsets: a page, so ONNX Runtime can map each tensor
CHUNK = 1 << 24  # elements generated at a time (64 MiB of float32)
DTYPES = {
    "float16": (np.dtype(np.float16), TensorProto.FLOAT16),
    "float32": (np.dtype(np.float32), TensorProto.FLOAT),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), TensorProto.BFLOAT16),
}
BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = f"{PAST} + {SEQ}"


@dataclass(frozen=True)
class Preset:
    """A model shape: ``heads`` query heads and ``kv_heads`` key/value heads of ``head_dim``."""

    d_model: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float = 1e-5

    def parameters(self) -> int:
        qkv = self.d_model * (self.heads + 2 * self.kv_heads) * self.head_dim
        layer = 2 * self.d_model + qkv + self.heads * self.head_dim * self.d_model + 2 * self.d_model * self.hidden
        return self.layers * layer + 2 * self.d_model + 2 * self.vocab * self.d_model


PRESETS = {
    "falcon-7b": Preset(d_model=4544, hidden=18176, layers=32, heads=71, kv_heads=1, head_dim=64, vocab=65024),
    "1.5b": Preset(d_model=2048, hidden=8192, layers=32, heads=16, kv_heads=1, head_dim=128, vocab=50304),
    "tiny": Preset(d_model=64, hidden=256, layers=2, heads=4, kv_heads=1, head_dim=16, vocab=128),
}


class _Weights:
    """Initializers streamed into one external-data file (:class:`tardis_onnx.io.ExternalDataWriter`), each at
    an aligned offset."""

    def __init__(self, out: ExternalDataWriter, dtype: np.dtype, elem: int, seed: int) -> None:
        self.out, self.dtype, self.elem, self.seed = out, dtype, elem, seed
        self.tensors: list[TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> str:
        """Append tensor ``name``: ``mean + std·N(0, 1)``, generated and written ``CHUNK`` elements at a time."""
        rng = np.random.default_rng([self.seed, len(self.tensors)])
        count = math.prod(shape)

        def chunks():
            for start in range(0, count, CHUNK):
                chunk = rng.standard_normal(min(CHUNK, count - start), dtype=np.float32)
                chunk *= std
                chunk += mean
                yield chunk.astype(self.dtype)

        tensor = TensorProto(name=name, data_type=self.elem, dims=shape)
        self.out.append(tensor, chunks())
        self.tensors.append(tensor)
        return name


class _Graph:
    """Nodes named as Optimum names them (``/transformer/h.0/mlp/act/Erf``), outputs ``<node>_output_0``."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[tuple, TensorProto] = {}
        self.taken: set[str] = set()

    def __call__(self, scope: str, op: str, *inputs: str, output: str | None = None, **attrs) -> str:
        name, k = f"{scope}/{op}", 0
        while name in self.taken:
            k += 1
            name = f"{scope}/{op}_{k}"
        self.taken.add(name)
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name, **attrs))
        return output

    def split(self, scope: str, x: str, sizes: list[int]) -> list[str]:
        """``Split`` of the last axis into ``sizes``."""
        first = self(scope, "Split", x, self.ints(sizes), output=f"{scope}/Split_output_0", axis=-1)
        self.nodes[-1].output.extend(f"{scope}/Split_output_{j}" for j in range(1, len(sizes)))
        return [first, *self.nodes[-1].output[1:]]

    def const(self, value: float) -> str:
        """A scalar of the model dtype (inline, not in the data file)."""
        return self._constant(np.array(value, dtype=np.float32).astype(self.dtype))

    def ints(self, values: list[int] | int) -> str:
        """An int64 vector, or scalar for an int."""
        return self._constant(np.array(values, dtype=np.int64))

    def _constant(self, array: np.ndarray) -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = numpy_helper.from_array(array, f"onnx::Constant_{len(self.constants)}")
        return self.constants[key].name


def _graph(preset: Preset, dtype: str, weights: _Weights) -> onnx.GraphProto:
    np_dtype, elem = DTYPES[dtype]
    p, g = preset, _Graph(np_dtype)
    d, hd, kv, group = p.d_model, p.head_dim, p.kv_heads, p.heads // p.kv_heads
    ln_std = 0.02

    embedding = weights.add("transformer.word_embeddings.weight", (p.vocab, d), 1.0)
    x = g("/transformer/word_embeddings", "Gather", embedding, "input_ids")
    # Mask, shared by every layer: query rows ordered (group, position) as the attention below lays them out.
    top = "/transformer"
    seq = g(top, "Shape", "input_ids", start=1, end=2)
    past = g(top, "Shape", "past_key_values.0.key", start=2, end=3)
    total = g(top, "Squeeze", g(top, "Add", past, seq))
    queries = g(top, "Range", g(top, "Squeeze", past), total, g.ints(1))
    keys = g(top, "Range", g.ints(0), total, g.ints(1))
    queries = g(top, "Unsqueeze", g(top, "Tile", queries, g.ints([group])), g.ints([1]))  # [group·seq, 1]
    causal = g(top, "LessOrEqual", g(top, "Unsqueeze", keys, g.ints([0])), queries)  # [group·seq, past+seq]
    padding = g(top, "Unsqueeze", g(top, "Cast", "attention_mask", to=TensorProto.BOOL), g.ints([1, 2]))
    allowed = g(top, "And", causal, padding)  # [batch, 1, group·seq, past+seq]
    lowest = g.const(float(ml_dtypes.finfo(np_dtype).min))

    for i in range(p.layers):
        s, w = f"/transformer/h.{i}", f"transformer.h.{i}"
        ln = g(
            f"{s}/input_layernorm",
            "LayerNormalization",
            x,
            weights.add(f"{w}.input_layernorm.weight", (d,), ln_std, 1.0),
            weights.add(f"{w}.input_layernorm.bias", (d,), ln_std),
            axis=-1,
            epsilon=p.eps,
        )
        a = f"{s}/self_attention"
        qkv_w = weights.add(f"{w}.self_attention.query_key_value.weight", (d, (p.heads + 2 * kv) * hd), d**-0.5)
        qkv = g(f"{a}/query_key_value", "MatMul", ln, qkv_w)
        q, k, v = g.split(a, qkv, [p.heads * hd, kv * hd, kv * hd])
        q = g(a, "Transpose", g(a, "Reshape", q, g.ints([0, 0, kv, group, hd])), perm=[0, 2, 3, 1, 4])
        q = g(a, "Mul", g(a, "Reshape", q, g.ints([0, 0, -1, hd])), g.const(hd**-0.5))  # [batch, kv, group·seq, hd]
        k = g(a, "Transpose", g(a, "Reshape", k, g.ints([0, 0, kv, hd])), perm=[0, 2, 1, 3])
        v = g(a, "Transpose", g(a, "Reshape", v, g.ints([0, 0, kv, hd])), perm=[0, 2, 1, 3])
        k = g(a, "Concat", f"past_key_values.{i}.key", k, axis=2, output=f"present.{i}.key")
        v = g(a, "Concat", f"past_key_values.{i}.value", v, axis=2, output=f"present.{i}.value")
        scores = g(a, "MatMul", q, g(a, "Transpose", k, perm=[0, 1, 3, 2]))  # [batch, kv, group·seq, past+seq]
        probs = g(a, "Softmax", g(a, "Where", allowed, scores, lowest), axis=-1)
        ctx = g(a, "Reshape", g(a, "MatMul", probs, v), g.ints([0, 0, group, -1, hd]))
        ctx = g(a, "Reshape", g(a, "Transpose", ctx, perm=[0, 3, 1, 2, 4]), g.ints([0, 0, p.heads * hd]))
        dense_w = weights.add(f"{w}.self_attention.dense.weight", (p.heads * hd, d), (p.heads * hd) ** -0.5)
        attn = g(f"{a}/dense", "MatMul", ctx, dense_w)

        m = f"{s}/mlp"
        up = g(f"{m}/dense_h_to_4h", "MatMul", ln, weights.add(f"{w}.mlp.dense_h_to_4h.weight", (d, p.hidden), d**-0.5))
        erf = g(f"{m}/act", "Erf", g(f"{m}/act", "Div", up, g.const(math.sqrt(2.0))))
        gelu = g(f"{m}/act", "Mul", g(f"{m}/act", "Mul", up, g(f"{m}/act", "Add", erf, g.const(1.0))), g.const(0.5))
        down_w = weights.add(f"{w}.mlp.dense_4h_to_h.weight", (p.hidden, d), p.hidden**-0.5)
        mlp = g(f"{m}/dense_4h_to_h", "MatMul", gelu, down_w)
        x = g(s, "Add", x, g(s, "Add", mlp, attn))

    ln_f = g(
        "/transformer/ln_f",
        "LayerNormalization",
        x,
        weights.add("transformer.ln_f.weight", (d,), ln_std, 1.0),
        weights.add("transformer.ln_f.bias", (d,), ln_std),
        axis=-1,
        epsilon=p.eps,
    )
    g("/lm_head", "MatMul", ln_f, weights.add("lm_head.weight", (d, p.vocab), d**-0.5), output="logits")

    cache = [[BATCH, kv, PAST, hd], [BATCH, kv, TOTAL, hd]]
    kinds = [(i, kind) for i in range(p.layers) for kind in ("key", "value")]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
        *(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", elem, cache[0]) for i, kind in kinds),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", elem, [BATCH, SEQ, p.vocab]),
        *(helper.make_tensor_value_info(f"present.{i}.{kind}", elem, cache[1]) for i, kind in kinds),
    ]
    return helper.make_graph(g.nodes, "gelu_decoder", inputs, outputs, [*g.constants.values(), *weights.tensors])


def write_model(preset: Preset, out_dir: Path, dtype: str = "float16", seed: int = 0) -> Path:
    """Write ``out_dir/model.onnx`` and ``out_dir/model.onnx.data``; return the model's path.

    Both are written in a ``.tmp-*`` sibling that is renamed to ``out_dir`` once complete, so a failure never
    leaves a half model; an existing ``out_dir`` must be empty (nothing is overwritten).
    """
    if dtype not in DTYPES:
        raise TardisError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if preset.layers < 1 or preset.heads % preset.kv_heads:
        raise TardisError(f"bad shape {preset}: at least one layer, query heads a multiple of key/value heads")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise TardisError(f"{out_dir} already exists and is not an empty folder: choose another --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        np_dtype, elem = DTYPES[dtype]
        with ExternalDataWriter(tmp / DATA_FILE) as data:
            graph = _graph(preset, dtype, _Weights(data, np_dtype, elem, seed))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tardis-onnx")
        model.ir_version = 8
        (tmp / MODEL_FILE).write_bytes(model.SerializeToString())
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the folder
        os.rename(tmp, out_dir)  # replaces an empty folder, fails on a non-empty one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / MODEL_FILE


def cache_key(preset: str, dtype: str, layers: int, seed: int) -> str:
    return f"gelu-decoder__{preset}__{dtype}__L{layers}__seed{seed}__v{RECIPE_VERSION}"


def build(
    preset: str, dtype: str = "float16", layers: int | None = None, seed: int = 0, cache_dir: Path | None = None
) -> Path:
    """The cached ``model.onnx`` of ``preset`` (``layers`` overrides its depth), written on first use."""
    if preset not in PRESETS:
        raise TardisError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    shape = PRESETS[preset]
    layers = shape.layers if layers is None else layers
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / cache_key(preset, dtype, layers, seed)
    if (final / MODEL_FILE).is_file():
        return final / MODEL_FILE
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache_dir)
    try:
        return write_model(replace(shape, layers=layers), final, dtype, seed)
    except (OSError, TardisError):
        if (final / MODEL_FILE).is_file():  # lost a race to a concurrent writer: use its result
            return final / MODEL_FILE
        raise


_NUMPY_OF = {"tensor(float16)": np.float16, "tensor(float)": np.float32}


def decode(session, prompt_ids: np.ndarray, steps: int) -> tuple[np.ndarray, list[float]]:
    """Greedy decoding with the KV cache: ``steps`` new tokens ``[batch, steps]`` after ``prompt_ids``
    ``[batch, seq]`` (or ``[seq]``), and the seconds of each ``session.run`` (the first is the prompt's prefill,
    then one per token fed back)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")
    ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1, np.shape(prompt_ids)[-1])
    batch = ids.shape[0]
    outputs = [o.name for o in session.get_outputs()]
    past = {
        i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), _NUMPY_OF[i.type])
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    length, tokens, seconds = 0, [], []
    for _ in range(steps):
        length += ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, length), np.int64), **past}
        start = time.perf_counter()
        result = dict(zip(outputs, session.run(outputs, feeds), strict=True))
        seconds.append(time.perf_counter() - start)
        past = {name.replace("present", "past_key_values"): v for name, v in result.items() if name != "logits"}
        ids = result["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(ids)
    return np.concatenate(tokens, axis=1), seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python models/gelu_decoder.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--layers", type=positive_int, help="override the preset's depth")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--out", type=Path, help="folder to create (default: the cache, $TARDIS_CACHE)")
    return parser


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    shape = replace(PRESETS[args.preset], layers=args.layers or PRESETS[args.preset].layers)
    try:
        if args.out is None:
            path = build(args.preset, args.dtype, shape.layers, args.seed)
        else:
            path = write_model(shape, args.out, args.dtype, args.seed)
    except OSError as exc:  # disk full, no permission: nothing was left behind
        raise TardisError(f"cannot write the model: {exc}") from None
    data = path.parent / DATA_FILE
    weight_bytes = shape.parameters() * DTYPES[args.dtype][0].itemsize
    print(f"{path} ({path.stat().st_size:,} bytes)")
    print(f"{data} ({data.stat().st_size:,} bytes)")
    print(f"{args.preset} {args.dtype}, {shape.layers} layers: {shape.parameters():,} parameters, {weight_bytes:,} B")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"took {time.perf_counter() - start:.1f} s, peak memory {peak:.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
