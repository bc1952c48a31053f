"""Per-frame reduction of ensemble maps to atoms (pure numpy + scipy.ndimage; no I/O).

Input: `probs` [M, C, H, W] from the engine and the indices of the ACTIVE members.
Definitions (all in network-grid pixels of the valid region; x = column, y = row, origin at the
top-left pixel centre):

- member atom map  a_m = sum_c probs[m, c];  consensus atom map  a = mean over active m of a_m.
- atoms: connected components (4-connectivity) of a > threshold, split where they hold several
  separated peaks (below), with min_blob_px <= size <= max_blob_px. Centre = centroid of the
  component weighted by (a - threshold), the excess probability (rim pixels weigh ~0, so the
  cut at the threshold biases the centre less);
  `prob` = max of a in it; `cls` = argmax_c of the component's sum of the active-mean class map c.
- merged atoms (split_dip > 0): where imaging blurs (defocus, contamination, thick areas) the
  discs of neighbouring atoms touch and one component holds two or more atoms. Peaks = pixels of
  a component not below any of their 8 neighbours in a smoothed by [1, 2, 1] / 4 along each axis.
  Two peaks of one component closer than min_peak_distance_px are one atom; closer than
  SPLIT_RANGE x min_peak_distance_px, one atom unless the smoothed map dips between them
  (straight line, SPLIT_SAMPLES points, bilinear) by more than split_dip below the lower peak;
  peaks joined so (transitively) form one atom. A component with several atoms is divided
  among them, each pixel to the nearest atom (the mean position of its peaks). A round or
  smeared single atom has no such dip and is not split.
- `cls_prob` = the consensus probability of that class given an atom: the component's sum of the
  active-mean class map `cls` over its sum of a (1/C..1; 1 with one class).
- `cls_agree` = fraction of ACTIVE members voting for `cls`; member m votes argmax_c of its own
  class map c at the component's maximum of a (the peak pixel).
- Z-contrast class check (heavy_contrast > 0, default 3.2; needs the network input `image` and
  the index of the heavier-atom class; HAADF intensity grows as Z^1.6-2, so Si among carbon is
  ~4x as bright): `z_contrast` = the atom's height over its local background, divided by the
  median height of its CONTRAST_NEIGHBOURS (8) nearest atoms within contrast_radius_px (NaN where
  fewer than CONTRAST_MIN_NEIGHBOURS (3) are, or the check is off); height = the image at half
  resolution (2 x 2 means) smoothed by [1, 2, 1] / 4, at the atom (bilinear), minus the minimum
  of that over a window of ~2 bond lengths (the median nearest-neighbour distance): the hexagon
  centres or the space between columns, so a slow background, a gradient or a diffuse blob
  raises both alike. Relative to the neighbours, so per-frame normalisation, dose and gain do
  not matter.
  Rule: any measured atom above heavy_contrast is heavy. How far the networks' heavy calls are
  trusted depends on the frame (`_frame_kind`): a "compound" (the consensus calls at least
  CONTRAST_DOPANT_FRACTION, 20 %, of the atoms heavy, and fewer than CONTRAST_PAINTED_FRACTION,
  half, of them have a heavy nearest neighbour: a sublattice, e.g. Mo in MoS2 or Sr in SrTiO3,
  which may be less than heavy_contrast times as bright) and a "particle" (no light atom) keep
  them. Otherwise ("dopants": fewer heavy calls; "painted": a region called heavy wholesale, as a
  child artifact does on its most blurred frames) a heavy call not above heavy_contrast is light
  when at least half its measured neighbours are light, or when it is no higher than
  heavy_contrast times the frame's median light atom (a demoted atom takes its most probable
  other class), unless it stands out of the whole frame: its band-pass peak (a zero-sum
  -Laplacian-of-Gaussian window of BAND_PASS_SIGMA x bond, at the atom only) is above
  CONTRAST_FRAME_RATIO (4) times the median of the frame's light atoms' (Si/C ~4.2). Why: the
  networks' class maps follow brightness after min-max normalisation, call a contamination
  blob's atoms heavy and blurred Si light; the contrast does neither (docs/evaluation.md, "heavy
  atoms by Z-contrast": 3.2, the 20 % and the 4 were chosen on seeds the suite does not score;
  the real MoS2 and SrTiO3 frames keep every heavy call). Under thick contamination the
  neighbours' heights are raised too and a heavy atom there reads ~1.5; the band pass removes
  the contamination's slow part and keeps such a Si heavy where the networks call it so (a
  column under a stack of contamination atoms can read as bright: then it is called heavy too).
  The same two measures lift an atom the networks call light: heavy when its contrast is above
  CONTRAST_LIFT (1.8; below heavy_contrast) and its band-pass peak stands out of the frame as
  above. Blurred (defocus, coma) or noisy Si the networks call lattice read 1.2-2.7 against
  their neighbours but still ~4x the frame's carbon in the band pass; a carbon under a
  contamination stack may pass one test, rarely both (docs/evaluation.md, "lifting blurred
  heavy atoms": chosen on seeds the suite does not score). A lifted atom's `cls_prob` is the
  consensus probability of the heavier class but at least 0.5: the networks and the image
  disagree, and the class says so.
  `cls_prob` of an atom whose class the rule decided: the larger of the consensus probability
  and the contrast's confidence 1 / (1 + exp(-|ln(z_contrast / heavy_contrast)| /
  CONTRAST_CONF_SCALE)).
  Two sublattices (`_sublattices`): before all that, in a frame where the networks call at
  least CONTRAST_DOPANT_FRACTION of the atoms heavy, the atoms' heights (log) are split in two
  (Otsu); when the split is a pair of alternating sublattices (at least SUBLATTICE_MIN_ATOMS
  atoms, the brighter group SUBLATTICE_FRACTION of them and SUBLATTICE_MIN_RATIO times as high,
  at most SUBLATTICE_MAX_SAME of the atoms with their nearest neighbour in their own group) the
  brighter group is heavy, the other takes its most probable other class, and any atom above
  heavy_contrast is heavy too; `cls_prob` is at least 1 / (1 + exp(-d)), d = the atom's distance
  from the split in within-group standard deviations. Why: on a compound lattice the networks'
  per-atom class depends on the frame's orientation (real SrTiO3: 14 to 933 of 1,902 atoms
  called heavy over transpositions, flips and a half turn; MoS2 79 to 895 of ~1,850), the
  heights do not (docs/evaluation.md, "Sublattices by the image"). The networks still decide
  whether the frame has a heavier sublattice at all (hBN-like monolayers: both light).
- peak window: the 3x3 pixels centred on the component's maximum of a (clipped at the border).
- `uncertainty` = the ensemble's total predictive uncertainty that the atom is there, at its
  peak: sqrt(p (1 - p)), p = `prob` (the consensus atom map's maximum, clipped to [0, 1]). By the
  law of total variance p (1 - p) = mean over ACTIVE m of p_m (1 - p_m) (each member's own doubt)
  + the variance over ACTIVE members of p_m (their disagreement), p_m = a_m at the peak pixel.
  0 where every active member is sure, 0.5 at most. It ranks false detections above true ones
  better than the spread alone: on the drift segments and heavy-atom cases of seeds the suite
  does not score, AUROC 0.82-0.96 against 0.81-0.93 (docs/evaluation.md, "per-atom
  uncertainty"; the same over the 3x3 peak window was tried: no better than the spread).
- `spread` = mean over the peak window of the std over ACTIVE members of a_m (population std,
  ddof=0: 0 with one active member): the between-member part alone.
- `det_frac` = fraction of ACTIVE members with max of a_m over the peak window >= detect_threshold.
- `count_per_member[m]` (ALL members) = atoms (above) that m detects in the same sense, plus m's
  "extra" blobs: connected regions of (any member's a_m > threshold) that touch no consensus pixel,
  counted for m when m has min_blob_px..max_blob_px pixels above threshold in the region.
  One labelling for all members, not M labellings (~1 ms instead of ~8 ms at 512x512, M = 8),
  hence approximate: two of m's blobs inside one region count once, and an extra blob that another
  member's mask connects to a consensus atom is missed (against exact per-member labelling: equal
  on clean maps, 1 of 15 hallucinated blobs missed on a dense lattice).
- `disagreement_per_member[m]` (ALL members) = 1 - IoU(a_m > threshold, a > threshold) over the
  valid region (0 when both masks are empty).
- reported atoms: every consensus atom in a frame that shows a lattice (`crystallinity`, below,
  at least lattice_crystallinity, default 50: random points give ~20, every lattice measured
  200 or more); in a frame without one (single atoms on a support, an amorphous film) only those
  whose `prob` (consensus peak) reaches min_peak (default 0.9; hysteresis: the threshold gives an
  atom's extent, min_peak whether it is one). There the members each see different noise
  grains as atoms and their mean passes the threshold, barely, in many places; in a lattice a
  faint blob on a lattice site is an atom (docs/evaluation.md, "post-processing"). Atoms left
  out are counted in `unconfirmed`; `count_per_member` and `mean_uncertainty` are over every
  consensus atom, reported or not, so a frame of unconfirmed atoms reads uncertain.
- `mean_uncertainty` = mean of `uncertainty` over the frame's consensus atoms; with no atoms, 0
  when no active member counts a blob either (they agree: nothing there) and `MAX_UNCERTAINTY`
  (0.5, the largest std of values in [0, 1]) when some do (an empty consensus of disagreeing
  members).
- frame figures (`FrameFigures`, over the valid region and the ACTIVE members; what the
  out-of-distribution reference of the manifest describes, see elit_stream/core/ood.py):
  `density` = fraction of pixels with a > threshold; `disagreement` = mean over active m of
  `disagreement_per_member`; `area_cv` = std / mean over active m of the pixel count of
  a_m > threshold (0 when all are 0); `crystallinity` = the largest whitened power of the
  consensus atom map (every 2nd pixel, its central `CRYSTAL_SIDE_PX` square, mean removed; the
  same number of frequencies whatever the frame size): |FFT|^2 over its ring's geometric-mean
  envelope, among frequencies of at least `CRYSTAL_MIN_CYCLES` cycles per side (function
  `crystallinity`; a lattice's Bragg peaks stand far out, atoms at random places do not);
  `order` = crystallinity / (density + `ORDER_DENSITY_FLOOR`): a lattice's peaks grow with the
  number of atoms, random places' do not, so a dense frame without order stands out (a sparse
  lattice has little crystallinity but also little density).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from dataclasses import replace as dc_replace

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

MAX_UNCERTAINTY = 0.5
CRYSTAL_MIN_CYCLES = 4
ORDER_DENSITY_FLOOR = 0.01
FIGURES = ("density", "disagreement", "area_cv", "crystallinity", "order")
CRYSTAL_SIDE_PX = 128      # crystallinity: central 128 x 128 of every 2nd pixel (size-independent)
SPLIT_RANGE = 3.0          # peaks farther apart than this x min_peak_distance_px: never one atom
SPLIT_SAMPLES = 12         # points on the line between two peaks where the dip is looked for
CONTRAST_NEIGHBOURS = 8    # Z-contrast: an atom against the median of its 8 nearest atoms ...
CONTRAST_MIN_NEIGHBOURS = 3    # ... of which at least 3 within contrast_radius_px, or not measured
CONTRAST_DOPANT_FRACTION = 0.2  # networks call fewer atoms heavy: dopants (a sublattice: 1/3-1/2)
CONTRAST_PAINTED_FRACTION = 0.5  # ... or this many of the heavy calls touch one: painted, no lattice
CONTRAST_CONF_SCALE = 0.2  # class confidence of a contrast-decided atom: logistic in log(c / T)
CONTRAST_FRAME_RATIO = 4.0  # a heavy call whose band-pass peak is 4x the frame's light atoms' stays
BAND_PASS_SIGMA = 0.2      # ... band pass: -Laplacian of Gaussian of 0.2 x the bond length
CONTRAST_LIFT = 1.8        # a light call above this contrast and bright in the frame: heavy
SUBLATTICE_MIN_ATOMS = 50     # two sublattices by the image (_sublattices): at least 50 atoms,
SUBLATTICE_FRACTION = (0.25, 0.75)  # the brighter group a quarter to three quarters of them,
SUBLATTICE_MIN_RATIO = 1.25   # 1.25x as high (real SrTiO3 1.44, MoS2 2.2), and alternating:
SUBLATTICE_MAX_SAME = 0.35    # at most 35 % with the nearest neighbour in their own group (real
#                               compounds 0.08-0.20, a random split ~0.5, a bright region >= 0.8)
_WINDOW = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)], np.intp)


@dataclass(frozen=True)
class Params:
    """Post-processing parameters; `replace` validates and returns a new instance."""

    threshold: float = 0.5
    min_blob_px: int = 3
    max_blob_px: int = 400
    detect_threshold: float = 0.5
    split_dip: float = 0.05           # merged atoms are split at a dip this deep (0: never split)
    min_peak_distance_px: int = 4     # closest two atoms' peaks can be (network pixels)
    min_peak: float = 0.9             # without a lattice, an atom needs a consensus peak this high
    lattice_crystallinity: float = 50.0   # frames at or above this crystallinity: no min_peak
    heavy_contrast: float = 3.2       # Z-contrast class check: heavy above this (0: off)
    contrast_radius_px: float = 24.0  # Z-contrast neighbours within this distance (network px)

    def __post_init__(self) -> None:
        for name in ("threshold", "detect_threshold"):
            _check_number(name, getattr(self, name), lambda v: 0.0 < v < 1.0, "in (0, 1)")
        for name in ("split_dip", "min_peak"):
            _check_number(name, getattr(self, name), lambda v: 0.0 <= v < 1.0, "in [0, 1)")
        for name in ("lattice_crystallinity", "heavy_contrast"):
            _check_number(name, getattr(self, name), lambda v: v >= 0, ">= 0")
        _check_number("contrast_radius_px", self.contrast_radius_px, lambda v: v > 0, "> 0")
        for name in ("min_blob_px", "max_blob_px", "min_peak_distance_px"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name}: must be an integer, got {value!r}")  # noqa: TRY004
            if value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value!r}")
        if self.max_blob_px < self.min_blob_px:
            raise ValueError(f"max_blob_px: {self.max_blob_px} < min_blob_px {self.min_blob_px}")

    def replace(self, **changes) -> Params:
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown parameter (known: {sorted(known)})")
        return dc_replace(self, **changes)


def _check_number(name: str, value, ok, what: str) -> None:
    """ValueError naming `name` unless `value` is a real number (not a bool) with ok(value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name}: must be a number, got {value!r}")  # noqa: TRY004
    if not ok(value):
        raise ValueError(f"{name}: must be {what}, got {value!r}")


