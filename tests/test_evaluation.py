"""The evaluation suite (benchmarks/evaluation): its truth, its scoring, and one quick run.

- the image model's truth is right: on noise-free frames (aberrations, scan distortion, line
  jitter included) a trivial peak finder recovers every truth atom, one-to-one, to < 0.25 px;
- the scoring functions on hand-made cases;
- `python -m benchmarks.evaluate --quick` end to end on models/default (real engine, real
  artifact), and the movie file it writes reads back with its truth;
- the suite never imports the trainer.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from benchmarks.evaluation import frames as fr
from benchmarks.evaluation import movie, optics, scoring
from benchmarks.evaluation import samples as sm

ROOT = Path(__file__).resolve().parents[1]


def _trivial_peaks(img: np.ndarray, size: int) -> np.ndarray:
    """Local maxima above 30 % of the max, refined by a 3x3 parabola fit per axis."""
    peak = (img == ndimage.maximum_filter(img, size)) & (img > 0.3 * img.max())
    ys, xs = np.nonzero(peak)
    ok = (ys > 0) & (xs > 0) & (ys < img.shape[0] - 1) & (xs < img.shape[1] - 1)
    ys, xs = ys[ok], xs[ok]
    c = img[ys, xs]
    dx = (img[ys, xs - 1] - img[ys, xs + 1]) / (2 * (img[ys, xs - 1] - 2 * c + img[ys, xs + 1]))
    dy = (img[ys - 1, xs] - img[ys + 1, xs]) / (2 * (img[ys - 1, xs] - 2 * c + img[ys + 1, xs]))
    return np.stack([xs + dx, ys + dy], 1)


def _centroids(img: np.ndarray, peaks: np.ndarray, r: int = 2) -> np.ndarray:
    """Intensity centroids over the (2r+1)^2 window (above half the peak) around each peak."""
    out = []
    for x, y in np.round(peaks).astype(int):
        win = img[y - r:y + r + 1, x - r:x + r + 1]
        w = np.clip(win - win.max() / 2, 0, None)
        gy, gx = np.mgrid[-r:r + 1, -r:r + 1]
        out.append([x + (w * gx).sum() / w.sum(), y + (w * gy).sum() / w.sum()])
    return np.array(out)


def _clean_frame(xy_pm, z, pixel_pm, optic, scan, shape=(96, 96), seed=0):
    offsets = optics.line_offsets_px(np.random.default_rng(seed), shape[0], scan)
    sample = fr.Sample(xy_pm, z, (z >= 14).astype(np.uint8))
    img = optics.render(sample.scene(), optic, shape, pixel_pm, scan, offsets)
    truth = optics.to_pixels(xy_pm, shape, pixel_pm, scan, offsets,
                             optics.image_sigma_pm(optic) / pixel_pm)
    inside = np.all((truth > 7) & (truth < shape[0] - 8), axis=1)
    return img, truth[inside]


def _assert_recovered(img, truth, size, tol_px=0.25, centroid=False):
    found = _trivial_peaks(img, size)
    found = found[np.all((found > 7) & (found < img.shape[0] - 8), axis=1)]
    if centroid:
        found = _centroids(img, found, r=5)
    ti, pi = scoring.match(truth, found, 1.0)
    assert len(ti) == len(truth) == len(found), (len(ti), len(truth), len(found))
    err = np.hypot(*(truth[ti] - found[pi]).T)
    assert err.max() < tol_px, err.max()


@pytest.mark.parametrize("optic", [
    optics.Optics(kv=200.0, aperture_mrad=25.0),
    optics.Optics(kv=200.0, aperture_mrad=25.0, defocus_nm=1.5, astig_nm=0.5, coma_nm=300.0),
])
@pytest.mark.parametrize("scan", [optics.Scan(),
                                  optics.Scan(shear=0.03, scale_y=0.97, scale_x=1.02)])
def test_isolated_heavy_atoms_are_where_the_truth_says(optic, scan):
    rng = np.random.default_rng(3)
    xy = sm.spaced_points(rng, 25, 800.0, 300.0)
    img, truth = _clean_frame(xy, np.full(len(xy), 78), 20.0, optic, scan)
    assert len(truth) >= 15
    _assert_recovered(img, truth, size=7)


def test_graphene_lattice_truth_with_line_jitter():
    """Per-line jitter moves rows; the truth follows the jitter averaged over an atom's rows,
    so the centroids of a clean jittered lattice sit on the truth (a single row's peak does not)."""
    xy = sm.graphene(1000.0, 0.3, np.zeros(2))
    optic = optics.Optics(kv=60.0, aperture_mrad=32.0)
    img, truth = _clean_frame(xy, np.full(len(xy), 6), 10.0, optic, optics.Scan())
    _assert_recovered(img, truth, size=5)
    img, truth = _clean_frame(xy, np.full(len(xy), 6), 10.0, optic,
                              optics.Scan(jitter_px=0.3), seed=1)
    _assert_recovered(img, truth, size=5, tol_px=0.15, centroid=True)


def test_z_contrast_and_thickness():
    optic = optics.Optics(kv=200.0, aperture_mrad=25.0)
    xy = np.array([[-300.0, 0.0], [300.0, 0.0]])
    scene = optics.Scene(xy, optics.atom_weight([6, 78], [1, 4]))
    img = optics.render(scene, optic, (64, 64), 15.0, optics.Scan(), np.zeros(64))
    ratio = img[31:33, 51:53].max() / img[31:33, 11:13].max()
    assert ratio == pytest.approx((78 / 6) ** 1.7 * 4 ** 0.85, rel=0.05)
    assert img[31:33, 11:13].max() == pytest.approx(1.0, rel=0.05)   # carbon-peak units


def test_aberrations_spread_the_same_current():
    """Defocus lowers an atom's peak but not its integrated signal (the beam current)."""
    xy, scan = np.array([[0.0, 0.0]]), optics.Scan()
    images = [optics.render(optics.Scene(xy, optics.atom_weight([6])), optics.Optics(**kw),
                            (96, 96), 10.0, scan, np.zeros(96))
              for kw in ({}, {"defocus_nm": 3.0, "astig_nm": 1.0})]
    assert images[0].max() == pytest.approx(1.0, rel=0.05)
    assert images[1].max() < 0.7 * images[0].max()
    assert images[1].sum() == pytest.approx(images[0].sum(), rel=0.03)


def test_detector_reads_out_counts_with_gain_and_offset():
    det = optics.Detector(dose=100.0, gain=10.0, offset=1000.0, read_noise=0.0)
    out = optics.detect(np.random.default_rng(0), np.ones((200, 200)), det)
    assert out.mean() == pytest.approx(1000 + 10 * 100, rel=0.01)
    assert out.std() == pytest.approx(10 * np.sqrt(100), rel=0.05)    # Poisson, times gain


# --- scoring on hand-made cases -------------------------------------------------------------

def test_match_is_one_to_one_and_within_radius():
    truth = np.array([[10.0, 10.0], [20.0, 10.0]])
    pred = np.array([[10.5, 10.0], [11.0, 10.0], [30.0, 30.0], [19.0, 10.0]])
    ti, pi = scoring.match(truth, pred, 2.0)
    assert sorted(zip(ti.tolist(), pi.tolist())) == [(0, 0), (1, 3)]


def test_score_frame_counts_interior_only_and_heavy_class():
    shape = (100, 100)
    truth = np.array([[50, 50], [60, 50], [70, 50], [2, 50]], float)     # last: on the border
    tcls = np.array([1, 0, 0, 0])
    pred = np.array([[50.5, 50], [60, 50.4], [40, 40], [2.5, 50], [1, 1]], float)
    pcls = np.array([1, 1, 0, 0, 1])
    unc = np.array([0.1, 0.2, 0.9, 0.5, 0.5])
    conf = np.array([0.9, 0.4, 0.5, 0.5, 0.5])
    s = scoring.score_frame(truth, tcls, pred, pcls, shape, spacing_px=10.0, pixel_pm=15.0,
                            uncertainty=unc, class_conf=conf)
    assert (s.tp, s.fp, s.fn) == (2, 1, 1)            # (40, 40) false; (70, 50) missed
    assert (s.heavy_pred, s.heavy_true, s.heavy_hits) == (2, 1, 1)   # (1, 1) is outside
    fig = scoring.pool([s])
    assert fig["precision"] == pytest.approx(2 / 3) and fig["recall"] == pytest.approx(2 / 3)
    assert fig["impurity_precision"] == 0.5 and fig["impurity_recall"] == 1.0
    assert fig["uncertainty_auroc"] == 1.0            # the false one is the most uncertain
    assert fig["class_conf_auroc"] == 1.0             # the wrong class has the lower confidence
    assert fig["loc_rms_pm"] == pytest.approx(np.sqrt((0.5**2 + 0.4**2) / 2) * 15.0)


def test_pool_reports_na_where_undefined():
    s = scoring.score_frame(np.empty((0, 2)), [], np.empty((0, 2)), [], (50, 50), 5.0, 15.0,
                            uncertainty=[])
    fig = scoring.pool([s])
    assert fig["precision"] is None and fig["f1"] is None and fig["uncertainty_auroc"] is None
    assert fig["impurity_precision"] is None and fig["fp_per_frame"] == 0.0
    assert scoring.auroc(np.array([0.1]), np.array([])) is None


def test_auroc_orders_positives_above_negatives():
    assert scoring.auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert scoring.auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0


# --- the suite end to end ---------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_end_to_end_on_the_default_model(tmp_path):
    from benchmarks import evaluate

    assert evaluate.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    cases = {g["case"] for g in res["groups"]}
    assert cases == {"drift_movie", "heavy_atoms", "nanoparticle", "perovskite", "compound", "ood"}
    segs = [g["segment"] for g in res["groups"] if g["case"] == "drift_movie"]
    assert segs == list(movie.SEGMENTS)
    lattice = [g for g in res["groups"] if g["case"] == "drift_movie"]
    assert all(g["f1"] is not None and 0.0 <= g["f1"] <= 1.0 for g in lattice)
    assert all((tmp_path / p).stat().st_size > 0 for p in res["pictures"])
    assert len(res["pictures"]) == len(res["groups"])
    assert "| case |" in (tmp_path / "results.md").read_text()
    frames = movie.load_movie(tmp_path / "movie.npz")
    assert [f.segment for f in frames] == list(movie.SEGMENTS)
    assert [len(f.xy) for f in frames] == [r["n_truth"] for r in res["frames"][:5]]
    assert all(4 <= int((f.cls == 1).sum()) <= 6 for f in frames)


def test_the_suite_never_imports_the_trainer():
    files = [ROOT / "benchmarks" / "evaluate.py",
             *sorted((ROOT / "benchmarks" / "evaluation").glob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "trainer" for n in names), path
