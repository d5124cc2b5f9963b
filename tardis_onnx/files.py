"""Nothing is ever destroyed: output targets are checked against every input before any work, and
everything a command writes is staged beside its target and renamed in place only once all of it
was written.

* :func:`model_files`: a model file and every external-data file it references; :func:`model_file_bytes`, their size.
* :func:`check_targets`: a one-line :class:`TardisError` when an output would alias an input or
  another output (same path, ``..``, symlink, hard link), is not a regular file, or cannot be written.
* :class:`StagedWrites`: temporaries in a hidden folder beside each target, ``os.replace``-d onto
  their targets when the ``with`` block ends without error, deleted (targets untouched) otherwise.
* :func:`strict_json`: JSON without ``NaN``/``Infinity`` (non-finite numbers become ``null``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx

from tardis_onnx.errors import TardisError

_STAGING_PREFIX = ".tardis-staging-"


def model_files(path: str | Path) -> list[Path]:
    """The model file (resolved) and every external-data file its tensors reference (resolved, relative
    to the model's folder), in first-reference order. A model that cannot be parsed gives just itself."""
    path = Path(path)
    files = [_real(path)]
    if not path.is_file():
        return files
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable or not a model: its loader reports that, this only lists files
        return files
    for tensor in all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location:
            data = _real(path.parent / location)
            if data not in files:
                files.append(data)
    return files


def model_file_bytes(path: str | Path) -> int:
    """Bytes of the model file and of every external-data file it references (those that exist)."""
    return sum(f.stat().st_size for f in model_files(path) if f.is_file())


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers, attribute tensors, and those of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                yield from all_tensors(sub)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_targets(
    outputs: Sequence[str | Path | None], inputs: Sequence[str | Path | None], *, folders_may_be_missing: bool = False
) -> None:
    """Refuse, before any work, outputs that would destroy an input or another output, or cannot be written.

    An output is refused when it is the same file as an input or as another output (compared after
    resolving ``..`` and symlinks, and by device and inode for hard links), when it exists and is not a
    regular file (a folder, a FIFO, a device such as /dev/null; ``""`` is the folder ``.``), or when its
    folder is missing or not writable. ``None`` entries are skipped. ``folders_may_be_missing``: the
    command creates the output folders later (having checked they can be), so a missing one is fine.
    """
    input_paths = [Path(p) for p in inputs if p is not None]
    seen: dict[Path, Path] = {}
    seen_ids: dict[tuple[int, int], Path] = {}
    input_real = {_real(p): p for p in input_paths}
    input_ids = {i: p for p in input_paths if (i := _identity(p)) is not None}
    for raw in outputs:
        if raw is None:
            continue
        output = Path(raw)
        shown = str(raw) if str(raw) else "''"
        real = _real(output)
        if str(raw) == "" or output.name in ("", ".", ".."):
            raise TardisError(f"{shown}: not a file name (it names a folder)")
        if os.path.lexists(real) or os.path.exists(output):
            try:
                info = os.stat(real)
            except OSError:
                info = None
            if info is not None and stat.S_ISDIR(info.st_mode):
                raise TardisError(f"{shown}: is a folder, not a file")
            if info is not None and not stat.S_ISREG(info.st_mode):
                raise TardisError(f"{shown}: not a regular file (a FIFO, socket or device): refusing to replace it")
        identity = _identity(real)
        source = input_real.get(real) or (input_ids.get(identity) if identity else None)
        if source is not None:
            raise TardisError(f"{shown}: refusing to overwrite the input '{source}'")
        other = seen.get(real) or (seen_ids.get(identity) if identity else None)
        if other is not None:
            raise TardisError(f"{shown}: written twice (it is the same file as the output '{other}')")
        seen[real] = output
        if identity is not None:
            seen_ids[identity] = output
        folder = real.parent
        if folders_may_be_missing and not os.path.lexists(folder):
            continue
        if not folder.is_dir():
            why = "is not a folder" if folder.exists() else "does not exist"
            raise TardisError(f"{shown}: cannot write: output folder '{output.parent}' {why}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TardisError(f"{shown}: cannot write: output folder '{output.parent}' is not writable")


class StagedWrites:
    """Stage files beside their targets; rename them all in place when the ``with`` block succeeds.

    ``path(target)`` is where to write ``target``'s content: ``<folder>/.tardis-staging-XXXX/<name>``,
    one hidden folder per target folder (same filesystem, so the rename is atomic), so files written
    side by side (a model and its ``.data``) stay side by side. Targets are resolved first: a symlinked
    target is written through (the link stays). On success every staged file is ``os.replace``-d onto its
    target (a target missing from the stage is an error, and nothing is replaced); if a rename fails the
    ones already done are rolled back. On an exception the temporaries are deleted and every target is
    left untouched.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # resolved target → temporary
        self._folders: dict[Path, Path] = {}  # target folder → its staging folder

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()
        return False

    def path(self, target: str | Path) -> Path:
        """A temporary path to write ``target``'s content to."""
        real = _real(Path(target))
        if real in self._staged:
            return self._staged[real]
        folder = self._folders.get(real.parent)
        if folder is None:
            try:
                folder = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=real.parent))
            except OSError as exc:
                raise TardisError(f"{target}: cannot write in '{real.parent}' ({exc.strerror or exc})") from None
            self._folders[real.parent] = folder
        self._staged[real] = folder / real.name
        return self._staged[real]

    def write_text(self, target: str | Path, text: str) -> None:
        try:
            self.path(target).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise TardisError(f"{target}: cannot write ({exc.strerror or exc})") from None

    def write_bytes(self, target: str | Path, data: bytes) -> None:
        try:
            self.path(target).write_bytes(data)
        except OSError as exc:
            raise TardisError(f"{target}: cannot write ({exc.strerror or exc})") from None

    def commit(self) -> None:
        """Rename every staged file onto its target (all were written, or none is renamed)."""
        missing = [target for target, temporary in self._staged.items() if not temporary.is_file()]
        if missing:
            raise TardisError(f"{missing[0]}: was not written")
        done: list[tuple[Path, Path | None]] = []
        try:
            for target, temporary in self._staged.items():
                backup = None
                if os.path.isfile(target):
                    backup = temporary.with_name(temporary.name + ".previous")
                    try:
                        os.link(target, backup)
                    except OSError:
                        backup = None
                os.replace(temporary, target)
                done.append((target, backup))
        except OSError as exc:
            for target, backup in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, target)
                    else:
                        os.unlink(target)
                except OSError:
                    pass
            raise TardisError(f"{target}: cannot write ({exc.strerror or exc})") from None
        self._staged.clear()

    def discard(self) -> None:
        """Delete the staging folders and whatever is left in them."""
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        self._staged.clear()


def delete_staged_files_on_terminate() -> None:
    """Let SIGTERM (a job killed by its scheduler or by ``kill``) unwind like Ctrl-C does: every
    :class:`StagedWrites` block then deletes its temporaries and no half-written file stays beside a target."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    with contextlib.suppress(ValueError):  # not the main thread: signals are the host's
        signal.signal(signal.SIGTERM, terminate)


def finite_or_none(value):
    """``value`` with every non-finite float replaced by ``None`` (numpy scalars and arrays converted)."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy scalars and arrays
        return finite_or_none(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def strict_json(value, **kwargs) -> str:
    """``json.dumps`` of ``value`` as strict JSON: non-finite numbers become ``null``, never ``NaN``."""
    try:
        return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)
    except (TypeError, ValueError) as exc:
        raise TardisError(f"cannot write the JSON ({exc})") from None
