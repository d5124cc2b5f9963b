"""Calibration feeds from real speech for Whisper's ONNX files (Optimum's ``automatic-speech-recognition`` layout).

Sources: a folder of audio files (``.wav``, ``.flac``, ``.ogg``, ``.mp3``; no transcripts: the dense model
greedy-decodes them) or a ``manifest.json``: a list of ``{"id", "file", "text"}`` entries, ``file`` relative to
the manifest's folder (or absolute), ``text`` the reference transcript. At most ``utterances`` (default 16) are
used, in the source's order, so calibration stays short.

What each file gets, built from its inputs as ONNX Runtime reads them:

- ``encoder_model.onnx`` (``input_features``): log-mel features from the folder's ``WhisperFeatureExtractor``
  (``preprocessor_config.json``), one utterance per batch (30 s windows, as Whisper always pads).
- ``decoder_model.onnx`` (``input_ids``, ``encoder_hidden_states``): the transcript teacher-forced after
  Whisper's prompt ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` and ending in
  ``<|endoftext|>``, with the hidden states of the dense ``encoder_model.onnx`` beside the model.
- ``decoder_with_past_model.onnx`` (``input_ids`` and ``past_key_values.*``): the decoding steps after the
  prompt, one token each, with the keys and values the dense ``decoder_model.onnx`` beside it computes for
  the tokens before (its ``present.*`` outputs, sliced: a causal decoder's key of position ``t`` does not
  depend on later tokens), as Optimum's generation loop feeds them.
- ``decoder_model_merged.onnx`` (all of the above and ``use_cache_branch``): per utterance the decoder's
  teacher-forced feed with ``use_cache_branch`` false (and empty pasts, as Optimum feeds the first step),
  then the with-past steps with it true (and the encoder's hidden states, which that branch does not read).

Feeds are built lazily, one utterance at a time (the cross-attention keys and values are 37 MB each).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.errors import TardisError
from tardis_onnx.feeds import Feeds

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DEFAULT_UTTERANCES = 16
DEFAULT_MAX_TOKENS = 128  # transcript tokens per utterance (Whisper's limit is 448)
PROMPT = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")
ENDOFTEXT = "<|endoftext|>"
ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
_STEPPED = ("decoder_with_past", "decoder_merged")  # fed one decoding step at a time, from the dense decoder
_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


# ------------------------------------------------------------------------------------------- what is what


def model_kind(model: onnx.ModelProto) -> str | None:
    """``"encoder"``, ``"decoder"``, ``"decoder_with_past"``, ``"decoder_merged"`` for Whisper's four files,
    else None."""
    initializers = {t.name for t in model.graph.initializer}
    names = {i.name for i in model.graph.input if i.name not in initializers}
    if "input_features" in names:
        return "encoder"
    if {"input_ids", "encoder_hidden_states", "use_cache_branch"} <= names:
        return "decoder_merged"
    if "input_ids" in names and "encoder_hidden_states" in names:
        return "decoder"
    if "input_ids" in names and any(_PAST.match(n) and n.endswith(("encoder.key", "encoder.value")) for n in names):
        return "decoder_with_past"
    return None


def is_speech_model(model: onnx.ModelProto) -> bool:
    """Whether the model is one of Whisper's encoder / decoder files (speech calibration can feed it)."""
    return model_kind(model) is not None


def is_speech_source(path: str | Path) -> bool:
    """A folder (of audio files) or a ``.json`` manifest: what :func:`calibration_feeds` reads."""
    path = Path(path)
    return path.is_dir() or path.suffix.lower() == ".json"


# ---------------------------------------------------------------------------------------------------- audio


def read_audio(path: str | Path) -> np.ndarray:
    """Mono float32 at 16 kHz (channels averaged, polyphase resampling); needs ``soundfile``."""
    try:
        import soundfile
    except ImportError:
        raise TardisError("speech calibration reads audio with soundfile: pip install soundfile") from None
    from scipy.signal import resample_poly

    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / OSError on unreadable files
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise TardisError(f"cannot read audio '{path}': {reason}") from None
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g)
    return np.ascontiguousarray(audio, dtype=np.float32)


@dataclass
class Utterance:
    id: str
    path: Path
    text: str | None = None


