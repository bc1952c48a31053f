"""Atom positions (pm, around the origin) of the suite's samples, with their atomic numbers.

Independent of `trainer.data`: own lattices, own defects, own supports. Every function takes a
numpy Generator and returns plain arrays; the scene (`optics.Scene`) and the truth are built from
them in `cases`.
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

CC_BOND_PM = 142.0
PT_Z, PT_FCC_A_PM, PT_NN_PM = 78, 392.0, 277.0
CARBON_Z, NITROGEN_Z, OXYGEN_Z, SILICON_Z = 6, 7, 8, 14


def rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def crystal(cell: np.ndarray, basis: np.ndarray, half_pm: float, theta: float,
            shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sites of a 2D crystal (rows of `cell` = a1, a2; basis [B, 2]) rotated by `theta` and
    shifted, inside the square |x|, |y| <= half_pm. Returns xy [N, 2] and basis index [N]."""
    n = int(np.ceil(1.5 * half_pm / np.min(np.linalg.norm(cell, axis=1)))) + 2
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1)), -1).reshape(-1, 2)
    xy = ((ij @ cell)[:, None, :] + basis[None]).reshape(-1, 2) + shift
    kind = np.tile(np.arange(len(basis)), len(ij))
    xy = xy @ rotation(theta).T
    keep = np.all(np.abs(xy) <= half_pm, axis=1)
    return xy[keep], kind[keep]


def graphene(half_pm: float, theta: float, shift: np.ndarray) -> np.ndarray:
    d = CC_BOND_PM
    cell = np.array([[np.sqrt(3) * d, 0.0], [np.sqrt(3) * d / 2, 1.5 * d]])
    xy, _ = crystal(cell, np.array([[0.0, 0.0], [0.0, d]]), half_pm, theta, shift)
    return xy


def rough_disc(xy: np.ndarray, centre: np.ndarray, radius_pm: float, phases: np.ndarray,
               roughness: float = 0.25) -> np.ndarray:
    """Mask of points inside a disc whose radius varies with angle (low-order harmonics)."""
    rel = xy - centre
    ang = np.arctan2(rel[:, 1], rel[:, 0])
    r_edge = radius_pm * (1 + roughness * sum(np.cos(k * ang + p) / k
                                              for k, p in enumerate(phases, start=2)))
    return np.hypot(rel[:, 0], rel[:, 1]) < r_edge


def poisson_disc(rng: np.random.Generator, inside, bbox: tuple, min_pm: float,
                 n_max: int, tries: int = 30) -> np.ndarray:
    """Random points with a minimum spacing (dart throwing) in the region `inside(xy) -> mask`,
    up to n_max points: a 2D amorphous (glassy) atom network."""
    (x0, x1), (y0, y1) = bbox
    pts = np.empty((0, 2))
    for _ in range(tries):
        cand = rng.uniform((x0, y0), (x1, y1), (4 * n_max, 2))
        cand = cand[inside(cand)]
        for p in cand:                     # greedy; small patches only (~100 atoms)
            if len(pts) >= n_max:
                return pts
            if len(pts) == 0 or np.min(np.hypot(*(pts - p).T)) >= min_pm:
                pts = np.vstack([pts, p])
    return pts


def film(rng: np.random.Generator, half_pm: float, atoms_per_nm2: float,
         envelope=None) -> tuple[np.ndarray, np.ndarray]:
    """A 3D amorphous light film in projection: random C/N positions with areal density
    `atoms_per_nm2` x envelope(xy) (thickness in units of the mean). Returns xy, Z."""
    area_nm2 = (2 * half_pm / 1e3) ** 2
    n = rng.poisson(atoms_per_nm2 * area_nm2 * 3)
    xy = rng.uniform(-half_pm, half_pm, (n, 2))
    keep_p = np.full(n, 1 / 3) if envelope is None else np.clip(envelope(xy) / 3, 0, 1)
    xy = xy[rng.random(n) < keep_p]
    z = np.where(rng.random(len(xy)) < 0.15, NITROGEN_Z, CARBON_Z)
    return xy, z


def blob_envelope(centres: np.ndarray, sizes_pm: np.ndarray, heights: np.ndarray):
    """Sum of Gaussian thickness bumps (contamination, thickness variations)."""
    def env(xy: np.ndarray) -> np.ndarray:
        out = np.zeros(len(xy))
        for c, s, h in zip(centres, sizes_pm, heights):
            out += h * np.exp(-np.sum((xy - c) ** 2, axis=1) / (2 * s**2))
        return out
    return env


def spaced_points(rng: np.random.Generator, n: int, half_pm: float, min_pm: float,
                  avoid: np.ndarray | None = None) -> np.ndarray:
    """n random points in the square, at least min_pm from each other and from `avoid`."""
    pts = [] if avoid is None else list(avoid)
    start = len(pts)
    for _ in range(200 * n):
        p = rng.uniform(-half_pm, half_pm, 2)
        if not pts or np.min(np.hypot(*(np.array(pts) - p).T)) >= min_pm:
            pts.append(p)
        if len(pts) - start == n:
            break
    return np.array(pts[start:]).reshape(-1, 2)


def cluster(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    """A small 2D-projected cluster of n heavy atoms at ~nearest-neighbour spacing."""
    pts = [centre]
    while len(pts) < n:
        base = pts[rng.integers(len(pts))]
        ang = rng.uniform(0, 2 * np.pi)
        p = base + PT_NN_PM * np.array([np.cos(ang), np.sin(ang)])
        if np.min(np.hypot(*(np.array(pts) - p).T)) >= 0.9 * PT_NN_PM:
            pts.append(p)
    return np.array(pts)


def fcc100_particle(rng: np.random.Generator, radius_pm: float, theta: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Columns of an fcc particle (Pt-like) seen along [100]: a square grid of spacing a/2;
    a column through a sphere of `radius_pm` at distance r holds 2 sqrt(R^2 - r^2) / a atoms.
    Returns xy [N, 2] and atoms per column [N] (>= 1)."""
    half = PT_FCC_A_PM / 2
    xy, _ = crystal(np.diag([half, half]), np.zeros((1, 2)), radius_pm + half, theta,
                    rng.uniform(-half / 2, half / 2, 2))
    r2 = np.sum(xy**2, axis=1)
    facet = radius_pm * (1 + 0.08 * np.cos(4 * (np.arctan2(xy[:, 1], xy[:, 0]) - theta)))
    keep = r2 < facet**2
    n_atoms = np.maximum(1, np.round(2 * np.sqrt(np.clip(facet**2 - r2, 0, None)) / PT_FCC_A_PM))
    return xy[keep], n_atoms[keep].astype(int)


def perovskite_columns(half_pm: float, a_pm: float, theta: float, shift: np.ndarray):
    """ABO3 along [001]: A on the corners, B(-O) in the centres, O-only columns on the edges.
    Returns xy [N, 2] and kind [N] (0 = A, 1 = B-O, 2 = O)."""
    basis = np.array([[0, 0], [a_pm / 2, a_pm / 2], [a_pm / 2, 0], [0, a_pm / 2]])
    xy, kind = crystal(np.diag([a_pm, a_pm]), basis, half_pm, theta, shift)
    return xy, np.minimum(kind, 2)


def nearest_spacing(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of a point set."""
    if len(xy) < 2:
        return float("nan")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))
