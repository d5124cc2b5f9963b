"""The package installs like one: the sdist carries the custom-op sources (so a wheel built from it
has the library) and no prebuilt binary; the command line answers --help and --version."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import tardis_onnx
from tardis_onnx.__main__ import main

REPO = Path(__file__).resolve().parent.parent


def test_the_sdist_carries_the_op_sources_and_no_binary(tmp_path):
    pytest.importorskip("setuptools", reason="building an sdist needs setuptools")
    command = [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={"TARDIS_CUSTOM_OPS": "skip"})
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in sdist.getnames() if "/" in n}
    assert {"custom_ops/build.py", "custom_ops/tardis_ops.cc", "custom_ops/ffn_fallback_cpu.cc"} <= names
    assert {"custom_ops/ffn_fallback.h", "custom_ops/tardis_math.h", "custom_ops/exports.map", "setup.py"} <= names
    assert "passes/ffn.py" in names and "tardis_onnx/optimize.py" in names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def test_help_and_version_exit_zero(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("optimize", "verify", "inspect", "diff"))
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tardis-onnx {tardis_onnx.__version__}"


def test_subcommand_help_names_the_command_and_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tardis_onnx optimize ")
    assert "(default: 0.2)" in out and "(default: accurate)" in out and "(default: auto)" in out
    assert "(default: None)" not in out
