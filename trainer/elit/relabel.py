"""ELIT step 3: a new training set from the good part of an experimental movie.

Owns: atoms from the selected members' mean map (probability-weighted blob centres) with their
ensemble uncertainty; the paper's patch-based Gaussian-mixture filter (``gmm_lattice_filter``); the
uncertainty filter; masks rebuilt from the kept coordinates on the *experimental* frames, with an
ignore label for regions whose atoms were dropped; the paper's augmentation for this stage (random
crops, ±90° rotations, flips, small scale jitter, Gaussian noise; no contrast or blur changes); the
dataset file (``trainer.data.synth`` format, loadable by ``train.py``) and a kept/dropped picture.

The patch GMM, and how its lattice component is identified: a 48×48 patch (at the artifact's pixel
scale) around every atom, reflect-padded at the frame edges; each patch is (a) averaged with its
180° rotation (``gmm_symmetrise``: the two graphene sublattices are inversion partners, and without
this the 2-class GMM splits sublattice A from B instead of lattice from amorphous), (b) weighted by
a centred Gaussian window of ``gmm_window`` × patch side (so a bright dopant or a hole edge far
from the atom matters less than its own neighbourhood), (c) standardised (zero mean, unit std:
contrast changes do not matter); then flattened, reduced by PCA to ``pca_dims`` dimensions, and a
2-component full-covariance ``GaussianMixture`` is fitted, **per frame** by default (imaging
conditions can change within a movie, and a joint fit then splits "before" from "after").
Patches around lattice atoms are near-copies of each other; patches in amorphous or contaminated
regions all differ. So the lattice component is the **tighter** one: the component whose
covariance has the smaller log-determinant (``gmm_keep="tight"``, default), among components
holding at least 25 % of the frame's atoms (a handful of near-identical patches, e.g. at the frame
edge, can form a tiny very tight component; seen on the test movie). Overrides: ``"large"``
(the component holding more atoms), ``"0"``/``"1"`` (a component by index, after inspecting the
picture), ``"none"`` (no GMM filtering). It is deliberately conservative: lattice atoms next to
holes, dopants, contamination and the frame edge are often dropped too (they become "ignore").

What happens to an atom the GMM calls "not lattice" (``trainer.elit.filters`` has the details):
it is **kept** when its bonds match the frame's lattice bond vectors (``geometry_rescue``: lattice
next to a frame edge, hole, dopant or contamination) or when its local Z-contrast is above
``keep_bright`` (dopants); it becomes **background** only where the ensemble and the raw frame agree
the place is empty (``dropped_as="auto"``: vacuum test); otherwise it is **ignored** (disc of
``ignore_radius_factor`` × atom radius marked 255, skipped by the loss): atom-like but not
lattice-like (amorphous carbon) is never taught as background. ``"ignore"``: never background;
``"background"``: every dropped atom is background (the paper). Around an ignored GMM-dropped atom
the ignore disc is ``region_ignore_factor`` × atom radius (~ a bond): the atoms of an amorphous
patch the ensemble missed are then not taught as background either. Atoms above the uncertainty limit
and faint blobs of the source map (peak in ``[weak_threshold, 0.5)``) are ignored too. Reasons in
``FrameAtoms.reason``: 0 kept, 1 GMM → ignore, 2 uncertainty → ignore, 3 vacuum → background,
4 faint blob → ignore.

Classes: with ``n_classes`` 2 (a 2-class parent) every atom gets class 1 (lattice) or 2 (heavy)
from its local Z-contrast (``trainer.elit.intensity``), so a 2-class parent has 2-class children;
in a frame where the parent calls at least a fifth of the atoms heavy and the atoms' heights form
two alternating sublattices (``intensity.sublattice_split``: Mo among S2, Sr among Ti-O, which
the local contrast reads as ~1 both) the heavier sublattice is class 2 instead. Where the contrast and the selected members' consensus class disagree (``class_vote``) the atom is
ignored, except (``teach_light``, default) a heavy call of the parent that the local contrast
does not confirm is settled by the frame's band pass (``intensity.bright_in_frame``: > 4x the
frame's light atoms, which a Si under contamination still is, as in the service's class check):
not bright, it is taught lattice (a parent's false heavy call is corrected, not passed on);
bright, it is taught heavy. And (``not_heavy``, default) every pixel the filters leave
open (255) becomes NOT_HEAVY (254: "not the heavier class, atom or not", a term of the loss in
``trainer.model.train.segmentation_loss``) except within the ignore disc of an atom that may be
heavy (contrast above the threshold or bright in the frame): without it a child was free to call
a bright contamination blob heavy, and did (impurity precision of its own class maps 0.23–0.32
after one iteration; docs/elit.md, session 7).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from trainer.data.synth import Dataset, SynthConfig, make_dataset, paint_discs, save_dataset
from trainer.elit.experiment import Analysis, atoms_with_uncertainty  # noqa: F401 (re-exported)
from trainer.model.artifact import normalise_minmax

IGNORE = 255
NOT_HEAVY = 254            # = trainer.model.train.NOT_HEAVY: not the heavier class, atom or not
SUBLATTICE_PARENT_FRACTION = 0.2   # the parent calls this many of a frame's atoms heavy: it sees a
#                                    heavier sublattice there (the service's dopant/compound line)


@dataclass(frozen=True)
class RelabelConfig:
    frames: str | None = None            # frame selection ("0:8", "all", ...), see parse_frames
    source: str = "mean"                 # "mean" of the selected members, or one member id
    patch_px: int = 48                   # GMM patch side at the artifact's pixel scale
    pca_dims: int = 10
    gmm_keep: str = "tight"              # tight | large | 0 | 1 | none
    gmm_symmetrise: bool = True          # average each patch with its 180° rotation
    gmm_window: float = 0.25             # Gaussian window sigma as a fraction of the patch (0: none)
    gmm_per_frame: bool = True           # fit one GMM per frame (False: one for all frames)
    std_quantile: float | None = 0.9     # drop atoms above this quantile of uncertainty ...
    std_max: float | None = None         # ... or above this absolute std (both may apply)
    dropped_as: str = "auto"             # auto (background only in vacuum) | ignore | background
    geometry_rescue: bool = True         # keep GMM-dropped atoms whose bonds match the lattice's
    keep_bright: float | None = 2.0      # never GMM-drop atoms of local Z-contrast above this
    keep_atom_like: float | None = None  # keep non-vacuum atoms of local contrast above this
    heavy_threshold: float | None = None # 2 classes: heavy above this contrast (None: 2.2)
    class_vote: bool = True              # 2 classes: teach a class only where the parent agrees
    teach_light: bool = True             # ... except a parent's heavy call nothing else sees: light
    not_heavy: bool = True               # 2 classes: ignored places are taught "not heavy" (254)
    weak_threshold: float | None = 0.25  # faint blobs (peak in [this, 0.5)) are ignored
    ignore_radius_factor: float = 1.6
    region_ignore_factor: float = 3.0    # ignored around GMM-dropped atoms (~a bond: missed atoms)
    n_classes: int = 1
    tile_px: int = 96                    # training tile side (multiple of 8)
    tiles_per_frame: int = 16
    scale_jitter: float = 0.1            # zoom drawn in [1 - j, 1 + j]
    noise_max: float = 0.08              # Gaussian noise std drawn in [0, noise_max] (of range)
    rehearsal: float = 0.0               # + this many synthetic tiles per movie tile (parent's world)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.gmm_keep not in ("tight", "large", "0", "1", "none"):
            raise ValueError(f"gmm_keep must be tight, large, 0, 1 or none, not {self.gmm_keep!r}")
        if self.dropped_as not in ("auto", "ignore", "background"):
            raise ValueError(f"dropped_as must be auto, ignore or background, not {self.dropped_as!r}")
        if not 0 <= self.rehearsal <= 10:
            raise ValueError(f"rehearsal must be in [0, 10] synthetic tiles per movie tile, not "
                             f"{self.rehearsal}")
        if self.tile_px % 8 or self.tile_px < 32:
            raise ValueError(f"tile size must be a multiple of 8 and >= 32, not {self.tile_px}")


@dataclass
class FrameAtoms:
    """Atoms of one frame on the frame's own grid; ``reason``: 0 kept, 1 GMM (ignored),
    2 uncertainty (ignored), 3 GMM (background), 4 faint blob (ignored)."""
    frame: int
    xy: np.ndarray
    std: np.ndarray
    reason: np.ndarray
    cls: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    maybe_heavy: np.ndarray | None = None    # 2 classes: could be a heavier atom (contrast, band pass)

    @property
    def kept(self) -> np.ndarray:
        return self.reason == 0


# ----------------------------------------------------------------------------- atoms


def patch_stack(image: np.ndarray, xy: np.ndarray, patch_px: int) -> np.ndarray:
    """``[n, p, p]`` patches centred on the atoms, reflect-padded at the frame edges."""
    half = patch_px // 2
    padded = np.pad(image, half, mode="reflect")
    offs = np.arange(patch_px) - half
    rows = np.rint(xy[:, 1]).astype(int)[:, None] + offs + half
    cols = np.rint(xy[:, 0]).astype(int)[:, None] + offs + half
    return padded[rows[:, :, None], cols[:, None, :]]


def patch_features(patches: np.ndarray, symmetrise: bool = True, window: float = 0.25) -> np.ndarray:
    """Symmetrise (patch + its 180° rotation) and window the patches, as described above."""
    p = patches.astype(np.float64)
    if symmetrise:
        p = 0.5 * (p + p[:, ::-1, ::-1])
    if window > 0:
        n = p.shape[-1]
        g = np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (window * n)) ** 2)
        p = (p - p.mean((1, 2), keepdims=True)) * g[:, None] * g[None, :]
    return p


def gmm_lattice_filter(patches: np.ndarray, keep: str = "tight", pca_dims: int = 10,
                       seed: int = 0, min_lattice_frac: float = 0.25) -> tuple[np.ndarray, dict]:
    """Keep mask ``[n]`` (True = lattice) from a 2-component GMM on PCA-reduced standardised
    patches (pass them through ``patch_features`` first for the documented preprocessing)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    n = len(patches)
    if keep == "none" or n < 10:
        return np.ones(n, bool), {"gmm": "skipped", "atoms": n, "dropped": 0}
    flat = patches.reshape(n, -1).astype(np.float64)
    flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-6)
    feats = PCA(n_components=min(pca_dims, n - 1, flat.shape[1]), random_state=seed).fit_transform(flat)
    gmm = GaussianMixture(2, covariance_type="full", random_state=seed, n_init=2).fit(feats)
    comp = gmm.predict(feats)
    logdet = np.array([np.linalg.slogdet(c)[1] for c in gmm.covariances_])
    sizes = np.bincount(comp, minlength=2)
    big_enough = sizes >= min_lattice_frac * n              # a tiny tight cluster is not the lattice
    tight = int(np.argmin(np.where(big_enough, logdet, np.inf))) if big_enough.any() else 0
    lattice = {"tight": tight, "large": int(np.argmax(sizes))}.get(keep)
    lattice = int(keep) if lattice is None else lattice
    info = {"gmm": keep, "lattice_component": lattice, "component_sizes": sizes.tolist(),
            "component_logdet": logdet.round(2).tolist(), "atoms": n,
            "dropped": int((comp != lattice).sum())}
    return comp == lattice, info


