"""Cases (b)-(e) with truth; case (a), the drift movie, is `movie`.

(b) heavy_atoms: single Pt-like atoms (Z = 78) and small clusters on a 3D amorphous C/N
    support of varying thickness, 200 kV, at 20, 30 and 40 pm/px. Support atoms are not resolved
    (hundreds per nm^2 in projection) and are not truth; every Pt atom is.
(c) nanoparticle: an fcc Pt particle seen along [100] (columns a/2 = 196 pm apart, intensity
    Z^n N^0.85 with N atoms per column from the particle's thickness) on an amorphous support,
    with a few single atoms around it, 13 pm/px.
(d) perovskite: SrTiO3-like along [001] (a = 390.5 pm) with a thickness wedge (15-40 unit
    cells): Sr columns heavy (class 1), Ti-O columns light (class 0), O-only columns rendered but
    too faint to be truth, and 3-4 Sr columns partly substituted by Bi (heavier, class 1), 12 pm/px.
(f) compound: a MoS2-like monolayer (Mo heavy, class 1; S2 columns light, class 0; a few S
    vacancies), 60 kV, 15 pm/px, with scan jitter and detector lag along the fast scan; segment
    "MoS2" as scanned, "MoS2 turned" the same kind of frame turned by 90 degrees after the scan
    (the fast scan then runs down the columns), truth turned with it.
(e) ood: frames a scientist would not want atoms from: noise only, vacuum, an amorphous film
    only, and a graphene lattice recorded at 3x the model's largest pixel size.
"""
from __future__ import annotations

import numpy as np

from benchmarks.evaluation import frames as fr
from benchmarks.evaluation import optics
from benchmarks.evaluation import samples as sm

HEAVY_PIXEL_PM = (20.0, 30.0, 40.0)
OOD_KINDS = ("noise", "vacuum", "film", "lattice_3x")
OPTICS_200KV = optics.Optics(kv=200.0, aperture_mrad=25.0, cs_um=2.0, source_pm=20.0,
                             object_pm=8.0)


def _support(rng, half_pm: float, density: float) -> tuple[np.ndarray, np.ndarray]:
    """Amorphous support with smooth thickness variations (x0.5 .. x1.7 of `density`)."""
    centres = rng.uniform(-half_pm, half_pm, (6, 2))
    bumps = sm.blob_envelope(centres, rng.uniform(300, 900, 6), rng.uniform(-0.5, 0.7, 6))
    return sm.film(rng, half_pm + 400, density, lambda xy: np.clip(1 + bumps(xy), 0.3, None))


def _frame(case, segment, index, rng, sample, shape, pixel_pm, optic, scan, det, spacing_pm,
           in_distribution=True, **background) -> fr.Frame:
    img, xy, cls = fr.image_sample(rng, sample, shape, pixel_pm, optic, scan, det, **background)
    return fr.Frame(case, segment, index, img, pixel_pm, xy, cls, spacing_pm, in_distribution,
                    fr.condition_dict(optic, scan, det))


def heavy_atoms(seed: int, pixel_pm: float, index: int, shape=(192, 192)) -> fr.Frame:
    rng = np.random.default_rng([seed, int(pixel_pm), index])
    half = shape[0] * pixel_pm / 2
    area_nm2 = (2 * half / 1e3) ** 2
    n_clusters = max(1, round(area_nm2 / 18))
    centres = sm.spaced_points(rng, n_clusters, half - 300, 1200.0)
    clusters = [sm.cluster(rng, c, int(rng.integers(3, 8))) for c in centres]
    heavy = np.vstack(clusters) if clusters else np.empty((0, 2))
    singles = sm.spaced_points(rng, round(0.35 * area_nm2), half, 450.0, avoid=heavy)
    xy = np.vstack([heavy, singles]) + rng.normal(0, 5.0, (len(heavy) + len(singles), 2))
    sample = fr.Sample(xy, np.full(len(xy), sm.PT_Z), np.ones(len(xy), np.uint8),
                       clutter=[_support(rng, half, rng.uniform(400, 900))])
    optic = optics.Optics(**{**OPTICS_200KV.__dict__, "defocus_nm": rng.normal(0, 1.0),
                             "astig_nm": rng.uniform(0, 0.8), "astig_deg": rng.uniform(0, 180)})
    det = optics.Detector(dose=rng.uniform(0.8, 1.6), gain=rng.uniform(15, 40),
                          offset=rng.uniform(200, 1500), read_noise=rng.uniform(5, 20))
    scan = optics.Scan(jitter_px=rng.uniform(0.05, 0.3), shear=rng.uniform(-0.01, 0.01))
    return _frame("heavy_atoms", f"{pixel_pm:.0f}pm", index, rng, sample, shape, pixel_pm,
                  optic, scan, det, sm.PT_NN_PM, gradient_c=rng.uniform(0, 20))


