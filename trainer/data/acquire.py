"""Image formation and the detector of the physical training world (`imaging="probe"`).

From a `Scene` (trainer.data.samples) to a tile, in milliseconds: atoms are point weights
Z**n · (atoms per column)**γ on a fine grid (≤ 12 pm per pixel, so 40 pm pixels are not
aliased before the scan samples them), amorphous carbon is Poisson texture of the same kind, and
the sum is convolved (FFT) with the probe's PSF (trainer.data.probe) — two PSFs when the focus
drifts over the slow scan, blended line by line. The scan samples every s-th fine pixel. Then the
microscope and the detector: sample drift (shear / scale of the positions), per-line jitter along
the fast scan, a slow background (thickness, diffuse scattering), a dose that may fall over the
frame, Poisson counts, a gain that may jump at one line, read noise, clipping, detector lag along
the fast scan and a few glitched lines. Units before the detector: the peak of the scene's light
reference (a carbon atom, the lightest column …) under this tile's probe = 1, so the dose is
"counts per light-atom peak". Truth (`xy`) follows the drift and the jitter; atoms that the
noise hides (`visibility_snr` below VISIBLE_SNR) are masked "ignore", so the network is never
taught to paint atoms into noise.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import minimum_filter
from scipy.signal import lfilter

from trainer.data.config import SynthConfig
from trainer.data.probe import draw_optics, refocused, transfer
from trainer.data.samples import CARBON_Z, Scene

FINE_PM = 12.0        # the finest grid spacing the object is rendered on
PAD_PM = 400.0        # margin around the tile (probe tails, wrap-around of the FFT)
CONTRAST_PM = 150.0   # an atom's contrast is measured against the darkest point this close
SNR_RADIUS_PM = 40.0  # ... and its SNR over the pixels this close (the core of the peak)
VISIBLE_SNR = 5.0     # below this an atom is "ignore" in the mask, not an atom (Rose criterion)
SATURATED_QUANTILE = (0.97, 0.999)   # when clipped, this quantile of the frame is the ceiling
DENSITY_BLOCK_PM = 40.0   # the support's (smooth) density is evaluated on blocks this wide


def render_clean(rng: np.random.Generator, cfg: SynthConfig, scene: Scene, pixel_pm: float,
                 size: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free image [size, size] (light-reference peak = 1) and the labelled atoms' xy in px
    (drift applied; x = column, origin at the top-left pixel centre)."""
    n_exp = rng.uniform(*cfg.z_exponent_range)
    gamma = rng.uniform(*cfg.channelling_range)
    drift = np.eye(2) + rng.uniform(-cfg.drift_max, cfg.drift_max, (2, 2))
    atoms = scene.atoms
    xy_px = (atoms.xy_pm @ drift.T) / pixel_pm + (size - 1) / 2.0
    count = np.ones(len(atoms.z)) if atoms.count is None else atoms.count
    ref = scene.ref_z**n_exp * scene.ref_count**gamma
    amplitude = atoms.z.astype(np.float64) ** n_exp * count**gamma / ref
    s = max(1, int(np.ceil(pixel_pm / FINE_PM)))
    pad = max(4, int(np.ceil(PAD_PM / pixel_pm)))
    n_fine = (size + 2 * pad) * s
    obj = _splat((xy_px + pad) * s, amplitude, n_fine)
    if scene.support is not None:
        obj += _texture(rng, scene, pixel_pm, size, pad, s) * (CARBON_Z**n_exp / ref)
    optics = draw_optics(rng, cfg)
    fine_pm = pixel_pm / s
    spectrum = np.fft.rfft2(obj)
    top_otf = transfer(optics, obj.shape, fine_pm)
    peak = np.fft.irfft2(top_otf, s=obj.shape).max()
    rows = slice(pad * s, (pad + size) * s, s)
    image = np.fft.irfft2(spectrum * top_otf, s=obj.shape)[rows, rows]
    focus_drift = rng.uniform(*cfg.focus_drift_nm_range) * rng.choice([-1.0, 1.0])
    if focus_drift != 0.0:
        bottom = transfer(refocused(optics, focus_drift), obj.shape, fine_pm)
        t = np.linspace(0.0, 1.0, size)[:, None]
        image = (1 - t) * image + t * np.fft.irfft2(spectrum * bottom, s=obj.shape)[rows, rows]
    return np.maximum(image, 0.0) / peak, xy_px


