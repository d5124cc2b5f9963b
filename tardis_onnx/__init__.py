"""tardis-onnx: fold the GELU feed-forward networks of ONNX models (TARDIS, arXiv 2501.10054)."""

__version__ = "0.1.0"
