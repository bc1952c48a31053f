"""Reading and verifying an artifact from the trainer's side (the service has its own reader).

Checks, in order: the manifest against ``models/manifest.schema.json``, the format's major version,
every file's sha256, and the probe (normalising ``raw`` gives ``input``; running it with onnxruntime
gives ``probs`` within the manifest's tolerance).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "models" / "manifest.schema.json"


class ArtifactError(Exception):
    """The artifact is unusable; the message names the file or field and what is wrong."""


def read_manifest(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no manifest.json (is this an artifact folder?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    validate_manifest(manifest, path)
    return manifest


def validate_manifest(manifest: dict, where: Path | str = "manifest.json") -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest),
                    key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = "/".join(str(p) for p in e.path) or "(top level)"
        raise ArtifactError(f"{where}: field {field!r}: {e.message}")
    if not str(manifest["format_version"]).startswith("1."):
        raise ArtifactError(f"{where}: format_version {manifest['format_version']} is not 1.x")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_files(artifact_dir: Path, manifest: dict) -> None:
    for name, entry in manifest["files"].items():
        path = Path(artifact_dir) / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(f"{path}: sha256 mismatch (manifest {entry['sha256'][:12]}…, "
                                f"file {digest[:12]}…): the file is corrupted or was changed")


def normalise_minmax(raw: np.ndarray) -> np.ndarray:
    """Per-frame min-max to [0, 1] in float32 (the manifest's ``minmax``/``frame``); a constant
    frame becomes zeros."""
    raw = raw.astype(np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    return (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)


def check_probe(artifact_dir: Path, manifest: dict) -> float:
    """Run the probe; returns max |probs − expected|, raises ArtifactError beyond ``atol``."""
    import onnxruntime as ort

    probe = np.load(Path(artifact_dir) / manifest["probe"]["file"])
    raw, net_input, expected = probe["raw"], probe["input"], probe["probs"]
    if not np.allclose(normalise_minmax(raw)[None, None], net_input, atol=1e-6):
        raise ArtifactError(f"{artifact_dir}: probe input is not the min-max normalisation of raw")
    session = ort.InferenceSession(str(Path(artifact_dir) / manifest["model"]["file"]),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["probs"], {"frame": net_input})[0]
    if got.shape != expected.shape:
        raise ArtifactError(f"{artifact_dir}: probe output shape {got.shape} != expected {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if not diff <= manifest["probe"]["atol"]:
        raise ArtifactError(f"{artifact_dir}: probe output differs by {diff:.2e} "
                            f"(> {manifest['probe']['atol']:g})")
    return diff


def verify_artifact(artifact_dir: Path) -> dict:
    """Full verification; returns the manifest."""
    manifest = read_manifest(artifact_dir)
    check_files(artifact_dir, manifest)
    check_probe(artifact_dir, manifest)
    return manifest
