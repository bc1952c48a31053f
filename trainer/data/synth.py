"""Synthetic HAADF-STEM training tiles: images, class masks and atom coordinates.

Owns rendering of
atoms as 2-D Gaussians, the fixed-radius disc masks, the paper's augmentations (crop, zoom, flips
and rotations, Poisson and Gaussian noise, blur, contrast, background), datasets of many tiles
with their `.npz` file format, and a preview picture for humans. Atom positions come from
`trainer.data.lattice`, the configuration (`SynthConfig`) from `trainer.data.config`. numpy, scipy and matplotlib only; deterministic under a seed.
"""
from __future__ import annotations

import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from trainer.data.acquire import PAD_PM, VISIBLE_SNR, acquire, render_clean
from trainer.data.config import SynthConfig
from trainer.data.lattice import make_atoms
from trainer.data.samples import make_scene

DATASET_FORMAT = "elit-synth-dataset"
DATASET_FORMAT_VERSION = "1"
IGNORE = 255          # mask value: neither atom nor background (e.g. an atom the noise hides)


@dataclass
class Sample:
    image: np.ndarray    # float32 [H, W], min-max normalised to [0, 1]
    mask: np.ndarray     # uint8 [H, W]: 0 background, 1..C class, 255 ignore
    xy: np.ndarray       # float32 [N, 2]: x = column, y = row, origin at the top-left pixel centre
    cls: np.ndarray      # uint8 [N], 1..C
    pixel_size_pm: float  # this tile's pixel size (after zoom)


