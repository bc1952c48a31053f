"""Atom positions for synthetic training tiles: which atoms sit where, and of which element.

Owns the projected crystal geometry (graphene, a generic square lattice, an ABO3 perovskite),
the emulation of atoms removed one by one (point vacancies that grow into holes and edges),
thermal jitter, random displacements and substitutional dopants. Positions are in picometres
around the tile centre, before any pixel grid exists; turning them into images and masks is
`trainer.data.synth`'s job. numpy and scipy only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from trainer.data.config import SynthConfig

CC_BOND_PM = 142.0
CARBON_Z = 6
PEROVSKITE_A_Z = (38, 56, 57, 82, 83)      # Sr, Ba, La, Pb, Bi
PEROVSKITE_B_Z = (22, 25, 26, 28, 41)      # Ti, Mn, Fe, Ni, Nb
SQUARE_BASE_Z = (20, 40)                   # inclusive range of the square lattice's columns
SQUARE_HEAVY_FACTOR = (1.6, 2.5)           # a heavy column's Z over the base Z
EDGE_DOPANT_BIAS = 2.0                     # extra weight per missing neighbour when placing dopants


@dataclass(frozen=True)
class Atoms:
    """Atoms (or atom columns) of one tile, in pm around the tile centre."""

    xy_pm: np.ndarray  # float64 [N, 2]: x, y
    z: np.ndarray      # int64 [N]: atomic number (a column's dominant element)
    heavy: np.ndarray  # bool [N]: belongs to the heavy class (class 2 when n_classes = 2)
    count: np.ndarray | None = None  # float [N]: atoms per projected column (None: one each)


def make_atoms(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Atoms:
    """Atoms of `cfg.lattice` covering a disc of `radius_pm`, randomly rotated, mirrored and shifted."""
    return _MAKERS[cfg.lattice](rng, cfg, radius_pm)


def _graphene(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Atoms:
    a = CC_BOND_PM * np.sqrt(3.0)
    cell = np.array([[a, 0.0], [a / 2, a * np.sqrt(3.0) / 2]])
    basis = np.array([[0.0, 0.0], [a / 2, a * np.sqrt(3.0) / 6]])
    xy, _ = lattice_sites(rng, cfg, cell, basis, radius_pm)
    xy = remove_clustered(rng, cfg, xy)
    coordination = count_neighbours(xy, 1.25 * CC_BOND_PM)
    xy, coordination = xy[coordination > 0], coordination[coordination > 0]  # lone atoms leave
    z = np.full(len(xy), CARBON_Z, dtype=np.int64)
    frac = rng.uniform(*cfg.dopant_fraction_range)
    weight = 1.0 + EDGE_DOPANT_BIAS * np.clip(3 - coordination, 0, 3)   # dopants like edges
    sites = _pick_sites(rng, frac, weight)
    z[sites] = rng.choice(np.asarray(cfg.dopant_z, dtype=np.int64), size=len(sites))
    xy = xy + rng.normal(0.0, rng.uniform(*cfg.jitter_pm_range), xy.shape)
    return Atoms(xy, z, z >= cfg.heavy_z_min)


def _square(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Atoms:
    a = rng.uniform(*cfg.square_a_pm_range)
    xy, _ = lattice_sites(rng, cfg, np.diag([a, a]), np.zeros((1, 2)), radius_pm)
    base_z = int(rng.integers(SQUARE_BASE_Z[0], SQUARE_BASE_Z[1] + 1))
    z = np.full(len(xy), base_z, dtype=np.int64)
    sites = _pick_sites(rng, rng.uniform(*cfg.dopant_fraction_range), np.ones(len(xy)))
    z[sites] = np.rint(base_z * rng.uniform(*SQUARE_HEAVY_FACTOR, size=len(sites)))
    heavy = np.zeros(len(xy), dtype=bool)
    heavy[sites] = True
    xy = xy + rng.normal(0.0, rng.uniform(*cfg.displacement_pm_range), xy.shape)
    return Atoms(xy, z, heavy)


def _perovskite(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Atoms:
    """ABO3 along [001]: A columns on the corners, B(-O) columns in the centres; O-only columns
    are too faint in HAADF to be labelled and are left out."""
    a = rng.uniform(*cfg.perovskite_a_pm_range)
    xy, kind = lattice_sites(rng, cfg, np.diag([a, a]), np.array([[0.0, 0.0], [a / 2, a / 2]]),
                             radius_pm)
    z_ab = np.array([rng.choice(PEROVSKITE_A_Z), rng.choice(PEROVSKITE_B_Z)], dtype=np.int64)
    shift_b = rng.normal(0.0, cfg.displacement_pm_range[1] / 2, 2)    # polar off-centring of B
    xy = xy + (kind == 1)[:, None] * shift_b
    xy = xy + rng.normal(0.0, rng.uniform(*cfg.displacement_pm_range), xy.shape)
    return Atoms(xy, z_ab[kind], kind == int(np.argmax(z_ab)))


_MAKERS: dict[str, Callable[[np.random.Generator, SynthConfig, float], Atoms]] = {
    "graphene": _graphene, "square": _square, "perovskite": _perovskite,
}


def lattice_sites(rng: np.random.Generator, cfg: SynthConfig, cell: np.ndarray,
                  basis: np.ndarray, radius_pm: float) -> tuple[np.ndarray, np.ndarray]:
    """Sites of a crystal (cell rows a1, a2 and Cartesian basis [B, 2], in pm) inside a disc of
    `radius_pm`, after a random shift, mirror, rotation and small affine distortion.
    Returns xy [N, 2] and each site's basis index [N]."""
    height = abs(np.linalg.det(cell)) / np.linalg.norm(cell, axis=1).max()
    n = int(np.ceil(radius_pm / height)) + 2
    ij = np.stack(np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1)), -1).reshape(-1, 2)
    origins = (ij + rng.random(2)) @ cell
    xy = (origins[:, None, :] + basis[None]).reshape(-1, 2)
    kind = np.tile(np.arange(len(basis)), len(origins))
    theta = rng.uniform(0.0, 2 * np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    mirror = np.diag([rng.choice([-1.0, 1.0]), 1.0])
    warp = np.eye(2) + rng.uniform(-cfg.distortion_max, cfg.distortion_max, (2, 2))
    xy = xy @ (warp @ rot @ mirror).T
    keep = np.einsum("ij,ij->i", xy, xy) <= radius_pm**2
    return xy[keep], kind[keep]


def remove_clustered(rng: np.random.Generator, cfg: SynthConfig, xy: np.ndarray) -> np.ndarray:
    """Remove a random fraction of the atoms as if one by one: each atom's turn comes from a mix of
    a smooth random field (holes, edges) and white noise (point vacancies), mixed per tile."""
    n_remove = round(rng.uniform(*cfg.removed_fraction_range) * len(xy))
    if n_remove == 0:
        return xy
    clustering = rng.random()
    field = smooth_field(rng, xy, rng.uniform(*cfg.hole_length_pm_range))
    turn = clustering * field + (1.0 - clustering) * rng.standard_normal(len(xy))
    keep = np.sort(np.argsort(turn)[: len(xy) - n_remove])
    return xy[keep]


def smooth_field(rng: np.random.Generator, xy: np.ndarray, length_pm: float,
                 n_modes: int = 32) -> np.ndarray:
    """A unit-variance Gaussian random field with correlation length `length_pm`, at points xy
    (random Fourier features of a squared-exponential kernel)."""
    k = rng.normal(0.0, 1.0 / length_pm, (n_modes, 2))
    phase = rng.uniform(0.0, 2 * np.pi, n_modes)
    return np.cos(xy @ k.T + phase).sum(axis=1) * np.sqrt(2.0 / n_modes)


def count_neighbours(xy: np.ndarray, within_pm: float) -> np.ndarray:
    """How many other atoms lie within `within_pm` of each atom."""
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    return cKDTree(xy).query_ball_point(xy, within_pm, return_length=True) - 1


def _pick_sites(rng: np.random.Generator, fraction: float, weight: np.ndarray) -> np.ndarray:
    """Indices of about `fraction` of the sites, drawn without replacement in proportion to weight."""
    n_pick = min(int(rng.binomial(len(weight), fraction)), len(weight))
    if n_pick == 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(len(weight), size=n_pick, replace=False, p=weight / weight.sum())
