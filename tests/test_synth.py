"""The synthetic training-data generator: determinism, masks vs. coordinates, scale, file format."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial import cKDTree

from trainer.data.lattice import CC_BOND_PM
from trainer.data.synth import (
    Dataset,
    DatasetFileError,
    SynthConfig,
    load_dataset,
    make_dataset,
    make_sample,
    paint_discs,
    preview_png,
    save_dataset,
)

SMALL = SynthConfig(size_px=64)
# A perfect, undistorted graphene sheet: only the scale is left to vary.
PERFECT_GRAPHENE = replace(SMALL, jitter_pm_range=(0.0, 0.0), removed_fraction_range=(0.0, 0.0),
                           distortion_max=0.0)


def _samples(cfg: SynthConfig, n: int, seed: int = 0):
    return [make_sample(np.random.default_rng([seed, i]), cfg) for i in range(n)]


def _assert_same(a: Dataset, b: Dataset, n: int) -> None:
    np.testing.assert_array_equal(a.images[:n], b.images[:n])
    np.testing.assert_array_equal(a.masks[:n], b.masks[:n])
    np.testing.assert_array_equal(a.pixel_size_pm[:n], b.pixel_size_pm[:n])
    for i in range(n):
        np.testing.assert_array_equal(a.xy[i], b.xy[i])
        np.testing.assert_array_equal(a.cls[i], b.cls[i])


@pytest.mark.parametrize("lattice", ["graphene", "square", "perovskite"])
def test_same_seed_same_tiles_and_tile_i_depends_only_on_seed_and_i(lattice):
    cfg = replace(SMALL, lattice=lattice)
    first = make_dataset(3, 11, cfg)
    _assert_same(first, make_dataset(3, 11, cfg), 3)
    _assert_same(first, make_dataset(5, 11, cfg), 3)
    other = make_dataset(3, 12, cfg)
    assert not np.array_equal(first.images, other.images)
    assert not np.array_equal(first.masks, other.masks)


@pytest.mark.parametrize("lattice", ["graphene", "square", "perovskite"])
@pytest.mark.parametrize("zoom", [1.0, 2.0])
def test_every_atom_centre_carries_its_class(lattice, zoom):
    cfg = replace(SMALL, lattice=lattice, zoom_range=(zoom, zoom))
    for s in _samples(cfg, 6):
        col, row = np.rint(s.xy).astype(int).T
        found = s.mask[row, col]
        assert np.all(found >= s.cls), "a disc centre is background or a lighter class"
        assert np.mean(found == s.cls) > 0.95


@pytest.mark.parametrize("lattice", ["graphene", "square", "perovskite"])
@pytest.mark.parametrize("zoom", [1.0, 2.0])
def test_mask_is_discs_of_the_zoomed_radius_around_atoms(lattice, zoom):
    cfg = replace(SMALL, lattice=lattice, zoom_range=(zoom, zoom))
    radius = cfg.atom_radius_px * zoom
    margin = int(np.ceil(radius)) + 1   # atoms just outside the tile paint the border band
    rows, cols = np.mgrid[margin:cfg.size_px - margin, margin:cfg.size_px - margin]
    pixels = np.stack([cols.ravel(), rows.ravel()], 1)
    for s in _samples(cfg, 6):
        inner = s.mask[margin:-margin, margin:-margin].ravel()
        if len(s.xy) == 0:
            assert not inner.any()
            continue
        distance, _ = cKDTree(s.xy).query(pixels)
        assert not np.any(inner[distance > radius + 1]), "mask pixel far from every atom"
        assert np.all(inner[distance < radius - 1] > 0), "pixel near an atom left background"


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_where_discs_overlap_the_heavier_class_wins(order):
    xy = np.array([[10.0, 10.0], [12.5, 10.0]])[order]
    cls = np.array([2, 1], np.uint8)[order]
    mask = paint_discs(xy, cls, 2.5, 24)
    assert mask[10, 10] == 2 and mask[10, 11] == 2 and mask[10, 12] == 2
    assert mask[10, 14] == 1 and mask[10, 15] == 1 and mask[10, 16] == 0


@pytest.mark.parametrize("zoom", [1.0, 2.0])
def test_image_atoms_are_centred_on_their_xy(zoom):
    cfg = replace(SynthConfig(lattice="perovskite", zoom_range=(zoom, zoom)).without_noise(),
                  sigma_pm_range=(40.0, 40.0), dopant_fraction_range=(0.0, 0.0))
    s = make_sample(np.random.default_rng(2), cfg)
    half = round(3 * 40.0 / s.pixel_size_pm)     # 3 sigma; the next column is ~7 sigma away
    offsets = np.arange(-half, half + 1)
    for x, y in s.xy:
        col, row = round(x), round(y)
        if not (half <= col < cfg.size_px - half and half <= row < cfg.size_px - half):
            continue
        window = s.image[row - half:row + half + 1, col - half:col + half + 1].astype(np.float64)
        cx = col + (window.sum(0) @ offsets) / window.sum()
        cy = row + (window.sum(1) @ offsets) / window.sum()
        assert abs(cx - x) < 0.15 and abs(cy - y) < 0.15


def test_graphene_two_classes_has_heavy_dopants_at_some_rate():
    cls = np.concatenate([s.cls for s in _samples(SMALL, 40)])
    assert set(np.unique(cls)) == {1, 2}
    assert 0.001 < np.mean(cls == 2) < 0.1


@pytest.mark.parametrize("lattice", ["graphene", "square", "perovskite"])
def test_one_class_yields_only_background_and_atom(lattice):
    cfg = replace(SMALL, lattice=lattice, n_classes=1)
    for s in _samples(cfg, 5):
        assert set(np.unique(s.mask)) <= {0, 1}
        assert np.all(s.cls == 1)


@pytest.mark.parametrize("zoom", [1.0, 1.5, 2.0])
def test_zoom_sets_pixel_size_and_bond_length_in_px(zoom):
    cfg = replace(PERFECT_GRAPHENE, zoom_range=(zoom, zoom))
    s = make_sample(np.random.default_rng(5), cfg)
    assert s.pixel_size_pm == pytest.approx(cfg.pixel_size_pm / zoom)
    distance, _ = cKDTree(s.xy).query(s.xy, k=2)
    assert np.median(distance[:, 1]) == pytest.approx(CC_BOND_PM / s.pixel_size_pm, rel=0.02)


def test_scale_properties_follow_zoom_range():
    cfg = SynthConfig(pixel_size_pm=20.0, zoom_range=(1.0, 4.0), atom_radius_px=2.5)
    assert cfg.nominal_pixel_size_pm == pytest.approx(10.0)
    assert cfg.pixel_size_range_pm == pytest.approx((5.0, 20.0))
    assert cfg.nominal_atom_radius_px == pytest.approx(5.0)
    sizes = [s.pixel_size_pm for s in _samples(replace(cfg, size_px=16), 30)]
    assert 5.0 <= min(sizes) < max(sizes) <= 20.0


@pytest.mark.parametrize("cfg", [SMALL, SMALL.without_noise(), replace(SMALL, lattice="perovskite")])
def test_images_are_float32_minmax_normalised(cfg):
    for s in _samples(cfg, 5):
        assert s.image.dtype == np.float32 and s.image.shape == (cfg.size_px, cfg.size_px)
        assert s.image.min() == 0.0 and s.image.max() == 1.0
        assert s.mask.dtype == np.uint8 and s.mask.shape == s.image.shape
        assert s.xy.dtype == np.float32 and s.cls.dtype == np.uint8
        assert np.all((s.xy >= -0.5) & (s.xy < cfg.size_px - 0.5))


@pytest.mark.parametrize("lattice", ["square", "perovskite"])
def test_oxide_lattices_produce_atoms_of_both_classes(lattice):
    samples = _samples(SynthConfig(lattice=lattice), 10)
    assert all(len(s.xy) > 4 for s in samples)
    assert set(np.unique(np.concatenate([s.cls for s in samples]))) == {1, 2}


def test_config_dict_roundtrip_through_json_and_validation():
    cfg = replace(SMALL, lattice="perovskite", dopant_z=(14, 78), zoom_range=(1.0, 1.5))
    assert SynthConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        SynthConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="size_px"):
        SynthConfig(size_px=100)
    with pytest.raises(ValueError, match="lattice"):
        SynthConfig(lattice="diamond")


def test_save_load_roundtrip(tmp_path):
    ds = make_dataset(4, 3, replace(SMALL, removed_fraction_range=(0.0, 1.0)))
    path = tmp_path / "train.data"     # any suffix: np.savez must not append ".npz"
    save_dataset(ds, path)
    back = load_dataset(path)
    _assert_same(ds, back, 4)
    assert back.config == ds.config and back.seed == 3
    assert back.images.shape == (4, 1, 64, 64) and back.pixel_size_pm.dtype == np.float32


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write_foreign_npz(path):
    np.savez(path, images=np.zeros((1, 1, 8, 8), np.float32))


def _write_broken_offsets(path):
    ds = make_dataset(2, 0, SMALL)
    save_dataset(ds, path)
    with np.load(path) as z:
        arrays = dict(z)
    arrays["offsets"] = arrays["offsets"][:-1]
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("write, says", [
    (None, "no such file"),
    (lambda p: p.write_bytes(b"\x00garbage" * 50), "unreadable"),
    (lambda p: p.write_bytes(_npy_bytes(np.zeros(3))), ".npy"),
    (_write_foreign_npz, "not a elit-synth-dataset"),
    (_write_broken_offsets, "offsets"),
])
def test_load_of_a_bad_file_raises_a_clear_error(tmp_path, write, says):
    path = tmp_path / "bad.npz"
    if write is not None:
        write(path)
    with pytest.raises(DatasetFileError, match=says) as info:
        load_dataset(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_preview_png_is_written(tmp_path):
    path = tmp_path / "preview.png"
    preview_png(make_dataset(3, 0, SMALL), path, n=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
