"""What tests that compile against ONNX Runtime need from custom_ops/build.py, without building anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ort_headers() -> Path | None:
    """ONNX Runtime's C/C++ headers the build used ($ORT_INCLUDE_DIR or its fetched copy), never fetching."""
    spec = importlib.util.spec_from_file_location("tardis_build", ROOT / "custom_ops" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        return build.headers_at_hand()
    except build.BuildError:
        return None
