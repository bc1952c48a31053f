"""ELIT trainer: synthetic STEM data, multi-SWA U-Net ensembles, ONNX artifacts (offline, PyTorch)."""
__version__ = "0.1.0"
