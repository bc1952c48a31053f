"""Unit tests of elit_stream.core.postprocess on synthetic ensemble maps with known blobs."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.spatial import cKDTree

from elit_stream.core import postprocess
from elit_stream.core.postprocess import Params, analyse, check_active

SHAPE = (48, 64)


def blob(shape, x0, y0, amp=0.95, sigma=1.5):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    return (amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))).astype(np.float32)


def probs_with(blobs_per_member, n_classes=2, shape=SHAPE):
    """blobs_per_member: list (per member) of [(x, y, cls, amp), ...] -> [M, C, H, W]."""
    out = np.zeros((len(blobs_per_member), n_classes, *shape), np.float32)
    for m, blobs in enumerate(blobs_per_member):
        for x, y, c, amp in blobs:
            out[m, c] += blob(shape, x, y, amp)
    return out


def by_x(result):
    order = np.argsort(result.x)
    return {k: getattr(result, k)[order] for k in ("x", "y", "cls", "prob", "uncertainty",
                                                   "det_frac", "spread")}


def test_symmetric_blobs_give_exact_centres():
    atoms = [(10, 12, 0, 0.95), (30.5, 20, 0, 0.9), (50, 35.5, 1, 0.99)]
    r = analyse(probs_with([atoms] * 3), np.arange(3), Params(min_peak=0.5))  # centres here
    got = by_x(r)
    np.testing.assert_allclose(got["x"], [10, 30.5, 50], atol=1e-4)
    np.testing.assert_allclose(got["y"], [12, 20, 35.5], atol=1e-4)
    assert got["cls"].tolist() == [0, 0, 1]
    np.testing.assert_allclose(got["prob"], [0.95, 0.9 * np.exp(-0.25 / 4.5), 0.99 *
                                             np.exp(-0.25 / 4.5)], rtol=1e-5)
    assert got["x"].dtype == np.float32 and got["cls"].dtype == np.uint8
    np.testing.assert_array_equal(got["det_frac"], 1.0)
    np.testing.assert_allclose(got["spread"], 0.0, atol=1e-7)            # members agree
    p = got["prob"].astype(np.float64)                  # members agree: their own doubt alone
    np.testing.assert_allclose(got["uncertainty"], np.sqrt(p * (1 - p)), rtol=1e-5)
    assert r.count_per_member.tolist() == [3, 3, 3] and r.count_per_member.dtype == np.int32
    np.testing.assert_allclose(r.disagreement_per_member, 0.0)


def test_subpixel_centres_within_a_tenth_of_a_pixel():
    rng = np.random.default_rng(1)
    xs, ys = rng.uniform(6, 58, 6), rng.uniform(6, 42, 6)
    xs = np.sort(xs + np.arange(6) * 0.0)
    keep = np.concatenate([[True], np.diff(xs) > 5])
    atoms = [(x, y, 0, 0.95) for x, y in zip(xs[keep], ys[keep])]
    got = by_x(analyse(probs_with([atoms]), [0], Params(min_peak=0.5)))    # centres here
    np.testing.assert_allclose(got["x"], xs[keep], atol=0.1)
    np.testing.assert_allclose(got["y"], ys[keep], atol=0.1)


def test_class_is_argmax_of_blob_sum_of_mean_class_map():
    members = [[(20, 20, 1, 0.9)], [(20, 20, 1, 0.9)], [(20, 20, 0, 0.9)]]
    r = analyse(probs_with(members), np.arange(3), Params())
    assert r.cls.tolist() == [1]
    r = analyse(probs_with(members), [2], Params())
    assert r.cls.tolist() == [0]
    r3 = analyse(probs_with([[(20, 20, 2, 0.9)]], n_classes=3), [0], Params())
    assert r3.cls.tolist() == [2]


def test_active_subset_changes_consensus_and_spread():
    common = [(15, 15, 0, 0.95)]
    members = [common, common, common + [(45, 30, 0, 0.95)]]
    probs = probs_with(members)
    everyone = analyse(probs, np.arange(3), Params(), want_maps=True)
    assert everyone.n_atoms == 1                                 # 0.95/3 < threshold
    assert everyone.count_per_member.tolist() == [1, 1, 2]       # extra blob of member 2
    assert everyone.disagreement_per_member[2] > 0.3
    np.testing.assert_allclose(everyone.disagreement_per_member[:2], 0.0)
    odd = analyse(probs, [2], Params(), want_maps=True)
    assert odd.n_atoms == 2
    np.testing.assert_allclose(everyone.mean_map, probs.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(everyone.std_map, probs.std(axis=0), atol=1e-4)
    np.testing.assert_allclose(odd.std_map, 0.0, atol=1e-6)
    pair = analyse(probs, [1, 2], Params(), want_maps=True)
    np.testing.assert_allclose(pair.mean_map, probs[1:].mean(axis=0), atol=1e-6)
    assert pair.n_atoms == 1 and pair.count_per_member.tolist() == [1, 1, 2]


def test_det_frac_and_uncertainty_count_active_members_only():
    atom = [(20, 20, 0, 0.95)]
    members = [atom, atom, atom, []]                            # member 3 sees nothing
    probs = probs_with(members)
    r = analyse(probs, np.arange(4), Params(min_peak=0.7))
    assert r.n_atoms == 1 and r.unconfirmed == 0
    np.testing.assert_allclose(r.det_frac, [0.75])
    assert r.spread[0] > 0.3                                    # std of (p, p, p, 0) around peak
    assert r.count_per_member.tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(r.disagreement_per_member[3], 1.0)
    agree = analyse(probs, [0, 1, 2], Params())
    np.testing.assert_allclose(agree.det_frac, [1.0])
    np.testing.assert_allclose(agree.spread, [0.0], atol=1e-7)
    assert 0 < agree.uncertainty[0] < r.uncertainty[0]          # their doubt only, no spread
    assert agree.count_per_member.tolist() == [1, 1, 1, 0]      # all members, always
    assert agree.mean_uncertainty == pytest.approx(float(agree.uncertainty[0]))
    assert r.mean_uncertainty == pytest.approx(float(r.uncertainty[0]))


def test_atoms_whose_consensus_peak_stays_below_min_peak_are_unconfirmed():
    atom, other = [(20, 20, 0, 0.95)], [(45, 30, 1, 0.95)]
    probs = probs_with([atom + other, atom + other, atom + other, atom])   # 3 of 4 see `other`
    vote = analyse(probs, np.arange(4), Params())          # its peak: 0.71 < 0.9
    assert vote.n_atoms == 1 and vote.unconfirmed == 1
    np.testing.assert_allclose([vote.x[0], vote.y[0]], [20, 20], atol=1e-4)
    every = analyse(probs, np.arange(4), Params(min_peak=0.5))
    assert every.n_atoms == 2 and every.unconfirmed == 0
    # what the members do is measured on every consensus atom, reported or not
    assert vote.count_per_member.tolist() == every.count_per_member.tolist() == [2, 2, 2, 1]
    assert vote.mean_uncertainty == pytest.approx(every.mean_uncertainty)
    assert vote.mean_uncertainty > 0.15
    # deselecting the member that misses it confirms the atom
    assert analyse(probs, [0, 1, 2], Params()).n_atoms == 2
    with pytest.raises(ValueError, match="min_peak"):
        Params(min_peak=1.0)


def test_blob_size_filter():
    probs = np.zeros((1, 1, *SHAPE), np.float32)
    probs[0, 0, 5, 5] = 0.9                                     # 1 px
    probs[0, 0, 20:22, 20:22] = 0.9                             # 4 px
    probs[0, 0, 30:45, 30:60] = 0.9                             # 450 px
    r = analyse(probs, [0], Params(min_blob_px=3, max_blob_px=400))
    assert r.n_atoms == 1
    np.testing.assert_allclose([r.x[0], r.y[0]], [20.5, 20.5])
    assert analyse(probs, [0], Params(min_blob_px=1, max_blob_px=1000)).n_atoms == 3
    assert r.count_per_member.tolist() == [1]


def test_empty_frame_gives_no_atoms_and_no_nan():
    probs = np.zeros((3, 2, *SHAPE), np.float32)
    r = analyse(probs, [0, 2], Params(), want_maps=True)
    assert r.n_atoms == 0
    for arr in (r.x, r.y, r.cls, r.prob, r.uncertainty, r.det_frac):
        assert arr.shape == (0,)
    assert r.count_per_member.tolist() == [0, 0, 0]
    np.testing.assert_array_equal(r.disagreement_per_member, 0.0)
    assert r.mean_uncertainty == 0.0
    assert not np.isnan(r.std_map).any()


def test_valid_shape_ignores_the_padding():
    probs = probs_with([[(10, 10, 0, 0.95), (60, 44, 0, 0.95)]])
    r = analyse(probs, [0], Params(), valid_shape=(40, 56), want_maps=True)
    assert r.n_atoms == 1 and r.x[0] == pytest.approx(10) and r.y[0] == pytest.approx(10)
    assert r.mean_map.shape == (2, 40, 56)
    assert r.count_per_member.tolist() == [1]


def test_float64_maps_accepted():
    probs = probs_with([[(20, 20, 0, 0.95)]]).astype(np.float64)
    r = analyse(probs, [0], Params())
    assert r.n_atoms == 1 and r.prob.dtype == np.float32


def test_atom_at_the_border():
    r = analyse(probs_with([[(0, 0, 0, 0.95)]]), [0], Params())
    assert r.n_atoms == 1 and r.x[0] > 0 and r.y[0] > 0 and r.spread[0] == 0


def test_params_replace_validates():
    p = Params()
    assert p.replace(threshold=0.3).threshold == 0.3 and p.threshold == 0.5
    with pytest.raises(ValueError, match="thresh"):
        p.replace(thresh=0.3)
    with pytest.raises(ValueError, match="threshold"):
        p.replace(threshold=1.5)
    with pytest.raises(ValueError, match="min_blob_px"):
        p.replace(min_blob_px=2.5)
    with pytest.raises(ValueError, match="max_blob_px"):
        p.replace(max_blob_px=2)
    with pytest.raises(ValueError, match="detect_threshold"):
        p.replace(detect_threshold="high")
    with pytest.raises(ValueError, match="min_blob_px"):
        p.replace(min_blob_px=True)


@pytest.mark.parametrize("active", [[], [3], [0, 0], [-1], [[0]], [0.5]])
def test_bad_active_refused(active):
    with pytest.raises(ValueError, match="active"):
        check_active(active, 3)
    with pytest.raises(ValueError, match="active"):
        analyse(np.zeros((3, 1, 16, 16), np.float32), active, Params())


@settings(max_examples=40, deadline=None)
@given(probs=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 3),
                                              st.integers(1, 24), st.integers(1, 24)),
                        elements=st.floats(0, 1, width=32)),
       data=st.data())
def test_arbitrary_maps_never_crash_or_nan(probs, data):
    n_m, n_c, h, w = probs.shape
    probs = probs / n_c                                    # classes sum to <= 1
    active = data.draw(st.lists(st.integers(0, n_m - 1), min_size=1, unique=True))
    vh, vw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    params = Params(threshold=data.draw(st.floats(0.05, 0.95)), min_blob_px=1,
                    contrast_radius_px=data.draw(st.floats(1.0, 30.0)))
    image = data.draw(hnp.arrays(np.float32, (h, w), elements=st.floats(0, 1, width=32)))
    heavy = data.draw(st.sampled_from([None, n_c - 1]))     # with the Z-contrast check or not
    r = analyse(probs, active, params, valid_shape=(vh, vw), want_maps=True, image=image,
                heavy_class=heavy)
    n = r.n_atoms
    for arr in (r.x, r.y, r.prob, r.uncertainty, r.det_frac, r.spread, r.cls_prob, r.cls_agree):
        assert arr.shape == (n,) and arr.dtype == np.float32 and np.isfinite(arr).all()
    assert r.z_contrast.shape == (n,) and not np.isinf(r.z_contrast).any()
    assert (np.isnan(r.z_contrast) | (r.z_contrast > 0)).all()
    assert ((r.uncertainty >= 0) & (r.uncertainty <= 0.5)).all()
    assert ((r.x >= 0) & (r.x <= vw - 1) & (r.y >= 0) & (r.y <= vh - 1)).all()
    assert ((r.det_frac >= 0) & (r.det_frac <= 1)).all() and (r.cls < n_c).all()
    assert (r.prob > params.threshold).all()
    assert r.count_per_member.shape == (n_m,) and (r.count_per_member >= 0).all()
    assert np.isfinite(r.disagreement_per_member).all() and np.isfinite(r.mean_uncertainty)
    assert np.isfinite(r.std_map).all() and r.std_map.shape == (n_c, vh, vw)


# --- merged atoms ------------------------------------------------------------------------------

def merged(centres, sigma=2.2, shape=SHAPE, stretch=1.0):
    """One member's one-class map: Gaussians summed and clipped at 1, as a network's discs of
    neighbouring atoms touch under blur (the saturated top, the dip between atoms above 0.5)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    a = sum(np.exp(-(((xx - x) / stretch) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
            for x, y in centres)
    return np.minimum(a, 1.0).astype(np.float32)[None, None]


def test_touching_atoms_are_split_at_the_dip_between_them():
    probs = merged([(20, 24), (26.5, 24)])
    whole = analyse(probs, [0], Params(split_dip=0))
    assert whole.n_atoms == 1                           # one component: the old behaviour
    r = by_x(analyse(probs, [0], Params()))
    np.testing.assert_allclose(r["x"], [20, 26.5], atol=0.6)
    np.testing.assert_allclose(r["y"], [24, 24], atol=0.05)


def test_a_row_of_merged_atoms_gives_every_atom():
    xs = [12, 18.5, 25, 31.5, 38]
    r = by_x(analyse(merged([(x, 20) for x in xs]), [0], Params()))
    np.testing.assert_allclose(r["x"], xs, atol=0.6)


@pytest.mark.parametrize("probs", [
    merged([(30, 24)], stretch=2.5),                   # one atom smeared along the scan
    np.pad(np.ones((1, 1, 9, 9), np.float32), ((0, 0), (0, 0), (20, 19), (28, 27))),  # plateau
    merged([(30, 24), (33, 24)]),                      # closer than min_peak_distance_px
], ids=["smeared", "flat top", "closer than the minimum distance"])
def test_one_atom_is_never_split(probs):
    assert analyse(probs, [0], Params()).n_atoms == 1


def test_members_detect_both_halves_of_a_split_atom():
    probs = np.concatenate([merged([(20, 24), (26.5, 24)])] * 3)
    r = analyse(probs, [0, 1, 2], Params())
    assert r.n_atoms == 2 and r.count_per_member.tolist() == [2, 2, 2]
    np.testing.assert_array_equal(r.det_frac, 1.0)


def test_split_params_validated():
    with pytest.raises(ValueError, match="split_dip"):
        Params().replace(split_dip=1.5)
    with pytest.raises(ValueError, match="min_peak_distance_px"):
        Params().replace(min_peak_distance_px=0)
    assert Params().replace(split_dip=0).split_dip == 0


def test_trainer_finds_the_same_atoms_as_the_service():
    """trainer.elit.experiment mirrors the service's split (no shared code): same atoms on a
    blurred lattice with merged neighbours, within 0.3 px (the centroids weigh pixels
    differently: excess over the threshold here, the map there)."""
    pytest.importorskip("torch")
    from trainer.elit.experiment import atoms_with_uncertainty

    rng = np.random.default_rng(3)
    centres = [(x + rng.normal(0, 0.2), y + rng.normal(0, 0.2))
               for x in np.arange(8, 58, 6.5) for y in np.arange(8, 42, 7.0)]
    probs = merged(centres, sigma=2.0)
    r = by_x(analyse(probs, [0], Params(min_blob_px=9)))
    xy, _ = atoms_with_uncertainty(probs[0, 0], np.zeros_like(probs[0, 0]), 3.0)
    assert len(xy) == len(r["x"]) == len(centres)
    gap, partner = cKDTree(xy).query(np.stack([r["x"], r["y"]], 1))
    assert np.unique(partner).size == len(xy) and gap.max() < 0.3


def test_faint_atoms_count_in_a_lattice_but_not_on_a_disordered_support():
    shape, rng = (128, 128), np.random.default_rng(5)
    grid = [(x, y) for x in np.arange(6, 124, 9.0) for y in np.arange(6, 124, 9.0)]
    scattered = []                                      # random, at least 8 px apart
    while len(scattered) < 40:
        p = rng.uniform(6, 122, 2)
        if all(np.hypot(*(p - q)) >= 8 for q in scattered):
            scattered.append(p)
    for centres, lattice in ((grid, True), (scattered, False)):
        amps = np.where(np.arange(len(centres)) % 7 == 3, 0.7, 0.99)      # faint ones peak at 0.7
        probs = probs_with([[(x, y, 0, a) for (x, y), a in zip(centres, amps)]], shape=shape)
        r = analyse(probs, [0], Params())
        faint = int((amps < Params().min_peak).sum())
        assert (r.figures.crystallinity >= Params().lattice_crystallinity) == lattice
        assert r.unconfirmed == (0 if lattice else faint)
        assert r.n_atoms == len(centres) - r.unconfirmed
        assert analyse(probs, [0], Params(lattice_crystallinity=0)).unconfirmed == 0


# ----------------------------------------------------------------------------- Z-contrast classes
ZC = Params()                       # the check is on by default (heavy_contrast 3.2)

def _hex_lattice(shape, bond=8.0, margin=6.0):
    """Atom positions of a graphene-like honeycomb (bond length `bond` px) inside `shape`."""
    a = bond * np.sqrt(3)
    pts = []
    for i in range(-2, int(shape[1] / a) + 3):
        for j in range(-2, int(shape[0] / (1.5 * bond)) + 3):
            x0, y0 = i * a + (j % 2) * a / 2, j * 1.5 * bond
            pts += [(x0, y0), (x0, y0 + bond)]
    pts = np.array(pts)
    inside = (pts[:, 0] > margin) & (pts[:, 0] < shape[1] - margin) \
        & (pts[:, 1] > margin) & (pts[:, 1] < shape[0] - margin)
    return pts[inside]


def _scene(xy, weights, shape, background=None, sigma=1.6):
    """Network input: a Gaussian per atom scaled by its weight, plus `background`."""
    img = np.zeros(shape, np.float32) if background is None else background.astype(np.float32)
    for (x, y), w in zip(xy, weights):
        img += blob(shape, x, y, w, sigma)
    return img


def _contrast_case(net_heavy, weights, shape=(96, 96), background=None):
    """probs of one member calling atom k heavy where net_heavy[k], and the image."""
    xy = _hex_lattice(shape)
    atoms = [(x, y, int(h), 0.95) for (x, y), h in zip(xy, net_heavy(len(xy)))]
    return xy, probs_with([atoms], shape=shape), _scene(xy, weights(len(xy)), shape, background)


def _atom_near(r, xy, k):
    return int(np.argmin(np.hypot(r.x - xy[k, 0], r.y - xy[k, 1])))


def test_an_atom_four_times_brighter_than_light_neighbours_is_heavy_whatever_the_network_says():
    k = 40
    xy, probs, img = _contrast_case(lambda n: np.zeros(n, int),
                                    lambda n: np.where(np.arange(n) == k, 4.2, 1.0))
    plain = analyse(probs, [0], Params(heavy_contrast=0), image=img, heavy_class=1)   # off
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    i = _atom_near(r, xy, k)
    assert (plain.cls == 0).all() and np.isnan(plain.z_contrast).all()
    assert r.cls[i] == 1 and np.count_nonzero(r.cls) == 1
    assert 3.5 < r.z_contrast[i] < 5.0
    others = np.delete(r.z_contrast, i)
    assert np.nanmedian(others) == pytest.approx(1.0, abs=0.1)
    assert r.cls_prob[i] > 0.75                   # the contrast is sure, though the network is not


def test_a_network_heavy_atom_as_bright_as_its_light_neighbours_is_light():
    k = 40
    xy, probs, img = _contrast_case(lambda n: (np.arange(n) == k).astype(int),
                                    lambda n: np.ones(n))
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    assert (r.cls == 0).all()
    off = analyse(probs, [0], Params(heavy_contrast=0.0), image=img, heavy_class=1)
    assert off.cls[_atom_near(off, xy, k)] == 1 and np.count_nonzero(off.cls) == 1


def test_a_lattice_of_heavy_atoms_stays_heavy_and_isolated_atoms_keep_the_network_class():
    _, probs, img = _contrast_case(lambda n: np.ones(n, int), lambda n: np.ones(n))
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    assert (r.cls == 1).all()                     # a particle: heavy among heavy, not demoted
    far = [(10, 10, 1, 0.95), (60, 12, 0, 0.95), (30, 40, 1, 0.95)]   # > 24 px apart
    img2 = _scene([(a[0], a[1]) for a in far], [1.0, 4.0, 1.0], SHAPE)
    r2 = analyse(probs_with([far]), [0], ZC, image=img2, heavy_class=1)
    assert by_x(r2)["cls"].tolist() == [1, 1, 0] and np.isnan(r2.z_contrast).all()


def test_a_background_gradient_and_a_diffuse_blob_do_not_make_lattice_atoms_heavy():
    shape = (96, 96)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    ramp = 3.0 * xx / shape[1] + 4.0 * np.exp(-((xx - 50) ** 2 + (yy - 45) ** 2) / (2 * 18 ** 2))
    _, probs, img = _contrast_case(lambda n: np.zeros(n, int), lambda n: np.ones(n), shape,
                                    background=ramp)
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    assert (r.cls == 0).all() and np.nanmax(r.z_contrast) < 1.6


def test_no_image_or_no_heavy_class_leaves_the_network_classes():
    k = 40
    _, probs, img = _contrast_case(lambda n: np.zeros(n, int),
                                    lambda n: np.where(np.arange(n) == k, 4.2, 1.0))
    assert (analyse(probs, [0], ZC, image=img).cls == 0).all()
    assert (analyse(probs, [0], ZC, heavy_class=1).cls == 0).all()
    with pytest.raises(ValueError, match="heavy_contrast"):
        Params(heavy_contrast=-1.0)
    with pytest.raises(ValueError, match="contrast_radius_px"):
        Params(contrast_radius_px=0)


def test_a_heavier_sublattice_keeps_its_class_but_scattered_false_heavy_calls_do_not():
    """Honeycomb: sublattice A 1.8x as bright as B (like Mo among S2, less than heavy_contrast).
    Networks calling all of A heavy (a compound, half the atoms): kept. Networks calling 10 % of
    the atoms heavy, as bright as their neighbours (a dopant frame): light."""
    shape = (96, 96)
    xy = _hex_lattice(shape)
    a_site = _sublattice(xy)
    img = _scene(xy, np.where(a_site, 1.8, 1.0), shape)
    compound = probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, a_site)]], shape=shape)
    r = analyse(compound, [0], ZC, image=img, heavy_class=1)
    assert np.count_nonzero(r.cls) == np.count_nonzero(a_site) > 0.4 * len(xy)
    flat = _scene(xy, np.ones(len(xy)), shape)
    scattered = np.zeros(len(xy), int)
    scattered[::10] = 1                                           # 10 %, each among light atoms
    dopant = probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, scattered)]], shape=shape)
    r = analyse(dopant, [0], ZC, image=flat, heavy_class=1)
    assert np.count_nonzero(r.cls) == 0


