"""Load: read a model with clear errors; save atomically, with external data when large."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx.external_data_helper import set_external_data, write_external_data_tensors

from tardis_onnx.errors import TardisError
from tardis_onnx.files import StagedWrites

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
            if model_bytes(model) < EXTERNAL_DATA_THRESHOLD:
                onnx.checker.check_model(model)
            else:
                onnx.checker.check_model(str(path))
        except (onnx.checker.ValidationError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TardisError(f"{path}: invalid ONNX model ({first_line})") from None
    return model


def check_output_folders(*folders: Path) -> None:
    """Refuse, before any work, output folders that cannot be created (or written to); create nothing."""
    for folder in folders:
        existing = Path(folder).absolute()
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.is_dir():
            raise TardisError(f"output folder '{folder}' cannot be created: '{existing}' is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise TardisError(f"output folder '{folder}' cannot be created: '{existing}' is not writable")


def make_output_folders(*folders: Path) -> None:
    """Create the folders a long run will write to, having checked first that each can be (so a bad
    one fails before any work, and leaves nothing behind)."""
    check_output_folders(*folders)
    for folder in folders:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TardisError(f"output folder '{folder}' cannot be created ({exc.strerror or exc})") from None


def save_model(model: onnx.ModelProto, output: Path, staged: StagedWrites | None = None) -> list[Path]:
    """Write ``model`` to ``output`` (external data ``<name>.data`` beside it when over 2 GiB); return the
    files. Through ``staged`` the files are only renamed in place when its ``with`` block succeeds;
    without it they are staged and renamed here."""
    if staged is None:
        with StagedWrites() as own:
            return save_model(model, output, own)
    output = Path(output)
    large = model_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    data = data_path(output)
    try:
        staged_model = staged.path(output)
        if large:
            staged.path(data).unlink(missing_ok=True)
            # onnx.save_model(save_as_external_data=True) refuses when `location` exists relative to the
            # *current* folder; mark the tensors and write their data beside the staged model instead.
            for tensor in _initializers(model.graph):
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                    set_external_data(tensor, data.name)
            write_external_data_tensors(model, str(staged_model.parent))
        onnx.save_model(model, str(staged_model))
    except (OSError, ValueError) as exc:
        raise TardisError(f"{output}: cannot write the model ({getattr(exc, 'strerror', None) or exc})") from None
    return [output, data] if large else [output]


def data_path(output: str | Path) -> Path:
    """Where :func:`save_model` puts a large model's external data: ``<name>.data`` beside the model file
    (beside the file a symlinked output points to)."""
    output = Path(output)
    return Path(os.path.realpath(os.path.abspath(output))).parent / (output.name + ".data")


def _initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from _initializers(sub)


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model``, or a value past protobuf's 2 GiB limit where protobuf cannot
    even measure it (it raises on messages over 2 GiB)."""
    try:
        return model.ByteSize()
    except (ValueError, EncodeError):
        return 2**31
