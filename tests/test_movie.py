"""The synthetic graphene movie: determinism, ground truth, drift, hole, file round trip, matching."""
from __future__ import annotations

import numpy as np
import pytest

from elit_stream.tools.movie import (
    CC_BOND_PM,
    Movie,
    interior,
    load_movie,
    make_movie,
    match_atoms,
    save_movie,
)


@pytest.fixture(scope="module")
def movie() -> Movie:
    return make_movie(n_frames=6, size_px=128, seed=3)


def test_deterministic(movie):
    again = make_movie(n_frames=6, size_px=128, seed=3)
    np.testing.assert_array_equal(again.frames, movie.frames)
    for a, b in zip(again.xy, movie.xy):
        np.testing.assert_array_equal(a, b)
    other = make_movie(n_frames=6, size_px=128, seed=4)
    assert not np.array_equal(other.frames, movie.frames)


def test_shapes_and_truth_inside_frame(movie):
    assert movie.frames.shape == (6, 128, 128) and movie.frames.dtype == np.uint16
    assert len(movie.xy) == len(movie.cls) == 6 and movie.pixel_size_pm == 14.0
    for xy, cls in zip(movie.xy, movie.cls):
        assert xy.dtype == np.float32 and cls.dtype == np.uint8 and len(xy) == len(cls)
        assert ((xy >= -0.5) & (xy < 127.5)).all()
        assert set(np.unique(cls)) <= {0, 1}


def test_nearest_neighbour_is_the_cc_bond(movie):
    from scipy.spatial import cKDTree
    xy = movie.xy[0]
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(np.median(d[:, 1]), CC_BOND_PM / movie.pixel_size_pm, rtol=1e-3)


def test_atoms_are_bright_and_dopants_brighter():
    m = make_movie(n_frames=1, size_px=128, seed=1, dose=400, dopant_fraction=0.05)
    f = m.frames[0].astype(float)
    ij = np.round(m.xy[0]).astype(int).clip(0, 127)
    at_atoms = f[ij[:, 1], ij[:, 0]]
    carbon, silicon = at_atoms[m.cls[0] == 0], at_atoms[m.cls[0] == 1]
    assert len(silicon) > 0
    assert np.median(carbon) > 1.5 * np.median(f) * 0.8
    assert np.median(silicon) > 2.5 * np.median(carbon)


def test_drift_and_growing_hole(movie):
    counts = [len(xy) for xy in movie.xy]
    assert counts[-1] < counts[0] - 10                          # the hole grows
    back = np.column_stack([movie.xy[-1][:, 0] + 5 * 0.6, movie.xy[-1][:, 1] + 5 * 0.3])
    tp, _, _ = match_atoms(back, movie.xy[0], 0.01)          # same sample, shifted by drift
    inner = ((back > 2) & (back < 125)).all(axis=1).sum()
    assert tp >= inner
    no_hole = make_movie(n_frames=3, size_px=64, seed=0, hole_growth=False,
                         drift_px_per_frame=(0.0, 0.0))
    assert len({len(xy) for xy in no_hole.xy}) == 1


def test_save_load_round_trip(movie, tmp_path):
    path = save_movie(movie, tmp_path / "m.npz")
    back = load_movie(path)
    np.testing.assert_array_equal(back.frames, movie.frames)
    assert back.pixel_size_pm == movie.pixel_size_pm
    for a, b, c, d in zip(back.xy, movie.xy, back.cls, movie.cls):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, d)
    with np.load(path) as z:
        assert set(z.files) == {"frames", "xy", "cls", "n_per_frame", "pixel_size_pm", "format"}


def test_match_atoms_counts():
    true = np.array([[0, 0], [10, 0], [20, 0]], float)
    assert match_atoms(true, true, 1.0) == (3, 0, 0)
    assert match_atoms(true[:2] + 0.5, true, 1.0) == (2, 0, 1)
    assert match_atoms(np.array([[10.2, 0], [10.4, 0], [50, 50]]), true, 1.0) == (1, 2, 2)
    assert match_atoms(np.zeros((0, 2)), true, 1.0) == (0, 0, 3)
    assert match_atoms(true, np.zeros((0, 2)), 1.0) == (0, 3, 0)
    # one-to-one and optimal: greedy nearest would pair (4.9 -> 5) and lose one
    pred = np.array([[4.9, 0], [5.8, 0]])
    assert match_atoms(pred, np.array([[4.0, 0], [5.0, 0]]), 1.0) == (2, 0, 0)


def test_interior_margin():
    xy = np.array([[0.0, 5.0], [3.0, 3.0], [5.0, 9.0], [5.0, 7.0]])
    assert interior(xy, (10, 8), 3).tolist() == [False, True, False, False]
    assert interior(np.zeros((0, 2)), (10, 8), 3).shape == (0,)