# ----------------------------------------------------------------------------- selection of atoms


def select_atoms(an: Analysis, members: list[int], cfg: RelabelConfig,
                 nominal_px_pm: float) -> tuple[list[FrameAtoms], dict]:
    """Atoms of the chosen frames from the selected members, with the GMM, geometry, vacuum and
    uncertainty filters, and classes (``cfg.n_classes`` 2: local Z-contrast split)."""
    from trainer.elit.experiment import parse_frames

    cols = [an.member_ids.index(m) for m in members]
    positions = _positions(an, parse_frames(cfg.frames, int(an.frame_index.max()) + 1))
    maps = an.atom_maps[positions][:, cols]                            # [T, K, H, W]
    source = maps.mean(1) if cfg.source == "mean" else maps[:, members.index(int(cfg.source))]
    std = maps.std(1)
    patch = max(8, 2 * round(cfg.patch_px * nominal_px_pm / an.pixel_size_pm / 2))
    per_frame, patches = [], []
    for i, pos in enumerate(positions):
        xy, s = atoms_with_uncertainty(source[i], std[i], an.atom_radius_px)
        per_frame.append(FrameAtoms(int(an.frame_index[pos]), xy, s, np.zeros(len(xy), np.uint8)))
        patches.append(patch_features(patch_stack(normalise_minmax(an.frames[pos]), xy, patch),
                                      cfg.gmm_symmetrise, cfg.gmm_window))
    lattice, info = _gmm_over_frames(patches, cfg)
    contrast = _contrasts(an, per_frame)
    cls, info["classes"] = _classes(contrast, cfg)
    parent_heavy = _parent_heavy(an, per_frame, positions, cols) if cfg.n_classes == 2 else None
    info["classes"]["sublattice_frames"] = _sublattice_classes(an, per_frame, parent_heavy, cls)
    disputed = _class_disputes(parent_heavy, cls, cfg)
    bright = _bright(an, per_frame, cls) if cfg.n_classes == 2 else np.zeros(len(cls), bool)
    maybe_heavy = (cls == 2) | bright
    if cfg.teach_light and disputed.any():           # the parent's heavy call, light by contrast
        settled = disputed & (cls == 1) & ~bright
        info["class_taught_light"] = int(settled.sum())
        confirmed = disputed & (cls == 1) & bright       # the band pass agrees with the parent
        cls[confirmed] = 2
        info["class_taught_heavy_by_band_pass"] = int(confirmed.sum())
        disputed &= ~(settled | confirmed)
    info["class_disputed"] = int(disputed.sum())
    cls[disputed & (cls == 2)] = 1                  # never rescued as "heavy" below
    very = contrast > cfg.keep_bright if cfg.keep_bright else np.zeros(len(contrast), bool)
    info["bright_rescued"] = int((very & ~lattice).sum())
    lattice = lattice | very | (cls == 2)
    geometry, vacuum = _second_opinions(an, per_frame, positions, lattice, source, std, cfg)
    info["geometry_rescued"] = int((geometry & ~lattice).sum())
    lattice = lattice | geometry
    atom_like = (contrast > cfg.keep_atom_like) & ~vacuum if cfg.keep_atom_like else ~lattice & False
    info["atom_like_kept"] = int((atom_like & ~lattice).sum())
    lattice = lattice | atom_like
    all_std = np.concatenate([fa.std for fa in per_frame])
    limit = np.inf
    if cfg.std_quantile is not None and len(all_std):
        limit = float(np.quantile(all_std[lattice], cfg.std_quantile)) if lattice.any() else np.inf
    if cfg.std_max is not None:
        limit = min(limit, cfg.std_max)
    start = 0
    for fa in per_frame:
        sl = slice(start, start + len(fa.xy))
        start += len(fa.xy)
        ok = lattice[sl]
        fa.reason = np.where(~ok, 1, np.where(fa.std > limit, 2, 0)).astype(np.uint8)
        if cfg.dropped_as != "ignore":
            to_bg = ~ok & (vacuum[sl] if cfg.dropped_as == "auto" else True)
            fa.reason[to_bg] = 3
        fa.reason[disputed[sl] & (fa.reason == 0)] = 2   # an atom, class unsure: ignored
        fa.cls = cls[sl]
        fa.maybe_heavy = maybe_heavy[sl]
    weak = _add_weak_blobs(per_frame, source, an.atom_radius_px, cfg.weak_threshold)
    info.update(weak_blobs_ignored=weak,std_limit=None if np.isinf(limit) else limit, patch_px_on_frames=patch,
                kept=int(sum(fa.kept.sum() for fa in per_frame)),
                dropped_uncertainty=int(sum((fa.reason == 2).sum() for fa in per_frame)),
                dropped_as_background=int(sum((fa.reason == 3).sum() for fa in per_frame)),
                n_classes=cfg.n_classes,
                heavy_kept=int(sum(((fa.cls == 2) & fa.kept).sum() for fa in per_frame)))
    return per_frame, info


