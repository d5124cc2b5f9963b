"""Input feeds for a model: random ones built from its signature, or loaded from ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from tardis_onnx.errors import TardisError
from tardis_onnx.graph import GraphIndex

Feeds = dict[str, np.ndarray]


def random_feeds(model: onnx.ModelProto, batch: int = 2, sequence: int = 16, past: int = 4, seed: int = 0) -> Feeds:
    """Plausible random inputs for a transformer export (ids, masks, positions, past key/values).

    Symbolic dimensions are resolved by name: ``batch`` → ``batch``, names with
    ``past`` and ``+`` (``past_sequence_length + 1``) → ``past + sequence``,
    other ``past`` names → ``past``, anything else → ``sequence``.
    """
    rng = np.random.default_rng(seed)
    index = GraphIndex(model.graph)
    initializers = set(index.initializers)
    feeds: Feeds = {}
    past_length = past if any("past" in i.name for i in model.graph.input) else 0
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [_resolve_dim(dim, batch, sequence, past) for dim in tensor_type.shape.dim]
        name = value.name.lower()
        if np.issubdtype(dtype, np.integer):
            if "mask" in name:
                array = np.ones(shape, dtype=dtype)
            elif "position" in name:
                array = np.broadcast_to(np.arange(shape[-1]) + past_length, shape)
            elif "type" in name:
                array = np.zeros(shape, dtype=dtype)
            else:
                array = rng.integers(0, _vocabulary_size(index, value.name), size=shape)
            feeds[value.name] = np.ascontiguousarray(array, dtype=dtype)
        elif dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype=dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_feeds(path: str | Path, model: onnx.ModelProto) -> list[Feeds]:
    """Feeds from an ``.npz``: one array per model input, or several batches as ``name/0``, ``name/1``, …"""
    path = Path(path)
    if not path.is_file():
        raise TardisError(f"calibration feeds '{path}' not found")
    try:
        archive = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise TardisError(f"calibration feeds '{path}' are not a readable .npz file ({exc})") from None
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    batches: dict[str, Feeds] = {}
    for key, array in archive.items():
        name, _, batch = key.rpartition("/") if "/" in key else (key, "", "0")
        batches.setdefault(batch, {})[name] = array
    result = []
    for batch, feeds in sorted(batches.items()):
        missing = [n for n in names if n not in feeds]
        unknown = [n for n in feeds if n not in names]
        if missing or unknown:
            raise TardisError(
                f"calibration feeds '{path}' (batch {batch}) do not match the model's inputs: "
                f"missing {missing}, unknown {unknown}"
            )
        result.append(feeds)
    if not result:
        raise TardisError(f"calibration feeds '{path}' are empty")
    return result


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


def _vocabulary_size(index: GraphIndex, input_name: str) -> int:
    """Rows of the embedding table gathered by ``input_name`` (1000 if none is found)."""
    for node in index.consumers_of(input_name):
        if node.op_type == "Gather" and node.input[1] == input_name:
            table = index.constant(node.input[0])
            if table is not None:
                return int(table.shape[0])
    return 1000