@dataclass(frozen=True)
class FrameFigures:
    """Frame-level figures over the active members (module docstring); plain floats."""

    density: float
    disagreement: float
    area_cv: float
    crystallinity: float

    @property
    def order(self) -> float:
        return self.crystallinity / (self.density + ORDER_DENSITY_FLOOR)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in FIGURES}


@dataclass
class FrameAnalysis:
    """Atoms (columnar) and frame-level figures of one frame; see the module docstring."""

    x: np.ndarray
    y: np.ndarray
    cls: np.ndarray
    prob: np.ndarray
    uncertainty: np.ndarray
    det_frac: np.ndarray
    count_per_member: np.ndarray
    disagreement_per_member: np.ndarray
    mean_uncertainty: float
    cls_prob: np.ndarray | None = None
    cls_agree: np.ndarray | None = None
    figures: FrameFigures | None = None
    mean_map: np.ndarray | None = None
    std_map: np.ndarray | None = None
    unconfirmed: int = 0          # consensus atoms not reported: peak below min_peak
    z_contrast: np.ndarray | None = None    # per atom; NaN where not measured
    spread: np.ndarray | None = None        # per atom: the between-member part of uncertainty

    @property
    def n_atoms(self) -> int:
        return int(self.x.shape[0])


def check_active(active, n_members: int) -> np.ndarray:
    """Active member indices as a sorted intp array; ValueError if empty/unknown/repeated."""
    idx = np.asarray(active)
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu":
        raise ValueError(f"active: need a non-empty 1-D integer array, got {active!r}")
    idx = idx.astype(np.intp)
    if idx.min() < 0 or idx.max() >= n_members or np.unique(idx).size != idx.size:
        raise ValueError(f"active: {idx.tolist()} must be distinct indices in 0..{n_members - 1}")
    return np.sort(idx)


