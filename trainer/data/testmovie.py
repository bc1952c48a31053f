"""A test movie for the ELIT loop, with imaging conditions unlike the trainer's simulations.

Owns an independent graphene-movie generator and the detection scoring against its truth. It does
NOT use ``trainer.data.synth``/``trainer.data.lattice`` (different code, different physics on purpose), and its
settings were chosen once on physical grounds, not tuned to what the networks find easy:

- probe: Gaussian core + Lorentzian tails (the synthetic training data has pure Gaussians);
- noise: Gaussian read noise + horizontal scan-line *shifts* (each row displaced, correlated from row
  to row) + sample drift between frames (the trainer uses Poisson noise and per-row *offsets*);
- a hole that opens part-way and grows over the movie;
- an amorphous carbon patch (random positions, no lattice, re-arranging between frames): its atoms
  are real atoms and ARE in the truth (class 3), so missing them costs recall;
- optionally a bright, diffuse contamination blob (hydrocarbon) on the lattice and a background
  gradient before the change too (``contamination_peak``, ``gradient_before``);
- at frame T/2 the imaging conditions change: extra defocus blur, lower contrast against the noise,
  and a background gradient.

The truth lists lattice carbon (class 1), heavier substitutional dopants (class 2, Si) and amorphous
carbon (class 3) per frame.
``python -m trainer.data.testmovie --out movie.npz [--seed 7 --set contamination_peak=2 ...]`` writes ``frames [T, H, W]`` float32 plus the truth
(``truth_xy``, ``truth_cls``, ``truth_offsets``), ``pixel_size_pm``, ``bond_px`` and the settings.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MOVIE_FORMAT = "elit-test-movie"


@dataclass(frozen=True)
class MovieConfig:
    frames: int = 24
    size_px: int = 256
    pixel_size_pm: float = 11.0
    bond_pm: float = 142.0
    seed: int = 0
    dopant_fraction: float = 0.012
    z_exponent: float = 1.6          # HAADF ~ Z**1.6 (C = 6, Si = 14)
    thermal_pm: float = 6.0          # rms displacement per axis, redrawn every frame
    core_sigma_pm: float = 42.0      # probe: Gaussian core ...
    tail_gamma_pm: float = 110.0     # ... plus Lorentzian tails of this half-width ...
    tail_weight: float = 0.35        # ... carrying this fraction of the probe's intensity
    read_noise: float = 0.22         # Gaussian, relative to a carbon peak
    line_jitter_px: float = 0.6      # rms horizontal shift of scan lines
    drift_px_per_frame: tuple[float, float] = (0.9, -0.5)
    hole_start: float = 0.25         # fraction of the movie when the hole opens
    hole_max_radius_px: float = 60.0
    amorphous_radius_px: float = 48.0
    amorphous_density: float = 1.2   # relative to graphene's atom density
    amorphous_turnover: float = 0.3  # fraction of amorphous atoms re-placed every frame
    change_frame_frac: float = 0.5   # imaging conditions change here
    defocus_sigma_pm: float = 38.0   # extra blur after the change
    contrast_after: float = 0.55     # signal scale after the change (noise unchanged)
    gradient_after: float = 0.6      # background ramp after the change, in carbon peaks
    gradient_before: float = 0.0     # background ramp before the change, in carbon peaks
    contamination_peak: float = 0.0  # diffuse contamination blob, peak in carbon peaks (0: none)
    contamination_sigma_px: float = 22.0

    @property
    def bond_px(self) -> float:
        return self.bond_pm / self.pixel_size_pm


@dataclass
class Movie:
    frames: np.ndarray               # float32 [T, H, W]
    truth_xy: list[np.ndarray]       # per frame float32 [n, 2] (x = column, y = row)
    truth_cls: list[np.ndarray]      # per frame uint8 [n]: 1 carbon, 2 dopant, 3 amorphous carbon
    amorphous_xy: list[np.ndarray]   # per frame: the amorphous atoms alone (also in the truth)
    config: MovieConfig


# ----------------------------------------------------------------------------- geometry


def honeycomb_pm(half_extent_pm: float, bond_pm: float, angle_rad: float) -> np.ndarray:
    """Graphene sites [N, 2] in pm covering a square of the given half extent, rotated."""
    a = bond_pm * np.sqrt(3.0)
    a1, a2 = np.array([a, 0.0]), np.array([a / 2, a * np.sqrt(3) / 2])
    basis = np.array([[0.0, 0.0], [a / 2, bond_pm / 2]])
    n = int(np.ceil(2 * half_extent_pm / a)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    cells = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    sites = (cells[:, None, :] + basis[None]).reshape(-1, 2)
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    sites = sites @ np.array([[c, s], [-s, c]])
    return sites[np.all(np.abs(sites) <= half_extent_pm, axis=1)]


def hard_core_points(rng: np.random.Generator, n: int, centre: np.ndarray, radius: float,
                     min_dist: float, existing: np.ndarray | None = None) -> np.ndarray:
    """Up to n random points in a disc, no two closer than min_dist (rejection sampling)."""
    pts = [] if existing is None else list(existing)
    tries = 0
    while len(pts) < n and tries < 60 * n:
        tries += 1
        r, phi = radius * np.sqrt(rng.random()), 2 * np.pi * rng.random()
        p = centre + r * np.array([np.cos(phi), np.sin(phi)])
        if not pts or np.min(np.hypot(*(np.asarray(pts) - p).T)) >= min_dist:
            pts.append(p)
    return np.asarray(pts, float).reshape(-1, 2)


# ----------------------------------------------------------------------------- imaging


def probe_kernel(cfg: MovieConfig, extra_sigma_pm: float = 0.0) -> np.ndarray:
    """Gaussian core + Lorentzian-like tails 1/(1 + r²/γ²)^1.5, each normalised to unit integral,
    mixed by ``tail_weight``, then scaled to peak 1."""
    half = int(np.ceil(6 * cfg.tail_gamma_pm / cfg.pixel_size_pm))
    y, x = np.mgrid[-half:half + 1, -half:half + 1] * cfg.pixel_size_pm
    r2 = x ** 2 + y ** 2
    sigma2 = cfg.core_sigma_pm ** 2 + extra_sigma_pm ** 2
    core = np.exp(-r2 / (2 * sigma2))
    tail = (1 + r2 / cfg.tail_gamma_pm ** 2) ** -1.5
    kernel = (1 - cfg.tail_weight) * core / core.sum() + cfg.tail_weight * tail / tail.sum()
    return kernel / kernel.max()                     # a lone carbon atom peaks at 1


def splat(xy_px: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """Bilinear deposition of point weights on a size × size grid."""
    img = np.zeros((size + 2, size + 2))
    x0, y0 = np.floor(xy_px[:, 0]).astype(int), np.floor(xy_px[:, 1]).astype(int)
    fx, fy = xy_px[:, 0] - x0, xy_px[:, 1] - y0
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx + 1, y0 + dy + 1
        ok = (xi >= 0) & (xi < size + 2) & (yi >= 0) & (yi < size + 2)
        np.add.at(img, (yi[ok], xi[ok]), (weight * w)[ok])
    return img[1:-1, 1:-1]


def shift_rows(img: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Scan-line jitter: row r is displaced horizontally by shifts_px[r] (linear interpolation)."""
    cols = np.arange(img.shape[1], dtype=float)
    return np.stack([np.interp(cols - s, cols, row) for row, s in zip(img, shifts_px)])


