"""The STEM probe of the physical training world: an aperture with aberrations, and the point-spread
function (PSF) that a HAADF image is convolved with.

Incoherent HAADF imaging: image = object ⊗ PSF, where the object is a sum of narrow peaks (one per
atom, weight Z**n) and PSF = |FFT(aperture · exp(-iχ))|² ⊗ source ⊗ atom width. The aberration
function χ(k) uses the Krivanek notation (as abTEM does):

    χ(θ, φ) = 2π/λ · [ ½ C10 θ² + ½ C12 θ² cos 2(φ-φ12) + ⅓ C21 θ³ cos(φ-φ21) + ¼ C30 θ⁴ ],  θ = λ|k|

(C10 is the defocus with abTEM's sign, C12 two-fold astigmatism, C21 axial coma, C30 spherical
aberration). The source size and the atom's own width (projected potential + thermal vibration)
are Gaussians, applied as one Gaussian factor in Fourier space. numpy only; no multislice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from trainer.data.config import SynthConfig


def wavelength_pm(voltage_kv: float) -> float:
    """Relativistic electron wavelength in pm (e.g. 200 kV -> 2.508 pm)."""
    volts = voltage_kv * 1e3
    return 1226.43 / np.sqrt(volts * (1.0 + 0.97845e-6 * volts))


@dataclass(frozen=True)
class Optics:
    """One probe. Lengths: C10, C12, C21 in nm, C30 in µm, widths (Gaussian sigma) in pm."""

    voltage_kv: float = 200.0
    aperture_mrad: float = 25.0
    c10_nm: float = 0.0
    c12_nm: float = 0.0
    phi12_rad: float = 0.0
    c21_nm: float = 0.0
    phi21_rad: float = 0.0
    c30_um: float = 0.0
    source_pm: float = 0.0
    object_pm: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def draw_optics(rng: np.random.Generator, cfg: SynthConfig) -> Optics:
    """A random probe from the configured ranges (magnitudes log-uniform, signs and angles random)."""
    def log_u(bounds):
        return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))
    return Optics(
        voltage_kv=float(rng.choice(cfg.voltages_kv)),
        aperture_mrad=float(rng.uniform(*cfg.aperture_mrad_range)),
        c10_nm=log_u(cfg.defocus_nm_range) * rng.choice([-1.0, 1.0]),
        c12_nm=log_u(cfg.astigmatism_nm_range), phi12_rad=float(rng.uniform(0, np.pi)),
        c21_nm=log_u(cfg.coma_nm_range), phi21_rad=float(rng.uniform(0, 2 * np.pi)),
        c30_um=float(rng.uniform(*cfg.cs_um_range)),
        source_pm=float(rng.uniform(*cfg.source_pm_range)),
        object_pm=float(rng.uniform(*cfg.object_pm_range)))


def refocused(optics: Optics, delta_c10_nm: float) -> Optics:
    return replace(optics, c10_nm=optics.c10_nm + delta_c10_nm)


def _k_grid(shape: tuple[int, int], pixel_pm: float) -> tuple[np.ndarray, np.ndarray]:
    ky = np.fft.fftfreq(shape[0], d=pixel_pm)[:, None]          # 1/pm
    kx = np.fft.fftfreq(shape[1], d=pixel_pm)[None, :]
    return kx, ky


def chi(optics: Optics, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """The aberration phase χ (radians) at spatial frequencies kx, ky (1/pm)."""
    lam = wavelength_pm(optics.voltage_kv)
    theta = lam * np.hypot(kx, ky)
    phi = np.arctan2(ky, kx)
    c10, c12, c21 = optics.c10_nm * 1e3, optics.c12_nm * 1e3, optics.c21_nm * 1e3   # -> pm
    c30 = optics.c30_um * 1e6
    return (2 * np.pi / lam) * (0.5 * c10 * theta**2
                                + 0.5 * c12 * theta**2 * np.cos(2 * (phi - optics.phi12_rad))
                                + c21 * theta**3 * np.cos(phi - optics.phi21_rad) / 3.0
                                + 0.25 * c30 * theta**4)


def probe_intensity(optics: Optics, shape: tuple[int, int], pixel_pm: float) -> np.ndarray:
    """|ψ(r)|² of the coherent probe on a periodic grid, origin at index [0, 0], sum 1.
    The aperture edge is softened over one Fourier pixel (no ringing from a hard cut)."""
    kx, ky = _k_grid(shape, pixel_pm)
    k = np.hypot(kx, ky)
    k_max = optics.aperture_mrad * 1e-3 / wavelength_pm(optics.voltage_kv)
    dk = 1.0 / (max(shape) * pixel_pm)
    aperture = np.clip((k_max - k) / dk + 0.5, 0.0, 1.0)
    psi = np.fft.ifft2(aperture * np.exp(-1j * chi(optics, kx, ky)))
    intensity = np.abs(psi) ** 2
    return intensity / intensity.sum()


PSF_EXTENT_PM = 1600.0   # the coherent probe is computed on a window this wide, then embedded


def transfer(optics: Optics, shape: tuple[int, int], pixel_pm: float) -> np.ndarray:
    """rfft2 of the whole PSF (probe ⊗ source ⊗ atom width), for `np.fft.irfft2(F(obj) * this)`.
    The probe is computed on a window of PSF_EXTENT_PM (cheap) and embedded in the large grid."""
    m = min(min(shape), 2 * int(np.ceil(PSF_EXTENT_PM / pixel_pm / 2)))
    small = np.fft.fftshift(probe_intensity(optics, (m, m), pixel_pm))
    big = np.zeros(shape)
    big[:m, :m] = small
    big = np.roll(big, (-(m // 2), -(m // 2)), (0, 1))
    otf = np.fft.rfft2(big)
    ky = np.fft.fftfreq(shape[0], d=pixel_pm)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=pixel_pm)[None, :]
    sigma2 = optics.source_pm**2 + optics.object_pm**2
    return otf * np.exp(-2 * np.pi**2 * sigma2 * (kx**2 + ky**2))


def psf(optics: Optics, shape: tuple[int, int], pixel_pm: float) -> np.ndarray:
    """The PSF in real space (origin at [0, 0], sum 1)."""
    return np.fft.irfft2(transfer(optics, shape, pixel_pm), s=shape)


def peak_shape(image: np.ndarray, pixel_pm: float) -> tuple[float, float]:
    """(FWHM in pm, elongation) of the highest peak: FWHM = diameter of the disc whose area equals
    the area above half maximum; elongation = ratio of the principal axes of that area (1 = round)."""
    peak = np.unravel_index(np.argmax(image), image.shape)
    rolled = np.roll(image, (image.shape[0] // 2 - peak[0], image.shape[1] // 2 - peak[1]), (0, 1))
    above = rolled >= rolled.max() / 2
    y, x = np.nonzero(above)
    fwhm = 2.0 * np.sqrt(above.sum() / np.pi) * pixel_pm
    cov = np.cov(np.stack([x, y]).astype(np.float64)) if len(x) > 2 else np.eye(2)
    eig = np.linalg.eigvalsh(cov)
    return float(fwhm), float(np.sqrt(eig[1] / max(eig[0], 1e-12)))