def _sublattice(xy, bond=8.0):
    """The honeycomb's A sites of _hex_lattice: those with an atom one bond straight below."""
    tree = cKDTree(xy)
    return np.array([len(tree.query_ball_point((x, y + bond), 0.5)) > 0 for x, y in xy])


def test_a_region_called_heavy_wholesale_is_light_but_a_bright_cluster_stays_heavy():
    """A third of a flat honeycomb called heavy in one piece (both sublattices: a region painted
    heavy, not a compound) -> light. Six atoms 10x as bright called heavy, among light ones -> kept."""
    shape = (96, 96)
    xy = _hex_lattice(shape)
    region = xy[:, 0] < np.percentile(xy[:, 0], 33)
    painted = probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, region)]], shape=shape)
    r = analyse(painted, [0], ZC, image=_scene(xy, np.ones(len(xy)), shape), heavy_class=1)
    assert np.count_nonzero(r.cls) == 0
    centre = np.argsort(np.hypot(xy[:, 0] - 48, xy[:, 1] - 48))[:6]
    bright = np.zeros(len(xy), int)
    bright[centre] = 1
    cluster = probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, bright)]], shape=shape)
    r = analyse(cluster, [0], ZC, image=_scene(xy, np.where(bright, 10.0, 1.0), shape),
                heavy_class=1)
    assert np.count_nonzero(r.cls) == 6


