"""The classical baseline: a Laplacian-of-Gaussian peak finder with a brightness rule for heavy
atoms, its parameters tuned per case on frames of a separate seed (never the scored frames).

find_peaks: background removed (the frame minus a Gaussian blur of 2 atom spacings), a
Laplacian of Gaussian of width `sigma` x spacing, local maxima within 0.35 x spacing that stand
`threshold` robust standard deviations (MAD) above the median; subpixel centres by a
3x3 centroid. Heavy: peak height above `heavy_factor` x the median peak height of the frame.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from benchmarks.evaluation import scoring

SIGMAS = (0.12, 0.2, 0.3)                  # x atom spacing
THRESHOLDS = (0.0, 0.5, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0, 15.0, 20.0)   # robust std above the median
HEAVY_FACTORS = (0.0, 1.5, 1.8, 2.2, 2.7, 3.3, 4.0)


@dataclass(frozen=True)
class PeakParams:
    sigma: float = 0.2
    threshold: float = 4.0
    heavy_factor: float = 2.2


def _response(image: np.ndarray, spacing_px: float, sigma: float) -> np.ndarray:
    img = image.astype(np.float64)
    img = img - ndimage.gaussian_filter(img, 2 * spacing_px, mode="reflect")
    return -ndimage.gaussian_laplace(img, max(0.7, sigma * spacing_px), mode="reflect")


def find_peaks(image: np.ndarray, spacing_px: float, params: PeakParams,
               response: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Peaks (x, y) [N, 2] and class [N] (1 = heavy) of one frame."""
    resp = _response(image, spacing_px, params.sigma) if response is None else response
    size = max(3, int(2 * round(0.35 * spacing_px) + 1))
    med = np.median(resp)
    mad = 1.4826 * np.median(np.abs(resp - med)) or 1.0
    peak = (resp == ndimage.maximum_filter(resp, size, mode="nearest")) \
        & (resp > med + params.threshold * mad)
    ys, xs = np.nonzero(peak)
    if len(xs) == 0:
        return np.empty((0, 2), np.float32), np.empty(0, np.uint8)
    xy = _refine(resp - med, xs, ys)
    height = resp[ys, xs] - med
    heavy = height > params.heavy_factor * np.median(height)
    return xy, heavy.astype(np.uint8)


def _refine(resp: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = resp.shape
    acc = np.zeros((len(xs), 3))
    for dy, dx in itertools.product((-1, 0, 1), repeat=2):
        yy, xx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
        v = np.clip(resp[yy, xx], 0, None)
        acc += np.stack([v, v * (xs + dx), v * (ys + dy)], 1)
    acc[:, 0] = np.where(acc[:, 0] > 0, acc[:, 0], 1.0)
    return np.stack([acc[:, 1] / acc[:, 0], acc[:, 2] / acc[:, 0]], 1).astype(np.float32)


def tune(frames: list) -> PeakParams:
    """Best detection F1 over the grid (ties: the first), then the best heavy F1 for it."""
    best, best_f1 = PeakParams(), -1.0
    for sigma in SIGMAS:
        responses = [_response(f.image, f.spacing_px, sigma) for f in frames]
        for thr in THRESHOLDS:
            p = PeakParams(sigma, thr)
            f1 = scoring.pool(_scores(frames, p, responses))["f1"] or 0.0
            if f1 > best_f1:
                best, best_f1 = p, f1
    responses = [_response(f.image, f.spacing_px, best.sigma) for f in frames]
    best_h, best_hf1 = best, -1.0
    for k in HEAVY_FACTORS:
        p = PeakParams(best.sigma, best.threshold, k)
        pooled = scoring.pool(_scores(frames, p, responses))
        pr, rc = pooled["impurity_precision"] or 0.0, pooled["impurity_recall"] or 0.0
        hf1 = 2 * pr * rc / (pr + rc) if pr + rc else 0.0
        if hf1 > best_hf1:
            best_h, best_hf1 = p, hf1
    return best_h


def _scores(frames, params: PeakParams, responses) -> list:
    out = []
    for f, resp in zip(frames, responses):
        xy, cls = find_peaks(f.image, f.spacing_px, params, resp)
        out.append(scoring.score_frame(f.xy, f.cls, xy, cls, f.image.shape, f.spacing_px,
                                       f.pixel_size_pm))
    return out


def score(frames: list, params: PeakParams) -> list:
    """Per-frame scores of the baseline with `params`."""
    return _scores(frames, params, [None] * len(frames))
