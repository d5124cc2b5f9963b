"""Load: read a model with clear errors (large ones graph-only, weights memory-mapped); save atomically,
with external data when large (written as the rewrite goes, for models read graph-only)."""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, set_external_data, write_external_data_tensors
from onnx.helper import np_dtype_to_tensor_dtype

from tardis_onnx.errors import TardisError, first_line
from tardis_onnx.files import StagedWrites, all_tensors

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # protobuf's 2 GiB limit, with headroom


def load_model(path: str | Path, load_weights: bool = True) -> onnx.ModelProto:
    """The model at ``path``; a ``TardisError`` with a one-line reason when it cannot be read.
    ``load_weights=False``: the graph only (external data stays on disk, unchecked)."""
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
        _check(model, path)
    return model


def open_model(path: str | Path) -> tuple[onnx.ModelProto, Path | None]:
    """The model at ``path`` for rewriting, checked, and the folder its external data is read from.

    A model with external data is loaded graph-only: its weights stay on disk and are read through
    :func:`tensor_array` (memory-mapped) one tensor at a time, so a model larger than memory can be
    rewritten. A model without external data is loaded whole (folder None)."""
    model = load_model(path, load_weights=False)
    if not has_external_data(model):
        _check(model, Path(path))
        return model, None
    _check(model, Path(path), by_path=True)
    return model, Path(os.path.realpath(os.path.abspath(path))).parent


def _check(model: onnx.ModelProto, path: Path, by_path: bool = False) -> None:
    try:
        if not by_path and model_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise TardisError(f"{path}: invalid ONNX model ({first_line(exc)})") from None


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the graph (subgraphs included) keeps its data in an external file."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model.graph))


def tensor_array(tensor: onnx.TensorProto, weights_dir: Path | None = None) -> np.ndarray:
    """The value of ``tensor``: read-only and memory-mapped from ``weights_dir`` when its data is external
    (only the pages read are ever loaded), else decoded from the proto."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    if weights_dir is None:
        raise TardisError(f"tensor '{tensor.name}': its data is in the external file '{info.location}', not loaded")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    shape = tuple(tensor.dims)
    count = math.prod(shape)
    if tensor.data_type not in _MAPPABLE or (info.length not in (None, 0) and info.length != count * dtype.itemsize):
        return numpy_helper.to_array(tensor, str(weights_dir))  # packed or odd layouts: decoded by onnx
    file = Path(weights_dir) / info.location
    try:
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=info.offset or 0, shape=shape)
    except (OSError, ValueError) as exc:
        raise TardisError(f"tensor '{tensor.name}': cannot read its data from '{file}' ({exc})") from None


# Types whose external bytes are a plain little-endian array numpy can map as it is.
_MAPPABLE = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT64,
}


def release(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped ``array`` from this process (they are read again from the file if
    used later): a model's weights, once folded, stop counting towards its memory."""
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise"):
        mapping.madvise(mmap.MADV_DONTNEED)


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


def save_model(
    model: onnx.ModelProto,
    output: Path,
    staged: StagedWrites | None = None,
    weights_dir: Path | None = None,
    weights: ExternalDataWriter | None = None,
) -> list[Path]:
    """Write ``model`` to ``output`` (external data ``<name>.data`` beside it when over 2 GiB); return the
    files. Through ``staged`` the files are only renamed in place when its ``with`` block succeeds;
    without it they are staged and renamed here.

    A model read graph-only (:func:`open_model`: its external data in ``weights_dir``) always keeps external
    data: ``weights`` (from :meth:`ExternalDataWriter.staged`, holding what the rewrite already wrote, or a
    new one) receives every other tensor, copied from ``weights_dir`` a chunk at a time."""
    if staged is None:
        with StagedWrites() as own:
            return save_model(model, output, own, weights_dir, weights)
    output = Path(output)
    data = data_path(output)
    mapped = weights_dir is not None or weights is not None
    large = mapped or model_bytes(model) >= EXTERNAL_DATA_THRESHOLD
    try:
        staged_model = staged.path(output)
        if mapped:
            writer = weights or ExternalDataWriter.staged(staged, output)
            with writer:
                for tensor in _initializers(model.graph):  # large inline ones join them; attributes stay inline
                    writer.add(tensor, weights_dir)
                for tensor in all_tensors(model.graph):  # attribute tensors kept in the input's external data
                    if tensor.data_location == onnx.TensorProto.EXTERNAL:
                        writer.add(tensor, weights_dir)
        elif large:
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