def _honeycomb_compound(shape=(96, 96), ratio=1.8):
    xy = _hex_lattice(shape)
    a_site = _sublattice(xy)
    return xy, a_site, _scene(xy, np.where(a_site, ratio, 1.0), shape)


def _called(xy, heavy, shape=(96, 96)):
    return probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, heavy)]], shape=shape)


def _heavy_sites(r, xy):
    """Per truth site (xy): is the atom found there called heavy?"""
    return np.array([r.cls[_atom_near(r, xy, k)] == 1 for k in range(len(xy))])


@pytest.mark.parametrize("calls", ["all", "dim sublattice", "a random third"])
def test_two_sublattices_are_told_apart_by_the_image_whatever_the_networks_call(calls):
    """Honeycomb, sublattice A 1.8x as bright as B (Mo among S2). The networks' heavy calls on
    such a frame depend on its orientation (real SrTiO3: 14 to 933 of 1,902); whenever they call
    many atoms heavy the image decides: exactly the A sites, with a class probability that says
    the image is sure."""
    xy, a_site, img = _honeycomb_compound()
    rng = np.random.default_rng(0)
    heavy = {"all": np.ones(len(xy), bool), "dim sublattice": ~a_site,
             "a random third": rng.random(len(xy)) < 0.33}[calls]
    r = analyse(_called(xy, heavy), [0], ZC, image=img, heavy_class=1)
    assert r.n_atoms == len(xy)
    np.testing.assert_array_equal(_heavy_sites(r, xy), a_site)
    assert np.median(r.cls_prob) > 0.9


