"""Second opinions for the patch-GMM filter of ``trainer.elit.relabel``: lattice geometry and vacuum.

The patch GMM (``relabel.gmm_lattice_filter``) calls an atom "not lattice" whenever its patch sees
something unusual: the frame edge (reflect padding), a hole, a dopant, contamination, amorphous
carbon. Two label-free checks decide what happens to such an atom:

``lattice_geometry`` (rescue → kept): the frame's lattice bond vectors are collected from the atoms
the GMM kept (every vector to a neighbour within 1.3 × the median bond). A GMM-dropped atom whose
vectors to at least ``min_match`` (2) neighbours each land within ``tol`` (0.15) × bond of a
lattice vector cluster (≥ ``min_share`` of all lattice vectors nearby) sits on the lattice: it is a
lattice atom next to an edge, hole or defect, and is taught as an atom. Amorphous atoms have random
bond directions and rarely match two. (Assumes one lattice orientation per frame.)

``vacuum`` (→ background): a dropped atom is taught as *background* only where the ensemble and
the raw frame agree that the place is empty, both of:

- ensemble: mean of the ensemble-mean atom map over a disc of 1.5 bonds around it < ``map_max``
  (0.15; a lattice or amorphous neighbourhood is ~0.3) and the mean ensemble std there
  < ``std_max`` (0.12);
- raw signal: the detection's height in the frame (smoothed by ½ atom radius, minus the local
  background of ``trainer.elit.intensity``) is below ``faint_max`` (0.5) × the median height of
  the kept atoms: no real atom is there. Local background and a relative height make it robust to
  gradients, contamination and contrast changes. (A level criterion — the frame smoothed over a
  bond against a plane through the lattice's level — was tried and dropped: how much darker vacuum
  is than lattice depends on the probe; a texture criterion was dropped because after an imaging
  change the noise texture in a hole equals the lattice's.)

Everything else the GMM drops is *ignored* (mask 255): atom-like but not lattice-like, e.g.
amorphous carbon, is never taught as background.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def bond_vectors(xy: np.ndarray, bond_px: float) -> np.ndarray:
    """All vectors [n, 2] from atoms to their neighbours within 1.3 bonds."""
    if len(xy) < 2:
        return np.zeros((0, 2))
    pairs = cKDTree(xy).query_pairs(1.3 * bond_px, output_type="ndarray")
    v = xy[pairs[:, 1]] - xy[pairs[:, 0]]
    return np.concatenate([v, -v])


def lattice_geometry(xy: np.ndarray, lattice_xy: np.ndarray, bond_px: float, tol: float = 0.15,
                     min_match: int = 2, min_share: float = 0.03) -> np.ndarray:
    """True where an atom's bonds to ≥ ``min_match`` neighbours (among ``xy`` ∪ ``lattice_xy``)
    match the lattice's bond vectors (see the module docstring)."""
    ref = bond_vectors(lattice_xy, bond_px)
    if len(xy) == 0 or len(ref) < 20:
        return np.zeros(len(xy), bool)
    ref_tree = cKDTree(ref)
    everyone = np.concatenate([xy, lattice_xy])
    tree = cKDTree(everyone)
    out = np.zeros(len(xy), bool)
    for i, nbrs in enumerate(tree.query_ball_point(xy, 1.3 * bond_px)):
        v = everyone[nbrs] - xy[i]
        v = v[np.hypot(*v.T) > 0.5 * bond_px]
        if len(v) < min_match:
            continue
        hits = np.array([len(h) for h in ref_tree.query_ball_point(v, tol * bond_px)])
        out[i] = (hits >= min_share * len(ref) / 6).sum() >= min_match
    return out


def _disc_mean(img: np.ndarray, radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (x ** 2 + y ** 2 <= r * r).astype(float)
    return ndimage.convolve(img, disc / disc.sum(), mode="reflect")


def vacuum(frame: np.ndarray, mean_map: np.ndarray, std_map: np.ndarray, xy: np.ndarray,
           kept_xy: np.ndarray, radius_px: float, bond_px: float, map_max: float = 0.15,
           std_max: float = 0.12, faint_max: float = 0.5) -> np.ndarray:
    """True where the place is confidently empty (see the module docstring)."""
    from trainer.elit.intensity import local_background

    if len(xy) == 0 or len(kept_xy) < 10:
        return np.zeros(len(xy), bool)
    f = frame.astype(np.float64)
    at = lambda img, p: ndimage.map_coordinates(img, [p[:, 1], p[:, 0]], order=1, mode="nearest")
    disc = 1.5 * bond_px
    quiet = (at(_disc_mean(mean_map, disc), xy) < map_max) & (at(_disc_mean(std_map, disc), xy) < std_max)
    height = ndimage.gaussian_filter(f, max(radius_px / 2, 0.5)) - local_background(
        f, max(3, int(round(2 * bond_px)) | 1), radius_px)
    typical = max(float(np.median(at(height, kept_xy))), 1e-9)
    return quiet & (at(height, xy) < faint_max * typical)
