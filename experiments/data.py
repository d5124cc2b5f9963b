"""Where the experiments read their data: ``--data``, else ``$TARDIS_DATA``, else ``../shared/data``
beside the repository (this checkout's layout; nothing here is installed)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_VARIABLE = "TARDIS_DATA"


def data_dir(given: Path | None = None) -> Path:
    """The data folder: ``given``, else ``$TARDIS_DATA``, else the repository's ``../shared/data``."""
    if given is not None:
        return Path(given)
    return Path(os.environ.get(DATA_VARIABLE, REPO.parent / "shared" / "data"))
