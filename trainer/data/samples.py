"""Scenes of the physical training world (`SynthConfig.imaging == "probe"`): what lies under the beam.

A `Scene` is the labelled atoms (or projected atom columns, with their number of atoms) plus an
unlabelled amorphous carbon density (a support film, contamination) that the renderer turns into
shot-noise-like texture. Scenes: monolayers at any rotation (graphene, hBN, MoS2-like) with
vacancies, holes, edges, dopants and monolayer amorphous patches (atoms, labelled); projected
cubic and perovskite columns with thickness (a wedge); single heavy atoms and small clusters on an
amorphous support (with holes); a heavy-metal nanoparticle on a support; vacuum.

Classes: class 2 (`impurity`, "heavier atom") is an atom with Z >= `heavy_z_min` on a light host
(graphene, hBN, supports: all single atoms and particles), or the heavier sublattice / heavy
substitution in a compound crystal (perovskite A or B, MoS2's Mo/W, the square lattice's heavy
columns), as in the legacy generator. numpy and scipy only; positions in pm around the tile centre.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from trainer.data.config import SynthConfig
from trainer.data.lattice import (Atoms, _graphene, _perovskite, _square, count_neighbours,
                                  lattice_sites, remove_clustered)

CARBON_Z = 6
SINGLE_ATOM_Z = (26, 28, 29, 46, 47, 72, 74, 77, 78, 79)   # Fe Ni Cu Pd Ag Hf W Ir Pt Au
PARTICLE_FCC_A_PM = {28: 352.0, 29: 361.0, 46: 389.0, 47: 409.0, 77: 384.0, 78: 392.0, 79: 408.0}
HBN_BOND_PM, MOS2_A_PM = 145.0, 316.0

Density = Callable[[np.ndarray], np.ndarray]    # xy_pm [N, 2] -> unlabelled C atoms per nm²


@dataclass(frozen=True)
class Scene:
    name: str
    atoms: Atoms                  # labelled atoms / columns
    ref_z: int                    # the scene's light reference (dose = counts at its peak) ...
    ref_count: float              # ... and its atoms per column
    support: Density | None       # unlabelled amorphous carbon, atoms per nm² (None: none)


def make_scene(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Scene:
    weights = np.asarray(cfg.scene_weights, dtype=np.float64)
    name = cfg.scenes[rng.choice(len(cfg.scenes), p=weights / weights.sum())]
    scene = _SCENES[name](rng, cfg, radius_pm)
    if name != "vacuum" and rng.random() < cfg.contamination_prob:
        scene = Scene(scene.name, scene.atoms, scene.ref_z, scene.ref_count,
                      _plus(scene.support, _contamination(rng, cfg, radius_pm)))
    return scene


def field_fn(rng: np.random.Generator, length_pm: float, n_modes: int = 32) -> Density:
    """A unit-variance smooth random field (correlation length `length_pm`) as a function of xy."""
    k = rng.normal(0.0, 1.0 / length_pm, (n_modes, 2))
    phase = rng.uniform(0.0, 2 * np.pi, n_modes)
    return lambda xy: np.cos(np.asarray(xy) @ k.T + phase).sum(axis=1) * np.sqrt(2.0 / n_modes)


def _plus(a: Density | None, b: Density) -> Density:
    return b if a is None else (lambda xy: a(xy) + b(xy))


def _contamination(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float) -> Density:
    """Patchy hydrocarbon: amorphous carbon where a smooth field exceeds a threshold."""
    field = field_fn(rng, rng.uniform(0.15, 0.6) * max(radius_pm, 300.0))
    threshold, density = rng.uniform(-0.5, 1.5), _log_u(rng, cfg.contamination_density_range)
    return lambda xy: density * np.clip(field(xy) - threshold, 0.0, 1.0)


def _support(rng: np.random.Generator, cfg: SynthConfig, radius_pm: float
             ) -> tuple[Density, Callable[[np.ndarray], np.ndarray]]:
    """An amorphous film with smooth thickness variation and, sometimes, holes; returns the density
    and a function telling where there is film (atoms cannot sit in the holes)."""
    density = _log_u(rng, cfg.support_density_range)
    thickness = field_fn(rng, rng.uniform(0.3, 1.0) * max(radius_pm, 300.0))
    holes = field_fn(rng, rng.uniform(0.2, 0.6) * max(radius_pm, 300.0))
    cut = rng.uniform(-2.5, 0.5) if rng.random() < 0.3 else -np.inf

    def film(xy):
        return np.clip((holes(xy) - cut) / 0.3, 0.0, 1.0)
    return (lambda xy: density * np.exp(0.3 * thickness(xy)) * film(xy)), film


def _log_u(rng: np.random.Generator, bounds) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


# ----------------------------------------------------------------------------- monolayers


def _amorphise(rng: np.random.Generator, cfg: SynthConfig, atoms: Atoms, bond_pm: float) -> Atoms:
    """Sometimes turn a smooth region into a monolayer amorphous patch: atoms displaced by ~a third
    of a bond, the closest pairs thinned out. They stay atoms (labelled)."""
    xy = atoms.xy_pm
    if len(xy) < 4 or rng.random() >= cfg.amorphous_prob:
        return atoms
    field = field_fn(rng, rng.uniform(2.0, 6.0) * bond_pm)(xy)
    patch = field > np.quantile(field, 1.0 - rng.uniform(0.1, 0.6))
    xy = xy + patch[:, None] * rng.normal(0.0, 0.35 * bond_pm, xy.shape)
    keep = np.ones(len(xy), dtype=bool)
    for i, j in cKDTree(xy).query_pairs(0.75 * bond_pm, output_type="ndarray"):
        if keep[i] and patch[j]:
            keep[j] = False
    count = None if atoms.count is None else atoms.count[keep]
    return Atoms(xy[keep], atoms.z[keep], atoms.heavy[keep], count)


def _graphene_scene(rng, cfg, radius_pm) -> Scene:
    atoms = _amorphise(rng, cfg, _graphene(rng, cfg, radius_pm), 142.0)
    return Scene("graphene", atoms, CARBON_Z, 1.0, None)


def _honeycomb(rng, cfg, bond_pm, radius_pm):
    a = bond_pm * np.sqrt(3.0)
    cell = np.array([[a, 0.0], [a / 2, a * np.sqrt(3.0) / 2]])
    basis = np.array([[0.0, 0.0], [a / 2, a * np.sqrt(3.0) / 6]])
    return lattice_sites(rng, cfg, cell, basis, radius_pm)


def _hbn_scene(rng, cfg, radius_pm) -> Scene:
    xy, kind = _honeycomb(rng, cfg, HBN_BOND_PM, radius_pm)
    z = np.where(kind == 0, 5, 7).astype(np.int64)
    kept = cKDTree(xy).query(remove_clustered(rng, cfg, xy))[1] if len(xy) else []
    xy, z = xy[kept], z[kept]
    lone = count_neighbours(xy, 1.25 * HBN_BOND_PM) == 0
    xy, z = xy[~lone], z[~lone]
    sites = rng.random(len(z)) < rng.uniform(*cfg.dopant_fraction_range)
    z[sites] = rng.choice(np.asarray(cfg.dopant_z + (6, 8), dtype=np.int64), size=sites.sum())
    xy = xy + rng.normal(0.0, rng.uniform(*cfg.jitter_pm_range), xy.shape)
    atoms = _amorphise(rng, cfg, Atoms(xy, z, z >= cfg.heavy_z_min), HBN_BOND_PM)
    return Scene("hbn", atoms, 5, 1.0, None)


def _mos2_scene(rng, cfg, radius_pm) -> Scene:
    """1H-MoS2 along [001]: Mo columns and S2 columns (two S atoms) on a honeycomb; S vacancies
    leave single S; W substitutes Mo. Mo/W is the heavy class."""
    xy, kind = _honeycomb(rng, cfg, MOS2_A_PM / np.sqrt(3.0), radius_pm)
    z = np.where(kind == 0, 42, 16).astype(np.int64)
    count = np.where(kind == 0, 1.0, 2.0)
    s_vacancy = (kind == 1) & (rng.random(len(z)) < rng.uniform(0.0, 0.15))
    count[s_vacancy] -= rng.choice([1.0, 2.0], size=s_vacancy.sum(), p=[0.8, 0.2])
    w = (kind == 0) & (rng.random(len(z)) < rng.uniform(*cfg.dopant_fraction_range))
    z[w] = 74
    keep = count > 0
    xy, z, count, kind = xy[keep], z[keep], count[keep], kind[keep]
    xy = xy + rng.normal(0.0, rng.uniform(*cfg.jitter_pm_range), xy.shape)
    return Scene("mos2", Atoms(xy, z, kind == 0, count), 16, 2.0, None)


# ----------------------------------------------------------------------------- columns


def _columns_scene(maker, name):
    def scene(rng, cfg, radius_pm) -> Scene:
        atoms = maker(rng, cfg, radius_pm)
        t0 = _log_u(rng, cfg.thickness_range)
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction)
        slope = rng.uniform(*cfg.thickness_gradient_range) / max(radius_pm, 1.0)
        count = np.maximum(1.0, t0 * (1.0 + slope * (atoms.xy_pm @ direction)))
        light = atoms.z[~atoms.heavy].min() if (~atoms.heavy).any() else atoms.z.min(initial=6)
        return Scene(name, Atoms(atoms.xy_pm, atoms.z, atoms.heavy, count), int(light), t0, None)
    return scene


# ----------------------------------------------------------------------------- supports


def _single_atoms_scene(rng, cfg, radius_pm) -> Scene:
    """Heavy single atoms and small clusters (2-8 atoms, 230-290 pm apart) on an amorphous film."""
    support, film = _support(rng, cfg, radius_pm)
    area_nm2 = np.pi * (radius_pm / 1e3) ** 2
    n_seeds = rng.poisson(_log_u(rng, (0.05, 2.0)) * area_nm2)
    seeds = _uniform_disc(rng, n_seeds, radius_pm)
    clustered = rng.random(n_seeds) < rng.uniform(0.0, 0.5)
    points = [seeds[~clustered]]
    for centre in seeds[clustered]:
        points.append(_cluster(rng, centre, int(rng.integers(2, 9))))
    xy = _thin(np.concatenate(points), 200.0)
    xy = xy[film(xy) > 0.5] if len(xy) else xy
    elements = np.asarray(SINGLE_ATOM_Z, dtype=np.int64)
    z = (np.full(len(xy), rng.choice(elements)) if rng.random() < 0.7
         else rng.choice(elements, size=len(xy)))
    return Scene("single_atoms", Atoms(xy, z, np.ones(len(xy), dtype=bool)), CARBON_Z, 1.0, support)


def _nanoparticle_scene(rng, cfg, radius_pm) -> Scene:
    """A roughly spherical fcc particle along [100] (columns a/2 apart, one atom per a of
    thickness) on an amorphous film, sometimes with single atoms of the same metal around it."""
    support, _ = _support(rng, cfg, radius_pm)
    metal = int(rng.choice(list(PARTICLE_FCC_A_PM)))
    a = PARTICLE_FCC_A_PM[metal]
    r_pm = _log_u(rng, (400.0, 2500.0))
    centre = _uniform_disc(rng, 1, 0.6 * radius_pm)[0]
    xy, _ = lattice_sites(rng, cfg, np.diag([a / 2, a / 2]), np.zeros((1, 2)), radius_pm)
    r = np.linalg.norm(xy - centre, axis=1)
    inside = r < r_pm
    xy, count = xy[inside], np.maximum(1.0, np.floor(2 * np.sqrt(r_pm**2 - r[inside] ** 2) / a))
    if rng.random() < 0.5:
        extra = _uniform_disc(rng, rng.poisson(0.3 * np.pi * (radius_pm / 1e3) ** 2), radius_pm)
        extra = extra[np.linalg.norm(extra - centre, axis=1) > r_pm + 250.0]
        xy, count = np.concatenate([xy, extra]), np.concatenate([count, np.ones(len(extra))])
    z = np.full(len(xy), metal, dtype=np.int64)
    return Scene("nanoparticle", Atoms(xy, z, np.ones(len(xy), dtype=bool), count), CARBON_Z, 1.0,
                 support)


def _vacuum_scene(rng, cfg, radius_pm) -> Scene:
    return Scene("vacuum", Atoms(np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, bool)),
                 CARBON_Z, 1.0, None)


def _uniform_disc(rng: np.random.Generator, n: int, radius_pm: float) -> np.ndarray:
    r = radius_pm * np.sqrt(rng.random(n))
    angle = rng.uniform(0.0, 2 * np.pi, n)
    return np.column_stack([r * np.cos(angle), r * np.sin(angle)])


def _cluster(rng: np.random.Generator, centre: np.ndarray, n: int) -> np.ndarray:
    """n atoms grown from `centre`, each 230-290 pm from a random earlier one."""
    xy = [centre]
    for _ in range(n - 1):
        angle, step = rng.uniform(0.0, 2 * np.pi), rng.uniform(230.0, 290.0)
        xy.append(xy[rng.integers(len(xy))] + step * np.array([np.cos(angle), np.sin(angle)]))
    return np.array(xy)


def _thin(xy: np.ndarray, min_pm: float) -> np.ndarray:
    """Drop the later atom of every pair closer than `min_pm`."""
    if len(xy) < 2:
        return xy
    drop = np.zeros(len(xy), dtype=bool)
    for i, j in cKDTree(xy).query_pairs(min_pm, output_type="ndarray"):
        if not drop[i]:
            drop[j] = True
    return xy[~drop]


_SCENES = {
    "graphene": _graphene_scene, "hbn": _hbn_scene, "mos2": _mos2_scene,
    "square": _columns_scene(_square, "square"), "perovskite": _columns_scene(_perovskite, "perovskite"),
    "single_atoms": _single_atoms_scene, "nanoparticle": _nanoparticle_scene, "vacuum": _vacuum_scene,
}
