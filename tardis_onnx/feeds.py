"""Input feeds for a model: random ones built from its signature, or loaded from ``.npz``."""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.errors import TardisError, one_line

Feeds = dict[str, np.ndarray]
MAX_RANDOM_ELEMENTS = 2**30  # per random input (4 GiB of float32): beyond that a typo, not a test


def random_feeds(model: onnx.ModelProto, batch: int = 2, sequence: int = 16, past: int = 4, seed: int = 0) -> Feeds:
    """Plausible random inputs for a transformer export (ids, masks, positions, past key/values).

    Symbolic dimensions are resolved by name: ``batch`` → ``batch``, names with
    ``past`` and ``+`` (``past_sequence_length + 1``) → ``past + sequence``,
    other ``past`` names → ``past``, anything else → ``sequence``. Token ids stay below the rows
    of the table each input indexes (:func:`tardis_onnx.text.embedding_rows`; 1000 if none is found).
    """
    from tardis_onnx.text import embedding_rows  # text imports this module

    if batch < 1 or sequence < 1 or past < 0 or seed < 0:
        raise TardisError(
            f"need batch >= 1, sequence >= 1, past >= 0, seed >= 0 (got {batch}, {sequence}, {past}, {seed})"
        )
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds: Feeds = {}
    past_length = past if any("past" in i.name for i in model.graph.input) else 0
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dtype = input_dtype(value)
        shape = [_resolve_dim(dim, batch, sequence, past) for dim in value.type.tensor_type.shape.dim]
        if math.prod(shape) > MAX_RANDOM_ELEMENTS:
            raise TardisError(
                f"random input '{value.name}' of shape {shape} is too large: lower the batch or sequence length"
            )
        name = value.name.lower()
        if np.issubdtype(dtype, np.integer):
            if "mask" in name:
                array = np.ones(shape, dtype=dtype)
            elif "position" in name:
                array = np.broadcast_to(np.arange(shape[-1]) + past_length, shape) if shape else np.zeros(shape)
            elif "type" in name:
                array = np.zeros(shape, dtype=dtype)
            else:
                vocabulary = embedding_rows(model, value.name) or 1000
                array = rng.integers(0, max(1, min(vocabulary, np.iinfo(dtype).max)), size=shape)
            feeds[value.name] = np.ascontiguousarray(array, dtype=dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a graph input; a one-line error for inputs that are not numeric tensors."""
    elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        dtype = None
    if dtype is None or elem == 0 or dtype.kind not in "biuf":
        kind = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else elem
        raise TardisError(f"input '{value.name}' is not a numeric tensor ({kind}): give its values in an .npz")
    return dtype


def load_feeds(path: str | Path, model: onnx.ModelProto, label: str = "calibration feeds") -> list[Feeds]:
    """Feeds from an ``.npz``: one array per model input, or several batches as ``name/0``, ``name/1``, …

    Each array must have the dtype and rank the model declares for its input, and its fixed dimensions;
    a symbolic dimension must have one size across a batch's inputs; float values must be finite.
    """
    path = Path(path)
    where = f"{label} '{path}'"
    if not path.exists():
        raise TardisError(f"{where} not found")
    if not path.is_file():
        raise TardisError(f"{where}: not a file")
    archive = _read_npz(path, where)
    inputs = {i.name: i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}}
    batches: dict[str, Feeds] = {}
    for key, array in archive.items():
        if key in inputs or "/" not in key:
            name, batch = key, "0"
        else:
            name, _, batch = key.rpartition("/")
        batches.setdefault(batch, {})[name] = array
    result = []
    for batch, feeds in sorted(
        batches.items(), key=lambda item: (not item[0].isdigit(), int(item[0]) if item[0].isdigit() else 0, item[0])
    ):
        missing = [n for n in inputs if n not in feeds]
        unknown = [n for n in feeds if n not in inputs]
        if missing or unknown:
            raise TardisError(
                f"{where} (batch {batch}) do not match the model's inputs: missing {missing}, unknown {unknown}"
            )
        symbols: dict[str, tuple[int, str]] = {}
        for name, array in feeds.items():
            _check_feed(where, batch, inputs[name], array, symbols)
        result.append({name: feeds[name] for name in inputs})
    if not result:
        raise TardisError(f"{where} are empty")
    return result


def _read_npz(path: Path, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("a single array (.npy), not an .npz archive")
            return {key: archive[key] for key in archive.files}
    except AttributeError:  # np.load of a .npy returns an array, which has no context manager
        raise TardisError(f"{where} are not a readable .npz file (a single array, not an archive)") from None
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise TardisError(f"{where} are not a readable .npz file ({one_line(exc, 120)})") from None


def _check_feed(where: str, batch: str, value: onnx.ValueInfoProto, array: np.ndarray, symbols: dict) -> None:
    name = value.name
    dtype = input_dtype(value)
    if array.dtype != dtype:
        raise TardisError(f"{where} (batch {batch}): input '{name}' is {array.dtype}, the model expects {dtype}")
    tensor_type = value.type.tensor_type
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        if array.ndim != len(dims):
            raise TardisError(
                f"{where} (batch {batch}): input '{name}' has rank {array.ndim} {list(array.shape)}, "
                f"the model expects rank {len(dims)}"
            )
        for axis, (size, dim) in enumerate(zip(array.shape, dims, strict=True)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise TardisError(
                    f"{where} (batch {batch}): input '{name}' has size {size} in dimension {axis}, "
                    f"the model expects {dim.dim_value}"
                )
            if dim.HasField("dim_param") and dim.dim_param:
                seen = symbols.setdefault(dim.dim_param, (size, name))
                if seen[0] != size:
                    raise TardisError(
                        f"{where} (batch {batch}): dimension '{dim.dim_param}' is {size} in input '{name}' "
                        f"but {seen[0]} in input '{seen[1]}'"
                    )
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise TardisError(f"{where} (batch {batch}): input '{name}' holds non-finite values (NaN or inf)")


def _resolve_dim(dim: onnx.TensorShapeProto.Dimension, batch: int, sequence: int, past: int) -> int:
    if dim.HasField("dim_value"):
        return dim.dim_value
    name = dim.dim_param.lower()
    if "batch" in name:
        return batch
    if "past" in name:
        return past + sequence if "+" in name else past
    if "total" in name:
        return past + sequence
    return sequence
