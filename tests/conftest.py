import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # models/ recipes

# The never-slower check times rewrites on this machine, so what it keeps varies from run to run:
# the suite turns it off (subprocesses inherit this) and tests/test_speed.py turns it back on.
os.environ["TARDIS_SPEED_CHECK"] = "0"

from experiments.data import data_dir as shared_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = shared_data_dir()  # $TARDIS_DATA, else ../shared/data beside the repository


@pytest.fixture
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA} (set TARDIS_DATA)")
    return DATA