def _contrasts(an: Analysis, atoms: list[FrameAtoms]) -> np.ndarray:
    """Local Z-contrast of every atom (``trainer.elit.intensity.local_contrast``)."""
    from trainer.elit.intensity import local_contrast

    where = {int(f): i for i, f in enumerate(an.frame_index)}
    values = [local_contrast(an.frames[where[fa.frame]], fa.xy, an.atom_radius_px) for fa in atoms]
    return np.concatenate(values) if values else np.zeros(0)


def _bright(an: Analysis, atoms: list[FrameAtoms], cls: np.ndarray) -> np.ndarray:
    """Per atom: its band-pass peak stands out of its frame like a heavier atom's
    (``trainer.elit.intensity.bright_in_frame``, against the frame's atoms of class 1)."""
    from trainer.elit.intensity import bright_in_frame

    where = {int(f): i for i, f in enumerate(an.frame_index)}
    out, start = [], 0
    for fa in atoms:
        sl = slice(start, start + len(fa.xy))
        start += len(fa.xy)
        out.append(bright_in_frame(an.frames[where[fa.frame]], fa.xy, cls[sl] == 1))
    return np.concatenate(out) if out else np.zeros(0, bool)


def _classes(contrast: np.ndarray, cfg: RelabelConfig) -> tuple[np.ndarray, dict]:
    """1 for every atom (1 class), or the local-contrast split (2 classes: 1 lattice, 2 heavy)."""
    from trainer.elit.intensity import split_by_contrast

    if cfg.n_classes == 1:
        return np.ones(len(contrast), np.uint8), {"rule": "one class"}
    if cfg.n_classes != 2:
        raise ValueError(f"relabelling supports 1 or 2 classes, not {cfg.n_classes}")
    return split_by_contrast(contrast, cfg.heavy_threshold)


