"""A synthetic HAADF-STEM movie of graphene with ground truth (demo and test data).

Independent of `trainer/` (its own small generator, not tuned to any model):
graphene (C-C 142 pm, Z = 6) with a few substitutional Si dopants (Z = 14), HAADF intensity
~ Z^1.7, a Gaussian probe (sigma 45 pm), slow sample drift, a hole that grows frame by frame
(atoms removed around a centre), a scan-like background gradient and Poisson counting noise.

Ground truth per frame: positions (x = column, y = row, pixel centres at integers) of the atoms
whose centre lies inside the frame's pixel area (-0.5 <= x < W - 0.5, same for y), and their
class (0 = lattice carbon, 1 = impurity). Atoms just outside still leak some intensity in.

`.npz` layout (`save_movie` / `load_movie`): `frames` uint16 [T, H, W]; `xy` float32 [sum N, 2]
and `cls` uint8 [sum N], all frames' atoms concatenated; `n_per_frame` int64 [T];
`pixel_size_pm` float64 scalar; `format` = "elit-movie-1".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

CC_BOND_PM = 142.0
PROBE_SIGMA_PM = 45.0
Z_CARBON, Z_SILICON = 6, 14
HAADF_EXPONENT = 1.7
MOVIE_FORMAT = "elit-movie-1"


@dataclass
class Movie:
    frames: np.ndarray          # uint16 [T, H, W] raw counts
    xy: list[np.ndarray]        # per frame float32 [N, 2] true (x, y) in pixels
    cls: list[np.ndarray]       # per frame uint8 [N]: 0 lattice, 1 impurity
    pixel_size_pm: float


def graphene_lattice(extent_pm: float, rng: np.random.Generator) -> np.ndarray:
    """Atom positions [N, 2] (pm) of a randomly rotated and shifted sheet covering a square
    of side `extent_pm` centred on the origin."""
    a = CC_BOND_PM * np.sqrt(3.0)
    a1, a2 = np.array([a, 0.0]), np.array([a / 2, a * np.sqrt(3.0) / 2])
    n = int(extent_pm / a) + 4
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    cells = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    sites = np.concatenate([cells, cells + (a1 + a2) / 3.0])
    theta = rng.uniform(0, np.pi / 3)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    sites = sites @ rot.T + rng.uniform(0, a, 2)
    half = extent_pm / 2
    return sites[(np.abs(sites) <= half).all(axis=1)]


def render(xy_px: np.ndarray, z: np.ndarray, shape: tuple[int, int], sigma_px: float
           ) -> np.ndarray:
    """Sum of Gaussians of height Z^1.7 at exact (sub-pixel) positions, float64 [H, W]."""
    h, w = shape
    r = int(np.ceil(4 * sigma_px))
    off = np.arange(-r, r + 1)
    cx, cy = np.round(xy_px[:, 0]).astype(int), np.round(xy_px[:, 1]).astype(int)
    px = cx[:, None] + off[None, :]                                   # [N, K]
    py = cy[:, None] + off[None, :]
    gx = np.exp(-(px - xy_px[:, :1]) ** 2 / (2 * sigma_px ** 2)) * (px >= 0) * (px < w)
    gy = np.exp(-(py - xy_px[:, 1:]) ** 2 / (2 * sigma_px ** 2)) * (py >= 0) * (py < h)
    amp = z.astype(np.float64) ** HAADF_EXPONENT
    weights = amp[:, None, None] * gy[:, :, None] * gx[:, None, :]     # [N, K, K]
    flat = np.clip(py, 0, h - 1)[:, :, None] * w + np.clip(px, 0, w - 1)[:, None, :]
    return np.bincount(flat.ravel(), weights.ravel(), h * w).reshape(h, w)


def make_movie(n_frames: int = 20, size_px: int = 256, seed: int = 0, pixel_size_pm: float = 14.0,
               drift_px_per_frame: tuple[float, float] = (0.6, 0.3), hole_growth: bool = True,
               dose: float = 40.0, dopant_fraction: float = 0.015) -> Movie:
    """Generate the movie. `dose`: expected counts at the peak of a carbon atom; the background
    is ~25 % of that, with a +-20 % scan-like gradient."""
    rng = np.random.default_rng(seed)
    drift = np.asarray(drift_px_per_frame, float)
    margin_px = 4 * PROBE_SIGMA_PM / pixel_size_pm + np.abs(drift).max() * n_frames + 2
    extent_pm = (size_px + 2 * margin_px) * pixel_size_pm * np.sqrt(2)
    sites = graphene_lattice(extent_pm, rng) / pixel_size_pm + (size_px - 1) / 2   # px, frame 0
    z = np.where(rng.random(len(sites)) < dopant_fraction, Z_SILICON, Z_CARBON)
    hole_c = (size_px - 1) / 2 + rng.uniform(-0.15, 0.15, 2) * size_px
    hole_r = np.linspace(0.0, 0.22 * size_px, n_frames) if hole_growth else np.zeros(n_frames)
    sigma_px = PROBE_SIGMA_PM / pixel_size_pm
    amp_c = dose / Z_CARBON ** HAADF_EXPONENT
    yy, xx = np.mgrid[0:size_px, 0:size_px] / size_px
    background = 0.25 * dose * (1 + 0.4 * (yy - 0.5) + 0.1 * (xx - 0.5))
    frames = np.empty((n_frames, size_px, size_px), np.uint16)
    xy_all, cls_all = [], []
    for t in range(n_frames):
        present = np.hypot(*(sites - hole_c).T) >= hole_r[t]      # hole fixed on the sample
        pos = sites[present] - drift * t
        expected = background + amp_c * render(pos, z[present], (size_px, size_px), sigma_px)
        frames[t] = np.clip(rng.poisson(expected), 0, np.iinfo(np.uint16).max)
        inside = ((pos >= -0.5) & (pos < size_px - 0.5)).all(axis=1)
        xy_all.append(pos[inside].astype(np.float32))
        cls_all.append((z[present][inside] == Z_SILICON).astype(np.uint8))
    return Movie(frames, xy_all, cls_all, float(pixel_size_pm))


def save_movie(movie: Movie, path) -> Path:
    path = Path(path)
    np.savez_compressed(
        path, frames=movie.frames,
        xy=np.concatenate(movie.xy) if movie.xy else np.zeros((0, 2), np.float32),
        cls=np.concatenate(movie.cls) if movie.cls else np.zeros(0, np.uint8),
        n_per_frame=np.array([len(a) for a in movie.xy], np.int64),
        pixel_size_pm=np.float64(movie.pixel_size_pm), format=np.str_(MOVIE_FORMAT))
    return path


def load_movie(path) -> Movie:
    with np.load(Path(path)) as z:
        if "format" in z and str(z["format"]) != MOVIE_FORMAT:
            raise ValueError(f"{path}: format {z['format']}, expected {MOVIE_FORMAT}")
        splits = np.cumsum(z["n_per_frame"])[:-1]
        return Movie(z["frames"], list(np.split(z["xy"], splits)),
                     list(np.split(z["cls"], splits)), float(z["pixel_size_pm"]))


def interior(xy: np.ndarray, shape: tuple[int, int], margin_px: float) -> np.ndarray:
    """Mask of positions at least `margin_px` inside the frame. Score detections on the interior
    only: atoms centred just outside the frame show up as partial blobs whose centres fall inside,
    and are (rightly) not in the truth."""
    xy = np.asarray(xy).reshape(-1, 2)
    h, w = shape
    return ((xy[:, 0] >= margin_px) & (xy[:, 0] <= w - 1 - margin_px)
            & (xy[:, 1] >= margin_px) & (xy[:, 1] <= h - 1 - margin_px))


def match_pairs(pred_xy: np.ndarray, true_xy: np.ndarray, max_dist_px: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred index, true index, distance) of a one-to-one matching minimising total distance
    among pairs closer than `max_dist_px` (linear_sum_assignment over the candidates cKDTree
    finds)."""
    pred = np.asarray(pred_xy, float).reshape(-1, 2)
    true = np.asarray(true_xy, float).reshape(-1, 2)
    none = np.empty(0, np.intp), np.empty(0, np.intp), np.empty(0)
    if len(pred) == 0 or len(true) == 0:
        return none
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(true), max_dist_px,
                                                 output_type="ndarray")
    if len(pairs) == 0:
        return none
    rows, ri = np.unique(pairs["i"], return_inverse=True)
    cols, ci = np.unique(pairs["j"], return_inverse=True)
    big = 1e6 * (max_dist_px + 1.0)
    cost = np.full((len(rows), len(cols)), big)
    cost[ri, ci] = pairs["v"]
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < big
    return rows[r[ok]], cols[c[ok]], cost[r, c][ok]