def utterances(source: str | Path, limit: int | None = DEFAULT_UTTERANCES) -> list[Utterance]:
    """The first ``limit`` utterances of a ``manifest.json`` (with transcripts) or of a folder of audio files
    (sorted by name, searched recursively; no transcripts)."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        if not files:
            raise TardisError(f"no audio file ({', '.join(AUDIO_SUFFIXES)}) in '{source}'")
        found = [Utterance(p.stem, p) for p in files]
    elif source.is_file():
        try:
            items = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TardisError(f"cannot read the speech manifest '{source}' ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) and "file" in i for i in items) or not items:
            raise TardisError(f"speech manifest '{source}': expected a list of {{'file', 'text'}} entries")
        found = []
        for i, item in enumerate(items):
            path = source.parent / str(item["file"])
            if not path.is_file():
                raise TardisError(f"speech manifest '{source}': audio file '{path}' not found")
            text = item.get("text")
            found.append(Utterance(str(item.get("id", i)), path, None if text is None else str(text)))
    else:
        raise TardisError(f"speech calibration source '{source}' not found (a folder of audio or a manifest.json)")
    return found[:limit] if limit is not None else found


# ------------------------------------------------------------------------------------------ the processor


def _load_processor(folder: Path):
    """The folder's ``WhisperFeatureExtractor`` and tokenizer (local files only)."""
    try:
        from transformers import AutoTokenizer, WhisperFeatureExtractor
    except ImportError:
        raise TardisError("speech calibration needs transformers (pip install 'tardis-onnx[export]')") from None
    if not (folder / "preprocessor_config.json").is_file():
        raise TardisError(f"speech calibration needs the feature extractor's preprocessor_config.json in '{folder}'")
    try:
        features = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... on bad folders
        reason = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise TardisError(f"no usable Whisper feature extractor / tokenizer in '{folder}': {reason}") from None
    return features, tokenizer


def _token_id(tokenizer, token: str) -> int:
    value = tokenizer.get_vocab().get(token)
    if value is None:
        raise TardisError(f"the tokenizer has no {token} token: is it Whisper's?")
    return int(value)


def _input_dtypes(model: onnx.ModelProto) -> dict[str, np.dtype]:
    initializers = {t.name for t in model.graph.initializer}
    return {
        i.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
        for i in model.graph.input
        if i.name not in initializers
    }


def _session(path: Path):
    from tardis_onnx.session import create_session

    if not path.is_file():
        raise TardisError(f"speech calibration needs the dense {path.name} beside the model ('{path}' not found)")
    return create_session(path, optimization="all")


# --------------------------------------------------------------------------------------------- the feeds