class ExternalDataWriter:
    """An external-data file written as tensors come: each tensor's bytes appended at a 4 KiB-aligned offset
    (so ONNX Runtime memory-maps them) and the tensor turned into a reference to them.

    ``add`` takes a tensor with inline data of at least ``min_bytes`` (moved out of the proto, freeing it)
    or one still referring to the input model's external data (copied a chunk at a time); smaller inline
    tensors stay inline. A named tensor is written once, however often it is added."""

    ALIGNMENT = 4096
    CHUNK = 64 << 20

    def __init__(self, path: Path, min_bytes: int = 1024) -> None:
        self.path = Path(path)
        self.location = self.path.name
        self.min_bytes = min_bytes
        self.written: set[str] = set()
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())

    @classmethod
    def staged(cls, staged: StagedWrites, output: Path) -> ExternalDataWriter:
        """A writer for ``output``'s external data, staged beside it (renamed in place with the model)."""
        return cls(staged.path(data_path(output)))

    def add(self, tensor: onnx.TensorProto, weights_dir: Path | None = None) -> None:
        if tensor.name and tensor.name in self.written:  # names are unique in a model; unnamed come once
            return
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(tensor)
            if weights_dir is None:
                raise TardisError(f"tensor '{tensor.name}': its external data '{info.location}' has no folder")
            self.append(tensor, self._copied(tensor.name, info, Path(weights_dir) / info.location))
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= self.min_bytes:
            data = tensor.raw_data
            tensor.ClearField("raw_data")
            self.append(tensor, [data])

    def append(self, tensor: onnx.TensorProto, chunks: Iterable) -> None:
        """Write ``chunks`` (the tensor's bytes, any bytes-like objects) at the next aligned offset and make
        ``tensor`` refer to them."""
        offset = self._align()
        for chunk in chunks:
            self._file.write(chunk)
        length = self._file.tell() - offset
        del tensor.external_data[:]
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensor.data_location = onnx.TensorProto.EXTERNAL
        if tensor.name:
            self.written.add(tensor.name)

    def add_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A tensor ``name`` holding ``array``: written from the array itself when of at least ``min_bytes`` (no
        copy into a proto and out again), else inline."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        if array.nbytes < self.min_bytes:
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=np_dtype_to_tensor_dtype(array.dtype))
        self.append(tensor, [array.data])
        return tensor

    def _copied(self, name: str, info: ExternalDataInfo, path: Path) -> Iterator[bytes]:
        """The bytes of an external tensor, a chunk at a time."""
        with open(path, "rb") as source:
            source.seek(info.offset or 0)
            left = info.length if info.length is not None else os.fstat(source.fileno()).st_size - source.tell()
            while left > 0:
                chunk = source.read(min(self.CHUNK, left))
                if not chunk:
                    raise TardisError(f"tensor '{name}': '{info.location}' ends before its data does")
                left -= len(chunk)
                yield chunk

    def _align(self) -> int:
        offset = self._file.tell()
        padding = -offset % self.ALIGNMENT
        if padding:
            self._file.write(b"\0" * padding)
        return offset + padding

    def flush(self) -> None:
        self._file.flush()

    def restart(self) -> None:
        """Empty the file: nothing written yet (what it held is no longer referred to)."""
        self._file.seek(0)
        self._file.truncate()
        self.written.clear()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def data_path(output: str | Path) -> Path:
    """Where :func:`save_model` puts a large model's external data: ``<name>.data`` beside the model file
    (beside the file a symlinked output points to)."""
    output = Path(output)
    return Path(os.path.realpath(os.path.abspath(output))).parent / (output.name + ".data")


def save_whole(
    model: onnx.ModelProto, path: Path, weights_dir: Path | None, weights: ExternalDataWriter | None = None
) -> None:
    """A model read graph-only written to ``path`` as a model ONNX tools can load by itself (external data in
    ``<name>.data`` beside it): each tensor's data copied a chunk at a time, from ``weights``' file for the tensors
    it wrote, else from ``weights_dir``; ``model`` unchanged. For a quantizer, which reads the model whole."""
    if weights is not None:
        weights.flush()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with ExternalDataWriter(data_path(path)) as writer:
        for tensor in all_tensors(copy.graph):
            written = weights is not None and tensor.name in weights.written
            writer.add(tensor, weights.path.parent if written else weights_dir)
    onnx.save_model(copy, str(path))


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