def nanoparticle(seed: int, index: int, shape=(256, 256), pixel_pm: float = 13.0) -> fr.Frame:
    rng = np.random.default_rng([seed, 13, index])
    half = shape[0] * pixel_pm / 2
    cols, n_atoms = sm.fcc100_particle(rng, rng.uniform(0.45, 0.6) * half, rng.uniform(0, np.pi))
    cols = cols + rng.uniform(-0.15, 0.15, 2) * half
    singles = sm.spaced_points(rng, 4, half, 400.0, avoid=cols)
    singles = singles[np.min(np.hypot(*(singles[:, None] - cols[None]).T), axis=0) > 400] \
        if len(cols) else singles
    xy = np.vstack([cols, singles]) + rng.normal(0, 4.0, (len(cols) + len(singles), 2))
    n = np.r_[n_atoms, np.ones(len(singles), int)]
    sample = fr.Sample(xy, np.full(len(xy), sm.PT_Z), np.ones(len(xy), np.uint8), n,
                       clutter=[_support(rng, half, 500.0)])
    optic = optics.Optics(**{**OPTICS_200KV.__dict__, "defocus_nm": rng.normal(0, 0.8)})
    det = optics.Detector(dose=rng.uniform(1.0, 3.0), gain=25.0, offset=800.0, read_noise=12.0)
    return _frame("nanoparticle", "fcc100", index, rng, sample, shape, pixel_pm, optic,
                  optics.Scan(jitter_px=0.15), det, sm.PT_FCC_A_PM / 2)


def perovskite(seed: int, index: int, shape=(256, 256), pixel_pm: float = 12.0) -> fr.Frame:
    rng = np.random.default_rng([seed, 3, index])
    half = shape[0] * pixel_pm / 2 + 200
    a = 390.5
    xy, kind = sm.perovskite_columns(half, a, rng.uniform(0, np.pi / 2), rng.uniform(0, a, 2))
    wedge = np.interp(xy[:, 0], [-half, half], rng.permutation([15.0, 40.0]))
    z_a, z_b, z_o, z_sub = 38, 22, sm.OXYGEN_Z, 83
    w = np.select([kind == 0, kind == 1], [optics.atom_weight(z_a, wedge),
                  (z_b**optics.Z_EXPONENT + z_o**optics.Z_EXPONENT) * wedge**optics.THICKNESS_EXPONENT],
                  optics.atom_weight(z_o, wedge))
    a_sites = np.flatnonzero((kind == 0) & np.all(np.abs(xy) < half - 600, axis=1))
    sub = rng.choice(a_sites, int(rng.integers(3, 5)), replace=False)
    frac = rng.uniform(0.3, 0.6, len(sub))
    w[sub] = ((1 - frac) * z_a**optics.Z_EXPONENT + frac * z_sub**optics.Z_EXPONENT) \
        * wedge[sub]**optics.THICKNESS_EXPONENT
    xy = xy + rng.normal(0, 4.0, xy.shape)
    truth = kind < 2
    sample = fr.Sample(xy[truth], np.where(kind[truth] == 0, z_a, z_b),
                       (kind[truth] == 0).astype(np.uint8), extra_weight=w[truth],
                       clutter=[_support(rng, half, 40.0)])
    o_scene = (xy[~truth], w[~truth])
    optic = optics.Optics(**{**OPTICS_200KV.__dict__, "defocus_nm": rng.normal(0, 0.8)})
    det = optics.Detector(dose=rng.uniform(0.2, 0.8), gain=20.0, offset=600.0, read_noise=10.0)
    scan = optics.Scan(jitter_px=0.2, shear=rng.uniform(-0.015, 0.015))
    img, txy, tcls = _image_with_extra(rng, sample, o_scene, shape, pixel_pm, optic, scan, det)
    return fr.Frame("perovskite", "SrTiO3+Bi", index, img, pixel_pm, txy, tcls, a / np.sqrt(2),
                    True, fr.condition_dict(optic, scan, det))


MOS2_A_PM = 316.0