def test_sublattice_classes_do_not_depend_on_the_frame_orientation():
    xy, a_site, img = _honeycomb_compound()
    heavy = np.ones(len(xy), bool)
    r = analyse(_called(xy, heavy), [0], ZC, image=img, heavy_class=1)
    xy_t = xy[:, ::-1].copy()                                   # the transposed frame
    r_t = analyse(_called(xy_t, heavy), [0], ZC, image=np.ascontiguousarray(img.T),
                  heavy_class=1)
    np.testing.assert_array_equal(_heavy_sites(r, xy), _heavy_sites(r_t, xy_t))


def test_of_three_sublattices_the_brightest_is_heavy():
    """A perovskite along [001] whose faint O-only columns are found too: A 4x, B-O 1.8x, O
    0.3x. The first split of the heights is O | (B-O and A); the bright part splits again into
    alternating A and B-O: only the A columns are heavy, as the networks (calling both) are not."""
    shape, a = (96, 96), 12.0
    grid = np.array([(i * a + 6, j * a + 6) for i in range(8) for j in range(8)])
    sites = {"A": grid, "B": grid + a / 2, "O": np.vstack([grid + (a / 2, 0), grid + (0, a / 2)])}
    xy = np.vstack(list(sites.values()))
    inside = np.all((xy > 4) & (xy < 92), axis=1)
    kind = np.repeat(list(sites), [len(v) for v in sites.values()])[inside]
    xy = xy[inside]
    img = _scene(xy, np.select([kind == "A", kind == "B"], [4.0, 1.8], 0.3), shape)
    r = analyse(_called(xy, kind != "O"), [0], ZC, image=img, heavy_class=1)
    assert r.n_atoms == len(xy)
    np.testing.assert_array_equal(_heavy_sites(r, xy), kind == "A")


