"""Case (a): a drifting graphene + Si movie in five segments of imaging drift, and its file.

The sample (fixed in its own coordinates, drifting under the beam): graphene with ~1 % single
vacancies, a hole that grows from ~150 to ~750 pm radius, a 2D amorphous carbon patch (its atoms
ARE atoms in the truth), 6 Si sites of which 4-6 are occupied per frame, and hydrocarbon
contamination blobs (3D amorphous C/N on top; the atoms under them stay truth), one of them thick.

Segments (8 frames each, 40 frames, 256 x 256 px at 15 pm/px, 60 kV, 32 mrad):
  clean        good focus, 40 counts per carbon peak
  aberrations  defocus 0.5 -> 3.5 nm, two-fold astigmatism 0.2 -> 1.5 nm, coma 0 -> 400 nm
  dose         40 -> 3 counts per carbon peak
  gain_offset  gain and offset jump every two frames, read noise grows
  scan_jitter  per-line jitter 0.2 -> 1.2 px, line glitches, drift shear, detector lag

File (`save_movie` / `load_movie`, numpy .npz, no pickles):
  frames         float32 [T, H, W]  detector values (ADU, integers, 16-bit range)
  truth_xy       float32 [N, 2]     (x = column, y = row) px, all frames concatenated
  truth_cls      uint8   [N]        0 = carbon (lattice, amorphous), 1 = Si (impurity)
  truth_offsets  int64   [T + 1]    frame t's atoms are rows truth_offsets[t]:truth_offsets[t+1]
  pixel_size_pm  float64 []         15.0
  segment        str     [T]        segment name per frame
  conditions     float64 [T, K] and condition_names str [K]: defocus_nm, astig_nm, coma_nm, ...
  seed           int64   []
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.evaluation import frames as fr
from benchmarks.evaluation import optics
from benchmarks.evaluation import samples as sm

SEGMENTS = ("clean", "aberrations", "dose", "gain_offset", "scan_jitter")
FRAMES_PER_SEGMENT = 8
N_FRAMES = len(SEGMENTS) * FRAMES_PER_SEGMENT
PIXEL_PM = 15.0
SHAPE = (256, 256)
DRIFT_PM_PER_FRAME = np.array([11.0, -7.0])


@dataclass
class Sheet:
    """The movie's sample in its own coordinates (pm)."""

    carbon: np.ndarray
    si_sites: np.ndarray          # [6, 2]
    hole_centre: np.ndarray
    hole_phases: np.ndarray
    contamination: tuple          # (xy, z)
    drift_pm: np.ndarray          # [T, 2]


def build_sheet(seed: int) -> Sheet:
    rng = np.random.default_rng(seed)
    half_fov = SHAPE[0] * PIXEL_PM / 2
    half = half_fov + 700.0
    c = sm.graphene(half, rng.uniform(0, np.pi / 3), rng.uniform(0, 300, 2))
    c = c[rng.random(len(c)) > 0.01]                                   # single vacancies
    fov = 0.5 * half_fov
    theta = rng.uniform(0, 2 * np.pi) + np.array([0.0, 2.1, 4.2])    # hole, patch, thick blob
    hole_centre, patch_centre, blob_centre = (fov * np.array([np.cos(t), np.sin(t)])
                                              for t in theta)
    axes_pm = np.array([750.0, 520.0])
    in_patch = np.hypot(*((c - patch_centre) / axes_pm).T) < 1
    patch = sm.poisson_disc(rng, lambda p: np.hypot(*((p - patch_centre) / axes_pm).T) < 1,
                            tuple(zip(patch_centre - axes_pm, patch_centre + axes_pm)),
                            128.0, int(in_patch.sum()))
    c = np.vstack([c[~in_patch], patch])
    far = (np.hypot(*(c - hole_centre).T) > 1000) & (np.hypot(*(c - patch_centre).T) > 700) \
        & np.all(np.abs(c) < half_fov - 500, axis=1)
    si_idx = rng.choice(np.flatnonzero(far), 6, replace=False)
    si = c[si_idx]
    c = np.delete(c, si_idx, axis=0)
    blobs = np.array([blob_centre, *(_away(rng, [hole_centre, patch_centre], 1300, 1.6 * fov)
                                     for _ in range(2))])
    env = sm.blob_envelope(blobs, np.r_[rng.uniform(250, 350), rng.uniform(150, 300, 2)],
                           np.array([2.0, 0.8, 0.5]))
    contamination = sm.film(rng, half, 120.0, env)
    steps = rng.normal(0, 3.0, (N_FRAMES, 2)) + DRIFT_PM_PER_FRAME
    drift = np.cumsum(steps, axis=0) - steps[0]
    return Sheet(c, si, hole_centre, rng.uniform(0, 2 * np.pi, 3), contamination, drift)


def _away(rng, others, min_pm, half) -> np.ndarray:
    for _ in range(1000):
        p = rng.uniform(-half, half, 2)
        if all(np.hypot(*(p - o)) > min_pm for o in others):
            return p
    return p


