"""tardis-onnx: fold the GELU feed-forward networks of ONNX models (TARDIS, arXiv 2501.10054)."""

__version__ = "0.1.0"

# ONNX Runtime session options with the ai.tardis library registered, e.g. for Optimum's
# ORTModelForCausalLM.from_pretrained(folder, file_name="model.tardis.onnx", session_options=session_options());
# library_path(): the library itself, for hosts that register it themselves.
from tardis_onnx.runtime import library_path, session_options  # noqa: E402

__all__ = ["__version__", "library_path", "session_options"]