# ----------------------------------------------------------------------------- the movie


def make_movie(cfg: MovieConfig = MovieConfig()) -> Movie:
    rng = np.random.default_rng(cfg.seed)
    size, px = cfg.size_px, cfg.pixel_size_pm
    drift_total = np.abs(np.array(cfg.drift_px_per_frame)) * cfg.frames
    half_pm = (size / 2 + drift_total.max() + 12) * px * np.sqrt(2)
    sites = honeycomb_pm(half_pm, cfg.bond_pm, rng.uniform(0, np.pi / 3))
    is_dopant = rng.random(len(sites)) < cfg.dopant_fraction
    # sample-fixed features, in the sample frame (pixels, before drift)
    centre = np.array([size / 2, size / 2])
    amorph_c = centre + np.array([0.28, -0.27]) * size
    hole_c = centre + np.array([-0.2, 0.18]) * size
    sites_px = sites / px + centre
    in_amorph = np.hypot(*(sites_px - amorph_c).T) < cfg.amorphous_radius_px
    density = 4 / (3 * np.sqrt(3) * cfg.bond_px ** 2)           # atoms per px² in graphene
    n_amorph = int(cfg.amorphous_density * density * np.pi * cfg.amorphous_radius_px ** 2)
    amorph = hard_core_points(rng, n_amorph, amorph_c, cfg.amorphous_radius_px, 0.75 * cfg.bond_px)
    change = round(cfg.change_frame_frac * cfg.frames)
    kernels = (probe_kernel(cfg), probe_kernel(cfg, cfg.defocus_sigma_pm))
    frames, t_xy, t_cls, a_xy = [], [], [], []
    for t in range(cfg.frames):
        drift = np.array(cfg.drift_px_per_frame) * t
        progress = (t / max(cfg.frames - 1, 1) - cfg.hole_start) / (1 - cfg.hole_start)
        hole_r = cfg.hole_max_radius_px * np.clip(progress, 0, 1) ** 0.7
        keep = ~in_amorph & (np.hypot(*(sites_px - hole_c).T) >= hole_r)
        xy = sites_px[keep] + rng.normal(0, cfg.thermal_pm / px, (keep.sum(), 2)) + drift
        z = np.where(is_dopant[keep], 14.0, 6.0)
        amorph = _turn_over(rng, amorph, cfg, amorph_c, hole_c, hole_r)
        amorph_amp = rng.uniform(0.6, 1.4, len(amorph))
        all_xy = np.concatenate([xy, amorph + drift])
        amp = np.concatenate([(z / 6.0) ** cfg.z_exponent, amorph_amp])
        after = t >= change
        image = _acquire(rng, cfg, all_xy, amp, kernels[after], after, drift)
        cls = np.concatenate([np.where(is_dopant[keep], 2, 1), np.full(len(amorph), 3)])
        inside = np.all((all_xy >= -0.5) & (all_xy < size - 0.5), axis=1)
        frames.append(image)
        t_xy.append(all_xy[inside].astype(np.float32))
        t_cls.append(cls[inside].astype(np.uint8))
        a_xy.append((amorph + drift).astype(np.float32))
    return Movie(np.stack(frames).astype(np.float32), t_xy, t_cls, a_xy, cfg)


