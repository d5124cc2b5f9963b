"""Tiny randomly initialised Hugging Face models, exported to ONNX with Optimum, cached outside git.

Every recipe builds a 2-layer, 4-head, hidden-64 model (FFN 256 = 4x where the config allows,
vocab 1000, 128 positions) from a config alone: no hub, no tokenizer. Two full-size shapes for
speed measurements, ``gpt2_124m`` and ``gpt2_355m`` (GPT-2 small and medium: vocab 50257, 1024
positions, ``gelu_new``), are built only when named (``--all`` skips them). Weights are
``torch.manual_seed(0)`` initialisation plus ``0.02 * randn`` noise on every parameter (otherwise
zero biases / unit norms are deduplicated by the exporter into ``Identity`` nodes).

    from models.optimum_zoo import export
    path = export("gpt2")                       # default task, default opset
    path = export("bert", opset=20)             # single Gelu op

CLI: ``python models/optimum_zoo.py [ARCH ...] [--task T] [--opset N] [--all] [--cache-dir D]``
prints ``ARCH TASK SECONDS PATH`` per export.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tardis_onnx from a checkout

from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402

# Bump when a recipe changes so stale cache entries are not reused.
RECIPE_VERSION = 1

# Tiny dimensions shared by all recipes.
HIDDEN = 64
FFN = 256
LAYERS = 2
HEADS = 4
VOCAB = 1000
POSITIONS = 128
SEED = 0
NOISE = 0.02

FEATURE = "feature-extraction"
TEXT_GEN = "text-generation"
TEXT_GEN_PAST = "text-generation-with-past"


def _bert():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=POSITIONS,
        hidden_act="gelu",
    )


def _roberta():
    from transformers import RobertaConfig

    # RoBERTa position ids start at pad_token_id + 1 = 2, hence 128 + 2 positions.
    return RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=POSITIONS + 2,
        hidden_act="gelu",
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )


def _distilbert():
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=VOCAB,
        dim=HIDDEN,
        n_layers=LAYERS,
        n_heads=HEADS,
        hidden_dim=FFN,
        max_position_embeddings=POSITIONS,
        activation="gelu",
    )


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        n_positions=POSITIONS,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt2_tanh():
    # Same as gpt2 but torch's fused tanh GELU (F.gelu(approximate="tanh")): a different ONNX spelling at
    # opset < 20 and a single Gelu(approximate="tanh") at opset >= 20 (gelu_new never becomes a Gelu op).
    config = _gpt2()
    config.activation_function = "gelu_pytorch_tanh"
    return config


def _gpt_neo():
    from transformers import GPTNeoConfig

    return GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=POSITIONS,
        attention_types=[[["global", "local"], LAYERS // 2]],
        window_size=32,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt_neox():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=POSITIONS,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
    )


def _phi():
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=POSITIONS,
        hidden_act="gelu_new",
        partial_rotary_factor=0.5,
        bos_token_id=0,
        eos_token_id=0,
    )


def _bloom():
    from transformers import BloomConfig

    # BLOOM's FFN is fixed at 4 * hidden and uses its own tanh GELU (BloomGelu).
    return BloomConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def _falcon():
    from transformers import FalconConfig

    # Falcon-7B layout: parallel attention + MLP, multi-query, rotary, no biases anywhere.
    return FalconConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        max_position_embeddings=POSITIONS,
        new_decoder_architecture=False,
        parallel_attn=True,
        multi_query=True,
        alibi=False,
        bias=False,
        activation="gelu",
        bos_token_id=0,
        eos_token_id=0,
    )


def _codegen():
    from transformers import CodeGenConfig

    return CodeGenConfig(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        n_positions=POSITIONS,
        n_ctx=POSITIONS,
        rotary_dim=8,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=0,
    )


def _gpt2_shape(layers: int, hidden: int, heads: int):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=50257,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=1024,
        activation_function="gelu_new",
        bos_token_id=50256,
        eos_token_id=50256,
    )


def _gpt2_124m():
    return _gpt2_shape(12, 768, 12)


def _gpt2_355m():
    return _gpt2_shape(24, 1024, 16)


def _opt():
    from transformers import OPTConfig

    # ReLU FFN: must come back unchanged from the TARDIS pass.
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        ffn_dim=FFN,
        max_position_embeddings=POSITIONS,
        word_embed_proj_dim=HIDDEN,
        activation_function="relu",
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def _llama():
    from transformers import LlamaConfig

    # SwiGLU (gated) FFN: negative case, the pass must leave it alone.
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=POSITIONS,
        hidden_act="silu",
        bos_token_id=0,
        eos_token_id=0,
    )


@dataclass(frozen=True)
class Recipe:
    config: Callable[[], object]  # returns a transformers PretrainedConfig
    task: str  # default task
    tasks: tuple[str, ...]  # tasks this recipe is meant for
    ffn: str  # FFN activation family, for documentation / test parametrisation
    tiny: bool = True  # False: a full-size shape, exported only when named (not by --all)


_DEC = (TEXT_GEN, TEXT_GEN_PAST)
ARCHITECTURES: dict[str, Recipe] = {
    "bert": Recipe(_bert, FEATURE, (FEATURE,), "gelu_erf"),
    "roberta": Recipe(_roberta, FEATURE, (FEATURE,), "gelu_erf"),
    "distilbert": Recipe(_distilbert, FEATURE, (FEATURE,), "gelu_erf"),
    "gpt2": Recipe(_gpt2, TEXT_GEN, _DEC, "gelu_tanh"),
    "gpt2_tanh": Recipe(_gpt2_tanh, TEXT_GEN, _DEC, "gelu_tanh"),
    "gpt_neo": Recipe(_gpt_neo, TEXT_GEN, _DEC, "gelu_tanh"),
    "gpt_neox": Recipe(_gpt_neox, TEXT_GEN, _DEC, "gelu_erf"),
    "phi": Recipe(_phi, TEXT_GEN, _DEC, "gelu_tanh"),
    "bloom": Recipe(_bloom, TEXT_GEN, _DEC, "gelu_tanh"),
    "falcon": Recipe(_falcon, TEXT_GEN, _DEC, "gelu_erf"),
    "codegen": Recipe(_codegen, TEXT_GEN, _DEC, "gelu_tanh"),
    "opt": Recipe(_opt, TEXT_GEN_PAST, _DEC, "relu"),
    "llama": Recipe(_llama, TEXT_GEN, _DEC, "swiglu"),
    "gpt2_124m": Recipe(_gpt2_124m, TEXT_GEN_PAST, _DEC, "gelu_tanh", tiny=False),
    "gpt2_355m": Recipe(_gpt2_355m, TEXT_GEN_PAST, _DEC, "gelu_tanh", tiny=False),
}


def default_cache_dir() -> Path:
    env = os.environ.get("TARDIS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/tardis-onnx/exports").expanduser()


def _versions_tag() -> str:
    """Exporter stack versions: a different torch/transformers/optimum-onnx may spell the graph differently."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for short, dist in (("torch", "torch"), ("tf", "transformers"), ("oo", "optimum-onnx")):
        try:
            parts.append(f"{short}{version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{short}none")
    return "-".join(parts).replace("+", "_")


