"""The ELIT relabelling must never make things worse: one test per failure seen on the drift movie
(issue 14). Amorphous atoms next to lattice are not taught as background (only confident vacuum
is); lattice bands at the frame edges are kept; a 2-class parent's atoms keep 2 classes; a bright
contamination blob and a large background gradient do not make lattice atoms heavy; the loop's
label-free verdict and recommendation."""
from __future__ import annotations

import numpy as np
import pytest

from tests.test_elit import BOND_PX, gaussians, half_lattice_half_amorphous
from trainer.data.testmovie import honeycomb_pm
from trainer.elit.experiment import Analysis, member_figures
from trainer.elit.relabel import RelabelConfig, select_atoms

SIZE = 192
RADIUS_PX = 2.5


def disc_maps(xy: np.ndarray, size: int) -> np.ndarray:
    """An ensemble's atom map that sees exactly these atoms (soft discs)."""
    return np.clip(1.6 * gaussians(xy, np.ones(len(xy)), size, 1.8), 0, 1)


@pytest.fixture(scope="module")
def scene():
    """Left half lattice (with 4 Si-like bright atoms and a vacuum hole in which the ensemble
    'sees' 4 atoms that are not there), right half amorphous carbon; the ensemble (2 identical
    members) finds every real atom."""
    image, xy, is_lattice = half_lattice_half_amorphous(seed=1, size=SIZE)
    hole_c = np.array([50.0, 130.0])
    in_hole = np.hypot(*(xy - hole_c).T) < 28
    xy, is_lattice = xy[~in_hole], is_lattice[~in_hole]
    lat_idx = np.flatnonzero(is_lattice & np.all((xy > 20) & (xy < [80, SIZE - 20]), axis=1))
    heavy = np.random.default_rng(2).choice(lat_idx, 4, replace=False)
    amp = np.ones(len(xy))
    amp[heavy] = 3.8
    rng = np.random.default_rng(3)
    image = 0.2 + gaussians(xy, amp * np.where(is_lattice, 1.0, rng.uniform(0.6, 1.4, len(xy))),
                            SIZE) + rng.normal(0, 0.12, (SIZE, SIZE))
    ghosts = hole_c + np.array([[-8.0, -6], [9, 4], [-3, 10], [5, -11]])
    seen = disc_maps(np.concatenate([xy, ghosts]), SIZE)
    probs = np.repeat(seen[None, None, None], 2, axis=1).astype(np.float16)   # [1, 2, 1, H, W]
    an = Analysis(image[None].astype(np.float32), np.arange(1), probs,
                  member_figures(probs.astype(np.float32).sum(2), RADIUS_PX), 11.0, RADIUS_PX,
                  [0, 1], "fake")
    return an, xy, is_lattice, heavy, ghosts


def fates(scene, **cfg):
    from trainer.elit.scoring import match_atoms

    an, xy, _, _, ghosts = scene
    atoms, info = select_atoms(an, [0, 1], RelabelConfig(**cfg), 11.0)
    fa = atoms[0]
    truth = np.concatenate([xy, ghosts])
    ok, partner = match_atoms(fa.xy, truth, 3.0)
    reason = np.full(len(truth), -1)
    cls = np.zeros(len(truth), int)
    reason[partner[ok]], cls[partner[ok]] = fa.reason[ok], fa.cls[ok]
    return reason[:len(xy)], reason[len(xy):], cls[:len(xy)], info


def test_amorphous_atoms_next_to_lattice_are_not_taught_as_background(scene):
    _, xy, is_lattice, _, _ = scene
    reason, ghost_reason, _, info = fates(scene)
    assert (reason[~is_lattice] >= 0).mean() > 0.95          # the ensemble found them
    assert (reason[~is_lattice] != 3).all()                  # ... and none became background
    assert (reason[is_lattice] != 3).all()
    assert (ghost_reason == 3).all()                         # the empty hole is taught as empty
    # the paper's rule ("not lattice" = background) fails this test: it would teach them
    forced, _, _, _ = fates(scene, dropped_as="background", geometry_rescue=False)
    assert (forced[~is_lattice] == 3).mean() > 0.5