def match_atoms(pred_xy: np.ndarray, true_xy: np.ndarray, max_dist_px: float
                ) -> tuple[int, int, int]:
    """(tp, fp, fn) of the one-to-one matching of `match_pairs`."""
    n_pred = len(np.asarray(pred_xy).reshape(-1, 2))
    n_true = len(np.asarray(true_xy).reshape(-1, 2))
    tp = len(match_pairs(pred_xy, true_xy, max_dist_px)[0])
    return tp, n_pred - tp, n_true - tp


def main(argv: list[str] | None = None) -> int:
    """`python -m elit_stream.tools.movie --out FILE.npz`: write a movie (how samples/ is made)."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m elit_stream.tools.movie",
                                description="Write a synthetic graphene movie with its ground "
                                "truth (the .npz layout of this module's docstring).")
    p.add_argument("--out", required=True, metavar="FILE.npz", help="where to write it")
    p.add_argument("--frames", type=int, default=20, help="number of frames (default 20)")
    p.add_argument("--size", type=int, default=256, metavar="PX", help="frame side in pixels "
                   "(default 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--pixel-size-pm", type=float, default=14.0, metavar="PM",
                   help="pixel size in picometres (default 14.0)")
    args = p.parse_args(argv)
    movie = make_movie(n_frames=args.frames, size_px=args.size, seed=args.seed,
                       pixel_size_pm=args.pixel_size_pm)
    out = save_movie(movie, args.out)
    print(f"{out}: {args.frames} frames of {args.size}x{args.size} px at {args.pixel_size_pm:g} "
          f"pm, {sum(len(a) for a in movie.xy)} atoms in the ground truth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