def analyse(probs: np.ndarray, active, params: Params,
            valid_shape: tuple[int, int] | None = None, want_maps: bool = False,
            image: np.ndarray | None = None, heavy_class: int | None = None) -> FrameAnalysis:
    """Reduce `probs` [M, C, H, W] over the active members and extract atoms.

    `image` [H, W]: what the members saw (the network input); with it and `heavy_class` (the
    index of the heavier-atom class) the classes are checked against the Z-contrast."""
    probs = np.asarray(probs, np.float32)                               # no copy if float32
    if probs.ndim != 4:
        raise ValueError(f"probs: need [M, C, H, W], got shape {probs.shape}")
    n_m, _, h, w = probs.shape
    act = check_active(active, n_m)
    vh, vw = valid_shape if valid_shape is not None else (h, w)
    if not (0 < vh <= h and 0 < vw <= w):
        raise ValueError(f"valid_shape {valid_shape} does not fit probs {probs.shape}")
    atom = _member_atom_maps(probs)                                     # [M, H, W]
    consensus = _active_mean(atom, act)                                 # [H, W]
    mask = consensus[:vh, :vw] > params.threshold
    blobs = _blobs(mask, consensus, params)
    window = _peak_window(blobs, vh, vw, w)                              # [9, N]
    win = atom.reshape(n_m, -1)[:, window]                              # [M, 9, N]
    detected = win.max(axis=1) >= params.detect_threshold             # [M, N]
    spread = win[act].std(axis=0).mean(axis=0).astype(np.float32)
    p = np.clip(blobs.peak, 0.0, 1.0)
    uncertainty = np.sqrt(p * (1.0 - p)).astype(np.float32)
    member_on = atom[:, :vh, :vw] > params.threshold
    extra, disagreement, areas = _member_figures(member_on, mask, params)
    counts = (detected.sum(axis=1) + extra).astype(np.int32)
    det_frac = detected[act].mean(axis=0, dtype=np.float32).astype(np.float32)
    mean_uncertainty = _mean_uncertainty(uncertainty, counts[act])      # over every candidate
    figures = _frame_figures(areas[act], mask, disagreement[act],
                             central(consensus[:vh:2, :vw:2], CRYSTAL_SIDE_PX))
    share, votes = _class_shares(probs, act, blobs)                     # [C, N], [A, N]
    keep, unconfirmed = slice(None), 0                                  # slice: views, no copy
    if figures.crystallinity < params.lattice_crystallinity:          # no lattice in sight
        confirmed = blobs.peak >= np.float32(params.min_peak)
        unconfirmed = confirmed.size - int(np.count_nonzero(confirmed))
        if unconfirmed:
            keep = confirmed
    x, y, peak = blobs.x[keep], blobs.y[keep], blobs.peak[keep]
    uncertainty, spread, det_frac = uncertainty[keep], spread[keep], det_frac[keep]
    share, votes, n = share[:, keep], votes[:, keep], x.shape[0]
    cls = share.argmax(axis=0).astype(np.uint8)
    contrast = np.full(n, np.nan, np.float32)
    confidence = contrast                    # the image's confidence where it decided the class
    lifted = np.zeros(n, bool)
    if image is not None and heavy_class is not None and share.shape[0] > 1 and n:
        called = cls
        contrast, cls, confidence = _z_contrast_classes(image[:vh, :vw], x, y, cls, share,
                                                        heavy_class, params)
        lifted = (cls == heavy_class) & (called != heavy_class) & np.isnan(confidence)
    cls_prob = share[cls, np.arange(n)].astype(np.float32)
    decided = ~np.isnan(confidence)
    if decided.any():
        cls_prob[decided] = np.maximum(cls_prob[decided], confidence[decided])
    if lifted.any():                  # the networks against the image: a coin flip at best
        cls_prob[lifted] = np.maximum(cls_prob[lifted], np.float32(0.5))
    cls_agree = (votes == cls).mean(axis=0, dtype=np.float32).astype(np.float32)
    result = FrameAnalysis(
        x=x, y=y, cls=cls, prob=peak, uncertainty=uncertainty, det_frac=det_frac,
        count_per_member=counts, disagreement_per_member=disagreement,
        mean_uncertainty=mean_uncertainty, cls_prob=cls_prob, cls_agree=cls_agree,
        figures=figures, unconfirmed=unconfirmed, z_contrast=contrast, spread=spread)
    if want_maps:
        result.mean_map, result.std_map = active_maps(probs, act, vh, vw)
    return result