def _turn_over(rng, amorph, cfg, amorph_c, hole_c, hole_r) -> np.ndarray:
    """Re-place a fraction of the amorphous atoms (beam-induced re-arrangement)."""
    stay = rng.random(len(amorph)) >= cfg.amorphous_turnover
    kept = amorph[stay]
    moved = hard_core_points(rng, len(amorph), amorph_c, cfg.amorphous_radius_px,
                             0.75 * cfg.bond_px, existing=kept)
    return moved[np.hypot(*(moved - hole_c).T) >= hole_r]


def _acquire(rng, cfg: MovieConfig, xy, amp, kernel, after: bool, drift) -> np.ndarray:
    size = cfg.size_px
    pad = kernel.shape[0] // 2 + 2
    points = splat(xy + pad, amp, size + 2 * pad)
    clean = _fft_convolve(points, kernel)[pad:pad + size, pad:pad + size]
    clean = clean + contamination(cfg, drift)
    if after:
        clean = cfg.contrast_after * clean
    ramp = np.linspace(0, cfg.gradient_after if after else cfg.gradient_before, size)
    clean = clean + ramp[None, :] * 0.6 + ramp[:, None] * 0.4
    shifts = np.zeros(size)
    for r in range(1, size):                         # AR(1): neighbouring lines move together
        shifts[r] = 0.8 * shifts[r - 1] + rng.normal(0, cfg.line_jitter_px * 0.6)
    image = shift_rows(clean, shifts) + rng.normal(0, cfg.read_noise, clean.shape)
    return 100.0 + 800.0 * image


def contamination(cfg: MovieConfig, drift) -> np.ndarray:
    """A diffuse bright blob fixed to the sample (moves with the drift): a Gaussian plus two
    smaller lumps, peak ``contamination_peak`` carbon peaks; zero when that is 0."""
    size = cfg.size_px
    if cfg.contamination_peak <= 0:
        return np.zeros((size, size))
    y, x = np.mgrid[:size, :size].astype(float)
    c = feature_centres_px(cfg, 0)["contamination"] + np.asarray(drift)
    s = cfg.contamination_sigma_px
    blob = np.zeros((size, size))
    for (dx, dy), f, w in (((0, 0), 1.0, 1.0), ((0.9, -0.6), 0.5, 0.6), ((-0.7, 0.8), 0.6, 0.5)):
        blob += w * np.exp(-((x - c[0] - dx * s) ** 2 + (y - c[1] - dy * s) ** 2) / (2 * (f * s) ** 2))
    return cfg.contamination_peak * blob / blob.max()


