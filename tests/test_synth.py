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


# ----------------------------------------------------------------------------- the physical world
# (imaging="probe": trainer.data.probe / samples / acquire)

from trainer.data.acquire import render_clean  # noqa: E402
from trainer.data.lattice import Atoms  # noqa: E402
from trainer.data.probe import Optics, peak_shape, psf, wavelength_pm  # noqa: E402
from trainer.data.config import SCENES as SCENE_NAMES  # noqa: E402
from trainer.data.samples import Scene, make_scene  # noqa: E402

PHYSICAL = SynthConfig.physical(size_px=64)
QUIET = replace(PHYSICAL.without_noise(), defocus_nm_range=(1e-3, 1e-3),
                astigmatism_nm_range=(1e-3, 1e-3), coma_nm_range=(1e-3, 1e-3), cs_um_range=(0, 0),
                focus_drift_nm_range=(0, 0), drift_max=0.0, source_pm_range=(20, 20),
                object_pm_range=(15, 15))


def _only(scene: str, cfg: SynthConfig = PHYSICAL) -> SynthConfig:
    return replace(cfg, scene_weights=tuple(float(s == scene) for s in cfg.scenes))


def _two_atoms(z1: int, z2: int) -> Scene:
    xy = np.array([[-295.0, 5.0], [295.0, 5.0]])     # on pixel centres at 10 pm, 96 px
    return Scene("test", Atoms(xy, np.array([z1, z2]), np.array([False, True])), z1, 1.0, None)


def test_wavelength_is_relativistic():
    assert wavelength_pm(200) == pytest.approx(2.508, abs=1e-3)
    assert wavelength_pm(60) == pytest.approx(4.866, abs=1e-3)


def test_an_ideal_probe_has_the_diffraction_limited_width():
    # Airy disc FWHM ≈ 0.51 λ/α
    shape = peak_shape(psf(Optics(voltage_kv=200, aperture_mrad=25), (256, 256), 5.0), 5.0)
    assert shape[0] == pytest.approx(0.51 * wavelength_pm(200) / 0.025, rel=0.1)
    assert shape[1] < 1.1


def test_two_fold_astigmatism_elongates_the_probe_and_defocus_widens_it():
    ideal = peak_shape(psf(Optics(), (256, 256), 5.0), 5.0)
    astig = peak_shape(psf(Optics(c10_nm=2.0, c12_nm=2.0), (256, 256), 5.0), 5.0)
    defocus = peak_shape(psf(Optics(c10_nm=8.0), (256, 256), 5.0), 5.0)
    assert astig[1] > 1.4 > ideal[1]
    assert psf(Optics(c10_nm=8.0), (256, 256), 5.0).max() < 0.5 * psf(Optics(), (256, 256), 5.0).max()
    assert defocus[0] >= ideal[0]


def test_coma_makes_a_tail_along_its_angle():
    """The centre of mass moves away from the peak towards φ21 (a comet tail); no tail without."""
    y, x = np.mgrid[:256, :256]
    for c21, phi, want in [(0.0, 0.0, (0.0, 0.0)), (300.0, 0.0, (1.0, 0.0)), (300.0, np.pi / 2, (0.0, 1.0))]:
        p = np.fft.fftshift(psf(Optics(c21_nm=c21, phi21_rad=phi), (256, 256), 5.0))
        row, col = np.unravel_index(np.argmax(p), p.shape)
        tail = np.array([(p * x).sum() - col, (p * y).sum() - row])
        assert np.allclose(tail / max(np.linalg.norm(tail), 1.0), want, atol=0.2)
        assert (np.linalg.norm(tail) > 2.0) == (c21 > 0)


@pytest.mark.parametrize("n", [1.6, 2.0])
@pytest.mark.parametrize("z1, z2", [(6, 14), (6, 78), (14, 26)])
def test_heavier_atom_peak_ratio_follows_z_to_the_n(n, z1, z2):
    cfg = replace(QUIET, z_exponent_range=(n, n))
    image, xy = render_clean(np.random.default_rng(0), cfg, _two_atoms(z1, z2), 10.0, 96)
    peaks = [image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3].max()
             for x, y in xy]
    assert peaks[0] == pytest.approx(1.0, rel=0.05)          # the light reference peak is 1
    assert peaks[1] / peaks[0] == pytest.approx((z2 / z1) ** n, rel=0.05)