def _parent_heavy(an: Analysis, atoms: list[FrameAtoms], positions: list[int],
                  cols: list[int]) -> np.ndarray | None:
    """Per atom: the selected members' consensus calls it heavy (their mean class maps at the
    atom); None for a 1-class parent."""
    from trainer.elit.experiment import value_at

    if an.probs.shape[2] < 2:
        return None
    votes = []
    for fa, pos in zip(atoms, positions):
        mean = an.probs[pos][cols].astype(np.float32).mean(0)               # [C, H, W]
        votes.append(value_at(mean[1], fa.xy) > value_at(mean[0], fa.xy) if len(fa.xy)
                     else np.zeros(0, bool))
    return np.concatenate(votes) if votes else np.zeros(0, bool)


def _sublattice_classes(an: Analysis, atoms: list[FrameAtoms], parent_heavy: np.ndarray | None,
                        cls: np.ndarray) -> int:
    """In each frame where the parent calls at least SUBLATTICE_PARENT_FRACTION of the atoms heavy
    (it sees a heavier sublattice, as in MoS2 or SrTiO3) and the atoms' heights split into
    alternating sublattices (``intensity.sublattice_split``), the heaviest sublattice is class 2
    and the rest class 1, in place of the local-contrast split, which calls both sublattices
    light (each is mostly surrounded by its own kind). Without it an ELIT child of a MoS2
    experiment is taught every Mo as lattice. Returns how many frames were split so."""
    from trainer.elit.intensity import local_heights, sublattice_split

    if parent_heavy is None:
        return 0
    where = {int(f): i for i, f in enumerate(an.frame_index)}
    frames, start = 0, 0
    for fa in atoms:
        sl = slice(start, start + len(fa.xy))
        start += len(fa.xy)
        if len(fa.xy) == 0 or parent_heavy[sl].mean() < SUBLATTICE_PARENT_FRACTION:
            continue
        frame = an.frames[where[fa.frame]]
        heavy = sublattice_split(local_heights(frame, fa.xy, an.atom_radius_px), fa.xy)
        if heavy is not None:
            cls[sl] = np.where(heavy | (cls[sl] == 2), 2, 1)
            frames += 1
    return frames