def test_a_bright_half_or_a_thickness_gradient_is_not_a_sublattice():
    """Brightness that does not alternate from atom to atom is no pair of sublattices: a lattice
    brighter on one side (thickness), called heavy there, keeps the painted-region rule (light)."""
    shape = (96, 96)
    xy = _hex_lattice(shape)
    right = xy[:, 0] > 48
    img = _scene(xy, np.where(right, 1.8, 1.0), shape)
    r = analyse(_called(xy, right), [0], ZC, image=img, heavy_class=1)
    assert np.count_nonzero(r.cls) == 0
    ramp = _scene(xy, 1.0 + xy[:, 0] / 96.0, shape)           # 1x .. 2x across the frame
    r = analyse(_called(xy, xy[:, 0] > 40), [0], ZC, image=ramp, heavy_class=1)
    assert np.count_nonzero(r.cls) == 0


def test_row_median_of_the_first_k_values_matches_numpy():
    from elit_stream.core.postprocess import _row_median

    rng = np.random.default_rng(0)
    k = rng.integers(1, 9, 300)
    values = rng.random((300, 8))
    values[np.arange(8)[None, :] >= k[:, None]] = np.inf        # the rest: no neighbour
    want = [np.median(v[:n]) for v, n in zip(values, k)]
    np.testing.assert_allclose(_row_median(values, k), want)