def test_column_intensity_grows_with_thickness():
    thin, thick = (replace(_only("square", QUIET), thickness_range=(t, t),
                           thickness_gradient_range=(0, 0), channelling_range=(0.8, 0.8),
                           dopant_fraction_range=(0, 0)) for t in (4.0, 16.0))
    scene_thin = make_scene(np.random.default_rng(1), thin, 800.0)
    scene_thick = make_scene(np.random.default_rng(1), thick, 800.0)
    assert np.allclose(scene_thick.atoms.count, 16.0) and np.allclose(scene_thin.atoms.count, 4.0)
    # per atom brightness relative to the scene's own reference column is the same, but against a
    # fixed (thin) reference the thick column is (16/4)**0.8 brighter
    ref = Scene("t", scene_thick.atoms, scene_thin.ref_z, 4.0, None)
    img_thick, _ = render_clean(np.random.default_rng(2), thick, ref, 15.0, 64)
    img_thin, _ = render_clean(np.random.default_rng(2), thin, scene_thin, 15.0, 64)
    assert img_thick.max() / img_thin.max() == pytest.approx(4.0 ** 0.8, rel=0.1)


def test_physical_pixel_size_range_covers_7_to_40_pm_and_is_recorded():
    assert PHYSICAL.pixel_size_range_pm[0] == pytest.approx(7.0)
    assert PHYSICAL.pixel_size_range_pm[1] == pytest.approx(40.0)
    d = PHYSICAL.to_dict()
    assert d["imaging"] == "probe" and d["pixel_size_pm"] == 40.0 and set(d["scenes"]) >= {
        "graphene", "single_atoms", "nanoparticle", "vacuum"}
    assert SynthConfig.from_dict(json.loads(json.dumps(d))) == PHYSICAL
    sizes = [s.pixel_size_pm for s in _samples(replace(PHYSICAL, size_px=16), 40)]
    assert 7.0 <= min(sizes) < 10.0 and 30.0 < max(sizes) <= 40.0


def test_physical_tiles_are_deterministic_normalised_and_masks_match_atoms():
    a = make_dataset(4, 5, PHYSICAL)
    _assert_same(a, make_dataset(4, 5, PHYSICAL), 4)
    for i in range(4):
        assert a.images[i].min() == 0.0 and a.images[i].max() == 1.0
        col, row = np.rint(a.xy[i]).astype(int).T
        assert np.all(a.masks[i][row, col] >= a.cls[i])


@pytest.mark.parametrize("scene", SCENE_NAMES)
def test_every_scene_renders(scene):
    for s in _samples(_only(scene), 3, seed=3):
        assert np.isfinite(s.image).all() and s.image.max() == 1.0
        if scene == "vacuum":
            assert len(s.xy) == 0 and not s.mask.any()
        if scene in ("single_atoms", "nanoparticle"):
            assert np.all(s.cls == 2), "single atoms and particle columns are the heavy class"


def test_single_atoms_sit_on_a_support_that_is_not_labelled():
    cfg = replace(_only("single_atoms"), contamination_prob=0.0)
    scenes = [make_scene(np.random.default_rng([7, i]), cfg, 1500.0) for i in range(10)]
    assert all(s.support is not None for s in scenes)
    assert sum(len(s.atoms.z) for s in scenes) > 0
    assert all(np.all(s.atoms.z >= 26) and np.all(s.atoms.heavy) for s in scenes)


def test_contamination_density_follows_its_range_and_adds_no_atoms():
    """A graphene scene always under contamination: its unlabelled density scales with
    `contamination_density_range` (same draws otherwise), its labelled atoms do not change."""
    base = replace(_only("graphene"), contamination_prob=1.0, amorphous_prob=0.0)
    thin, thick = (replace(base, contamination_density_range=(d, d)) for d in (20.0, 400.0))
    xy = np.random.default_rng(0).uniform(-1000, 1000, (4000, 2))
    a, b = (make_scene(np.random.default_rng(3), c, 1500.0) for c in (thin, thick))
    assert np.array_equal(a.atoms.xy_pm, b.atoms.xy_pm)
    assert a.support is not None and b.support(xy).sum() > 0
    assert b.support(xy).sum() == pytest.approx(20.0 * a.support(xy).sum(), rel=1e-6)
    assert SynthConfig.from_dict(thick.to_dict()).contamination_density_range == (400.0, 400.0)