def test_atom_like_atoms_can_be_taught_as_atoms_but_vacuum_stays_empty(scene):
    _, _, is_lattice, _, _ = scene
    reason, ghost_reason, _, info = fates(scene, keep_atom_like=0.6, std_quantile=None)
    assert (reason[~is_lattice] == 0).mean() > 0.9 and info["atom_like_kept"] > 50
    assert (ghost_reason == 3).all()


def test_lattice_bands_at_frame_edges_are_kept(scene):
    _, xy, is_lattice, _, _ = scene
    at_edge = (xy[:, 0] < 24) | (xy[:, 1] < 24) | (xy[:, 1] > SIZE - 24)   # half a GMM patch
    band = is_lattice & at_edge & (xy[:, 0] < SIZE / 2 - 24)               # not at the amorphous
    reason, _, _, _ = fates(scene, std_quantile=None)
    assert band.sum() > 40 and (reason[band] == 0).mean() > 0.95
    gmm_only, _, _, _ = fates(scene, std_quantile=None, geometry_rescue=False)
    assert (gmm_only[band] == 0).mean() < (reason[band] == 0).mean() - 0.05   # GMM alone drops some


def test_a_two_class_parent_gives_two_class_children(scene):
    from trainer.elit.relabel import build_dataset
    from trainer.data.synth import SynthConfig

    an, xy, _, heavy, _ = scene
    reason, _, cls, info = fates(scene, n_classes=2, std_quantile=None)
    assert info["n_classes"] == 2 and (cls[heavy] == 2).all() and (reason[heavy] == 0).all()
    others = np.setdiff1d(np.arange(len(xy)), heavy)
    assert (cls[others] == 2).sum() == 0
    atoms, _ = select_atoms(an, [0, 1], RelabelConfig(n_classes=2, tile_px=64, tiles_per_frame=8), 11.0)
    ds = build_dataset(an, atoms, RelabelConfig(n_classes=2, tile_px=64, tiles_per_frame=8), 11.0,
                       RADIUS_PX, SynthConfig())
    assert ds.config.n_classes == 2 and set(np.unique(ds.masks)) <= {0, 1, 2, 254, 255}
    assert (ds.masks == 2).any()
    with pytest.raises(ValueError, match="1 or 2 classes"):
        fates(scene, n_classes=3)



def test_rehearsal_prepends_exact_synthetic_tiles_and_keeps_the_movie_tail(scene):
    """--rehearsal R adds R synthetic tiles (parent's world, exact labels, same classes) per movie
    tile before the movie's tiles: the trainer's tail split keeps validation and test on the movie."""
    from trainer.data.synth import SynthConfig
    from trainer.elit.relabel import build_dataset

    an = scene[0]
    cfg = RelabelConfig(n_classes=2, tile_px=64, tiles_per_frame=4)
    atoms, _ = select_atoms(an, [0, 1], cfg, 11.0)
    plain = build_dataset(an, atoms, cfg, 11.0, RADIUS_PX, SynthConfig())
    from dataclasses import replace
    mixed = build_dataset(an, atoms, replace(cfg, rehearsal=1.5), 11.0, RADIUS_PX, SynthConfig())
    n = len(plain.images)
    assert len(mixed.images) == n + round(1.5 * n) and len(mixed.xy) == len(mixed.images)
    np.testing.assert_array_equal(mixed.images[-n:], plain.images)      # movie tiles last, unchanged
    np.testing.assert_array_equal(mixed.masks[-n:], plain.masks)
    synthetic = mixed.masks[:-n]
    assert set(np.unique(synthetic)) <= {0, 1, 2} and (synthetic == 1).any()   # exact labels
    assert mixed.config == plain.config
    with pytest.raises(ValueError, match="rehearsal"):
        RelabelConfig(rehearsal=-1)

