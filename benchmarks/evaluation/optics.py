"""The physics of one HAADF-STEM frame, from atom positions (pm) to detector values.

1. Probe: the aperture function A(k) (a disc of semi-angle `aperture_mrad`) times the aberration
   phase exp(-i chi(k)) with defocus C1, two-fold astigmatism A1 and axial coma B2 (and a small
   residual Cs); probe intensity = |IFFT(A exp(-i chi))|^2.
   chi(alpha, phi) = 2 pi / lambda * (alpha^2/2 (C1 + A1 cos 2(phi - phi_A1))
                                      + alpha^3/3 B2 cos(phi - phi_B2) + alpha^4/4 Cs).
2. Source size (Gaussian, sigma) and the object's own width (thermal smearing and the extent of
   the scattering potential, sigma) blur the probe intensity.
3. Incoherent imaging: image = sum over atoms/columns of w * probe(r - r_atom), with the HAADF
   weight w = Z^n (n ~ 1.7) for one atom and Z^n * N^THICKNESS_EXPONENT for a column of N atoms
   (channelling makes the increase with thickness sublinear).
4. Scan: the probe position of detector pixel (row i, column j) is an affine map of (j, i)
   (scale, drift shear) plus a per-line offset along the fast scan (jitter, glitches).
5. Detector: Poisson counts at `dose` counts per carbon-atom peak (in focus), then gain, offset and
   Gaussian read noise, optional lag along the fast scan, rounding and 16-bit saturation.

The image is rendered on a fine grid (<= FINE_PM per sample) and read at the scan positions by
linear interpolation, so pixel sizes up to ~60 pm/px are rendered without aliasing the probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
from scipy import ndimage, signal

Z_EXPONENT = 1.7
THICKNESS_EXPONENT = 0.85
CARBON_Z = 6
FINE_PM = 7.5                 # finest sample spacing of the rendering grid
KERNEL_NM = 1.6               # the probe is computed on a square window of this size
ADC_MAX = 65535.0             # 16-bit detector read-out


def wavelength_pm(kv: float) -> float:
    """Relativistic electron wavelength in pm at `kv` kilovolts."""
    volts = kv * 1e3
    return 1226.43 / np.sqrt(volts * (1.0 + 0.978476e-6 * volts))


@dataclass(frozen=True)
class Optics:
    """Probe-forming optics; lengths of aberrations in nm, angles in degrees."""

    kv: float = 60.0
    aperture_mrad: float = 32.0
    defocus_nm: float = 0.0
    astig_nm: float = 0.0
    astig_deg: float = 0.0
    coma_nm: float = 0.0
    coma_deg: float = 0.0
    cs_um: float = 1.0            # residual spherical aberration after correction
    source_pm: float = 25.0       # source size, Gaussian sigma
    object_pm: float = 12.0       # thermal + potential width of an atom, Gaussian sigma


@dataclass(frozen=True)
class Scan:
    """Scan geometry: probe position of pixel (i, j) = M @ (j, i) * pixel + (jitter_i * pixel, 0)."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    shear: float = 0.0            # x offset per row, in pixels per pixel (slow drift in x)
    jitter_px: float = 0.0        # rms per-line offset along the fast scan
    glitch_rate: float = 0.0      # fraction of lines displaced by GLITCH_PX
    glitch_px: float = 4.0


@dataclass(frozen=True)
class Detector:
    """Counts per carbon peak, then ADU = gain * counts + offset + read noise."""

    dose: float = 40.0
    gain: float = 20.0
    offset: float = 500.0
    read_noise: float = 10.0      # ADU rms
    lag: float = 0.0              # fraction of the previous pixel's value (fast-scan direction)


@dataclass
class Scene:
    """What the beam sees: positions (pm) and HAADF weights of atoms or columns."""

    xy_pm: np.ndarray                                   # [N, 2]
    weight: np.ndarray                                  # [N]
    background: list = field(default_factory=list)      # extra (xy_pm, weight) point clouds