def _splat(xy_fine: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray:
    """Point weights onto an n x n grid, bilinear (sub-pixel positions kept)."""
    grid = np.zeros(n * n)
    base = np.floor(xy_fine).astype(np.int64)
    frac = xy_fine - base
    for dx in (0, 1):
        for dy in (0, 1):
            col, row = base[:, 0] + dx, base[:, 1] + dy
            w = weight * np.abs(1 - dx - frac[:, 0]) * np.abs(1 - dy - frac[:, 1])
            ok = (col >= 0) & (col < n) & (row >= 0) & (row < n)
            grid += np.bincount(row[ok] * n + col[ok], w[ok], minlength=n * n)
    return grid.reshape(n, n)


def _texture(rng: np.random.Generator, scene: Scene, pixel_pm: float, size: int, pad: int,
             s: int) -> np.ndarray:
    """Carbon atoms of the amorphous support / contamination as Poisson counts per fine pixel."""
    n = (size + 2 * pad) * s
    block = max(1, int(DENSITY_BLOCK_PM * s / pixel_pm))   # the density is smooth: evaluate it
    m = -(-n // block)                                     # on blocks of ~DENSITY_BLOCK_PM
    centres = ((np.arange(m) + 0.5) * block / s - pad - (size - 1) / 2.0 - 0.5 / s) * pixel_pm
    gx, gy = np.meshgrid(centres, centres)
    density = scene.support(np.column_stack([gx.ravel(), gy.ravel()])).reshape(m, m)
    density = np.repeat(np.repeat(density, block, 0), block, 1)[:n, :n]
    per_fine_px = density * (pixel_pm / s / 1e3) ** 2
    return rng.poisson(np.maximum(per_fine_px, 0.0)).astype(np.float64)


def acquire(rng: np.random.Generator, cfg: SynthConfig, clean: np.ndarray, xy_px: np.ndarray,
            pixel_pm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan and detector: jitter, background, dose, Poisson, gain, read noise, clipping, lag,
    glitches. Returns the min-max normalised float32 image, the jittered truth and each atom's
    signal-to-noise ratio (`visibility_snr`)."""
    size = clean.shape[0]
    image, xy_px = _jitter(rng, cfg, clean, xy_px, pixel_pm)
    background = _background(rng, cfg, size)
    image = image + background
    dose = _log_u(rng, cfg.dose_range) * np.linspace(1.0, rng.uniform(*cfg.dose_drift_range),
                                                     size)[:, None]
    expected = np.maximum(image, 0.0) * dose
    counts = rng.poisson(expected) if rng.random() < cfg.poisson_prob else expected
    gain = np.ones((size, 1))
    if rng.random() < cfg.gain_jump_prob:
        gain[rng.integers(1, size):] = rng.uniform(*cfg.gain_jump_range)
    read_noise = rng.uniform(*cfg.read_noise_range)
    snr = visibility_snr(clean, background, dose, read_noise, xy_px, pixel_pm,
                         cfg.poisson_prob > 0)
    signal = gain * counts + rng.normal(0.0, read_noise, counts.shape)
    if rng.random() < cfg.saturation_prob:       # the detector / ADC clips the brightest part
        signal = np.minimum(signal, np.quantile(signal, rng.uniform(*SATURATED_QUANTILE)))
    lag = rng.uniform(*cfg.lag_range)
    if lag > 0:
        signal = lfilter([1.0 - lag], [1.0, -lag], signal, axis=1)
    if rng.random() < cfg.glitch_prob:
        signal = _glitch(rng, signal)
    lo, hi = signal.min(), signal.max()
    out = (signal - lo) / (hi - lo) if hi > lo else np.zeros_like(signal)
    return out.astype(np.float32), xy_px, snr


def visibility_snr(clean: np.ndarray, background: np.ndarray, dose: np.ndarray,
                   read_noise: float, xy_px: np.ndarray, pixel_pm: float,
                   shot_noise: bool = True) -> np.ndarray:
    """How visible each atom is: its contrast over the darkest point within CONTRAST_PM (the
    hexagon centre, the gap between columns, a dip of the support) in counts, over the noise of
    one pixel there, times the square root of the pixels within SNR_RADIUS_PM (what an eye or a
    network can average). Atoms below VISIBLE_SNR are not labelled as atoms (mask "ignore")."""
    size = clean.shape[0]
    if len(xy_px) == 0:
        return np.zeros(0)
    floor = minimum_filter(clean, size=2 * int(np.ceil(CONTRAST_PM / pixel_pm)) + 1, mode="nearest")
    col = np.clip(np.rint(xy_px[:, 0]).astype(np.int64), 0, size - 1)
    row = np.clip(np.rint(xy_px[:, 1]).astype(np.int64), 0, size - 1)
    contrast = np.maximum(clean[row, col] - floor[row, col], 0.0) * dose[row, 0]
    level = (floor[row, col] + background[row, col]) * dose[row, 0]
    noise = np.sqrt((level + contrast if shot_noise else 0.0) + read_noise**2 + 1e-12)
    pixels = max(1.0, np.pi * (SNR_RADIUS_PM / pixel_pm) ** 2)
    return contrast / noise * np.sqrt(pixels)


def _jitter(rng, cfg, image, xy_px, pixel_pm):
    """Each scan line shifted along x by a random amount (truth follows the line it lies on)."""
    rms_px = rng.uniform(*cfg.line_jitter_pm_range) / pixel_pm
    if rms_px == 0:
        return image, xy_px
    size = image.shape[0]
    shift = rng.normal(0.0, rms_px, size)
    cols = np.arange(size, dtype=np.float64)
    out = np.stack([np.interp(cols - shift[r], cols, image[r]) for r in range(size)])
    rows = np.clip(np.rint(xy_px[:, 1]).astype(np.int64), 0, size - 1)
    return out, xy_px + np.column_stack([shift[rows], np.zeros(len(rows))])


def _glitch(rng, signal):
    """1-3 bad scan lines: a repeated line, a line at the offset, or a saturated line."""
    signal = signal.copy()
    for row in rng.integers(1, len(signal), size=rng.integers(1, 4)):
        kind = rng.integers(3)
        signal[row] = (signal[row - 1] if kind == 0 else
                       signal.min() if kind == 1 else signal.max())
    return signal


def _background(rng: np.random.Generator, cfg: SynthConfig, size: int) -> np.ndarray:
    """A level, a linear gradient and smooth blobs (thickness, diffuse scattering), in light-atom
    peaks, each drawn from background_range."""
    level, slope, blobs = rng.uniform(*cfg.background_range, size=3)
    t = np.linspace(-0.5, 0.5, size)
    angle = rng.uniform(0.0, 2 * np.pi)
    plane = slope * (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None])
    freq = rng.uniform(0.0, 2.0, (2, 3))
    phase = rng.uniform(0.0, 2 * np.pi, (2, 3))
    u = np.cos(2 * np.pi * freq[0] * t[:, None] + phase[0])
    v = np.cos(2 * np.pi * freq[1] * t[:, None] + phase[1])
    smooth = (u @ v.T) / 3.0
    return level + plane - plane.min() + blobs * (smooth - smooth.min())


def _log_u(rng: np.random.Generator, bounds) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))