def test_a_class_the_parent_disputes_is_not_taught(scene):
    """2-class parent: an atom the local Z-contrast calls heavy and the selected members' consensus
    light is ignored (neither class is taught); one only the parent calls heavy, and that does
    not stand out of the frame either, is taught light (teach_light, the default; before:
    ignored, so a parent's false heavy calls were never corrected); agreed classes are kept."""
    from dataclasses import replace as dc_replace

    an, xy, is_lattice, heavy, ghosts = scene
    everything = np.concatenate([xy, ghosts])
    others = np.setdiff1d(np.flatnonzero(is_lattice & np.all((xy > 40) & (xy < SIZE - 40), 1)),
                          heavy)                           # interior lattice carbon
    said_heavy = np.r_[heavy[1:], others[:1]]           # parent misses heavy[0], calls others[0] heavy
    heavy_map = disc_maps(xy[said_heavy], SIZE)
    light_map = np.clip(disc_maps(everything, SIZE) - heavy_map, 0, 1)
    probs = np.stack([light_map, heavy_map])[None, None].repeat(2, axis=1).astype(np.float16)
    two = dc_replace(an, probs=probs)                   # [1, 2 members, 2 classes, H, W]
    scene2 = (two, *scene[1:])
    reason, _, cls, info = fates(scene2, n_classes=2, std_quantile=None)
    assert reason[heavy[0]] == 2                                      # disputed: ignored
    assert reason[others[0]] == 0 and cls[others[0]] == 1   # heavy by the parent alone: light
    assert (reason[heavy[1:]] == 0).all() and (cls[heavy[1:]] == 2).all()   # agreed heavy
    assert info["class_disputed"] == 1 and info["class_taught_light"] == 1
    reason, _, cls, info = fates(scene2, n_classes=2, std_quantile=None, teach_light=False)
    assert reason[heavy[0]] == 2 and reason[others[0]] == 2 and info["class_disputed"] == 2
    reason, _, cls, _ = fates(scene2, n_classes=2, std_quantile=None, class_vote=False)
    assert reason[heavy[0]] == 0 and cls[heavy[0]] == 2                # contrast alone decides

def test_a_heavy_atom_under_contamination_the_parent_calls_heavy_is_not_taught_light():
    """Contamination raises every atom near a Si (its neighbours too: local contrast ~2, below
    2.2) on a diffuse blob. The parent calls the Si and a carbon next to it heavy. The Si stands
    out of the frame's band pass (> 4x the light atoms'): taught heavy, as the parent said; the
    carbon does not: taught light."""
    from trainer.elit.intensity import bright_in_frame, local_contrast

    rng = np.random.default_rng(7)
    size = 160
    xy = honeycomb_pm(size, BOND_PX, 0.3) + size / 2
    xy = xy[np.all((xy > 3) & (xy < size - 3), axis=1)]
    centre = np.hypot(*(xy - size / 2).T)
    si, c = np.argsort(centre)[[0, 3]]
    amp = np.where(centre < 2.5 * BOND_PX, 3.0, 1.0)
    amp[si] = 6.2
    y, x = np.mgrid[:size, :size]
    blob = 3.0 * np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * 20.0 ** 2))
    image = gaussians(xy, amp, size) + blob + rng.normal(0, 0.05, (size, size))
    contrast = local_contrast(image, xy, RADIUS_PX)
    assert contrast[si] < 2.2 and contrast[c] < 2.2            # the local contrast misses the Si
    bright = bright_in_frame(image, xy, contrast < 2.2)
    assert bright[si] and not bright[c] and bright.sum() == 1
    said_heavy = disc_maps(xy[[si, c]], size)
    light_map = np.clip(disc_maps(xy, size) - said_heavy, 0, 1)
    probs = np.stack([light_map, said_heavy])[None, None].repeat(2, axis=1).astype(np.float16)
    an = Analysis(image[None].astype(np.float32), np.arange(1), probs,
                  member_figures(probs.astype(np.float32).sum(2), RADIUS_PX), 11.0, RADIUS_PX,
                  [0, 1], "fake")
    atoms, info = select_atoms(an, [0, 1], RelabelConfig(n_classes=2, std_quantile=None), 11.0)
    fa = atoms[0]
    at = lambda k: int(np.argmin(np.hypot(*(fa.xy - xy[k]).T)))
    assert fa.reason[at(si)] == 0 and fa.cls[at(si)] == 2        # the band pass confirms: heavy
    assert fa.reason[at(c)] == 0 and fa.cls[at(c)] == 1          # taught light
    assert info["class_taught_light"] == 1 and info["class_taught_heavy_by_band_pass"] == 1