def atom_weight(z, n_atoms=1) -> np.ndarray:
    """HAADF weight of a column of `n_atoms` atoms of atomic number `z`."""
    z = np.asarray(z, np.float64)
    return z**Z_EXPONENT * np.asarray(n_atoms, np.float64) ** THICKNESS_EXPONENT


def probe_intensity(optics: Optics, n_px: int, sample_pm: float) -> np.ndarray:
    """Probe intensity [n, n], centred at (n//2, n//2), sum 1 (before source and object blur)."""
    lam = wavelength_pm(optics.kv)
    k = np.fft.fftfreq(n_px, d=sample_pm)
    kx, ky = np.meshgrid(k, k)
    alpha = lam * np.hypot(kx, ky)
    phi = np.arctan2(ky, kx)
    aperture = alpha <= optics.aperture_mrad * 1e-3
    c1, a1 = optics.defocus_nm * 1e3, optics.astig_nm * 1e3
    b2, cs = optics.coma_nm * 1e3, optics.cs_um * 1e6
    chi = 2 * np.pi / lam * (
        alpha**2 / 2 * (c1 + a1 * np.cos(2 * (phi - np.radians(optics.astig_deg))))
        + alpha**3 / 3 * b2 * np.cos(phi - np.radians(optics.coma_deg))
        + alpha**4 / 4 * cs)
    psi = np.fft.ifft2(aperture * np.exp(-1j * chi))
    intensity = np.fft.fftshift(np.abs(psi) ** 2)
    return intensity / intensity.sum()


def image_sigma_pm(optics: Optics) -> float:
    """Approximate Gaussian sigma of one atom's image (diffraction limit, source, object)."""
    diffraction = 0.21 * wavelength_pm(optics.kv) / (optics.aperture_mrad * 1e-3)
    return float(np.sqrt(diffraction**2 + optics.source_pm**2 + optics.object_pm**2))


@lru_cache(maxsize=16)
def _kernel(optics: Optics, sample_pm: float) -> np.ndarray:
    """Blurred probe intensity, odd-sized, centred, sum 1 (cached: treat as read-only)."""
    n = int(2 ** np.ceil(np.log2(KERNEL_NM * 1e3 / sample_pm)))
    kern = probe_intensity(optics, n, sample_pm)[1:, 1:]     # odd size, centre in the middle
    blur_px = np.hypot(optics.source_pm, optics.object_pm) / sample_pm
    return ndimage.gaussian_filter(kern, blur_px, mode="wrap")


def _scan_positions_pm(shape, pixel_pm: float, scan: Scan, line_offset_px: np.ndarray):
    """Probe positions (x, y) in pm of every pixel; the frame's centre pixel sits at (0, 0)."""
    h, w = shape
    jj, ii = np.meshgrid(np.arange(w) - (w - 1) / 2, np.arange(h) - (h - 1) / 2)
    x = (scan.scale_x * jj + scan.shear * ii + line_offset_px[:, None]) * pixel_pm
    y = scan.scale_y * ii * pixel_pm
    return x, y


def line_offsets_px(rng: np.random.Generator, n_lines: int, scan: Scan) -> np.ndarray:
    """Per-line fast-scan offsets (px): Gaussian jitter plus rare large glitches."""
    off = rng.normal(0.0, scan.jitter_px, n_lines) if scan.jitter_px > 0 else np.zeros(n_lines)
    glitch = rng.random(n_lines) < scan.glitch_rate
    off[glitch] += rng.choice([-1.0, 1.0], glitch.sum()) * scan.glitch_px
    return off


def to_pixels(xy_pm: np.ndarray, shape, pixel_pm: float, scan: Scan,
              line_offset_px: np.ndarray, smooth_lines: float = 2.0) -> np.ndarray:
    """Where atoms at `xy_pm` appear in the frame, (x = column, y = row) in pixels: the inverse of
    the scan map, with the line offsets averaged over the rows an atom spans (Gaussian weights
    of `smooth_lines` rows: pass the atom image's sigma in pixels)."""
    h, w = shape
    row = xy_pm[:, 1] / pixel_pm / scan.scale_y + (h - 1) / 2
    smooth = ndimage.gaussian_filter1d(line_offset_px, smooth_lines, mode="nearest")
    off = np.interp(row, np.arange(h), smooth)
    col = (xy_pm[:, 0] / pixel_pm - scan.shear * (row - (h - 1) / 2) - off) / scan.scale_x \
        + (w - 1) / 2
    return np.stack([col, row], axis=1)


