"""How synthetic tiles are made: `SynthConfig`, recorded in the model manifest (`training.synth`)
and read back by the ELIT loop. Plain data and its checks; the generators read it
(`trainer.data.lattice` for positions, `trainer.data.synth` for images).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

LATTICES = ("graphene", "square", "perovskite")
IMAGING = ("gaussian", "probe")
# Scenes of the physical world (`imaging="probe"`); see trainer.data.samples.
SCENES = ("graphene", "hbn", "mos2", "square", "perovskite", "single_atoms", "nanoparticle",
          "vacuum")


@dataclass(frozen=True)
class SynthConfig:
    """How synthetic tiles are made. Ranges are (low, high), drawn uniformly per tile unless noted."""

    lattice: str = "graphene"        # "graphene" | "square" | "perovskite"
    n_classes: int = 2               # 1: atom; 2: lattice atom / heavy atom (dopant, heavy column)
    size_px: int = 128               # output tile H = W (multiple of 8)
    pixel_size_pm: float = 20.0      # pixel size at zoom 1 (C–C bond = 7.1 px)
    zoom_range: tuple[float, float] = (1.0, 2.0)    # drawn log-uniformly; pixel = pixel_size_pm/zoom
    atom_radius_px: float = 2.5      # mask disc radius at zoom 1
    sigma_pm_range: tuple[float, float] = (35.0, 60.0)   # Gaussian width of an atom, per tile
    z_exponent: float = 1.7          # HAADF intensity ~ Z ** z_exponent
    # graphene
    jitter_pm_range: tuple[float, float] = (5.0, 8.0)     # thermal rms displacement per axis
    removed_fraction_range: tuple[float, float] = (0.0, 0.9)
    hole_length_pm_range: tuple[float, float] = (150.0, 600.0)  # correlation length of holes
    dopant_fraction_range: tuple[float, float] = (0.0, 0.04)    # also heavy columns (square)
    dopant_z: tuple[int, ...] = (7, 14, 15, 26)                 # N, Si, P, Fe
    heavy_z_min: int = 14            # graphene: Z >= this is class 2
    # oxides
    square_a_pm_range: tuple[float, float] = (250.0, 420.0)
    perovskite_a_pm_range: tuple[float, float] = (370.0, 420.0)
    displacement_pm_range: tuple[float, float] = (0.0, 15.0)  # random column displacements (rms)
    distortion_max: float = 0.02     # affine scan distortion, each matrix entry within ±this
    # acquisition and augmentation
    dose_range: tuple[float, float] = (1.0, 300.0)  # counts at a light atom's peak, log-uniform
    poisson_prob: float = 0.9
    gauss_noise_range: tuple[float, float] = (0.0, 0.3)   # std relative to a light atom's peak
    scan_noise_range: tuple[float, float] = (0.0, 0.1)    # per-row offset std, same units
    blur_prob: float = 0.5
    blur_px_range: tuple[float, float] = (0.3, 1.2)
    background_range: tuple[float, float] = (0.0, 0.5)    # level, gradient and smooth blobs
    gamma_range: tuple[float, float] = (0.5, 1.4)         # log-uniform
    saturation_prob: float = 0.5     # clip the clean image (detector, display window) ...
    saturation_range: tuple[float, float] = (1.5, 4.0)    # ... at this many light-atom peaks
    # ---- the physical world (imaging="probe"; trainer.data.probe / samples / acquire). The
    # defaults of the fields above keep the legacy generator ("gaussian") bit for bit; the
    # fields below are ignored by it. `SynthConfig.physical()` is the wide preset.
    imaging: str = "gaussian"        # "gaussian": atoms as Gaussians (legacy); "probe": see below
    scenes: tuple[str, ...] = ()     # drawn per tile with scene_weights; () = `lattice` only
    scene_weights: tuple[float, ...] = ()
    z_exponent_range: tuple[float, float] = (1.6, 2.0)   # HAADF: intensity ~ Z ** n, n per tile
    voltages_kv: tuple[float, ...] = (60.0, 80.0, 200.0, 300.0)
    aperture_mrad_range: tuple[float, float] = (18.0, 35.0)   # probe semi-angle
    defocus_nm_range: tuple[float, float] = (0.1, 4.0)     # |C10|, log-uniform, random sign
    astigmatism_nm_range: tuple[float, float] = (0.1, 3.0)  # |C12|, log-uniform, random angle
    coma_nm_range: tuple[float, float] = (1.0, 80.0)      # |C21|, log-uniform, random angle
    cs_um_range: tuple[float, float] = (-5.0, 5.0)         # C30 (corrected instrument)
    focus_drift_nm_range: tuple[float, float] = (0.0, 3.0)  # C10 change over the slow scan
    source_pm_range: tuple[float, float] = (5.0, 35.0)     # source size, Gaussian sigma
    object_pm_range: tuple[float, float] = (8.0, 20.0)     # atom's own width (potential + thermal)
    thickness_range: tuple[float, float] = (2.0, 40.0)     # atoms per column (crystals), log-uniform
    thickness_gradient_range: tuple[float, float] = (0.0, 0.8)   # wedge: relative change per radius
    channelling_range: tuple[float, float] = (0.7, 1.0)    # column intensity ~ thickness ** this
    support_density_range: tuple[float, float] = (20.0, 1500.0)  # a-C atoms / nm^2, log-uniform
    amorphous_prob: float = 0.3      # lattice scenes: monolayer amorphous patches (atoms, labelled)
    contamination_prob: float = 0.3  # patchy hydrocarbon (unlabelled texture) over the sample
    contamination_density_range: tuple[float, float] = (20.0, 400.0)  # its a-C atoms / nm^2
    read_noise_range: tuple[float, float] = (0.0, 3.0)     # detector read noise, counts rms
    gain_jump_prob: float = 0.2      # the gain changes at a random scan line ...
    gain_jump_range: tuple[float, float] = (0.6, 1.6)      # ... by this factor
    dose_drift_range: tuple[float, float] = (0.5, 1.0)     # dose at the last line / at the first
    lag_range: tuple[float, float] = (0.0, 0.5)            # detector lag along the fast scan
    line_jitter_pm_range: tuple[float, float] = (0.0, 12.0)  # per-line shift along x, rms
    glitch_prob: float = 0.2         # a few scan lines repeated, dropped to the offset or saturated
    drift_max: float = 0.03          # shear / scale from sample drift over the frame

    def __post_init__(self) -> None:
        problems = [text for bad, text in _config_checks(self) if bad]
        if problems:
            raise ValueError("invalid SynthConfig: " + "; ".join(problems))

    @property
    def nominal_zoom(self) -> float:
        return float(np.sqrt(self.zoom_range[0] * self.zoom_range[1]))

    @property
    def nominal_pixel_size_pm(self) -> float:
        return self.pixel_size_pm / self.nominal_zoom

    @property
    def pixel_size_range_pm(self) -> tuple[float, float]:
        return (self.pixel_size_pm / self.zoom_range[1], self.pixel_size_pm / self.zoom_range[0])

    @property
    def nominal_atom_radius_px(self) -> float:
        return self.atom_radius_px * self.nominal_zoom

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SynthConfig fields: {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @classmethod
    def physical(cls, **changes) -> SynthConfig:
        """The wide physical world: every scene, an aberrated probe, 7-40 pm per pixel."""
        base = dict(imaging="probe", scenes=SCENES,
                    scene_weights=(3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 0.4),
                    pixel_size_pm=40.0, zoom_range=(1.0, 40.0 / 7.0), atom_radius_px=1.25,
                    dopant_z=(7, 7, 14, 14, 14, 15, 26, 29, 78), dopant_fraction_range=(0.0, 0.05),
                    removed_fraction_range=(0.0, 0.7), dose_range=(2.0, 300.0),
                    poisson_prob=1.0, gauss_noise_range=(0.0, 0.0), scan_noise_range=(0.0, 0.0),
                    blur_prob=0.0, background_range=(0.0, 1.0), gamma_range=(1.0, 1.0),
                    saturation_prob=0.1, saturation_range=(3.0, 30.0))
        return cls(**{**base, **changes})

    def without_noise(self) -> SynthConfig:
        """The same tiles' geometry, rendered clean: no noise, blur, background, gamma or clipping."""
        return replace(self, saturation_prob=0.0, poisson_prob=0.0, gauss_noise_range=(0.0, 0.0),
                       scan_noise_range=(0.0, 0.0), blur_prob=0.0, background_range=(0.0, 0.0),
                       gamma_range=(1.0, 1.0), read_noise_range=(0.0, 0.0), gain_jump_prob=0.0,
                       dose_drift_range=(1.0, 1.0), lag_range=(0.0, 0.0),
                       line_jitter_pm_range=(0.0, 0.0), glitch_prob=0.0, contamination_prob=0.0)


