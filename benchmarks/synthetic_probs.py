"""Synthetic ensemble maps for benchmarks: Gaussian atom blobs on a lattice, per-member jitter."""
from __future__ import annotations

import numpy as np


def synthetic_probs(m: int = 8, c: int = 2, size: int = 512, spacing_px: float = 10.0,
                    sigma_px: float = 2.0, seed: int = 0) -> np.ndarray:
    """[M, C, size, size] float32: blobs every `spacing_px`, ~5 % class 1, members jittered."""
    rng = np.random.default_rng(seed)
    g = np.arange(spacing_px / 2, size, spacing_px)
    cy, cx = [a.ravel() for a in np.meshgrid(g, g, indexing="ij")]
    cls = (rng.random(cy.size) < 0.05).astype(int)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    probs = np.zeros((m, c, size, size), np.float32)
    r = int(3 * sigma_px) + 1
    for k in range(m):
        jy, jx = rng.normal(0, 0.3, (2, cy.size))
        amp = np.clip(rng.normal(0.95, 0.05, cy.size), 0, 1)
        for y0, x0, cl, a in zip(cy + jy, cx + jx, cls, amp):
            ys, xs = slice(max(int(y0) - r, 0), int(y0) + r + 1), slice(max(int(x0) - r, 0), int(x0) + r + 1)
            blob = a * np.exp(-((yy[ys, xs] - y0) ** 2 + (xx[ys, xs] - x0) ** 2) / (2 * sigma_px ** 2))
            np.maximum(probs[k, min(cl, c - 1), ys, xs], blob, out=probs[k, min(cl, c - 1), ys, xs])
    return probs