def _member_atom_maps(probs: np.ndarray) -> np.ndarray:
    """a_m = sum over classes, [M, H, W] float32, one pass over probs."""
    if probs.shape[1] == 1:
        return probs[:, 0]
    atom = np.add(probs[:, 0], probs[:, 1])
    for c in range(2, probs.shape[1]):
        atom += probs[:, c]
    return atom


def _active_mean(maps: np.ndarray, act: np.ndarray) -> np.ndarray:
    """Mean of maps[act] over axis 0 without gathering (no BLAS: predictable on busy CPUs)."""
    acc = maps[act[0]].copy()
    for m in act[1:]:
        acc += maps[m]
    if act.size > 1:
        acc *= np.float32(1.0 / act.size)
    return acc


@dataclass
class _Blobs:
    lab: np.ndarray      # [n_fg] blob index 0..N-1 per kept foreground pixel
    flat: np.ndarray     # [n_fg] flat index into the padded H*W grid
    peak_flat: np.ndarray
    x: np.ndarray
    y: np.ndarray
    peak: np.ndarray
    weight: np.ndarray   # [N] sum of the consensus atom map over the blob

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def _blobs(mask: np.ndarray, consensus: np.ndarray, params: Params) -> _Blobs:
    """Label, split merged atoms, filter by size, weighted centroids and peaks (no per-atom
    Python loop)."""
    labels, n = ndimage.label(mask)
    fg = np.flatnonzero(mask)
    lab = labels.ravel()[fg]
    if params.split_dip > 0 and n:
        lab, n = _split_merged(fg, lab, n, mask.shape, consensus, params)
    sizes = np.bincount(lab, minlength=n + 1)
    keep = (sizes >= params.min_blob_px) & (sizes <= params.max_blob_px)
    keep[0] = False
    sel = keep[lab]
    ys, xs = np.divmod(fg[sel], mask.shape[1])
    lab = (np.cumsum(keep) - 1)[lab[sel]]
    n_kept = int(keep.sum())
    flat = ys * consensus.shape[1] + xs
    wpx = consensus.ravel()[flat]
    excess = wpx - np.float32(params.threshold)          # > 0 inside; ~0 at the blob's rim
    norm = np.bincount(lab, excess, n_kept)
    x = (np.bincount(lab, excess * xs, n_kept) / norm).astype(np.float32)
    y = (np.bincount(lab, excess * ys, n_kept) / norm).astype(np.float32)
    total = np.bincount(lab, wpx, n_kept)
    peak = np.full(n_kept, -np.inf, np.float32)
    np.maximum.at(peak, lab, wpx)
    at_peak = wpx == peak[lab]
    peak_flat = np.empty(n_kept, np.intp)
    peak_flat[lab[at_peak]] = flat[at_peak]
    return _Blobs(lab, flat, peak_flat, x, y, peak, total)


