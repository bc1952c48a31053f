"""Per-atom brightness, comparable across frames (the basis of the heavy-atom class split)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def atom_intensities(frame: np.ndarray, xy: np.ndarray, radius_px: float) -> np.ndarray:
    smooth = ndimage.gaussian_filter(frame.astype(np.float64), max(radius_px / 2, 0.5))
    vals = ndimage.map_coordinates(smooth, [xy[:, 1], xy[:, 0]], order=1, mode="nearest")
    vals = vals - np.percentile(frame, 5)
    return vals / max(float(np.median(vals)), 1e-9) if len(vals) else vals