class SpeechFeeds:
    """Lazy calibration feeds for one of Whisper's files: iterate for feed dicts (exactly the model's inputs
    in its dtypes); ``len`` is the number of batches; ``tokens`` how many decoder tokens the transcripts hold."""

    def __init__(
        self,
        model: onnx.ModelProto,
        folder: str | Path,
        source: str | Path,
        utterances_limit: int = DEFAULT_UTTERANCES,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.kind = model_kind(model)
        if self.kind is None:
            raise TardisError("speech calibration feeds Whisper's encoder or decoder files only")
        if utterances_limit < 1 or max_tokens < 1:
            raise TardisError(f"need utterances >= 1 and max tokens >= 1 (got {utterances_limit}, {max_tokens})")
        self.folder = Path(folder)
        self.source = Path(source)
        self.max_tokens = max_tokens
        self.dtypes = _input_dtypes(model)
        self.items = utterances(source, utterances_limit)
        self.features, self.tokenizer = _load_processor(self.folder)
        self.prompt = [_token_id(self.tokenizer, t) for t in PROMPT]
        self.eot = _token_id(self.tokenizer, ENDOFTEXT)
        self._encoder = self._dense_decoder = None
        self._ids: list[np.ndarray] | None = None
        if self.kind != "encoder":
            self._encoder = _session(self.folder / ENCODER_FILE)
            if self.kind in _STEPPED or any(i.text is None for i in self.items):
                self._dense_decoder = _session(self.folder / DECODER_FILE)

    @property
    def _decoder(self):
        if self._dense_decoder is None:
            self._dense_decoder = _session(self.folder / DECODER_FILE)
        return self._dense_decoder

    # -- pieces

    def input_features(self, item: Utterance) -> np.ndarray:
        audio = read_audio(item.path)
        out = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="np")
        return np.asarray(out["input_features"], dtype=np.float32)

    def encoder_hidden_states(self, features: np.ndarray) -> np.ndarray:
        name = self._encoder.get_inputs()[0].name
        return self._encoder.run(None, {name: features})[0]

    def transcript_ids(self, item: Utterance, hidden: np.ndarray) -> np.ndarray:
        """Prompt + transcript tokens (+ ``<|endoftext|>``), ``[1, T]`` int64; greedy-decoded when no text."""
        if item.text is None:
            return self.greedy(hidden)
        tokens = self.tokenizer.encode(" " + " ".join(item.text.split()), add_special_tokens=False)
        return np.array([self.prompt + tokens[: self.max_tokens] + [self.eot]], dtype=np.int64)

    def greedy(self, hidden: np.ndarray) -> np.ndarray:
        """Greedy decoding with the dense decoder (no cache: the whole sequence each step; at most
        ``max_tokens`` tokens), the special tokens other than ``<|endoftext|>`` suppressed."""
        vocabulary = len(self.tokenizer)
        special = [i for i in self.tokenizer.all_special_ids if i != self.eot] + list(range(self.eot + 1, vocabulary))
        ids = list(self.prompt)
        for _ in range(self.max_tokens):
            logits = self._decoder.run(["logits"], self._decoder_feed(np.array([ids], np.int64), hidden))[0][0, -1]
            logits = logits.astype(np.float64)
            logits[[i for i in special if i < logits.shape[0]]] = -np.inf
            token = int(np.argmax(logits))
            ids.append(token)
            if token == self.eot:
                break
        else:
            ids.append(self.eot)
        return np.array([ids], dtype=np.int64)

    def _decoder_feed(self, ids: np.ndarray, hidden: np.ndarray) -> Feeds:
        names = {i.name for i in self._decoder.get_inputs()}
        feed = {"input_ids": ids, "encoder_hidden_states": hidden}
        return {k: v for k, v in feed.items() if k in names}

    # -- iteration

    def __len__(self) -> int:
        if self.kind not in _STEPPED or self._ids is None:
            return len(self.items)  # steps unknown until decoded: one per utterance as an estimate
        steps = sum(int(ids.shape[1]) - len(self.prompt) for ids in self._ids)
        return steps + (len(self.items) if self.kind == "decoder_merged" else 0)

    def __iter__(self) -> Iterator[Feeds]:
        ids_seen = []
        for item in self.items:
            features = self.input_features(item)
            if self.kind == "encoder":
                yield self._cast({"input_features": features})
                continue
            hidden = self.encoder_hidden_states(features)
            ids = self.transcript_ids(item, hidden)
            ids_seen.append(ids)
            if self.kind == "decoder":
                yield self._cast({"input_ids": ids, "encoder_hidden_states": hidden})
                continue
            yield from self._steps(ids, hidden)
        if self.kind != "encoder":
            self._ids = ids_seen

    def _steps(self, ids: np.ndarray, hidden: np.ndarray) -> Iterator[Feeds]:
        """The with-past decoder's feeds after the prompt: token ``t`` with the keys/values of tokens ``< t``.
        The merged decoder's: first the whole sequence (no past: ``use_cache_branch`` false), then the same
        steps (``use_cache_branch`` true)."""
        pasts = self._pasts(ids, hidden)
        if self.kind == "decoder_merged":
            first = {"input_ids": ids, "encoder_hidden_states": hidden, "use_cache_branch": np.array([False])}
            yield self._cast(first | {name: value[:, :, :0, :] for name, (_, value) in pasts.items()})
        for t in range(len(self.prompt), ids.shape[1]):
            feed = {
                "input_ids": ids[:, t : t + 1],
                "encoder_hidden_states": hidden,
                "use_cache_branch": np.array([True]),
            }
            for name, (side, value) in pasts.items():
                feed[name] = value if side == "encoder" else np.ascontiguousarray(value[:, :, :t, :])
            yield self._cast(feed)

    def _pasts(self, ids: np.ndarray, hidden: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
        """Per ``past_key_values.*`` input: its side (decoder, encoder) and the dense decoder's ``present.*``
        for the whole sequence."""
        outputs = [o.name for o in self._decoder.get_outputs()]
        values = dict(zip(outputs, self._decoder.run(outputs, self._decoder_feed(ids, hidden)), strict=True))
        pasts = {}
        for name in self.dtypes:
            match = _PAST.match(name)
            if match is None:
                continue
            present = f"present.{match.group(1)}.{match.group(2)}.{match.group(3)}"
            if present not in values:
                raise TardisError(f"the dense {DECODER_FILE} has no output {present} for the input {name}")
            pasts[name] = (match.group(2), values[present])
        return pasts

    def _cast(self, feed: Feeds) -> Feeds:
        missing = sorted(set(self.dtypes) - set(feed))
        if missing:
            raise TardisError(f"speech calibration cannot build the model inputs {missing}")
        return {k: np.ascontiguousarray(feed[k], dtype=self.dtypes[k]) for k in self.dtypes}

    def describe(self) -> str:
        texts = "transcripts" if all(i.text is not None for i in self.items) else "greedy transcripts"
        what = {
            "encoder": "input features",
            "decoder": f"teacher-forced {texts}",
            "decoder_with_past": f"teacher-forced {texts}, one step per token",
            "decoder_merged": f"teacher-forced {texts}: whole (no cache), then one step per token (cache)",
        }[self.kind]
        return f"speech {self.source}: {len(self.items)} utterances ({what})"


def calibration_feeds(
    model: onnx.ModelProto,
    folder: str | Path,
    source: str | Path,
    utterances_limit: int = DEFAULT_UTTERANCES,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> SpeechFeeds:
    """Lazy feeds for ``model`` (one of Whisper's encoder and decoder files) from the audio in
    ``source`` (a folder or a ``manifest.json``), with the feature extractor, tokenizer and dense
    encoder/decoder files in ``folder``."""
    return SpeechFeeds(model, folder, source, utterances_limit, max_tokens)
