"""Reading and verifying a model artifact (docs/artifact.md, format 1).

Owns: the pydantic mirror of `models/manifest.schema.json` (strict, `extra="forbid"`), the major
version check, path confinement for artifacts named over the control socket, the sha256 of every
listed file. The probe (step 3) runs in `core.artifact`, which uses the engine; this module
imports neither onnxruntime nor the engine.
Everything that is wrong raises one `ArtifactError` whose message names the file or field.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

READ_MAJOR = 1
MANIFEST_FILE = "manifest.json"
_SHA256 = r"^[0-9a-f]{64}$"


class ArtifactError(Exception):
    """An artifact cannot be used; the message names the file or field and what is wrong."""


# --- pydantic mirror of models/manifest.schema.json (tests check both agree) -----------------
# Strict: no str->int coercion, no bool as number, like JSON schema. Optional keys that may not be
# null in the schema are typed `str` with a default (pydantic does not validate defaults).

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Producer(_Strict):
    tool: str
    version: str
    command: str


class Tensor(_Strict):
    name: str
    shape: list[int | str]
    dtype: str
    meaning: str = None  # type: ignore[assignment]  # optional, never null


class ModelSpec(_Strict):
    file: str
    opset: int = Field(ge=13)
    input: Tensor
    output: Tensor
    architecture: dict[str, Any]


class InputSize(_Strict):
    multiple_of: int = Field(ge=1)
    min_px: int = Field(ge=1)
    max_px: int = Field(ge=1)


class Normalization(_Strict):
    kind: Literal["minmax"]
    scope: Literal["frame"]


class ClassSpec(_Strict):
    index: int = Field(ge=0)
    name: str
    description: str


class MemberSpec(_Strict):
    id: int = Field(ge=0)
    seed: int
    epochs: int = Field(ge=0)
    swa_epochs: int = Field(ge=0)
    best_val_loss: float | None
    test_iou: float | None


class TestSet(_Strict):
    frames: int = Field(ge=0)
    seed: int
    iou_mean: float | None
    iou_std: float | None


class Parent(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    manifest_sha256: str = Field(pattern=_SHA256)


class Lineage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    parent: Parent | None
    iteration: int = Field(ge=0)
    notes: str = None  # type: ignore[assignment]


class FileEntry(_Strict):
    sha256: str = Field(pattern=_SHA256)
    bytes: int = Field(ge=0)


class Probe(_Strict):
    file: str
    atol: float = Field(gt=0)


class FigureBandSpec(_Strict):
    low: float
    median: float
    high: float
    scale: float = Field(gt=0)
    floor: float = Field(gt=0)
    side: Literal["both", "low", "high"] = "both"


class OodReferenceSpec(_Strict):
    version: Literal[1]
    threshold: float = Field(gt=0, lt=1)
    flag_above: float = Field(ge=0)
    frames: int = Field(ge=1)
    seed: int
    size_px: int = Field(ge=1)
    command: str = None  # type: ignore[assignment]  # optional, never null
    scenes_excluded: list[str] = None  # type: ignore[assignment]  # optional, never null
    min_atoms: int = Field(default=None, ge=0)  # type: ignore[assignment]  # optional, never null
    figures: dict[str, FigureBandSpec] = Field(min_length=1)


class Manifest(_Strict):
    format: Literal["elit-ensemble"]
    format_version: str = Field(pattern=r"^1\.[0-9]+$")
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    created: str
    git_commit: str = Field(min_length=1)
    producer: Producer
    model: ModelSpec
    input_size: InputSize
    normalization: Normalization
    pixel_size_pm: float = Field(gt=0)
    pixel_size_range_pm: list[Annotated[float, Field(gt=0)]] = Field(min_length=2, max_length=2)
    atom_radius_px: float = Field(gt=0)
    classes: list[ClassSpec] = Field(min_length=1)
    members: list[MemberSpec] = Field(min_length=1)
    test_set: TestSet
    training: dict[str, Any]
    lineage: Lineage
    files: dict[str, FileEntry] = Field(min_length=1)
    probe: Probe
    ood_reference: OodReferenceSpec = None  # type: ignore[assignment]  # optional, never null


HEAVY_CLASS_NAMES = ("impurity", "heavy")
"""Class names that mean "heavier atoms" (Z-contrast), in order of preference."""


# --- the artifact ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    """A verified artifact folder. `manifest` is the parsed JSON (treat it as read-only)."""

    path: Path
    name: str
    manifest: dict
    manifest_sha256: str
    onnx_path: Path
    member_ids: tuple[int, ...]
    member_seeds: tuple[int, ...]
    class_names: tuple[str, ...]
    pixel_size_pm: float
    multiple_of: int
    min_px: int
    max_px: int
    atom_radius_px: float
    parent: str | None
    probe_path: Path | None = None
    probe_atol: float = 0.0
    ood_reference: dict | None = None   # the manifest's ood_reference; None in older artifacts

    @property
    def n_members(self) -> int:
        return len(self.member_ids)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def heavy_class(self) -> int | None:
        """Index of the heavier-atom class (named one of HEAVY_CLASS_NAMES), None without one:
        the class the Z-contrast rule of core/postprocess.py checks (docs/artifact.md)."""
        names = [n.lower() for n in self.class_names]
        return next((names.index(n) for n in HEAVY_CLASS_NAMES if n in names), None)


def default_artifact_path() -> Path:
    """`$ELIT_MODEL` if set, else `<repo root>/models/default`."""
    env = os.environ.get("ELIT_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models" / "default"


def read_artifact(path, allowed_dirs: Sequence[Path] | None = None) -> Artifact:
    """Read and validate the artifact folder `path` (steps 1-2 of docs/artifact.md: schema,
    consistency, checksums). Step 3, the probe, needs the engine: `core.artifact.load_artifact`.

    `allowed_dirs`: if given, the folder (symlinks resolved) must lie inside one of them.
    """
    folder = _confined(Path(path), allowed_dirs)
    raw, digest = _read_manifest(folder / MANIFEST_FILE)
    _check_major(raw)
    spec = _validate(raw)
    _check_consistency(spec)
    for fname, entry in spec.files.items():
        _check_file(folder, fname, entry)
    return _to_artifact(folder, raw, digest, spec)


def _confined(path: Path, allowed_dirs: Sequence[Path] | None) -> Path:
    try:
        folder = path.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: artifact folder not found ({exc})") from None
    if not folder.is_dir():
        raise ArtifactError(f"{path}: not a folder")
    if allowed_dirs is not None:
        roots = [Path(d).resolve() for d in allowed_dirs]
        if not any(folder.is_relative_to(r) for r in roots):
            raise ArtifactError(f"{path}: outside the allowed model folders "
                                f"{[str(r) for r in roots]}")
    return folder


def _read_manifest(mpath: Path) -> tuple[dict, str]:
    try:
        data = mpath.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{mpath}: cannot read ({exc.strerror})") from None
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{mpath}: top level must be an object")
    return raw, hashlib.sha256(data).hexdigest()


def _check_major(raw: dict) -> None:
    version = raw.get("format_version")
    major = str(version).split(".")[0] if version is not None else None
    if major != str(READ_MAJOR):
        raise ArtifactError(f"manifest.json: format_version {version!r} has major version "
                            f"{major}; this reader reads {READ_MAJOR}.x only")


def _validate(raw: dict) -> Manifest:
    try:
        spec = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ArtifactError(f"manifest.json: field {where}: {first['msg']} "
                            f"({exc.error_count()} problem(s) in all)") from None
    return spec


def _check_consistency(spec: Manifest) -> None:
    """What the schema cannot say: orders, cross-references, shapes."""
    def bad(field: str, why: str) -> ArtifactError:
        return ArtifactError(f"manifest.json: field {field}: {why}")
    if [c.index for c in spec.classes] != list(range(len(spec.classes))):
        raise bad("classes", "indices must be 0..C-1 in order")
    if [m.id for m in spec.members] != list(range(len(spec.members))):
        raise bad("members", "ids must be 0..M-1 in order (id = index in probs)")
    size = spec.input_size
    if size.min_px > size.max_px:
        raise bad("input_size", f"min_px {size.min_px} > max_px {size.max_px}")
    for key, ref in (("model.file", spec.model.file), ("probe.file", spec.probe.file)):
        if ref not in spec.files:
            raise bad(key, f"{ref!r} is not listed in files")
    for key, tensor in (("input", spec.model.input), ("output", spec.model.output)):
        if tensor.dtype != "float32":
            raise bad(f"model.{key}.dtype", f"{tensor.dtype!r}; this reader handles float32")
    out = spec.model.output.shape
    if len(out) != 4:
        raise bad("model.output.shape", f"must have 4 dims [M, C, H, W], got {out}")
    for dim, want, what in ((out[0], len(spec.members), "members"),
                            (out[1], len(spec.classes), "classes")):
        if isinstance(dim, int) and dim != want:
            raise bad("model.output.shape", f"{dim} does not match {want} {what}")


def _check_file(folder: Path, fname: str, entry: FileEntry) -> None:
    fpath = (folder / fname).resolve()
    if not fpath.is_relative_to(folder):
        raise ArtifactError(f"{fname}: path leaves the artifact folder")
    if not fpath.is_file():
        raise ArtifactError(f"{fname}: listed in manifest.json files but missing")
    nbytes = fpath.stat().st_size
    if nbytes != entry.bytes:
        raise ArtifactError(f"{fname}: size {nbytes} bytes, manifest says {entry.bytes}"
                            f" (sha256 not checked)")
    digest = _sha256_file(fpath)
    if digest != entry.sha256:
        raise ArtifactError(f"{fname}: sha256 mismatch (file {digest[:12]}…, "
                            f"manifest {entry.sha256[:12]}…)")


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _to_artifact(folder: Path, raw: dict, digest: str, spec: Manifest) -> Artifact:
    parent = spec.lineage.parent
    return Artifact(
        path=folder, name=spec.name, manifest=raw, manifest_sha256=digest,
        onnx_path=folder / spec.model.file,
        member_ids=tuple(m.id for m in spec.members),
        member_seeds=tuple(m.seed for m in spec.members),
        class_names=tuple(c.name for c in spec.classes),
        pixel_size_pm=float(spec.pixel_size_pm), multiple_of=spec.input_size.multiple_of,
        min_px=spec.input_size.min_px, max_px=spec.input_size.max_px,
        atom_radius_px=float(spec.atom_radius_px),
        parent=parent.name if parent is not None else None,
        probe_path=folder / spec.probe.file, probe_atol=float(spec.probe.atol),
        ood_reference=raw.get("ood_reference"))