def test_contamination_blob_and_gradient_do_not_make_lattice_atoms_heavy():
    from trainer.elit.intensity import atom_intensities, local_contrast, split_by_contrast

    rng = np.random.default_rng(5)
    size = 160
    xy = honeycomb_pm(size, BOND_PX, 0.4) + size / 2
    xy = xy[np.all((xy > 3) & (xy < size - 3), axis=1)]
    heavy = rng.choice(len(xy), 5, replace=False)
    amp = np.ones(len(xy))
    amp[heavy] = 3.8                                          # Si among C: (14/6)^1.6
    y, x = np.mgrid[:size, :size]
    blob = 3.0 * np.exp(-((x - 110) ** 2 + (y - 60) ** 2) / (2 * 22.0 ** 2))   # contamination
    ramp = 4.0 * (0.6 * x + 0.4 * y) / size                                     # strong gradient
    image = gaussians(xy, amp, size) + blob + ramp + rng.normal(0, 0.15, (size, size))
    cls, info = split_by_contrast(local_contrast(image, xy, RADIUS_PX))
    assert set(np.flatnonzero(cls == 2)) == set(heavy.tolist()), info
    # the old global intensity (over the frame's 5th percentile; heavy above 1.3) calls the
    # atoms under the blob and up the ramp heavy
    assert (atom_intensities(image, xy, RADIUS_PX) > 1.3).sum() > len(heavy) + 10


def test_the_loop_recommends_the_last_accepted_iteration():
    from trainer.elit.judge import compare, recommend

    base = {"agreement": 0.90, "uncertainty": 0.050, "count_jitter": 0.010, "keep_fraction": 0.80}
    better = {"agreement": 0.95, "uncertainty": 0.030, "count_jitter": 0.010, "keep_fraction": 0.85}
    jumpy = dict(better, count_jitter=0.030)                  # atom counts jump frame to frame
    same = dict(better)
    assert compare(better, base)["accepted"]
    v = compare(jumpy, better)
    assert not v["accepted"] and "count_jitter" in v["why"] and any("count_jitter" in f and "worse" in f
                                                             for f in v["figures"])
    v = compare(same, better)
    assert not v["accepted"] and "no figure better" in v["why"]   # stopped improving
    agreeing = dict(better, agreement=0.99, uncertainty=0.01)  # members agree more, nothing worse
    assert compare(agreeing, better)["accepted"]
    shaky = dict(agreeing, keep_fraction=0.70)                 # ... but the filter keeps less
    assert not compare(shaky, better)["accepted"]
    rows = [{"iteration": 0, "artifact": "a0"},
            {"iteration": 1, "artifact": "a1", "verdict": compare(better, base)},
            {"iteration": 2, "artifact": "a2", "verdict": compare(jumpy, better)},
            {"iteration": 3, "artifact": "a3", "verdict": compare(better, jumpy)}]
    rec = recommend(rows)
    assert rec["iteration"] == 1 and rec["artifact"] == "a1" and "iteration 2" in rec["why"]


def test_a_child_that_lost_the_heavier_class_is_not_accepted():
    """The four label-free figures do not look at classes: a child of a compound movie that
    calls nothing heavy any more agreed better and was accepted. heavy_share guards it; a child
    that calls fewer atoms heavy (contamination no longer heavy) or a dopant movie is not judged."""
    from trainer.elit.judge import compare

    parent = {"agreement": 0.90, "uncertainty": 0.027, "count_jitter": 0.006,
              "keep_fraction": 0.90, "heavy_share": 0.48}
    lost = dict(parent, agreement=0.95, uncertainty=0.010, heavy_share=0.01)
    v = compare(lost, parent)
    assert not v["accepted"] and "heavier class" in v["why"]
    assert any("class lost" in f for f in v["figures"])
    assert compare(dict(lost, heavy_share=0.30), parent)["accepted"]        # fewer, not gone
    dopants = dict(parent, heavy_share=0.012)
    assert compare(dict(lost, heavy_share=0.0), dopants)["accepted"]        # 1 %: not judged
    assert compare(dict(lost, heavy_share=None), dict(parent, heavy_share=None))["accepted"]