def make_sample(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    """One tile: a random crop of a random lattice at a random zoom, rendered and augmented
    (`imaging="probe"`: a random scene under an aberrated probe, see `_make_physical`)."""
    if cfg.imaging == "probe":
        return _make_physical(rng, cfg)
    zoom = _log_uniform(rng, cfg.zoom_range)
    pixel_pm = cfg.pixel_size_pm / zoom
    sigma_px = rng.uniform(*cfg.sigma_pm_range) / pixel_pm
    size = cfg.size_px
    reach_px = size / np.sqrt(2.0) + 4.0 * sigma_px + cfg.atom_radius_px * zoom + 2.0
    atoms = make_atoms(rng, cfg, reach_px * pixel_pm)
    xy = atoms.xy_pm / pixel_pm + (size - 1) / 2.0
    cls = (1 + atoms.heavy).astype(np.uint8) if cfg.n_classes == 2 else np.ones(len(xy), np.uint8)
    z_ref = atoms.z[~atoms.heavy].min() if (~atoms.heavy).any() else atoms.z.min(initial=1)
    amplitude = (atoms.z / z_ref) ** cfg.z_exponent
    image = _acquire(rng, cfg, render_gaussians(xy, amplitude, sigma_px, size))
    mask = paint_discs(xy, cls, cfg.atom_radius_px * zoom, size)
    inside = np.all((xy >= -0.5) & (xy < size - 0.5), axis=1)
    return Sample(image, mask, xy[inside].astype(np.float32), cls[inside], float(pixel_pm))


def _make_physical(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    """The physical world: scene (trainer.data.samples) -> probe image and detector
    (trainer.data.acquire); masks and coordinates as for the legacy tiles."""
    zoom = _log_uniform(rng, cfg.zoom_range)
    pixel_pm = cfg.pixel_size_pm / zoom
    size = cfg.size_px
    reach_px = size / np.sqrt(2.0) + PAD_PM / pixel_pm + cfg.atom_radius_px * zoom + 2.0
    scene = make_scene(rng, cfg, reach_px * pixel_pm)
    clean, xy = render_clean(rng, cfg, scene, pixel_pm, size)
    image, xy, snr = acquire(rng, cfg, clean, xy, pixel_pm)
    heavy = scene.atoms.heavy
    cls = (1 + heavy).astype(np.uint8) if cfg.n_classes == 2 else np.ones(len(xy), np.uint8)
    seen = snr >= VISIBLE_SNR
    radius_px = cfg.atom_radius_px * zoom
    mask = paint_discs(xy[seen], cls[seen], radius_px, size)
    hidden = paint_discs(xy[~seen], np.ones((~seen).sum(), np.uint8), radius_px, size)
    mask[(mask == 0) & (hidden > 0)] = IGNORE
    keep = seen & np.all((xy >= -0.5) & (xy < size - 0.5), axis=1)
    return Sample(image, mask, xy[keep].astype(np.float32), cls[keep], float(pixel_pm))


def render_gaussians(xy: np.ndarray, amplitude: np.ndarray, sigma_px: float,
                     size: int) -> np.ndarray:
    """Sum of isotropic Gaussians (peak = amplitude) on a size x size grid, float64.
    Separable, so the whole sum is one matrix product: (amp * Gy)^T @ Gx."""
    near = np.all((xy > -4 * sigma_px - 1) & (xy < size + 4 * sigma_px), axis=1)
    xy, amplitude = xy[near], amplitude[near]
    grid = np.arange(size, dtype=np.float64)
    gx = np.exp(-0.5 * ((grid - xy[:, :1]) / sigma_px) ** 2)   # [N, W]
    gy = np.exp(-0.5 * ((grid - xy[:, 1:]) / sigma_px) ** 2)   # [N, H]
    return (gy * amplitude[:, None]).T @ gx


def paint_discs(xy: np.ndarray, cls: np.ndarray, radius_px: float, size: int) -> np.ndarray:
    """uint8 class map with a disc of `radius_px` around every atom; heavier classes paint last."""
    k = int(np.ceil(radius_px))
    offsets = np.arange(-k, k + 1)
    centre = np.rint(xy).astype(np.int64)
    cols = centre[:, 0, None] + offsets                          # [N, 2k+1]
    rows = centre[:, 1, None] + offsets
    dx2 = (cols - xy[:, :1]) ** 2
    dy2 = (rows - xy[:, 1:]) ** 2
    inside = dy2[:, :, None] + dx2[:, None, :] <= radius_px**2   # [N, 2k+1, 2k+1]
    inside &= ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    mask = np.zeros((size, size), np.uint8)
    for c in np.unique(cls):
        sel = inside & (cls == c)[:, None, None]
        n, r, q = np.nonzero(sel)
        mask[rows[n, r], cols[n, q]] = c
    return mask


def _acquire(rng: np.random.Generator, cfg: SynthConfig, clean: np.ndarray) -> np.ndarray:
    """Background, shot and read noise, scan-line noise, blur and contrast; min-max normalised."""
    size = clean.shape[0]
    if rng.random() < cfg.saturation_prob:
        clean = np.minimum(clean, rng.uniform(*cfg.saturation_range))
    image = clean + _background(rng, cfg, size)
    if rng.random() < cfg.poisson_prob:
        dose = _log_uniform(rng, cfg.dose_range)
        image = rng.poisson(np.maximum(image, 0.0) * dose) / dose
    image = image + rng.normal(0.0, rng.uniform(*cfg.gauss_noise_range), image.shape)
    image = image + rng.normal(0.0, rng.uniform(*cfg.scan_noise_range), (size, 1))
    if rng.random() < cfg.blur_prob:
        image = gaussian_filter(image, rng.uniform(*cfg.blur_px_range), mode="nearest")
    image = _minmax(image) ** _log_uniform(rng, cfg.gamma_range)
    return _minmax(image).astype(np.float32)


def _background(rng: np.random.Generator, cfg: SynthConfig, size: int) -> np.ndarray:
    """A level, a linear gradient and a few smooth blobs (contamination), each up to the range."""
    level, slope, blobs = rng.uniform(*cfg.background_range, size=3)
    t = np.linspace(-0.5, 0.5, size)
    angle = rng.uniform(0.0, 2 * np.pi)
    plane = slope * (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None])
    freq = rng.uniform(0.0, 2.5, (2, 3))                         # cycles per tile, rank 3
    phase = rng.uniform(0.0, 2 * np.pi, (2, 3))
    u = np.cos(2 * np.pi * freq[0] * t[:, None] + phase[0])       # [H, 3]
    v = np.cos(2 * np.pi * freq[1] * t[:, None] + phase[1])       # [W, 3]
    smooth = (u @ v.T) / 3.0
    return level + plane + blobs * (smooth - smooth.min())


def _minmax(image: np.ndarray) -> np.ndarray:
    lo, hi = image.min(), image.max()
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


@dataclass
class Dataset:
    images: np.ndarray         # float32 [N, 1, H, W]
    masks: np.ndarray          # uint8 [N, H, W]
    xy: list[np.ndarray]       # per tile float32 [n_i, 2]
    cls: list[np.ndarray]      # per tile uint8 [n_i]
    pixel_size_pm: np.ndarray  # float32 [N]
    config: SynthConfig
    seed: int


class DatasetFileError(ValueError):
    """A dataset file is missing, unreadable or not one of ours."""


def make_dataset(n: int, seed: int, cfg: SynthConfig, progress: bool = False) -> Dataset:
    """n tiles; tile i depends only on (seed, i, cfg) (np.random.SeedSequence(seed).spawn)."""
    size = cfg.size_px
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.empty((n, size, size), np.uint8)
    xy, cls, pixel_pm = [], [], np.empty(n, np.float32)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        s = make_sample(np.random.default_rng(child), cfg)
        images[i, 0], masks[i], pixel_pm[i] = s.image, s.mask, s.pixel_size_pm
        xy.append(s.xy)
        cls.append(s.cls)
        if progress and ((i + 1) % max(1, n // 10) == 0 or i + 1 == n):
            print(f"synth: {i + 1}/{n} tiles", file=sys.stderr, flush=True)
    return Dataset(images, masks, xy, cls, pixel_pm, cfg, int(seed))


def save_dataset(ds: Dataset, path) -> None:
    """One uncompressed .npz (written to a temporary file, then renamed into place)."""
    path = Path(path)
    counts = np.array([len(c) for c in ds.cls], np.int64)
    arrays = {
        "format": np.array(DATASET_FORMAT), "format_version": np.array(DATASET_FORMAT_VERSION),
        "config": np.array(json.dumps(ds.config.to_dict())), "seed": np.array(ds.seed, np.int64),
        "images": ds.images, "masks": ds.masks, "pixel_size_pm": ds.pixel_size_pm,
        "offsets": np.concatenate([[0], np.cumsum(counts)]),
        "xy": np.concatenate(ds.xy).reshape(-1, 2).astype(np.float32) if ds.xy else
        np.zeros((0, 2), np.float32),
        "cls": np.concatenate(ds.cls).astype(np.uint8) if ds.cls else np.zeros(0, np.uint8),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_dataset(path) -> Dataset:
    """Read a file written by `save_dataset`; DatasetFileError (a ValueError) names what is wrong."""
    arrays = _read_npz(Path(path))
    try:
        return _dataset_from_arrays(arrays)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise DatasetFileError(f"{path}: not a valid {DATASET_FORMAT} file: {e}") from e


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DatasetFileError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DatasetFileError(f"{path}: a bare .npy array, not a {DATASET_FORMAT} .npz")
        with loaded as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DatasetFileError):
            raise
        raise DatasetFileError(f"{path}: unreadable as .npz ({type(e).__name__}: {e})") from e
    if str(arrays.get("format", "")) != DATASET_FORMAT:
        raise DatasetFileError(f"{path}: not a {DATASET_FORMAT} file (no matching 'format' entry)")
    if str(arrays["format_version"]).split(".")[0] != DATASET_FORMAT_VERSION:
        raise DatasetFileError(f"{path}: format version {arrays['format_version']} unsupported")
    return arrays


def _dataset_from_arrays(a: dict[str, np.ndarray]) -> Dataset:
    cfg = SynthConfig.from_dict(json.loads(str(a["config"])))
    images, masks, offsets = a["images"], a["masks"], a["offsets"]
    n, size = len(images), cfg.size_px
    if images.shape != (n, 1, size, size) or images.dtype != np.float32:
        raise ValueError(f"images {images.dtype} {images.shape}, want float32 [N, 1, {size}, {size}]")
    if masks.shape != (n, size, size) or masks.dtype != np.uint8:
        raise ValueError(f"masks {masks.dtype} {masks.shape}, want uint8 [{n}, {size}, {size}]")
    if (offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
            or offsets[-1] != len(a["xy"]) or len(a["xy"]) != len(a["cls"])):
        raise ValueError("atom offsets do not match the xy/cls arrays")
    if a["pixel_size_pm"].shape != (n,):
        raise ValueError(f"pixel_size_pm has shape {a['pixel_size_pm'].shape}, want [{n}]")
    xy = np.split(a["xy"], offsets[1:-1])
    cls = np.split(a["cls"], offsets[1:-1])
    return Dataset(images, masks, xy, cls, a["pixel_size_pm"], cfg, int(a["seed"]))


def preview_png(ds: Dataset, path, n: int = 8) -> None:
    """A grid for humans: images (atoms as dots, coloured by class) on top, class masks below."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n = min(n, len(ds.images))
    colours = ["black", "#3fb6ff", "#ff5a36"][: ds.config.n_classes + 1]
    fig = Figure(figsize=(2.2 * max(n, 1), 4.6), layout="constrained")
    axes = fig.subplots(2, max(n, 1), squeeze=False)
    for i in range(n):
        top, bottom = axes[0, i], axes[1, i]
        top.imshow(ds.images[i, 0], cmap="gray", vmin=0, vmax=1)
        top.scatter(ds.xy[i][:, 0], ds.xy[i][:, 1], s=2,
                    c=[colours[c] for c in ds.cls[i]], linewidths=0)
        top.set_title(f"#{i}  {ds.pixel_size_pm[i]:.1f} pm/px", fontsize=8)
        bottom.imshow(ds.masks[i], cmap=ListedColormap(colours), vmin=0,
                      vmax=ds.config.n_classes, interpolation="nearest")
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.suptitle(f"{ds.config.lattice}, {ds.config.n_classes} classes, seed {ds.seed}", fontsize=9)
    fig.savefig(path, dpi=110)