def _split_merged(fg: np.ndarray, lab: np.ndarray, n: int, shape: tuple[int, int],
                  consensus: np.ndarray, params: Params) -> tuple[np.ndarray, int]:
    """Component labels of the foreground pixels ``fg`` (flat indices into ``shape``) with every
    component that holds several atoms divided among them (module docstring): its pixels get
    labels n+1, ... (one per atom; 0 for a pixel no atom of its component is among the 4 nearest
    of), its own label is left empty. Returns (labels, new label count)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    vh, vw = shape
    smooth = _binomial3(consensus[:vh, :vw])
    fy, fx = np.divmod(fg, vw)
    top = np.flatnonzero(_peaks(smooth, fy, fx))
    several = (np.bincount(lab[top], minlength=n + 1) >= 2)[lab[top]]
    top = top[several]
    if top.size == 0:
        return lab, n
    plab, pts = lab[top], np.stack([fy[top], fx[top]], 1).astype(np.float64)
    pairs = cKDTree(pts).query_pairs(SPLIT_RANGE * params.min_peak_distance_px,
                                     output_type="ndarray")
    pairs = pairs[plab[pairs[:, 0]] == plab[pairs[:, 1]]]
    a, b = pts[pairs[:, 0]], pts[pairs[:, 1]]
    t = np.linspace(0.0, 1.0, SPLIT_SAMPLES)
    line = a[:, None, :] + t[None, :, None] * (b - a)[:, None, :]           # [P, S, 2]
    low = ndimage.map_coordinates(smooth, line.reshape(-1, 2).T, order=1).reshape(len(pairs), -1)
    peak = smooth.ravel()[fg[top]]
    close = np.hypot(*(b - a).T) < params.min_peak_distance_px
    same = close | (low.min(axis=1) > np.minimum(peak[pairs[:, 0]], peak[pairs[:, 1]])
                    - params.split_dip)
    joined = coo_matrix((np.ones(int(same.sum())), (pairs[same, 0], pairs[same, 1])),
                        shape=(len(top), len(top)))
    n_atoms, atom_of = connected_components(joined, directed=False)
    atom_lab = np.zeros(n_atoms, np.intp)
    atom_lab[atom_of] = plab
    divided = np.bincount(atom_lab, minlength=n + 1) >= 2                   # [n + 1]
    keep = divided[atom_lab]
    if not keep.any():
        return lab, n
    centre = np.stack([np.bincount(atom_of, pts[:, k], n_atoms) for k in (0, 1)], 1)
    centre = (centre / np.bincount(atom_of, minlength=n_atoms)[:, None])[keep]
    owner = atom_lab[keep]
    sel = np.flatnonzero(divided[lab])
    pix = np.stack([fy[sel], fx[sel]], 1)
    tree = cKDTree(centre)
    pick = tree.query(pix, k=1)[1]
    stray = np.flatnonzero(owner[pick] != lab[sel])        # nearest atom in another component
    if stray.size:
        k = min(4, len(centre))
        near = tree.query(pix[stray], k=k)[1].reshape(stray.size, k)
        own = owner[near] == lab[sel[stray]][:, None]
        pick[stray] = np.where(own.any(axis=1), near[np.arange(stray.size), own.argmax(axis=1)], -1)
    out = lab.copy()
    out[sel] = np.where(pick >= 0, n + 1 + pick, 0)
    return out, n + len(centre)


def _binomial3(a: np.ndarray) -> np.ndarray:
    """``a`` smoothed by the separable [1, 2, 1] / 4 kernel (edges repeated): ~ a Gaussian of
    0.7 px, so that noise on a saturated blob does not make peaks."""
    p = np.pad(a, 1, mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) * np.float32(1 / 16)


def _peaks(smooth: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Which of the pixels (fy, fx) are not below any of their 8 neighbours (ties: all)."""
    w = smooth.shape[1] + 2
    p = np.pad(smooth, 1, mode="constant", constant_values=-np.inf).ravel()
    flat = (fy + 1) * w + fx + 1
    centre = p[flat]
    top = np.ones(flat.size, bool)
    for dy, dx in _WINDOW:
        if dy or dx:
            top &= centre >= p[flat + dy * w + dx]
    return top


def _class_shares(probs: np.ndarray, act: np.ndarray, blobs: _Blobs
                  ) -> tuple[np.ndarray, np.ndarray]:
    """[C, N] consensus probability of each class given the atom (the blob sum of the
    active-mean class map over the blob sum of a) and [A, N] each active member's vote.

    The last class's sum is the blob's consensus total minus the others' (classes sum to a).
    """
    n_c, n = probs.shape[1], blobs.n
    if n_c == 1 or n == 0:
        return np.ones((n_c, n)), np.zeros((act.size, n), np.intp)
    per_class = np.empty((n_c, n))
    for c in range(n_c - 1):
        acc = np.take(probs[act[0], c].ravel(), blobs.flat)
        for m in act[1:]:
            acc += np.take(probs[m, c].ravel(), blobs.flat)
        per_class[c] = np.bincount(blobs.lab, acc, n) / act.size
    per_class[-1] = blobs.weight - per_class[:-1].sum(axis=0)
    share = per_class / np.maximum(blobs.weight, 1e-12)
    return share, _member_votes(probs, act, blobs.peak_flat)


