"""Reading side of the artifact contract: schema (pydantic == jsonschema), checksums, probe, paths."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from elit_stream.core.manifest import ArtifactError, Manifest, default_artifact_path
from elit_stream.core.artifact import load_artifact

SCHEMA = json.loads((Path(__file__).parents[1] / "models" / "manifest.schema.json").read_text())


@pytest.fixture
def art_copy(tiny_artifact, tmp_path) -> Path:
    dst = tmp_path / "models" / tiny_artifact.name
    shutil.copytree(tiny_artifact, dst)
    return dst


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refresh_checksum(folder: Path, fname: str) -> None:
    m = read_manifest(folder)
    data = (folder / fname).read_bytes()
    m["files"][fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    write_manifest(folder, m)


def test_tiny_artifact_loads(tiny_artifact):
    art = load_artifact(tiny_artifact)
    assert art.name == "tiny" and art.path == tiny_artifact.resolve()
    assert art.member_ids == (0, 1, 2) and art.member_seeds == (0, 1, 2)
    assert art.class_names == ("lattice", "impurity")
    assert (art.multiple_of, art.min_px, art.max_px) == (8, 16, 4096)
    assert art.pixel_size_pm == pytest.approx(14.1) and art.atom_radius_px == 3.0
    assert art.parent is None and art.onnx_path.name == "ensemble.onnx"
    digest = hashlib.sha256((tiny_artifact / "manifest.json").read_bytes()).hexdigest()
    assert art.manifest_sha256 == digest


def test_corrupted_onnx_byte_is_refused_naming_file_and_sha256(art_copy):
    data = bytearray((art_copy / "ensemble.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art_copy / "ensemble.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"ensemble\.onnx.*sha256"):
        load_artifact(art_copy)


def test_missing_listed_file_is_refused(art_copy):
    (art_copy / "probe.npz").unlink()
    with pytest.raises(ArtifactError, match=r"probe\.npz.*missing"):
        load_artifact(art_copy)


@pytest.mark.parametrize("path, value, field", [
    (("pixel_size_pm",), -1.0, "pixel_size_pm"),
    (("input_size", "multiple_of"), "8", "input_size.multiple_of"),
    (("members", 1, "seed"), 1.5, "members.1.seed"),
    (("classes", 0, "index"), 1, "classes"),
    (("model", "file"), "other.onnx", "model.file"),
    (("model", "output", "shape"), [5, 2, "H", "W"], "model.output.shape"),
    (("model", "input", "dtype"), "float16", "model.input.dtype"),
])
def test_bad_field_is_named(art_copy, path, value, field):
    m = read_manifest(art_copy)
    node = m
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    write_manifest(art_copy, m)
    with pytest.raises(ArtifactError, match=f"field {field}"):
        load_artifact(art_copy)


def test_unknown_key_is_refused(art_copy):
    m = read_manifest(art_copy)
    m["surprise"] = 1
    write_manifest(art_copy, m)
    with pytest.raises(ArtifactError, match="surprise"):
        load_artifact(art_copy)


@pytest.mark.parametrize("version", ["2.0", "0.9", None])
def test_other_major_version_is_refused(art_copy, version):
    m = read_manifest(art_copy)
    m["format_version"] = version
    write_manifest(art_copy, m)
    with pytest.raises(ArtifactError, match="major version"):
        load_artifact(art_copy)


def test_newer_minor_version_is_read(art_copy):
    m = read_manifest(art_copy)
    m["format_version"] = "1.7"
    write_manifest(art_copy, m)
    assert load_artifact(art_copy).name == "tiny"


def test_not_json_is_refused(art_copy):
    (art_copy / "manifest.json").write_text("{nope")
    with pytest.raises(ArtifactError, match="manifest.json.*JSON"):
        load_artifact(art_copy)


def test_probe_mismatch_is_refused(art_copy):
    with np.load(art_copy / "probe.npz") as z:
        arrays = dict(z)
    arrays["probs"] = arrays["probs"] + 0.01
    np.savez(art_copy / "probe.npz", **arrays)
    refresh_checksum(art_copy, "probe.npz")
    with pytest.raises(ArtifactError, match="probe mismatch"):
        load_artifact(art_copy)
    assert load_artifact(art_copy, check_probe=False).name == "tiny"


def test_probe_normalisation_mismatch_is_refused(art_copy):
    with np.load(art_copy / "probe.npz") as z:
        arrays = dict(z)
    arrays["input"] = arrays["input"] * 0.5
    np.savez(art_copy / "probe.npz", **arrays)
    refresh_checksum(art_copy, "probe.npz")
    with pytest.raises(ArtifactError, match="normalising raw"):
        load_artifact(art_copy)


def test_allowed_dirs(art_copy, tmp_path):
    models = art_copy.parent
    assert load_artifact(art_copy, allowed_dirs=[models], check_probe=False).name == "tiny"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ArtifactError, match="outside the allowed"):
        load_artifact(art_copy, allowed_dirs=[elsewhere])
    with pytest.raises(ArtifactError, match="outside the allowed"):
        load_artifact(elsewhere / ".." / "models" / "tiny", allowed_dirs=[elsewhere])
    link = elsewhere / "sneaky"
    link.symlink_to(art_copy, target_is_directory=True)
    with pytest.raises(ArtifactError, match="outside the allowed"):
        load_artifact(link, allowed_dirs=[elsewhere])
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(models / "absent", allowed_dirs=[models])


def test_listed_file_may_not_leave_the_folder(art_copy, tmp_path):
    m = read_manifest(art_copy)
    m["files"]["../outside.bin"] = {"sha256": "0" * 64, "bytes": 0}
    write_manifest(art_copy, m)
    with pytest.raises(ArtifactError, match="leaves the artifact folder"):
        load_artifact(art_copy)


def test_default_artifact_path(monkeypatch, tmp_path):
    monkeypatch.setenv("ELIT_MODEL", str(tmp_path))
    assert default_artifact_path() == tmp_path
    monkeypatch.delenv("ELIT_MODEL")
    assert default_artifact_path() == Path(__file__).resolve().parents[1] / "models" / "default"


# --- pydantic mirror agrees with the JSON schema ------------------------------------------------

def _set(path, value):
    def mutate(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


OOD_OK = {"version": 1, "threshold": 0.5, "flag_above": 1.0, "frames": 8, "seed": 5,
          "size_px": 64, "command": "elit-train reference x",
          "figures": {"density": {"low": -3.0, "median": -2.0, "high": -1.0, "scale": 0.5,
                                  "floor": 0.001}}}

MUTATIONS = {
    "identity": lambda m: None,
    "no name": _delete(("name",)),
    "extra top key": _set(("extra",), 1),
    "format": _set(("format",), "other"),
    "minor version": _set(("format_version",), "1.12"),
    "major 2": _set(("format_version",), "2.0"),
    "version number": _set(("format_version",), 1.0),
    "bad name": _set(("name",), "bad name!"),
    "empty git": _set(("git_commit",), ""),
    "opset 12": _set(("model", "opset"), 12),
    "opset str": _set(("model", "opset"), "17"),
    "architecture list": _set(("model", "architecture"), []),
    "tensor meaning": _set(("model", "input", "meaning"), "pixels"),
    "tensor meaning null": _set(("model", "input", "meaning"), None),
    "tensor extra": _set(("model", "input", "extra"), 1),
    "shape float": _set(("model", "output", "shape"), [3, 2, "H", 1.5]),
    "shape bool": _set(("model", "output", "shape"), [True, 2, "H", "W"]),
    "multiple 0": _set(("input_size", "multiple_of"), 0),
    "kind": _set(("normalization", "kind"), "zscore"),
    "scope": _set(("normalization", "scope"), "movie"),
    "pixel 0": _set(("pixel_size_pm",), 0),
    "pixel int": _set(("pixel_size_pm",), 14),
    "pixel str": _set(("pixel_size_pm",), "14"),
    "pixel bool": _set(("pixel_size_pm",), True),
    "range short": _set(("pixel_size_range_pm",), [7.0]),
    "range long": _set(("pixel_size_range_pm",), [7.0, 8.0, 9.0]),
    "range zero": _set(("pixel_size_range_pm",), [0, 28.0]),
    "no classes": _set(("classes",), []),
    "class extra": _set(("classes", 0, "colour"), "red"),
    "member loss null": _set(("members", 0, "best_val_loss"), None),
    "member loss str": _set(("members", 0, "best_val_loss"), "low"),
    "member seed float": _set(("members", 0, "seed"), 1.5),
    "member no iou": _delete(("members", 0, "test_iou")),
    "frames negative": _set(("test_set", "frames"), -1),
    "training list": _set(("training",), []),
    "lineage extra": _set(("lineage", "who"), "me"),
    "lineage notes null": _set(("lineage", "notes"), None),
    "parent ok": _set(("lineage", "parent"), {"name": "p", "manifest_sha256": "a" * 64}),
    "parent extra": _set(("lineage", "parent"), {"name": "p", "manifest_sha256": "a" * 64,
                                                 "x": 1}),
    "parent bad sha": _set(("lineage", "parent"), {"name": "p", "manifest_sha256": "A" * 64}),
    "parent str": _set(("lineage", "parent"), "p"),
    "iteration negative": _set(("lineage", "iteration"), -1),
    "no files": _set(("files",), {}),
    "file bad sha": _set(("files", "probe.npz", "sha256"), "xyz"),
    "file extra": _set(("files", "probe.npz", "mtime"), 0),
    "atol 0": _set(("probe", "atol"), 0),
    "created int": _set(("created",), 5),
    "ood ok": _set(("ood_reference",), OOD_OK),
    "ood null": _set(("ood_reference",), None),
    "ood no figures": _set(("ood_reference",), {**OOD_OK, "figures": {}}),
    "ood version 2": _set(("ood_reference",), {**OOD_OK, "version": 2}),
    "ood threshold 1": _set(("ood_reference",), {**OOD_OK, "threshold": 1.0}),
    "ood frames 0": _set(("ood_reference",), {**OOD_OK, "frames": 0}),
    "ood extra": _set(("ood_reference",), {**OOD_OK, "x": 1}),
    "ood command null": _set(("ood_reference",), {**OOD_OK, "command": None}),
    "ood scale 0": _set(("ood_reference",), {**OOD_OK, "figures": {"density": {
        **OOD_OK["figures"]["density"], "scale": 0.0}}}),
    "ood side low": _set(("ood_reference",), {**OOD_OK, "figures": {"density": {
        **OOD_OK["figures"]["density"], "side": "low"}}}),
    "ood side bad": _set(("ood_reference",), {**OOD_OK, "figures": {"density": {
        **OOD_OK["figures"]["density"], "side": "left"}}}),
    "ood band extra": _set(("ood_reference",), {**OOD_OK, "figures": {"density": {
        **OOD_OK["figures"]["density"], "p1": 0.0}}}),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_pydantic_and_jsonschema_agree(tiny_artifact, name):
    doc = copy.deepcopy(read_manifest(tiny_artifact))
    MUTATIONS[name](doc)
    schema_ok = jsonschema.Draft202012Validator(SCHEMA).is_valid(doc)
    try:
        Manifest.model_validate(doc)
        pydantic_ok = True
    except ValidationError:
        pydantic_ok = False
    assert pydantic_ok == schema_ok, f"{name}: jsonschema {schema_ok}, pydantic {pydantic_ok}"


def test_default_artifact_is_valid_if_present():
    path = Path(__file__).resolve().parents[1] / "models" / "default"
    if not (path / "manifest.json").exists():
        pytest.skip("models/default not built yet")
    jsonschema.validate(read_manifest(path), SCHEMA)
    art = load_artifact(path, check_probe=False)
    assert art.n_members >= 1
