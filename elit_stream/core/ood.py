"""Out-of-distribution score of a frame against the artifact's in-distribution reference.

The manifest's optional `ood_reference` (written by `elit-train reference`, docs/artifact.md)
holds, per frame figure (`postprocess.FrameFigures`), quantiles of log(value + floor) over
synthetic in-distribution frames. A frame's score is the largest excursion of any figure outside
its [low, high] band, in units of that figure's interquartile range (`scale`):

    z_k = max(0, L_k - high_k, low_k - L_k) / scale_k,   L_k = log(figure_k + floor_k)
    ood = max_k z_k;   flagged when ood > flag_above

(a figure whose `side` is "high" counts only above `high`, "low" only below `low`). A frame whose
pixel size lies outside the artifact's trained range (`pixel_size_range_pm`) adds the excursion
`pixel_size` = log(factor outside the range) / log 2 (1 = twice as coarse or fine as anything
trained on): rescaling it to the model's pixel size is an extrapolation. So 0 means
every figure lies inside the band seen on in-distribution frames; 1 means one figure lies an
interquartile range beyond it. Absolute: it needs no history, so the first frame of a
session is scored like any other. Figures computed at another post-processing threshold than the
reference's are not comparable: `score` then returns None. Pure numpy, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from elit_stream.core.postprocess import FIGURES, FrameFigures

REFERENCE_VERSION = 1
PIXEL_SIZE_SCALE = math.log(2.0)   # the pixel_size excursion: 1 = a factor 2 outside the range


class ReferenceError(ValueError):
    """The manifest's ood_reference cannot be used; the message names the field."""


@dataclass(frozen=True)
class FigureBand:
    low: float       # quantiles of log(value + floor) over the reference frames
    median: float
    high: float
    scale: float     # interquartile range of the same, > 0
    floor: float     # > 0, added before the log (figures may be 0)
    side: str = "both"   # which excursions count: "both", "low" or "high"


@dataclass(frozen=True)
class OodScore:
    score: float
    flagged: bool
    excursions: dict[str, float]    # z_k per figure (0 inside the band)

    @property
    def worst(self) -> str:
        return max(self.excursions, key=self.excursions.get)


@dataclass(frozen=True)
class OodReference:
    bands: dict[str, FigureBand]
    flag_above: float
    threshold: float              # the post-processing threshold the figures were computed at
    frames: int
    pixel_range_pm: tuple[float, float] | None = None   # the artifact's trained pixel sizes

    @classmethod
    def from_manifest(cls, ref: dict, pixel_range_pm=None) -> OodReference:
        """From the manifest's `ood_reference` (schema-checked already); figures this service
        does not compute are ignored, and at least one known figure is required."""
        known = set(FIGURES)
        bands = {}
        for name, b in ref["figures"].items():
            if name not in known:
                continue
            band = FigureBand(*(float(b[k]) for k in ("low", "median", "high", "scale", "floor")),
                              side=b.get("side", "both"))
            if not (band.low <= band.median <= band.high and band.scale > 0 and band.floor > 0):
                raise ReferenceError(f"ood_reference.figures.{name}: need low <= median <= high, "
                                     f"scale > 0 and floor > 0, got {b}")
            bands[name] = band
        if not bands:
            raise ReferenceError(f"ood_reference: none of the figures {sorted(ref['figures'])} is "
                                 f"one this service computes ({sorted(known)})")
        rng = None if pixel_range_pm is None else (float(pixel_range_pm[0]), float(pixel_range_pm[1]))
        return cls(bands, float(ref["flag_above"]), float(ref["threshold"]), int(ref["frames"]), rng)

    @classmethod
    def of(cls, ref: dict | None, pixel_range_pm=None) -> OodReference | None:
        """The artifact's `ood_reference` (may be absent: older artifacts) and its
        `pixel_size_range_pm` -> a reference or None."""
        return cls.from_manifest(ref, pixel_range_pm) if ref else None

    def score(self, figures: FrameFigures | None, threshold: float,
              pixel_size_pm: float | None = None) -> OodScore | None:
        """The frame's score, or None when the figures are missing or were computed at another
        post-processing threshold than the reference's. With the frame's pixel size and the
        artifact's range, a pixel size outside the range is an excursion too."""
        if figures is None or not math.isclose(threshold, self.threshold, abs_tol=1e-9):
            return None
        z = {}
        for name, b in self.bands.items():
            v = math.log(max(getattr(figures, name), 0.0) + b.floor)
            above = v - b.high if b.side != "low" else 0.0
            below = b.low - v if b.side != "high" else 0.0
            z[name] = round(max(0.0, above, below) / b.scale, 4)
        if pixel_size_pm is not None and self.pixel_range_pm is not None and pixel_size_pm > 0:
            lo, hi = self.pixel_range_pm
            outside = max(0.0, math.log(pixel_size_pm / hi), math.log(lo / pixel_size_pm))
            z["pixel_size"] = round(outside / PIXEL_SIZE_SCALE, 4)
        score = max(z.values())
        return OodScore(score, score > self.flag_above, z)