def _fft_convolve(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.signal import fftconvolve
    return fftconvolve(img, kernel, mode="same")


# ----------------------------------------------------------------------------- file + scoring


def save_movie(movie: Movie, path: Path) -> None:
    counts = [len(x) for x in movie.truth_xy]
    np.savez_compressed(
        path, format=np.array(MOVIE_FORMAT), frames=movie.frames,
        truth_xy=np.concatenate(movie.truth_xy), truth_cls=np.concatenate(movie.truth_cls),
        truth_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        amorphous_xy=np.concatenate(movie.amorphous_xy),
        amorphous_offsets=np.concatenate([[0], np.cumsum([len(a) for a in movie.amorphous_xy])]),
        pixel_size_pm=np.float32(movie.config.pixel_size_pm),
        bond_px=np.float32(movie.config.bond_px),
        config=np.array(json.dumps(asdict(movie.config))))


GRAPHENE_BOND_PM = 142.0


def load_truth(path: Path) -> dict | None:
    """Truth of a movie file: {"xy": [...], "cls": [...], "bond_px", "pixel_size_pm"} (+ "segment":
    a name per frame, when the file has them); None if the file carries no truth.

    Reads the movies written here (classes 1 lattice C, 2 Si, 3 amorphous C) and the evaluation
    suite's drift movie (`python -m benchmarks.evaluate`, docs/evaluation.md: classes 0 carbon,
    1 Si, mapped to 1 and 2; no `bond_px`, so graphene's 142 pm over the pixel size)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return None
    with np.load(path, allow_pickle=False) as z:
        if "truth_xy" not in z:
            return None
        off, cls = z["truth_offsets"], z["truth_cls"]
        pixel = float(z["pixel_size_pm"])
        evaluation = "bond_px" not in z
        truth = {"xy": np.split(z["truth_xy"], off[1:-1]),
                 "cls": np.split(cls + 1 if evaluation else cls, off[1:-1]),
                 "bond_px": GRAPHENE_BOND_PM / pixel if evaluation else float(z["bond_px"]),
                 "pixel_size_pm": pixel}
        if "segment" in z:
            truth["segment"] = [str(s) for s in z["segment"]]
        return truth


def feature_centres_px(cfg: MovieConfig, frame: int) -> dict:
    """Centres (with drift) of the amorphous patch and the hole in ``frame`` (pixels)."""
    centre = np.array([cfg.size_px / 2] * 2)
    drift = np.array(cfg.drift_px_per_frame) * frame
    return {"amorphous": centre + np.array([0.28, -0.27]) * cfg.size_px + drift,
            "hole": centre + np.array([-0.2, 0.18]) * cfg.size_px + drift,
            "contamination": centre + np.array([0.2, 0.24]) * cfg.size_px + drift}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data.testmovie", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--frames", type=int, default=MovieConfig.frames)
    p.add_argument("--size", type=int, default=MovieConfig.size_px, help="frame size in px")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview", type=Path, help="PNG of a few frames with the truth overlaid")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other MovieConfig field, e.g. --set contamination_peak=2 "
                   "--set drift_px_per_frame=-0.7,0.8 (repeatable)")
    args = p.parse_args(argv)
    movie = make_movie(MovieConfig(frames=args.frames, size_px=args.size, seed=args.seed,
                                   **_overrides(args.set)))
    save_movie(movie, args.out)
    print(f"wrote {args.frames} frames {args.size}×{args.size} px at {movie.config.pixel_size_pm} pm/px, "
          f"{sum(map(len, movie.truth_xy))} true atoms -> {args.out}")
    if args.preview:
        preview_png(movie, args.preview)
    return 0


def _overrides(items: list[str]) -> dict:
    fields = MovieConfig.__dataclass_fields__
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        out[key] = tuple(float(v) for v in value.split(",")) if "," in value else type(
            getattr(MovieConfig(), key))(value)
    return out


def preview_png(movie: Movie, path: Path) -> None:
    from matplotlib.figure import Figure

    t_all = len(movie.frames)
    picks = sorted({0, t_all // 2 - 1, t_all // 2, t_all - 1})
    fig = Figure(figsize=(4 * len(picks), 8), layout="constrained")
    axes = fig.subplots(2, len(picks), squeeze=False)
    for col, t in enumerate(picks):
        for row in range(2):
            axes[row, col].imshow(movie.frames[t], cmap="gray")
            axes[row, col].set_axis_off()
        xy, cls = movie.truth_xy[t], movie.truth_cls[t]
        colour = np.array(["cyan", "red", "yellow"])[np.clip(cls, 1, 3) - 1]
        axes[1, col].scatter(xy[:, 0], xy[:, 1], s=3, c=colour)
        axes[0, col].set_title(f"frame {t}", fontsize=9)
    fig.suptitle("test movie; bottom: truth (cyan lattice C, red Si, yellow amorphous C)")
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    raise SystemExit(main())
