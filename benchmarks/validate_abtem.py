"""Validate the physical training world's image model (trainer.data.probe / acquire: incoherent
HAADF = Σ Z**n · PSF) against abTEM's multislice HAADF simulation.

Two cases, no noise, no aberrations, static lattice (no frozen phonons):
  1. graphene with one substitutional Si, 60 kV, 30 mrad, HAADF 80-200 mrad;
  2. a Pt atom on graphene (2 Å above a hollow site), 200 kV, 25 mrad, HAADF 70-200 mrad.
Reported for both models: peak ratio heavy / carbon (and the exponent n it implies,
ratio = (Z/6)**n), the heavy atom's FWHM and the carbon peak over the hexagon centre.
Our model is evaluated for several atom widths (object_pm) to show which one matches.

    .venv/bin/python -m benchmarks.validate_abtem [--png docs/img/abtem-validation.png]

abTEM (`pip install abtem`) is NOT a project dependency: without it this prints a note and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

from trainer.data.acquire import render_clean
from trainer.data.config import SynthConfig
from trainer.data.lattice import Atoms
from trainer.data.samples import Scene

PIXEL_PM = 5.0                     # both images are compared on 5 pm grids
OBJECT_PM = (0.0, 10.0, 15.0, 20.0, 25.0)
BEST = (1.85, 10.0)                # (n, object_pm) closest to abTEM here: shown in the picture
CASES = {
    "graphene+Si": dict(kv=60.0, mrad=30.0, inner=80.0, outer=200.0, heavy="Si", z=14,
                        sampling=0.05),
    "Pt on graphene": dict(kv=200.0, mrad=25.0, inner=70.0, outer=200.0, heavy="Pt", z=78,
                           sampling=0.04),
}


def build_atoms(heavy: str):
    """ASE atoms of an orthogonal graphene supercell (0.74 x 0.85 nm) with the heavy atom near the
    centre: substituted (Si) or adsorbed 2 Å above a hollow site (Pt)."""
    import abtem
    from ase import Atom
    from ase.build import graphene

    atoms = abtem.orthogonalize_cell(graphene(a=2.46, vacuum=3.0)) * (3, 2, 1)
    centre = atoms.cell.diagonal()[:2] / 2
    d = np.linalg.norm(atoms.positions[:, :2] - centre, axis=1)
    if heavy == "Si":
        atoms[int(np.argmin(d))].symbol = "Si"
    else:
        nearest = atoms.positions[np.argsort(d)[:6], :2].mean(axis=0)   # a hexagon's centre
        atoms.append(Atom("Pt", (*nearest, atoms.positions[:, 2].max() + 2.0)))
    return atoms


def abtem_image(atoms, case: dict) -> np.ndarray:
    """HAADF image over the periodic cell, Fourier-interpolated to PIXEL_PM."""
    import abtem

    abtem.config.set({"device": "cpu", "fft": "fftw" if _has("pyfftw") else "numpy"})
    potential = abtem.Potential(atoms, sampling=case["sampling"], projection="infinite",
                                slice_thickness=1.0)
    probe = abtem.Probe(energy=case["kv"] * 1e3, semiangle_cutoff=case["mrad"])
    probe.grid.match(potential)
    scan = abtem.GridScan(start=(0, 0), end=(1, 1), fractional=True, potential=potential,
                          sampling=0.25, endpoint=False)
    detector = abtem.AnnularDetector(inner=case["inner"], outer=case["outer"])
    measurement = probe.scan(potential, scan=scan, detectors=detector).compute()
    return np.asarray(measurement.interpolate(PIXEL_PM / 100.0).array, dtype=np.float64).T


def our_image(atoms, case: dict, object_pm: float, shape: tuple[int, int],
              n: float = 1.7) -> np.ndarray:
    """Our model of the same atoms (periodic images included), on the same grid, light peak = 1."""
    cell = atoms.cell.diagonal()[:2] * 100.0                          # pm
    xy = atoms.positions[:, :2] * 100.0
    z = atoms.numbers.astype(np.int64)
    shifts = np.array([[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)]) * cell
    xy = (xy[None] + shifts[:, None]).reshape(-1, 2)
    z = np.tile(z, len(shifts))
    size = 8 * int(np.ceil(max(shape) / 8))
    # tile pixel (0, 0) sits at cell position (0, 0): put the tile centre at ((size-1)/2) px
    xy_c = xy - (size - 1) / 2.0 * PIXEL_PM
    scene = Scene("validation", Atoms(xy_c, z, z > 6), 6, 1.0, None)
    cfg = replace(SynthConfig.physical().without_noise(), voltages_kv=(case["kv"],),
                  aperture_mrad_range=(case["mrad"],) * 2, defocus_nm_range=(1e-6, 1e-6),
                  astigmatism_nm_range=(1e-6, 1e-6), coma_nm_range=(1e-6, 1e-6),
                  cs_um_range=(0.0, 0.0), focus_drift_nm_range=(0.0, 0.0), drift_max=0.0,
                  source_pm_range=(0.0, 0.0), object_pm_range=(object_pm, object_pm),
                  z_exponent_range=(n, n), channelling_range=(1.0, 1.0))
    image, _ = render_clean(np.random.default_rng(0), cfg, scene, PIXEL_PM, size)
    return image[: shape[0], : shape[1]]


def metrics(image: np.ndarray, atoms, heavy_z: int) -> dict:
    """Peak heights at the atoms (max within 30 pm), heavy / median carbon, heavy FWHM (radial
    profile above the level 250-350 pm away), carbon peak / hexagon-centre minimum."""
    xy_px = atoms.positions[:, :2] * 100.0 / PIXEL_PM                 # (x, y) = (col, row)
    rows, cols = np.mgrid[: image.shape[0], : image.shape[1]]

    def near(p, r_pm):
        return np.hypot(cols - p[0], rows - p[1]) * PIXEL_PM <= r_pm
    inner = np.all((xy_px > 8) & (xy_px < np.array(image.shape[::-1]) - 8), axis=1)
    peaks = np.array([image[near(p, 30.0)].max() for p in xy_px])
    carbon = np.median(peaks[(atoms.numbers == 6) & inner])
    k = int(np.flatnonzero(atoms.numbers == heavy_z)[0])
    ratio = peaks[k] / carbon
    r = np.hypot(cols - xy_px[k, 0], rows - xy_px[k, 1]) * PIXEL_PM
    level = np.median(image[(r > 250) & (r < 350)])
    radii = np.arange(0.0, 200.0, 2.5)
    profile = np.array([image[(r >= a) & (r < a + 2.5)].mean() for a in radii])
    half = level + (profile[0] - level) / 2
    fwhm = 2 * (radii[np.argmax(profile < half)] + 1.25)
    hole = image.min()
    return {"ratio": ratio, "n_eff": np.log(ratio) / np.log(heavy_z / 6.0), "fwhm_pm": fwhm,
            "c_over_hole": carbon / max(hole, 1e-9) if hole > 0 else np.inf}


def _cached(folder, name: str, compute) -> np.ndarray:
    if not folder:
        return compute()
    from pathlib import Path
    path = Path(folder) / (name.replace(" ", "_").replace("+", "_") + ".npy")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, compute())
    return np.load(path)


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", help="write a comparison picture here")
    parser.add_argument("--cache", help="folder to keep abTEM's images in (reused when present)")
    args = parser.parse_args(argv)
    if not _has("abtem"):
        print("abTEM is not installed (pip install abtem): validation skipped.")
        return 0
    rows, pictures = [], []
    for name, case in CASES.items():
        atoms = build_atoms(case["heavy"])
        t0 = time.perf_counter()
        ref = _cached(args.cache, name, lambda: abtem_image(atoms, case))
        took = time.perf_counter() - t0
        m = metrics(ref, atoms, case["z"])
        rows.append((name, f"abTEM multislice ({took:.0f} s)", m))
        for o in OBJECT_PM:
            image = our_image(atoms, case, o, ref.shape)
            rows.append((name, f"ours, n=1.7, object {o:.0f} pm", metrics(image, atoms, case["z"])))
        best = our_image(atoms, case, BEST[1], ref.shape, n=BEST[0])
        rows.append((name, f"ours, n={BEST[0]}, object {BEST[1]:.0f} pm",
                     metrics(best, atoms, case["z"])))
        pictures.append((name, ref, best, atoms))
    print("| case | model | heavy / C peak | n implied | heavy FWHM (pm) | C peak / hexagon centre |")
    print("|---|---|---:|---:|---:|---:|")
    for name, model, m in rows:
        print(f"| {name} | {model} | {m['ratio']:.2f} | {m['n_eff']:.2f} | {m['fwhm_pm']:.0f} | "
              f"{m['c_over_hole']:.2f} |")
    if args.png:
        _picture(pictures, args.png)
        print(f"picture: {args.png}")
    return 0


def _picture(pictures, path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.2 * len(pictures)), layout="constrained")
    axes = fig.subplots(len(pictures), 3, squeeze=False)
    for row, (name, ref, ours, atoms) in zip(axes, pictures):
        for ax, image, title in ((row[0], ref, f"{name}: abTEM HAADF"),
                                 (row[1], ours, f"{name}: ours (n {BEST[0]}, object {BEST[1]:.0f} pm)")):
            ax.imshow(image / image.max(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
        k = int(np.flatnonzero(atoms.numbers > 6)[0])
        y = int(round(atoms.positions[k, 1] * 100 / PIXEL_PM))
        x_pm = np.arange(ref.shape[1]) * PIXEL_PM
        c = np.median([ref[int(round(p[1] * 100 / PIXEL_PM)), int(round(p[0] * 100 / PIXEL_PM))]
                       for p in atoms.positions[atoms.numbers == 6]])
        d = np.median([ours[int(round(p[1] * 100 / PIXEL_PM)), int(round(p[0] * 100 / PIXEL_PM))]
                       for p in atoms.positions[atoms.numbers == 6]])
        row[2].plot(x_pm, ref[y] / c, label="abTEM")
        row[2].plot(x_pm, ours[y] / d, label="ours", ls="--")
        row[2].set(title="line through the heavy atom (÷ carbon peak)", xlabel="x (pm)")
        row[2].legend(fontsize=8)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
