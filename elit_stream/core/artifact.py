"""A usable artifact: read and validated (`core.manifest`) and its probe run through the engine
(`core.engine`), steps 1-3 of docs/artifact.md. The one place that joins the two, so the manifest
reader never needs onnxruntime and the engine never reads manifests.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from elit_stream.core import engine
from elit_stream.core.manifest import Artifact, ArtifactError, read_artifact


def load_artifact(path, allowed_dirs: Sequence[Path] | None = None,
                  check_probe: bool = True) -> Artifact:
    """Read, validate and verify the artifact folder `path` (steps 1-3 of docs/artifact.md).

    `allowed_dirs`: if given, the folder (symlinks resolved) must lie inside one of them.
    """
    art = read_artifact(path, allowed_dirs)
    if check_probe:
        verify_probe(art)
    return art


def verify_probe(art: Artifact) -> None:
    """Step 3: normalising `raw` gives `input` (1e-6); running `input` gives `probs` (atol)."""
    fname = art.probe_path.name
    try:
        with np.load(art.probe_path) as z:
            raw, x, expected = z["raw"], z["input"], z["probs"]
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(f"{fname}: cannot read raw/input/probs ({exc})") from None
    if raw.ndim != 2 or x.shape != (1, 1, *raw.shape):
        raise ArtifactError(f"{fname}: raw {raw.shape} / input {x.shape} shapes disagree")
    norm_err = float(np.max(np.abs(engine.normalise(raw) - x[0, 0])))
    if not norm_err <= 1e-6:
        raise ArtifactError(f"{fname}: normalising raw differs from input by {norm_err:.3g}")
    try:
        got = engine.run_probe(art.onnx_path, x.astype(np.float32, copy=False))
    except engine.EngineError as exc:
        raise ArtifactError(f"{art.onnx_path.name}: cannot run the probe: {exc}") from None
    if expected.shape[:2] != (art.n_members, art.n_classes) or got.shape != expected.shape:
        raise ArtifactError(f"{fname}: output shape {got.shape}, probe expects {expected.shape}")
    err = float(np.max(np.abs(got - expected)))
    if not err <= art.probe_atol:
        raise ArtifactError(f"{fname}: probe mismatch, max |probs - expected| = {err:.3g} "
                            f"> atol {art.probe_atol}")