def compound(seed: int, index: int, turned: bool, shape=(192, 192),
             pixel_pm: float = 15.0) -> fr.Frame:
    rng = np.random.default_rng([seed, 5, index, int(turned)])
    half = shape[0] * pixel_pm / 2 + 200
    a = MOS2_A_PM
    cell = np.array([[a, 0.0], [a / 2, a * np.sqrt(3) / 2]])
    basis = np.array([[0.0, 0.0], [a / 2, a / (2 * np.sqrt(3))]])
    xy, kind = sm.crystal(cell, basis, half, rng.uniform(0, np.pi / 3), rng.uniform(0, a, 2))
    n = np.where(kind == 0, 1, np.where(rng.random(len(kind)) < 0.05, 1, 2))  # S vacancies
    sample = fr.Sample(xy + rng.normal(0, 4.0, xy.shape), np.where(kind == 0, 42, 16),
                       (kind == 0).astype(np.uint8), n_per_column=n)
    optic = optics.Optics(kv=60.0, aperture_mrad=32.0, defocus_nm=rng.normal(0, 0.5),
                          astig_nm=0.2, astig_deg=rng.uniform(0, 180), source_pm=22.0)
    det = optics.Detector(dose=rng.uniform(0.5, 3.0), gain=20.0, offset=500.0,
                          read_noise=rng.uniform(10.0, 40.0), lag=rng.uniform(0.1, 0.3))
    scan = optics.Scan(jitter_px=rng.uniform(0.2, 0.6), shear=rng.uniform(-0.02, 0.02))
    img, txy, tcls = fr.image_sample(rng, sample, shape, pixel_pm, optic, scan, det)
    if turned:                         # np.rot90: pixel (row i, col j) -> (W - 1 - j, i)
        img = np.ascontiguousarray(np.rot90(img))
        txy = np.stack([txy[:, 1], shape[1] - 1 - txy[:, 0]], axis=1).astype(np.float32)
    return fr.Frame("compound", "MoS2 turned" if turned else "MoS2", index, img, pixel_pm, txy,
                    tcls, a / np.sqrt(3), True, fr.condition_dict(optic, scan, det))


def _image_with_extra(rng, sample, extra, shape, pixel_pm, optic, scan, det):
    """Like fr.image_sample, with weighted non-truth columns (xy, weight) in the scene."""
    offsets = optics.line_offsets_px(rng, shape[0], scan)
    scene = sample.scene()
    scene.background.append(extra)
    clean = optics.render(scene, optic, shape, pixel_pm, scan, offsets)
    xy = optics.to_pixels(sample.xy_pm, shape, pixel_pm, scan, offsets,
                          optics.image_sigma_pm(optic) / pixel_pm)
    h, w = shape
    inside = (xy[:, 0] > -0.5) & (xy[:, 0] < w - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < h - 0.5)
    return optics.detect(rng, clean, det), xy[inside].astype(np.float32), \
        sample.cls[inside].astype(np.uint8)


def ood(seed: int, kind: str, index: int, max_pixel_pm: float = 20.0) -> fr.Frame:
    """An out-of-distribution frame; `max_pixel_pm`: the model's largest pixel size (manifest)."""
    rng = np.random.default_rng([seed, OOD_KINDS.index(kind), index])
    empty = fr.Sample(np.empty((0, 2)), np.empty(0, int), np.empty(0, np.uint8))
    shape, pixel_pm, spacing = (192, 192), 15.0, sm.CC_BOND_PM
    optic, scan = optics.Optics(), optics.Scan(jitter_px=0.1)
    det = optics.Detector(dose=40.0, gain=20.0, offset=500.0, read_noise=10.0)
    bg = {}
    if kind == "noise":
        bg = {"background_c": rng.uniform(0.2, 3.0)}
    elif kind == "vacuum":
        det = optics.Detector(dose=40.0, gain=20.0, offset=500.0, read_noise=rng.uniform(3, 15))
        bg = {"background_c": 0.002}
    elif kind == "film":
        half = shape[0] * pixel_pm / 2
        empty.clutter.append(_support(rng, half, rng.uniform(100, 300)))
    elif kind == "lattice_3x":
        pixel_pm, shape = 3 * max_pixel_pm, (128, 128)
        half = shape[0] * pixel_pm / 2 + 300
        c = sm.graphene(half, rng.uniform(0, np.pi), rng.uniform(0, 300, 2))
        z = np.where(rng.random(len(c)) < 0.01, sm.SILICON_Z, sm.CARBON_Z)
        empty = fr.Sample(c + rng.normal(0, 4.0, c.shape), z, (z >= 14).astype(np.uint8))
    else:
        raise ValueError(f"unknown OOD kind {kind!r} (known: {OOD_KINDS})")
    return _frame("ood", kind, index, rng, empty, shape, pixel_pm, optic, scan, det, spacing,
                  in_distribution=False, **bg)