def test_a_heavy_atom_the_networks_call_light_is_lifted_when_both_contrasts_say_heavy(
        monkeypatch):
    """The contaminated scene of the next test with a heavier Si (7), but the networks call
    every atom light. The Si reads ~2 against its raised neighbours (above CONTRAST_LIFT, below
    heavy_contrast) and its band-pass peak is > 4x the frame's light atoms': heavy, with a class
    probability of 0.5 (the networks say otherwise). A carbon 2.5x as bright as its neighbours
    outside the blob passes the contrast but not the band pass (2.5x the frame's light atoms):
    light. Without the lift (CONTRAST_LIFT = inf) the Si stays light."""
    shape = (96, 96)
    xy = _hex_lattice(shape)
    centre = np.hypot(xy[:, 0] - 48, xy[:, 1] - 48)
    si, c = np.argsort(centre)[[0, -40]]
    weights = np.where(centre < 20, 3.0, 1.0)
    weights[si], weights[c] = 7.0, 2.5
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    img = _scene(xy, weights, shape,
                 background=3.0 * np.exp(-((xx - 48) ** 2 + (yy - 48) ** 2) / (2 * 16 ** 2)))
    probs = probs_with([[(x, y, 0, 0.95) for x, y in xy]], shape=shape)
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    i, j = _atom_near(r, xy, si), _atom_near(r, xy, c)
    assert postprocess.CONTRAST_LIFT < r.z_contrast[i] < ZC.heavy_contrast
    assert postprocess.CONTRAST_LIFT < r.z_contrast[j] < ZC.heavy_contrast
    assert r.cls[i] == 1 and r.cls[j] == 0 and np.count_nonzero(r.cls) == 1
    assert r.cls_prob[i] == pytest.approx(0.5)
    monkeypatch.setattr(postprocess, "CONTRAST_LIFT", np.inf)
    off = analyse(probs, [0], ZC, image=img, heavy_class=1)
    assert np.count_nonzero(off.cls) == 0


