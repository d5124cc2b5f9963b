"""The scripts outside the package keep the commands' contract: --help shows the usage and exits 0, a usage
error is one ``error:`` line on stderr and exit code 2 (argument parsing only: nothing is built)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Every script with a main() outside the package.
SCRIPTS = sorted(
    str(path.relative_to(REPO))
    for folder in ("models", "tools", "benchmarks", "experiments")
    for path in (REPO / folder).glob("*.py")
    if "\ndef main(" in path.read_text()
)


def _run(script: str, option: str) -> subprocess.CompletedProcess:
    # experiments/ is a package, run as a module (python -m experiments.evaluate); the rest as files.
    command = ["-m", script[:-3].replace("/", ".")] if script.startswith("experiments/") else [script]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *command, option], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_and_usage_error(script):
    shown = _run(script, "--help")
    assert shown.returncode == 0, shown.stderr
    assert "usage" in shown.stdout
    refused = _run(script, "--no-such-option")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error:"), refused.stderr