def _config_checks(c: SynthConfig) -> list[tuple[bool, str]]:
    ranges = [f.name for f in fields(c) if f.name.endswith("_range")]
    probs = [f.name for f in fields(c) if f.name.endswith("_prob")]
    return [
        (c.lattice not in LATTICES, f"lattice {c.lattice!r} not one of {LATTICES}"),
        (c.imaging not in IMAGING, f"imaging {c.imaging!r} not one of {IMAGING}"),
        (any(s not in SCENES for s in c.scenes), f"scenes {c.scenes} not all in {SCENES}"),
        (len(c.scenes) != len(c.scene_weights) or any(w < 0 for w in c.scene_weights)
         or (c.scenes and sum(c.scene_weights) <= 0),
         "scene_weights: one weight >= 0 per scene, not all zero"),
        (bool(c.scenes) and c.imaging != "probe", "scenes need imaging='probe'"),
        (not c.voltages_kv or min(c.voltages_kv) <= 0, "voltages_kv must be > 0"),
        (c.n_classes not in (1, 2), f"n_classes must be 1 or 2, not {c.n_classes}"),
        (c.size_px < 8 or c.size_px % 8, f"size_px must be a positive multiple of 8, not {c.size_px}"),
        (c.pixel_size_pm <= 0, "pixel_size_pm must be > 0"),
        (c.zoom_range[0] <= 0, "zoom_range must be > 0"),
        (c.atom_radius_px < 1, "atom_radius_px must be >= 1"),
        (not c.dopant_z, "dopant_z must name at least one element"),
        *[(not isinstance(getattr(c, r), tuple) or len(getattr(c, r)) != 2
           or getattr(c, r)[0] > getattr(c, r)[1],
           f"{r} must be (low, high) with low <= high") for r in ranges],
        *[(not 0.0 <= getattr(c, p) <= 1.0, f"{p} must be in [0, 1]") for p in probs],
    ]