def test_test_movie_truth_counts_amorphous_atoms():
    from trainer.data.testmovie import MovieConfig, make_movie

    movie = make_movie(MovieConfig(frames=2, size_px=128, seed=4, amorphous_radius_px=30,
                                   contamination_peak=2.0, gradient_before=1.0))
    assert 10 < (movie.truth_cls[0] == 3).sum() <= len(movie.amorphous_xy[0])
    assert {1, 3} <= set(np.unique(movie.truth_cls[1]).tolist())


def test_the_evaluation_suites_drift_movie_is_read_with_its_segments(tmp_path):
    """The loop scores against the evaluation suite's movie file (docs/evaluation.md: classes
    0 carbon / 1 Si, named segments, no bond length) as against its own test movies."""
    from trainer.data.testmovie import load_truth

    xy = np.array([[10, 10], [20, 20], [30, 30]], np.float32)
    np.savez(tmp_path / "movie.npz", frames=np.zeros((2, 32, 32), np.float32), truth_xy=xy,
             truth_cls=np.array([0, 1, 0], np.uint8), truth_offsets=np.array([0, 2, 3]),
             pixel_size_pm=np.float64(15.0), segment=np.array(["clean", "dose"]))
    t = load_truth(tmp_path / "movie.npz")
    assert [c.tolist() for c in t["cls"]] == [[1, 2], [1]]        # Si is the heavy class 2
    assert t["bond_px"] == pytest.approx(142 / 15) and t["segment"] == ["clean", "dose"]
    assert [len(x) for x in t["xy"]] == [2, 1]


def test_not_heavy_pixels_penalise_only_the_heavier_class():
    """Mask 254 (NOT_HEAVY): -(1 - p_bg) log(p_light / (p_light + p_heavy)): an atom there must be
    light; whether one is there is left open (no gradient on the background logit); with one atom
    class it is ignored like 255."""
    import torch

    from trainer.model.train import NOT_HEAVY, labelled_pixels, segmentation_loss

    y = torch.full((1, 1, 1), NOT_HEAVY, dtype=torch.long)
    def loss(bg, lattice, heavy):
        logits = torch.tensor([bg, lattice, heavy], dtype=torch.float32, requires_grad=True)
        out = segmentation_loss(logits.view(1, 3, 1, 1), y)
        out.backward()
        return float(out), logits.grad
    assert loss(0.0, 5.0, 0.0)[0] < 0.01                       # a light atom: fine
    assert loss(8.0, 0.0, 0.0)[0] < 0.01                       # background: fine too
    value, grad = loss(0.0, 0.0, 5.0)                          # a heavy atom: costly
    assert value > 4.0 and abs(float(grad[0])) < 1e-6 and grad[1] < 0 < grad[2]   # to light, not bg
    mixed = torch.tensor([[[1, NOT_HEAVY, 255]]])
    logits = torch.zeros(1, 3, 1, 3)
    assert float(segmentation_loss(logits, mixed, "sum")) == pytest.approx(
        np.log(3) + (2 / 3) * np.log(2), abs=1e-5)         # CE of class 1 + (1 - 1/3) log 2
    assert labelled_pixels(mixed, 3) == 2 and labelled_pixels(mixed, 2) == 1
    assert float(segmentation_loss(torch.zeros(1, 2, 1, 3), mixed, "sum")) == pytest.approx(
        np.log(2), abs=1e-5)                                # one class: only the labelled pixel


def test_places_the_filter_leaves_open_are_taught_not_heavy_except_near_a_possible_heavy_atom(scene):
    """2 classes: the amorphous half is ignored by the filter; its pixels become NOT_HEAVY (254),
    so a child is not free to call a bright region heavy; the discs of atoms that may be heavy
    stay fully open (255). --no-not-heavy: all 255 as before."""
    from dataclasses import replace as dc_replace

    from trainer.data.synth import SynthConfig
    from trainer.elit.relabel import IGNORE, NOT_HEAVY, build_dataset, label_mask

    an = scene[0]
    cfg = RelabelConfig(n_classes=2, tile_px=64, tiles_per_frame=6, std_quantile=None)
    atoms, _ = select_atoms(an, [0, 1], cfg, 11.0)
    ds = build_dataset(an, atoms, cfg, 11.0, RADIUS_PX, SynthConfig())
    assert (ds.masks == NOT_HEAVY).sum() > 0.5 * (ds.masks >= NOT_HEAVY).sum()
    old = build_dataset(an, atoms, dc_replace(cfg, not_heavy=False), 11.0, RADIUS_PX, SynthConfig())
    assert not (old.masks == NOT_HEAVY).any()
    np.testing.assert_array_equal(old.masks == IGNORE, ds.masks >= NOT_HEAVY)   # same places
    m = label_mask(np.zeros((0, 2)), np.zeros(0, np.uint8), np.array([[10.0, 10], [30, 30]]),
                   2.0, 4.0, 40, open_xy=np.array([[30.0, 30]]))
    assert m[10, 10] == NOT_HEAVY and m[30, 30] == IGNORE and m[20, 20] == 0


