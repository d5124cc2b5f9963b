"""``python -m tardis_onnx triton MODEL --out REPO``: a Triton Inference Server model repository.

Writes ``REPO/NAME/1/model.onnx`` (and its external data), ``REPO/NAME/config.pbtxt`` for Triton's
ONNX Runtime backend (inputs and outputs read off the model, dynamic batching when the model's first
dimension is free, instance groups), and, for a model that uses the ``ai.tardis`` op, a copy of the op
library in ``REPO/NAME/`` named in ``model_operations { op_library_filename: ... }`` by its absolute
path (Triton hands the path to ONNX Runtime as it is: regenerate the repository after moving it). A
``--fallback portable`` model needs no library and gets no ``model_operations``.

Decoders exported with a KV cache (Optimum ``*-with-past``) are served as the single-step model:
each request carries its ``past_key_values.*`` and gets the ``present.*`` back; Triton keeps no
state between requests and does not run the generation loop.

The model folder is written beside its target under a temporary name and renamed into place only
when complete; an existing ``REPO/NAME`` is never replaced.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import onnx

from tardis_onnx.errors import TardisError, non_negative_int, positive_int, run_command
from tardis_onnx.files import model_files
from tardis_onnx.io import load_model
from tardis_onnx.runtime import CPU_LIBRARY, CUDA_LIBRARY, library_path
from tardis_onnx.session import create_session, uses_tardis_ops

# ONNX Runtime's type strings → Triton's data types.
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}


Tensor = tuple[str, str, list[int]]  # name, ONNX Runtime type, dims (-1: free)


def signature(model: onnx.ModelProto | Path) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs as ONNX Runtime sees them (after its shape inference, the op library
    registered): what Triton's backend checks the config against."""
    session = create_session(model)

    def tensors(values) -> list[Tensor]:
        return [(v.name, v.type, [d if isinstance(d, int) and d >= 0 else -1 for d in v.shape]) for v in values]

    return tensors(session.get_inputs()), tensors(session.get_outputs())


def _tensor_entries(tensors: list[Tensor], batched: bool) -> str:
    entries = []
    for name, kind, dims in tensors:
        if kind not in TRITON_TYPES:
            raise TardisError(f"tensor '{name}' has type {kind}, which Triton cannot carry")
        shape = ", ".join(map(str, dims[1:] if batched else dims))
        fields = (f'name: "{name}"', f"data_type: {TRITON_TYPES[kind]}", f"dims: [ {shape} ]")
        entries.append("  {\n" + "".join(f"    {field}\n" for field in fields) + "  }")
    return ",\n".join(entries)


def model_config(
    model: onnx.ModelProto | Path,
    name: str,
    max_batch: int = 8,
    instances: int = 1,
    kind: str = "cpu",
    op_library: Path | None = None,
) -> str:
    """The ``config.pbtxt`` text serving ``model`` as ``name`` with Triton's ONNX Runtime backend.

    ``max_batch`` > 0 (and a model whose inputs and outputs all have a free first dimension) turns on
    dynamic batching with that largest batch; otherwise ``max_batch_size: 0`` and full shapes.
    """
    if kind not in KINDS:
        raise TardisError(f"instance kind must be one of {sorted(KINDS)}, got {kind!r}")
    inputs, outputs = signature(model)
    # Batchable when every input and output has a free first dimension.
    batched = max_batch > 0 and all(dims and dims[0] == -1 for _, _, dims in inputs + outputs)
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch if batched else 0}",
        f"input [\n{_tensor_entries(inputs, batched)}\n]",
        f"output [\n{_tensor_entries(outputs, batched)}\n]",
        f"instance_group [ {{ count: {instances} kind: {KINDS[kind]} }} ]",
    ]
    if batched:
        lines.append("dynamic_batching { }")
    if op_library is not None:
        lines.append(f'model_operations {{ op_library_filename: "{op_library}" }}')
    return "\n".join(lines) + "\n"


def write_repository(
    model_path: str | Path,
    repository: str | Path,
    name: str | None = None,
    max_batch: int = 8,
    instances: int = 1,
    kind: str = "cpu",
) -> Path:
    """Write the model folder ``repository/name`` (see the module doc); return it."""
    model_path = Path(model_path)
    model = load_model(model_path, load_weights=False)
    name = name or model_path.name.removesuffix(".onnx").removesuffix(".tardis") or "model"
    if "/" in name or name in (".", ".."):
        raise TardisError(f"model name {name!r} is not a folder name")
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise TardisError(f"{repository}: not a folder")
    target = repository / name
    if os.path.lexists(target):
        raise TardisError(f"{target}: already exists: pick another --name or remove it (nothing is replaced)")
    library = None
    if uses_tardis_ops(model):
        try:
            library = library_path(cuda=kind == "gpu")
        except Exception as exc:  # LibraryNotBuiltError: its message says how to build the library
            raise TardisError(str(exc)) from None
    files = model_files(model_path)
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tardis-staging-{name}-", dir=repository))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(files[0], staging / "1" / "model.onnx")
        for data in files[1:]:  # external data keeps its name: the model refers to it relative to its folder
            relative = os.path.relpath(data, files[0].parent)
            if relative.startswith(".."):
                raise TardisError(f"{data}: external data outside the model's folder cannot be carried along")
            (staging / "1" / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data, staging / "1" / relative)
        op_library = None
        if library is not None:
            copied = CUDA_LIBRARY if kind == "gpu" else CPU_LIBRARY
            shutil.copyfile(library, staging / copied)
            op_library = target.resolve() / copied
        config = model_config(model_path, name, max_batch, instances, kind, op_library)
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        os.rename(staging, target)
    except OSError as exc:
        raise TardisError(f"{target}: cannot write the model folder ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tardis_onnx triton",
        description="Write a Triton Inference Server model repository entry for an ONNX model (ONNX Runtime "
        "backend; the ai.tardis op library copied in and registered when the model uses it).",
    )
    parser.add_argument("model", type=Path, help="the (rewritten) ONNX model")
    parser.add_argument("--out", type=Path, required=True, help="the model repository folder (created if missing)")
    parser.add_argument("--name", help="model name in the repository (default: the file name without .tardis.onnx)")
    parser.add_argument("--max-batch", type=non_negative_int, default=8, help="largest dynamic batch (0: no batching)")
    parser.add_argument("--instances", type=positive_int, default=1, help="model instances (instance_group count)")
    parser.add_argument("--kind", choices=sorted(KINDS), default="cpu", help="where instances run")
    return parser


def run(args: argparse.Namespace) -> None:
    target = write_repository(args.model, args.out, args.name, args.max_batch, args.instances, args.kind)
    print(f"wrote {target} (serve with: tritonserver --model-repository {target.parent})")


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