def _z_contrast_classes(image: np.ndarray, x: np.ndarray, y: np.ndarray, cls: np.ndarray,
                        share: np.ndarray, heavy: int, params: Params
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per atom the Z-contrast (module docstring; NaN where not measured), the classes after
    the Z-contrast rule, and the image's class confidence where the image alone decided the
    class (NaN elsewhere, e.g. for a lifted atom, which the contrast alone would call light)."""
    n = x.shape[0]
    nan = np.full(n, np.nan, np.float32)
    if n < CONTRAST_MIN_NEIGHBOURS + 1 or params.heavy_contrast <= 0:
        return nan, cls, nan
    contrast, height, floor, nb, near, bond = _z_contrast(image, x, y, params.contrast_radius_px)
    measured = ~np.isnan(contrast)
    kind = _frame_kind(cls == heavy, nb[:, 0], near[:, 0])
    above = measured & (contrast > params.heavy_contrast)
    if kind != "dopants":                         # many heavy calls: two sublattices in sight?
        split = _sublattices(height, floor, nb, near)
        if split is not None:
            upper, margin = split
            out = _other_class(share, heavy)
            out[upper | above] = heavy
            return contrast, out, (1.0 / (1.0 + np.exp(-margin))).astype(np.float32)
    light_nb = near & (cls[nb] != heavy)
    among_light = measured & (2 * light_nb.sum(axis=1) >= near.sum(axis=1))  # half or more
    if kind == "compound":                                              # keep its sublattices
        among_light[:] = False
    elif kind != "particle":    # also heavy calls among heavy calls, no brighter than the
        light_height = np.median(height[cls != heavy])                  # frame's light atoms
        among_light |= measured & (height <= params.heavy_contrast * max(light_height, floor))
    doubt = among_light & ~above & (cls == heavy)
    lift = measured & ~above & (cls != heavy) & (contrast > CONTRAST_LIFT)
    if doubt.any() or lift.any():   # does it stand out of the whole frame like a heavier atom?
        bright = _bright_in_frame(image, x, y, bond, cls != heavy)
        doubt &= ~bright
        lift &= bright
    out = cls.copy()
    out[above | lift] = heavy
    if doubt.any():                                    # heavy by the networks only: light
        out[doubt] = _other_class(share[:, doubt], heavy)
    decided = above | (among_light & (cls != heavy) & ~lift) | doubt
    confidence = nan.copy()            # logistic in how far the contrast is from the threshold
    margin = np.abs(np.log(contrast[decided] / params.heavy_contrast)) / CONTRAST_CONF_SCALE
    confidence[decided] = 1.0 / (1.0 + np.exp(-margin))
    return contrast, out, confidence


def _other_class(share: np.ndarray, heavy: int) -> np.ndarray:
    """[N] the most probable class other than `heavy` by the consensus shares [C, N]."""
    others = share.copy()
    others[heavy] = -1.0
    return others.argmax(axis=0).astype(np.uint8)


def _sublattices(height: np.ndarray, floor: float, nb: np.ndarray, near: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """The heaviest of two or three alternating sublattices in the image, or None: (its atoms
    [N] bool, each atom's distance from the split that placed it in standard deviations [N]).

    The log heights are split in two (`_split`); if the brighter group splits again in the same
    way (SrTiO3 where the faint O columns are found too: O | Ti-O and Sr), its brighter part is
    the heaviest sublattice. Why: the networks' per-atom class on a compound lattice depends on
    the frame's orientation (the real SrTiO3 frame: 933 of 1,902 atoms called heavy as read, 14
    transposed, 608 turned by 180 degrees); the heights do not (docs/evaluation.md, "Sublattices
    by the image")."""
    log_h = np.log(np.maximum(height, floor))
    first = _split(log_h, np.ones(log_h.shape, bool), nb, near)
    if first is None:
        return None
    upper, margin = first
    second = _split(log_h, upper, nb, near)
    if second is not None:
        upper, margin2 = second
        margin = np.where(first[0], margin2, margin)
    return upper, margin


def _split(log_h: np.ndarray, group: np.ndarray, nb: np.ndarray, near: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray] | None:
    """The atoms of `group` split by log height (Otsu: the largest between-group variance):
    (the brighter part [N] bool, |log height - cut| / within-group std [N]) when it is a pair of
    sublattices: at least SUBLATTICE_MIN_ATOMS atoms whose nearest neighbour in the group is
    among their 8 nearest, the brighter part SUBLATTICE_FRACTION of them and at least
    SUBLATTICE_MIN_RATIO times as high, and the parts alternating: at most SUBLATTICE_MAX_SAME
    of those atoms have that neighbour in their own part (a random split gives about half; a
    bright region, a particle or a thickness gradient far more). Else None."""
    in_group = near & group[nb]                                         # [N, 8]
    has = group & in_group.any(axis=1)
    if np.count_nonzero(has) < SUBLATTICE_MIN_ATOMS:
        return None
    nearest = nb[np.arange(nb.shape[0]), in_group.argmax(axis=1)]       # first one in the group
    values = log_h[group]
    hist, edges = np.histogram(values, 64)
    mass = hist * 0.5 * (edges[1:] + edges[:-1])
    w_lo, s_lo = np.cumsum(hist)[:-1], np.cumsum(mass)[:-1]      # below each inner edge
    w_hi, s_hi = hist.sum() - w_lo, mass.sum() - s_lo
    between = w_lo * w_hi * (s_lo / w_lo.clip(1) - s_hi / w_hi.clip(1)) ** 2
    cut = edges[1 + int(np.argmax(between))]
    upper = group & (log_h >= cut)
    lo, hi = values[values < cut], values[values >= cut]
    if not (SUBLATTICE_FRACTION[0] <= hi.size / values.size <= SUBLATTICE_FRACTION[1]
            and hi.mean() - lo.mean() >= np.log(SUBLATTICE_MIN_RATIO)
            and np.mean(upper[has] == upper[nearest[has]]) <= SUBLATTICE_MAX_SAME):
        return None
    spread = np.sqrt((lo.var() * lo.size + hi.var() * hi.size) / values.size)
    return upper, np.abs(log_h - cut) / max(float(spread), 1e-6)


def _z_contrast(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius_px: float
                ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray, float]:
    """(z_contrast [N] float32, NaN where not measured; height [N]; the smallest height a
    reference may have (5 % of the typical one); the up to 8 nearest atoms [N, 8] (0 where
    none); which of them are within radius_px [N, 8]; the bond length, px). Module docstring."""
    xy = np.stack([x, y], axis=1)
    dist, nb = cKDTree(xy, balanced_tree=False, compact_nodes=False).query(
        xy, k=min(CONTRAST_NEIGHBOURS + 1, len(xy)), distance_upper_bound=radius_px)
    dist, nb = dist[:, 1:], nb[:, 1:]                                   # the atom itself out
    near = np.isfinite(dist)                                            # within the radius
    nb = np.where(near, nb, 0)
    bond = float(np.median(dist[near[:, 0], 0])) if near[:, 0].any() else radius_px
    smooth = _binomial3(_half(image))                # background at half resolution: cheaper
    low = ndimage.minimum_filter(smooth, max(3, round(bond) | 1))       # window ~ 2 bonds
    at = [(y - 0.5) / 2, (x - 0.5) / 2]                                 # half-resolution coords
    height = (ndimage.map_coordinates(smooth, at, order=1, mode="nearest")
              - ndimage.map_coordinates(low, at, order=1, mode="nearest")).astype(np.float64)
    measured = near.sum(axis=1) >= CONTRAST_MIN_NEIGHBOURS
    ref = _row_median(np.where(near, height[nb], np.inf)[measured], near[measured].sum(axis=1))
    floor = max(float(np.median(np.abs(height))) * 0.05, 1e-6)
    contrast = np.full(len(xy), np.nan, np.float32)
    contrast[measured] = np.maximum(height[measured] / np.maximum(ref, floor), 1e-3)
    return contrast, height, floor, nb, near, bond


def _bright_in_frame(image: np.ndarray, x: np.ndarray, y: np.ndarray, bond: float,
                     light: np.ndarray) -> np.ndarray:
    """[N] bool: the atom's band-pass peak is above CONTRAST_FRAME_RATIO times the median of the
    `light` atoms'. Band pass: the image under a zero-sum -Laplacian-of-Gaussian window of
    sigma BAND_PASS_SIGMA x bond at the atom's nearest pixel (only there: N windows, not a
    filtered image); it removes what varies slowly (contamination, thickness, gradients), which
    the neighbours' median does not where they sit under the same contamination."""
    if not light.any():
        return np.zeros(x.shape[0], bool)
    sigma = max(BAND_PASS_SIGMA * bond, 0.7)
    r = int(np.ceil(3 * sigma))
    q = (np.arange(-r, r + 1)[:, None] ** 2 + np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma)
    kernel = (1 - q) * np.exp(-q)
    kernel = (kernel - kernel.mean()).astype(np.float32)
    h, w = image.shape
    iy = np.clip(np.rint(y).astype(np.intp), 0, h - 1)
    ix = np.clip(np.rint(x).astype(np.intp), 0, w - 1)
    padded = np.pad(image.astype(np.float32, copy=False), r, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.shape)[iy, ix]
    peak = np.einsum("nij,ij->n", windows, kernel)
    return peak > CONTRAST_FRAME_RATIO * max(float(np.median(peak[light])), 1e-6)


def _row_median(values: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Median of the first k[i] finite values of each row (the rest +inf); k >= 1. A sort
    instead of nanmedian: 0.3 instead of 1.2 ms for 2,860 atoms x 8 neighbours."""
    values = np.sort(values, axis=1)
    rows = np.arange(values.shape[0])
    return 0.5 * (values[rows, (k - 1) // 2] + values[rows, k // 2])


def _frame_kind(is_heavy: np.ndarray, nearest: np.ndarray, has_nearest: np.ndarray) -> str:
    """"dopants": the consensus calls fewer than CONTRAST_DOPANT_FRACTION of the atoms heavy;
    "compound": more, alternating with light ones like a sublattice (fewer than
    CONTRAST_PAINTED_FRACTION of them have a heavy nearest neighbour: Mo next to S2, Sr next to O
    or Ti-O; the real MoS2 and SrTiO3 frames: 4-33 %); "painted": more, mostly touching each other
    (a region called heavy wholesale: a child artifact on its most blurred frames, 76-87 %; or a
    particle, which the caller keeps by its brightness); "particle": no light atoms at all."""
    n_heavy = int(np.count_nonzero(is_heavy))
    if n_heavy < CONTRAST_DOPANT_FRACTION * is_heavy.size:
        return "dopants"
    if n_heavy == is_heavy.size:
        return "particle"
    touching = np.count_nonzero(is_heavy & has_nearest & is_heavy[nearest])
    return "compound" if touching < CONTRAST_PAINTED_FRACTION * n_heavy else "painted"


def _half(a: np.ndarray) -> np.ndarray:
    """Mean of each 2 x 2 block (an odd last row / column dropped): half resolution."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    b = a[:h, :w].astype(np.float32, copy=False)
    return (b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]) * np.float32(0.25)


def _member_votes(probs: np.ndarray, act: np.ndarray, peak_flat: np.ndarray) -> np.ndarray:
    """[A, N] each active member's class: argmax_c of its class map c at the atom's peak pixel."""
    n_m, n_c = probs.shape[:2]
    at_peak = np.take(probs.reshape(n_m, n_c, -1), peak_flat, axis=2)   # [M, C, N], small
    return at_peak[act].argmax(axis=1)


def _mean_uncertainty(uncertainty: np.ndarray, active_counts: np.ndarray) -> float:
    """Mean per-atom uncertainty; without atoms 0 if no active member sees any, else the max."""
    if uncertainty.size:
        return float(uncertainty.mean())
    return MAX_UNCERTAINTY if np.any(active_counts > 0) else 0.0


def _frame_figures(areas: np.ndarray, mask: np.ndarray, disagreement: np.ndarray,
                   consensus_half: np.ndarray) -> FrameFigures:
    """The frame figures (areas, disagreement: of the active members only)."""
    areas = areas.astype(np.float64)
    mean_area = areas.mean()
    return FrameFigures(density=float(np.count_nonzero(mask) / mask.size),
                        disagreement=float(disagreement.mean()),
                        area_cv=float(areas.std() / mean_area) if mean_area > 0 else 0.0,
                        crystallinity=crystallinity(consensus_half))


def central(a: np.ndarray, side: int) -> np.ndarray:
    """The central side x side part of `a` (all of it along a shorter axis)."""
    y0, x0 = max(0, (a.shape[0] - side) // 2), max(0, (a.shape[1] - side) // 2)
    return a[y0:y0 + side, x0:x0 + side]


def crystallinity(half: np.ndarray) -> float:
    """Largest whitened power: max over frequencies of at least CRYSTAL_MIN_CYCLES cycles of
    |FFT|^2 over its ring's envelope exp(mean log |FFT|^2) (ring = rounded |k| in cycles per
    side); 0 for a constant map. Random points give ~ 2 log(number of frequencies) (~ 20 at
    256 x 256), a lattice's Bragg peaks far more."""
    h, w = half.shape
    power = np.abs(np.fft.rfft2(half - half.mean())) ** 2
    scale = float(power.mean())
    if scale <= 0:
        return 0.0
    ring = np.rint(np.hypot(np.fft.fftfreq(h)[:, None] * h, np.fft.rfftfreq(w)[None, :] * w))
    ring = ring.astype(np.intp).ravel()
    logp = np.log(power.ravel() / scale + 1e-12)
    n_ring = np.bincount(ring)
    envelope = np.bincount(ring, logp) / np.maximum(n_ring, 1)
    keep = ring >= CRYSTAL_MIN_CYCLES
    return float(np.exp((logp - envelope[ring])[keep].max())) if keep.any() else 0.0


def _peak_window(blobs: _Blobs, vh: int, vw: int, width: int) -> np.ndarray:
    """[9, N] flat indices of the 3x3 window around each peak, clipped to the valid region."""
    py, px = np.divmod(blobs.peak_flat, width)
    yy = np.clip(py[None, :] + _WINDOW[:, :1], 0, vh - 1)
    xx = np.clip(px[None, :] + _WINDOW[:, 1:], 0, vw - 1)
    return yy * width + xx


def _count_true(masks: np.ndarray) -> np.ndarray:
    """Number of True per row of a C-contiguous bool [M, ...] array."""
    flat = masks.reshape(masks.shape[0], -1)
    if flat.shape[1] % 8 == 0 and flat.flags.c_contiguous:
        return np.bitwise_count(flat.view(np.uint64)).sum(axis=1, dtype=np.int64)
    return np.count_nonzero(flat, axis=1)


def _member_figures(member_on: np.ndarray, mask: np.ndarray,
                    params: Params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per member (all): extra blobs outside the consensus, 1 - IoU with the consensus, and the
    pixel count of a_m > threshold.

    member_on: [M, vh, vw] bool, a_m > threshold; mask: [vh, vw] consensus a > threshold.
    """
    n_m = member_on.shape[0]
    inter = _count_true(member_on & mask)
    areas = _count_true(member_on)
    either = areas + np.count_nonzero(mask) - inter
    disagreement = np.where(either > 0, 1.0 - inter / np.maximum(either, 1), 0.0)
    union = np.logical_or.reduce(member_on, axis=0)                     # contains `mask`
    u_labels, n_u = ndimage.label(union)
    touched = np.zeros(n_u + 1, bool)
    touched[u_labels[mask]] = True
    u_idx = np.flatnonzero(union)
    u_lab = u_labels.ravel()[u_idx]
    outside = ~touched[u_lab]
    m_idx, j = np.nonzero(member_on.reshape(n_m, -1)[:, u_idx[outside]])
    counts = np.bincount(u_lab[outside][j] * n_m + m_idx, minlength=(n_u + 1) * n_m)
    counts = counts.reshape(n_u + 1, n_m)
    extra = ((counts >= params.min_blob_px) & (counts <= params.max_blob_px)).sum(axis=0)
    return extra, disagreement.astype(np.float32), areas


def active_maps(probs: np.ndarray, act: np.ndarray, vh: int, vw: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ddof=0) over active members, per class, cropped: two [C, vh, vw] float32.

    Two passes (mean, then squared deviations): E[x^2] - E[x]^2 in float32 cancels where members
    agree and its square root then errs by ~3e-4 (measured at 512², 4 members)."""
    crop = probs[:, :, :vh, :vw]
    mean = np.zeros(crop.shape[1:], np.float32)
    for m in act:
        mean += crop[m]
    mean /= act.size
    sq = np.zeros_like(mean)
    dev = np.empty_like(mean)
    for m in act:
        np.subtract(crop[m], mean, out=dev)
        dev *= dev
        sq += dev
    sq /= act.size
    return mean, np.sqrt(sq, out=sq)