def test_support_texture_adds_signal_but_no_atoms():
    cfg = replace(_only("single_atoms", QUIET), contamination_prob=0.0)
    rng = np.random.default_rng(4)
    scene = make_scene(rng, cfg, 1500.0)
    bare = Scene("bare", scene.atoms, scene.ref_z, scene.ref_count, None)
    with_support, _ = render_clean(np.random.default_rng(5), cfg, scene, 20.0, 64)
    without, _ = render_clean(np.random.default_rng(5), cfg, bare, 20.0, 64)
    assert with_support.mean() > without.mean() + 0.1


def test_scan_distortions_move_the_truth_with_the_image():
    """Drift shear and line jitter: the labelled centres still sit on the image's peaks."""
    cfg = replace(_only("square", QUIET), drift_max=0.03, line_jitter_pm_range=(8.0, 8.0),
                  dopant_fraction_range=(0, 0), thickness_gradient_range=(0, 0),
                  square_a_pm_range=(400.0, 400.0), zoom_range=(4.0, 4.0))
    s = make_sample(np.random.default_rng(6), cfg)
    for x, y in s.xy:
        col, row = int(round(x)), int(round(y))
        if 3 <= col < 61 and 3 <= row < 61:
            window = s.image[row - 3:row + 4, col - 3:col + 4]
            dy, dx = np.unravel_index(np.argmax(window), window.shape)
            assert abs(dx - 3) <= 1 and abs(dy - 3) <= 1


def test_detector_lag_smears_along_the_fast_scan_only():
    base = replace(_only("vacuum"), background_range=(0.0, 0.0), poisson_prob=0.0,
                   read_noise_range=(0.0, 0.0), glitch_prob=0.0, gain_jump_prob=0.0,
                   saturation_prob=0.0, dose_drift_range=(1.0, 1.0), line_jitter_pm_range=(0, 0))
    from trainer.data.acquire import acquire
    clean = np.zeros((32, 32))
    clean[16, 16] = 1.0
    out, _, _ = acquire(np.random.default_rng(0), replace(base, lag_range=(0.5, 0.5)), clean,
                     np.zeros((0, 2)), 10.0)
    assert out[16, 17] > 0.3 and out[16, 15] == 0 and out[17, 16] == 0 and out[15, 16] == 0


def test_physical_generator_is_fast_enough_for_training():
    """Not a timing assertion: the work per tile is bounded by the grid size (FFT-based)."""
    from trainer.data.acquire import FINE_PM
    for pixel_pm in PHYSICAL.pixel_size_range_pm:
        s = max(1, int(np.ceil(pixel_pm / FINE_PM)))
        assert pixel_pm / s <= FINE_PM


def test_legacy_configs_without_the_new_fields_still_load_and_render_the_old_way():
    old = {k: v for k, v in SMALL.to_dict().items() if k in (
        "lattice", "n_classes", "size_px", "pixel_size_pm", "zoom_range")}
    cfg = SynthConfig.from_dict(old)
    assert cfg.imaging == "gaussian" and cfg.scenes == ()
    with pytest.raises(ValueError, match="scenes need"):
        SynthConfig(scenes=("graphene",), scene_weights=(1.0,))


def test_visibility_snr_grows_with_dose_and_falls_with_background():
    from trainer.data.acquire import visibility_snr
    clean = np.zeros((32, 32))
    clean[16, 16] = 1.0
    xy = np.array([[16.0, 16.0]])
    flat = np.zeros_like(clean)

    def snr(dose, bg=0.0):
        return visibility_snr(clean, flat + bg, np.full((32, 1), dose), 0.0, xy, 10.0)[0]
    assert snr(100.0) > snr(10.0) > snr(1.0)
    assert snr(10.0, bg=5.0) < snr(10.0)
    assert snr(100.0) == pytest.approx(np.sqrt(100.0) * np.sqrt(np.pi * 16), rel=1e-6)


@pytest.mark.parametrize("dose, hidden", [((1000.0, 1000.0), False), ((0.05, 0.05), True)])
def test_atoms_the_noise_hides_are_ignored_not_taught(dose, hidden):
    from trainer.data.synth import IGNORE
    cfg = replace(_only("graphene"), dose_range=dose, contamination_prob=0.0, amorphous_prob=0.0,
                  removed_fraction_range=(0.0, 0.0), zoom_range=(2.0, 2.0))
    s = make_sample(np.random.default_rng(8), cfg)
    ignored = np.mean(s.mask == IGNORE)
    if hidden:
        assert ignored > 0.2 and len(s.xy) == 0
    else:
        assert ignored == 0.0 and len(s.xy) > 20