def _class_disputes(parent_heavy: np.ndarray | None, cls: np.ndarray,
                    cfg: RelabelConfig) -> np.ndarray:
    """Atoms whose class from the image (local Z-contrast, or the sublattice split) disagrees
    with the selected members' consensus class: with ``cfg.class_vote`` and a 2-class parent,
    these are taught as neither class (ignored), so neither a contrast artefact (contamination
    edge, defocus) nor a parent's mistake becomes a label. All False otherwise."""
    if cfg.n_classes != 2 or not cfg.class_vote or parent_heavy is None:
        return np.zeros(len(cls), bool)
    return parent_heavy != (cls == 2)


def _second_opinions(an: Analysis, atoms: list[FrameAtoms], positions: list[int], lattice,
                     source, std, cfg: RelabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per atom: lattice-like geometry (rescue) and confident vacuum (may become background),
    both from ``trainer.elit.filters``; only evaluated for the GMM-dropped atoms."""
    from trainer.elit.filters import lattice_geometry, vacuum
    from trainer.elit.intensity import bond_length_px

    geometry, empty, start = [], [], 0
    for fa, pos, src, sd in zip(atoms, positions, source, std):
        ok = lattice[start:start + len(fa.xy)]
        start += len(fa.xy)
        bond = bond_length_px(fa.xy[ok], 4 * an.atom_radius_px)
        g, v = np.zeros(len(ok), bool), np.zeros(len(ok), bool)
        if cfg.geometry_rescue:
            g[~ok] = lattice_geometry(fa.xy[~ok], fa.xy[ok], bond)
        v[~ok & ~g] = vacuum(an.frames[pos], src, sd, fa.xy[~ok & ~g], fa.xy[ok | g],
                             an.atom_radius_px, bond)
        geometry.append(g)
        empty.append(v)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, bool)
    return cat(geometry), cat(empty)


def _add_weak_blobs(atoms: list[FrameAtoms], source: np.ndarray, radius_px: float,
                    threshold: float | None) -> int:
    """Blobs of ``source`` above ``threshold`` (but not 0.5) away from every found atom are added
    with reason 4 (ignored): a faint atom must not be taught as background."""
    from scipy.spatial import cKDTree

    from trainer.elit.experiment import blob_centres

    if threshold is None:
        return 0
    total = 0
    for fa, src in zip(atoms, source):
        weak = blob_centres(src, radius_px, threshold=threshold)
        if len(fa.xy) and len(weak):
            weak = weak[cKDTree(fa.xy).query(weak)[0] > 1.5 * radius_px]
        fa.xy = np.concatenate([fa.xy, weak]).astype(np.float32)
        fa.std = np.concatenate([fa.std, np.full(len(weak), np.nan)])
        fa.reason = np.concatenate([fa.reason, np.full(len(weak), 4, np.uint8)])
        fa.cls = np.concatenate([fa.cls, np.ones(len(weak), np.uint8)])
        if fa.maybe_heavy is not None:                  # a faint blob is no heavier atom
            fa.maybe_heavy = np.concatenate([fa.maybe_heavy, np.zeros(len(weak), bool)])
        total += len(weak)
    return total


def _gmm_over_frames(patches: list[np.ndarray], cfg: RelabelConfig) -> tuple[np.ndarray, dict]:
    if not cfg.gmm_per_frame:
        return gmm_lattice_filter(np.concatenate(patches), cfg.gmm_keep, cfg.pca_dims, cfg.seed)
    keeps, infos = zip(*(gmm_lattice_filter(p, cfg.gmm_keep, cfg.pca_dims, cfg.seed) for p in patches))
    info = {"gmm": cfg.gmm_keep, "per_frame": True, "atoms": sum(i["atoms"] for i in infos),
            "dropped": sum(i["dropped"] for i in infos),
            "dropped_per_frame": [i["dropped"] for i in infos]}
    return np.concatenate(keeps) if keeps else np.zeros(0, bool), info


def _positions(an: Analysis, frames: np.ndarray) -> list[int]:
    where = {int(f): i for i, f in enumerate(an.frame_index)}
    missing = [int(f) for f in frames if int(f) not in where]
    if len(missing) == len(frames):
        raise ValueError(f"none of the frames {frames.tolist()} were analysed")
    return [where[int(f)] for f in frames if int(f) in where]


# ----------------------------------------------------------------------------- masks and tiles


def label_mask(xy: np.ndarray, cls: np.ndarray, dropped_xy: np.ndarray, radius_px: float,
               ignore_radius_px: float, size: int, region_xy: np.ndarray | None = None,
               region_radius_px: float = 0.0, open_xy: np.ndarray | None = None) -> np.ndarray:
    """Discs of class ``cls`` at ``xy``; 255 within ``ignore_radius_px`` of dropped atoms and
    within ``region_radius_px`` of ``region_xy`` (kept discs win where they overlap). With
    ``open_xy`` (2 classes) those ignored pixels are NOT_HEAVY (254: not the heavier class,
    atom or not) except within ``ignore_radius_px`` of ``open_xy``, the atoms that may be heavy."""
    mask = paint_discs(xy, cls, radius_px, size) if len(xy) else np.zeros((size, size), np.uint8)
    for pts, r in ((dropped_xy, ignore_radius_px), (region_xy, region_radius_px)):
        if pts is not None and len(pts) and r > 0:
            ignore = paint_discs(pts, np.ones(len(pts), np.uint8), r, size)
            mask[(ignore > 0) & (mask == 0)] = IGNORE
    if open_xy is not None:
        unsure = mask == IGNORE
        if len(open_xy):
            unsure &= paint_discs(open_xy, np.ones(len(open_xy), np.uint8), ignore_radius_px,
                                  size) == 0
        mask[unsure] = NOT_HEAVY
    return mask


def rot90_xy(xy: np.ndarray, k: int, size: int) -> np.ndarray:
    """Coordinates after ``np.rot90(image, k)`` of a ``size`` × ``size`` image."""
    xy = xy.copy()
    for _ in range(k % 4):
        xy = np.stack([xy[:, 1], size - 1 - xy[:, 0]], 1)
    return xy


def augment_tile(rng: np.random.Generator, image: np.ndarray, xy: np.ndarray, cls: np.ndarray,
                 dropped: np.ndarray, cfg: RelabelConfig, radius_px: float,
                 region: np.ndarray | None = None, open_xy: np.ndarray | None = None):
    """One training tile: crop (with scale jitter), rot90, flips, Gaussian noise; the mask is painted
    from the transformed coordinates, so it is aligned with the image by construction."""
    tile, (h, w) = cfg.tile_px, image.shape
    zoom = rng.uniform(1 - cfg.scale_jitter, 1 + cfg.scale_jitter)
    crop = int(min(round(tile / zoom), h, w))
    x0, y0 = int(rng.integers(0, w - crop + 1)), int(rng.integers(0, h - crop + 1))
    img = image[y0:y0 + crop, x0:x0 + crop]
    factor = (tile - 1) / (crop - 1)
    if crop != tile:
        img = ndimage.zoom(img, tile / crop, order=1)
    region = np.zeros((0, 2)) if region is None else region
    opened = np.zeros((0, 2)) if open_xy is None else open_xy
    pts = [(p - [x0, y0]) * factor for p in (xy, dropped, region, opened)]
    k = int(rng.integers(4))
    img, pts = np.rot90(img, k), [rot90_xy(p, k, tile) for p in pts]
    if rng.random() < 0.5:
        img, pts = img[:, ::-1], [p * [-1, 1] + [tile - 1, 0] for p in pts]
    if rng.random() < 0.5:
        img, pts = img[::-1], [p * [1, -1] + [0, tile - 1] for p in pts]
    img = normalise_minmax(img) + rng.normal(0, rng.uniform(0, cfg.noise_max), img.shape)
    r = radius_px * factor
    mask = label_mask(pts[0], cls, pts[1], r, r * cfg.ignore_radius_factor, tile, pts[2],
                      r * cfg.region_ignore_factor, None if open_xy is None else pts[3])
    inside = np.all((pts[0] >= -0.5) & (pts[0] < tile - 0.5), axis=1)
    return (normalise_minmax(img).astype(np.float32), mask, pts[0][inside].astype(np.float32),
            cls[inside], factor)


def build_dataset(an: Analysis, atoms: list[FrameAtoms], cfg: RelabelConfig, nominal_px_pm: float,
                  radius_nominal_px: float, base_synth: SynthConfig,
                  world: SynthConfig | None = None) -> Dataset:
    """Tiles from every chosen frame, in frame order (so a tail split holds out the last frames);
    with ``cfg.rehearsal``, synthetic tiles of ``world`` (default ``base_synth``) before them."""
    rng = np.random.default_rng(cfg.seed)
    s = an.pixel_size_pm / nominal_px_pm                 # frames -> artifact scale
    images, masks, xys, clss, pix = [], [], [], [], []
    where = {int(f): i for i, f in enumerate(an.frame_index)}
    for fa in atoms:
        frame = an.frames[where[fa.frame]].astype(np.float32)
        scaled = ndimage.zoom(frame, s, order=1) if abs(s - 1) > 0.01 else frame
        g = (np.array(scaled.shape[::-1]) - 1) / (np.array(frame.shape[::-1]) - 1)
        if min(scaled.shape) < cfg.tile_px * (1 + cfg.scale_jitter):
            raise ValueError(f"frames are {scaled.shape} px at the artifact's scale, too small for "
                             f"{cfg.tile_px}-px tiles; use a smaller --tile")
        kept, dropped = fa.xy[fa.kept] * g, fa.xy[np.isin(fa.reason, (1, 2, 4))] * g
        region = fa.xy[fa.reason == 1] * g           # not lattice, not vacuum: its surroundings too
        opened = None                                 # 2 classes: the rest of them "not heavy"
        if cfg.n_classes == 2 and cfg.not_heavy and fa.maybe_heavy is not None:
            opened = fa.xy[fa.maybe_heavy & ~fa.kept] * g
        for _ in range(cfg.tiles_per_frame):
            img, mask, xy, cls, factor = augment_tile(rng, scaled, kept, fa.cls[fa.kept], dropped,
                                                      cfg, radius_nominal_px, region, opened)
            images.append(img[None]), masks.append(mask), xys.append(xy), clss.append(cls)
            pix.append(nominal_px_pm / factor)
    jit = (1 / (1 + cfg.scale_jitter), 1 + cfg.scale_jitter)
    synth = replace(base_synth, size_px=cfg.tile_px, n_classes=cfg.n_classes, zoom_range=jit,
                    pixel_size_pm=nominal_px_pm, atom_radius_px=radius_nominal_px)
    ds = Dataset(np.stack(images), np.stack(masks), xys, clss, np.array(pix, np.float32), synth,
                 cfg.seed)
    return with_rehearsal(ds, world or base_synth, cfg) if cfg.rehearsal > 0 else ds


def with_rehearsal(ds: Dataset, world: SynthConfig, cfg: RelabelConfig) -> Dataset:
    """Prepend round(rehearsal x N) tiles of the parent's own synthetic world (exact labels) to
    the N movie tiles, so a child keeps what its parent learnt from truth while it adapts to the
    movie. Prepended: the trainer's tail split keeps validation and test on the movie's last frames."""
    n = int(round(cfg.rehearsal * len(ds.images)))
    if n == 0:
        return ds
    syn = make_dataset(n, 1_000_003 + cfg.seed, replace(world, size_px=cfg.tile_px,
                                                        n_classes=cfg.n_classes))
    return Dataset(np.concatenate([syn.images, ds.images]), np.concatenate([syn.masks, ds.masks]),
                   syn.xy + ds.xy, syn.cls + ds.cls,
                   np.concatenate([syn.pixel_size_pm, ds.pixel_size_pm]).astype(np.float32),
                   ds.config, ds.seed)


def rehearsal_tiles(ds: Dataset, atoms: list[FrameAtoms], cfg: RelabelConfig) -> int:
    """How many of ``ds``'s tiles are synthetic rehearsal (the rest: tiles_per_frame per frame)."""
    return len(ds.images) - len(atoms) * cfg.tiles_per_frame


def write_relabel(out_dir: Path, ds: Dataset, atoms: list[FrameAtoms], info: dict,
                  cfg: RelabelConfig, an: Analysis, members: list[int]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dataset(ds, out_dir / "dataset.npz")
    summary = {"config": asdict(cfg), "members": members, "artifact": an.artifact,
               "frames": [fa.frame for fa in atoms], "filters": info, "tiles": len(ds.images),
               "rehearsal_tiles": rehearsal_tiles(ds, atoms, cfg),
               "ignored_pixel_fraction": float((ds.masks == IGNORE).mean()),
               "not_heavy_pixel_fraction": float((ds.masks == NOT_HEAVY).mean())}
    (out_dir / "relabel.json").write_text(json.dumps(summary, indent=1) + "\n")
    from trainer.elit.figures import kept_dropped_png

    kept_dropped_png(an, atoms, out_dir / "kept_dropped.png")
    return out_dir / "dataset.npz"