def cache_key(arch: str, task: str, opset: int | None) -> str:
    opset_s = opset if opset is not None else "default"
    return f"{arch}__{task}__opset{opset_s}__v{RECIPE_VERSION}-{_versions_tag()}"


def _clean_stale_tmp(cache_dir: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs left by exports that were killed (SIGKILL skips ``finally``)."""
    now = time.time()
    for d in cache_dir.glob(".tmp-*"):
        try:
            if now - d.stat().st_mtime > max_age_s:
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def build_model(arch: str, task: str | None = None):
    """The random PyTorch model for ``arch`` (in eval mode, noise on every parameter)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    recipe = ARCHITECTURES[arch]
    task = task or recipe.task
    config = recipe.config()
    torch.manual_seed(SEED)
    cls = AutoModel if task == FEATURE else AutoModelForCausalLM
    model = cls.from_config(config)
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters are visited once
            p.add_(NOISE * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def main_onnx_path(export_dir: Path) -> Path:
    """The file to load from an export directory.

    Optimum writes ``model.onnx`` for every task here, including ``text-generation-with-past``
    (one graph taking ``past_key_values.*`` inputs; a first step feeds past length 0). Older
    Optimum versions split decoders into ``decoder_model.onnx`` / ``decoder_with_past_model.onnx``
    merged into ``decoder_model_merged.onnx`` (an ``If`` on ``use_cache_branch``); prefer the merged
    one if it is ever present.
    """
    export_dir = Path(export_dir)
    for name in ("model.onnx", "decoder_model_merged.onnx", "decoder_model.onnx"):
        if (export_dir / name).is_file():
            return export_dir / name
    found = sorted(export_dir.glob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx file in {export_dir}")
    return found[0]


def export(
    arch: str,
    task: str | None = None,
    cache_dir: Path | None = None,
    opset: int | None = None,
    *,
    validate: bool = False,
) -> Path:
    """Export ``arch`` (random weights) with Optimum and return the main ``.onnx`` path (cached).

    The cache entry ``<cache_dir>/<arch>__<task>__opset<N|default>__v<recipe>-<versions>/`` is written
    to a temporary sibling and renamed into place, so an interrupted export never leaves a half entry.
    ``validate`` runs Optimum's own PyTorch-vs-ONNX Runtime comparison (about 0.05 s here; a mismatch
    is only logged by Optimum, so tests should compare outputs themselves).
    """
    if arch not in ARCHITECTURES:
        raise TardisError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    recipe = ARCHITECTURES[arch]
    task = task or recipe.task
    if task not in recipe.tasks:
        raise TardisError(f"{arch}: task {task!r} not in {recipe.tasks}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / cache_key(arch, task, opset)
    if final.is_dir():
        return main_onnx_path(final)

    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
    try:
        src, out = tmp / "hf", tmp / "onnx"
        build_model(arch, task).save_pretrained(src)
        _optimum_export(src, out, task, opset, validate)
        shutil.rmtree(src)
        main_onnx_path(out)  # raises if nothing was produced
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():  # lost a race to a concurrent exporter: use its result
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return main_onnx_path(final)


def _optimum_export(src: Path, out: Path, task: str, opset: int | None, validate: bool) -> None:
    import torch
    from optimum.exporters.onnx import main_export

    # Keep the exporter quiet (tokenizer-not-found, TracerWarnings) and thread-light.
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(
                model_name_or_path=str(src),
                output=out,
                task=task,
                opset=opset,
                device="cpu",
                library_name="transformers",
                local_files_only=True,
                do_validation=validate,
            )
    finally:
        torch.set_num_threads(threads)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*", metavar="ARCH", help=f"one of: {', '.join(ARCHITECTURES)}")
    ap.add_argument("--all", action="store_true", help="every tiny architecture (that supports --task, if given)")
    ap.add_argument("--task", default=None, help="override the default task (e.g. text-generation-with-past)")
    ap.add_argument("--opset", type=positive_int, default=None)
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx/exports"
    )
    ap.add_argument("--validate", action="store_true", help="run Optimum's output validation")
    return ap


def run(args: argparse.Namespace) -> int:
    if args.all:
        archs = [a for a, r in ARCHITECTURES.items() if r.tiny and (args.task is None or args.task in r.tasks)]
    else:
        archs = args.archs
    if not archs:
        raise TardisError("give ARCH names or --all")
    for arch in archs:
        t0 = time.perf_counter()
        path = export(arch, args.task, args.cache_dir, args.opset, validate=args.validate)
        task = args.task or ARCHITECTURES[arch].task
        print(f"{arch}\t{task}\t{time.perf_counter() - t0:.1f}s\t{path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
