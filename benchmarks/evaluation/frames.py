"""One evaluation frame with its truth, and the one function that images a sample into it.

Truth convention (the service's): x = column, y = row, in pixels of the frame, origin at the
top-left pixel centre. Class 0 = light / lattice atom, class 1 = heavy (the artifact's
`impurity`: heavier atoms, Z >= 14, or the heavy columns of an oxide).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from benchmarks.evaluation import optics


@dataclass
class Frame:
    case: str
    segment: str
    index: int
    image: np.ndarray                 # [H, W] float32 detector values (ADU)
    pixel_size_pm: float
    xy: np.ndarray                    # [N, 2] truth (x, y) in pixels
    cls: np.ndarray                   # [N] uint8 truth class
    spacing_pm: float                 # atom spacing that scales the matching radius
    in_distribution: bool = True
    conditions: dict = field(default_factory=dict)

    @property
    def spacing_px(self) -> float:
        return self.spacing_pm / self.pixel_size_pm


@dataclass
class Sample:
    """Atoms that are truth (xy_pm, z, cls) and what else the beam sees (films: xy_pm, z)."""

    xy_pm: np.ndarray
    z: np.ndarray
    cls: np.ndarray
    n_per_column: np.ndarray | None = None
    clutter: list = field(default_factory=list)       # [(xy_pm, z)] not in the truth
    extra_weight: np.ndarray | None = None             # overrides the weight of the truth atoms

    def scene(self) -> optics.Scene:
        n = 1 if self.n_per_column is None else self.n_per_column
        w = optics.atom_weight(self.z, n) if self.extra_weight is None else self.extra_weight
        return optics.Scene(self.xy_pm, w, [(xy, optics.atom_weight(z)) for xy, z in self.clutter])


def image_sample(rng: np.random.Generator, sample: Sample, shape: tuple[int, int],
                 pixel_pm: float, optic: optics.Optics, scan: optics.Scan,
                 det: optics.Detector, background_c: float = 0.0,
                 gradient_c: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render, scan and read out `sample`. Returns image, truth xy (px) and truth cls, keeping
    truth atoms that fall inside the frame. `background_c` / `gradient_c`: a slow background
    (level, and ramp across the frame) in carbon-peak units."""
    offsets = optics.line_offsets_px(rng, shape[0], scan)
    clean = optics.render(sample.scene(), optic, shape, pixel_pm, scan, offsets)
    if background_c or gradient_c:
        ramp = np.linspace(-0.5, 0.5, shape[1])[None, :] * np.cos(rng.uniform(0, np.pi)) \
            + np.linspace(-0.5, 0.5, shape[0])[:, None] * np.sin(rng.uniform(0, np.pi))
        clean = clean + background_c + gradient_c * ramp
    image = optics.detect(rng, clean, det)
    xy = optics.to_pixels(sample.xy_pm, shape, pixel_pm, scan, offsets,
                          optics.image_sigma_pm(optic) / pixel_pm)
    h, w = shape
    inside = (xy[:, 0] > -0.5) & (xy[:, 0] < w - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < h - 0.5)
    return image, xy[inside].astype(np.float32), sample.cls[inside].astype(np.uint8)


def condition_dict(optic: optics.Optics, scan: optics.Scan, det: optics.Detector) -> dict:
    """The imaging conditions of a frame, flat, for the report and the movie file."""
    return {"defocus_nm": optic.defocus_nm, "astig_nm": optic.astig_nm, "coma_nm": optic.coma_nm,
            "source_pm": optic.source_pm, "kv": optic.kv, "dose": det.dose, "gain": det.gain,
            "offset": det.offset, "read_noise": det.read_noise, "lag": det.lag,
            "jitter_px": scan.jitter_px, "glitch_rate": scan.glitch_rate, "shear": scan.shear}