def test_a_heavy_atom_under_contamination_keeps_the_networks_call_a_light_one_there_does_not():
    """Contamination raises every atom within 20 px of the frame centre by 2 (its own atoms over
    each column) on a diffuse blob: the Si's neighbours are raised too, so its z_contrast reads
    ~2, below heavy_contrast. Its band-pass peak is still > 4x the frame's light atoms': the
    networks' heavy call stays. A carbon there called heavy (3x the frame's light atoms) is light."""
    shape = (96, 96)
    xy = _hex_lattice(shape)
    centre = np.hypot(xy[:, 0] - 48, xy[:, 1] - 48)
    si, c = np.argsort(centre)[[0, 3]]
    weights = np.where(centre < 20, 3.0, 1.0)
    weights[si] = 6.2
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    blob_bg = 3.0 * np.exp(-((xx - 48) ** 2 + (yy - 48) ** 2) / (2 * 16 ** 2))
    img = _scene(xy, weights, shape, background=blob_bg)
    calls = np.zeros(len(xy), int)
    calls[[si, c]] = 1
    probs = probs_with([[(x, y, int(h), 0.95) for (x, y), h in zip(xy, calls)]], shape=shape)
    r = analyse(probs, [0], ZC, image=img, heavy_class=1)
    i, j = _atom_near(r, xy, si), _atom_near(r, xy, c)
    assert r.z_contrast[i] < ZC.heavy_contrast              # the neighbours' median misses it
    assert r.cls[i] == 1 and r.cls[j] == 0 and np.count_nonzero(r.cls) == 1
    plain = analyse(probs, [0], ZC, image=_scene(xy, np.where(centre < 20, 3.0, 1.0),
                                                           shape, background=blob_bg),
                              heavy_class=1)
    assert np.count_nonzero(plain.cls) == 0       # no heavier atom there: both light
