"""ELIT trainer: synthetic STEM data, multi-SWA U-Net ensembles, ONNX artifacts (offline, PyTorch).

Four rooms; imports point down this list only (checked by tests/test_architecture.py):

- `trainer.cli`   the `elit-train` commands (`cli.elit` for the ELIT loop's)
- `trainer.elit`  the ELIT loop on experimental movies; uses `model` and `data`
- `trainer.model` U-Net, multi-SWA training, ONNX export, artifact checks; uses `data`
- `trainer.data`  synthetic tiles and test movies; imports no other room

The trainer and the service (`elit_stream`) share no code, only the artifact in `models/`.
"""
__version__ = "0.1.0"