def _splat(grid: np.ndarray, x0: float, y0: float, sample_pm: float,
           xy_pm: np.ndarray, weight: np.ndarray) -> None:
    """Deposit point weights on `grid` (origin x0, y0 in pm) by bilinear splatting."""
    gx = (xy_pm[:, 0] - x0) / sample_pm
    gy = (xy_pm[:, 1] - y0) / sample_pm
    ix, iy = np.floor(gx).astype(int), np.floor(gy).astype(int)
    fx, fy = gx - ix, gy - iy
    h, w = grid.shape
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)),
                       (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = iy + dy, ix + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        np.add.at(grid, (yy[ok], xx[ok]), weight[ok] * wt[ok])


def _centroid_offset_pm(kern: np.ndarray, sample_pm: float) -> np.ndarray:
    """(x, y) of the centroid of the kernel's bright core (>= half maximum) relative to its
    centre pixel, in pm: where an atom appears under an aberrated probe."""
    cy, cx = ndimage.center_of_mass(np.where(kern >= kern.max() / 2, kern, 0.0))
    c = (kern.shape[0] - 1) / 2
    return np.array([cx - c, cy - c]) * sample_pm


def render(scene: Scene, optics: Optics, shape, pixel_pm: float, scan: Scan,
           line_offset_px: np.ndarray) -> np.ndarray:
    """Noise-free HAADF signal at every scan position, in units of one carbon atom's peak under
    the in-focus probe."""
    sample_pm = pixel_pm / max(1, int(np.ceil(pixel_pm / FINE_PM)))
    kern = _kernel(optics, sample_pm)
    x, y = _scan_positions_pm(shape, pixel_pm, scan, line_offset_px)
    margin = kern.shape[0] // 2 * sample_pm + 2 * sample_pm
    x0, y0 = x.min() - margin, y.min() - margin
    gw = int(np.ceil((x.max() + margin - x0) / sample_pm)) + 1
    gh = int(np.ceil((y.max() + margin - y0) / sample_pm)) + 1
    grid = np.zeros((gh, gw))
    shift = _centroid_offset_pm(kern, sample_pm)    # coma moves the probe's core
    _splat(grid, x0, y0, sample_pm, scene.xy_pm - shift, scene.weight)
    for xy, wt in scene.background:
        _splat(grid, x0, y0, sample_pm, xy - shift, wt)
    fine = signal.fftconvolve(grid, kern, mode="same")
    img = ndimage.map_coordinates(fine, [(y - y0) / sample_pm, (x - x0) / sample_pm], order=1)
    return img / (in_focus_peak(optics, sample_pm) * atom_weight(CARBON_Z))


def in_focus_peak(optics: Optics, sample_pm: float) -> float:
    """Peak of the kernel without defocus, astigmatism and coma: the unit of the image (one
    carbon atom's peak in focus), so aberrations spread the same current and lower the peaks."""
    ideal = replace(optics, defocus_nm=0.0, astig_nm=0.0, coma_nm=0.0)
    return float(_kernel(ideal, sample_pm).max())


def detect(rng: np.random.Generator, signal_c: np.ndarray, det: Detector) -> np.ndarray:
    """Detector read-out (ADU, float32) of a signal in carbon-peak units."""
    counts = rng.poisson(np.clip(signal_c, 0, None) * det.dose).astype(np.float64)
    adu = det.gain * counts
    if det.lag > 0:
        adu = signal.lfilter([1 - det.lag], [1, -det.lag], adu, axis=1)
    adu += det.offset + rng.normal(0.0, det.read_noise, adu.shape)
    return np.clip(np.round(adu), 0, ADC_MAX).astype(np.float32)