def sample_at(sheet: Sheet, t: int, rng: np.random.Generator) -> fr.Sample:
    """The sample under the beam at frame t: hole grown, Si occupied, drifted, thermal jitter."""
    radius = 150.0 + 600.0 * t / (N_FRAMES - 1)
    carbon = sheet.carbon[~sm.rough_disc(sheet.carbon, sheet.hole_centre, radius,
                                         sheet.hole_phases)]
    n_si = int(rng.integers(4, 7))
    xy = np.vstack([carbon, sheet.si_sites[:n_si]])
    z = np.r_[np.full(len(carbon), sm.CARBON_Z), np.full(n_si, sm.SILICON_Z)]
    cls = (z >= 14).astype(np.uint8)
    shift = sheet.drift_pm[t]
    xy = xy + shift + rng.normal(0, 4.0, xy.shape)
    cont_xy, cont_z = sheet.contamination
    return fr.Sample(xy, z, cls, clutter=[(cont_xy + shift, cont_z)])


def conditions_at(t: int, rng: np.random.Generator):
    """(segment, Optics, Scan, Detector) of frame t."""
    seg_i, k = divmod(t, FRAMES_PER_SEGMENT)
    u = k / (FRAMES_PER_SEGMENT - 1)
    seg = SEGMENTS[seg_i]
    optic = optics.Optics(kv=60.0, aperture_mrad=32.0, defocus_nm=rng.normal(0, 0.3),
                          astig_nm=0.15, astig_deg=35.0, source_pm=22.0)
    scan, det = optics.Scan(jitter_px=0.05), optics.Detector(dose=40.0, gain=20.0, offset=500.0)
    if seg == "aberrations":
        optic = optics.Optics(kv=60.0, aperture_mrad=32.0, defocus_nm=0.5 + 3.0 * u,
                              astig_nm=0.2 + 1.3 * u, astig_deg=35.0, coma_nm=400.0 * u,
                              coma_deg=120.0, source_pm=22.0)
    elif seg == "dose":
        det = optics.Detector(dose=40.0 * (3.0 / 40.0) ** u, gain=20.0, offset=500.0)
    elif seg == "gain_offset":
        gains, offs = (20.0, 65.0, 7.0, 35.0), (500.0, 3500.0, 80.0, 1800.0)
        det = optics.Detector(dose=40.0, gain=gains[k // 2], offset=offs[k // 2],
                              read_noise=10.0 + 40.0 * u)
    elif seg == "scan_jitter":
        scan = optics.Scan(jitter_px=0.2 + 1.0 * u, glitch_rate=0.03 * u, glitch_px=4.0,
                           shear=0.03 * u, scale_y=1.0 - 0.03 * u)
        det = optics.Detector(dose=40.0, gain=20.0, offset=500.0, lag=0.25 * u)
    return seg, optic, scan, det


def make_movie(seed: int, indices=None) -> list[fr.Frame]:
    """Frames `indices` (default all 40) of the movie with this seed."""
    sheet = build_sheet(seed)
    out = []
    for t in range(N_FRAMES) if indices is None else indices:
        rng = np.random.default_rng([seed, t])
        seg, optic, scan, det = conditions_at(t, rng)
        sample = sample_at(sheet, t, rng)
        img, xy, cls = fr.image_sample(rng, sample, SHAPE, PIXEL_PM, optic, scan, det,
                                       gradient_c=0.3)
        out.append(fr.Frame("drift_movie", seg, t, img, PIXEL_PM, xy, cls, sm.CC_BOND_PM,
                            conditions=fr.condition_dict(optic, scan, det)))
    return out


def save_movie(path: Path, movie: list[fr.Frame], seed: int) -> None:
    names = sorted(movie[0].conditions)
    counts = [len(f.xy) for f in movie]
    np.savez_compressed(
        path, frames=np.stack([f.image for f in movie]).astype(np.float32),
        truth_xy=np.concatenate([f.xy for f in movie]).astype(np.float32),
        truth_cls=np.concatenate([f.cls for f in movie]).astype(np.uint8),
        truth_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
        pixel_size_pm=np.float64(movie[0].pixel_size_pm),
        segment=np.array([f.segment for f in movie]),
        conditions=np.array([[f.conditions[n] for n in names] for f in movie], np.float64),
        condition_names=np.array(names), frame_index=np.array([f.index for f in movie]),
        seed=np.int64(seed))


def load_movie(path: Path) -> list[fr.Frame]:
    """Frames with truth from a movie file written by `save_movie`."""
    with np.load(path, allow_pickle=False) as z:
        off, names = z["truth_offsets"], [str(n) for n in z["condition_names"]]
        return [fr.Frame("drift_movie", str(z["segment"][t]), int(z["frame_index"][t]),
                         z["frames"][t], float(z["pixel_size_pm"]),
                         z["truth_xy"][off[t]:off[t + 1]], z["truth_cls"][off[t]:off[t + 1]],
                         sm.CC_BOND_PM, conditions=dict(zip(names, z["conditions"][t])))
                for t in range(len(z["frames"]))]
