"""Load: read a model with clear errors; save atomically, with external data when large."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from tardis_onnx.errors import TardisError

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GiB limit, with headroom


def load_model(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """The model at ``path``; a ``TardisError`` with a one-line reason when it cannot be read."""
    path = Path(path)
    if not path.exists():
        raise TardisError(f"{path}: no such file")
    if not path.is_file():
        raise TardisError(f"{path}: not a file")
    try:
        model = onnx.load(str(path), load_external_data=load_weights)
    except DecodeError as exc:
        raise TardisError(f"{path}: not an ONNX model (protobuf parse failed: {exc})") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise TardisError(f"{path}: cannot read the model or its external data ({exc})") from None
    if model.ir_version == 0 or not model.graph.node:
        raise TardisError(f"{path}: not an ONNX model (no graph)")
    if load_weights:
        try:
            if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
                onnx.checker.check_model(model)
            else:
                onnx.checker.check_model(str(path))
        except (onnx.checker.ValidationError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TardisError(f"{path}: invalid ONNX model ({first_line})") from None
    return model


def check_writable(output: Path, source: Path) -> None:
    """Refuse to overwrite the input or to write where we cannot, before doing any work."""
    if output.resolve() == source.resolve():
        raise TardisError(f"{output}: refusing to overwrite the input model")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise TardisError(f"{output}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise TardisError(f"{output}: output folder '{folder}' is not writable")


def make_output_folders(*folders: Path) -> None:
    """Create the folders a long run will write to, having checked first that each can be (so a bad
    one fails before any work, and leaves nothing behind)."""
    for folder in folders:
        existing = folder.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise TardisError(f"output folder '{folder}' cannot be created: '{existing}' is not a folder")
        if not os.access(existing, os.W_OK):
            raise TardisError(f"output folder '{folder}' cannot be created: '{existing}' is not writable")
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


def save_model(model: onnx.ModelProto, output: Path) -> list[Path]:
    """Write ``model`` to ``output`` atomically (external data ``<name>.data`` when over 2 GiB); return the files."""
    output = Path(output)
    large = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD if _small_enough_to_measure(model) else True
    data_name = output.name + ".data"
    try:
        with tempfile.TemporaryDirectory(prefix=".tardis-", dir=output.parent) as staging:
            staged = Path(staging) / output.name
            if large:
                onnx.save_model(model, str(staged), save_as_external_data=True, location=data_name)
                os.replace(Path(staging) / data_name, output.parent / data_name)
            else:
                onnx.save_model(model, str(staged))
            os.replace(staged, output)
    except OSError as exc:
        raise TardisError(f"{output}: cannot write the model ({exc.strerror or exc})") from None
    return [output, output.parent / data_name] if large else [output]


def _small_enough_to_measure(model: onnx.ModelProto) -> bool:
    try:
        model.ByteSize()
    except ValueError:
        return False
    return True