def test_a_compound_parent_keeps_its_heavier_sublattice_in_the_children():
    """MoS2-like honeycomb, sublattice A 2.5x as bright as B. The local contrast reads ~1 for both
    (each is surrounded mostly by its own kind), so before the sublattice split every A atom the
    parent called heavy was taught lattice. Now: A heavy, B lattice, both kept; also when the
    parent calls a random half of A and some B heavy (its calls on real compounds depend on the
    frame's orientation), in which case the atoms it gets wrong are settled or ignored, never
    taught the wrong class."""
    from trainer.elit.intensity import local_contrast

    size, bond = 160, 10.0
    xy = honeycomb_pm(size, bond, 0.2) + size / 2
    xy = xy[np.all((xy > 6) & (xy < size - 6), axis=1)]
    a_site = _sublattice_any(xy, bond)
    rng = np.random.default_rng(5)
    image = 0.1 + gaussians(xy, np.where(a_site, 2.5, 1.0), size) + rng.normal(0, 0.05, (size, size))
    assert np.median(local_contrast(image, xy, RADIUS_PX)[a_site]) < 1.6   # the contrast is blind
    an_maps = disc_maps(xy, size)

    def relabel(called):
        heavy_map = disc_maps(xy[called], size)
        probs = np.stack([np.clip(an_maps - heavy_map, 0, 1), heavy_map])[None, None]
        an = Analysis(image[None].astype(np.float32), np.arange(1),
                      probs.repeat(2, axis=1).astype(np.float16),
                      member_figures(probs.repeat(2, axis=1).sum(2), RADIUS_PX), 11.0,
                      RADIUS_PX, [0, 1], "fake")
        atoms, info = select_atoms(an, [0, 1], RelabelConfig(n_classes=2, std_quantile=None), 11.0)
        from trainer.elit.scoring import match_atoms
        ok, partner = match_atoms(atoms[0].xy, xy, 3.0)
        cls, reason = np.zeros(len(xy), int), np.full(len(xy), -1)
        cls[partner[ok]], reason[partner[ok]] = atoms[0].cls[ok], atoms[0].reason[ok]
        return cls, reason, info

    cls, reason, info = relabel(a_site)
    assert info["classes"]["sublattice_frames"] == 1
    kept = reason == 0
    assert kept.mean() > 0.9
    assert (cls[a_site & kept] == 2).all() and (cls[~a_site & kept] == 1).all()
    mixed = (a_site & (rng.random(len(xy)) < 0.5)) | (~a_site & (rng.random(len(xy)) < 0.2))
    cls, reason, info = relabel(mixed)
    assert info["classes"]["sublattice_frames"] == 1
    taught = reason == 0
    assert (cls[a_site & taught] == 2).all() and (cls[~a_site & taught] == 1).all()
    assert (a_site & taught).sum() > 0.3 * a_site.sum()          # the agreed A atoms stay heavy
    assert (reason[a_site & ~mixed] == 2).all()                  # parent said light: ignored


def _sublattice_any(xy, bond):
    """The A sites of a rotated honeycomb: those whose three nearest neighbours point the same
    way as the first site's (the two sublattices' bonds point in opposite directions)."""
    from scipy.spatial import cKDTree

    _, nb = cKDTree(xy).query(xy, k=4)
    d = xy[nb[:, 1:]] - xy[:, None]                       # [N, 3, 2]
    ref = np.exp(3j * np.arctan2(d[..., 1], d[..., 0])).sum(axis=1)   # 3 bonds: 3x the angle
    return (ref * np.conj(ref[np.argmax(np.abs(ref))])).real > 0
