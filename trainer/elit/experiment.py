"""ELIT step 1: apply an artifact to an experimental movie and measure every member on every frame.

Owns ``analyse_movie`` (every member's class maps, their mean and std, per frame), the per-member
figures (``member_figures``, vectorised over frames × members), blob finding (``find_blobs``,
``blob_centres``) and the analysis run folder (``analysis.npz``, ``figures.csv``, ``figures.md``).

Atoms of a map (``blob_centres``, ``atoms_with_uncertainty``, hence relabelling, scoring and the
judge) are blobs of ``a > threshold`` with **merged atoms split** (``split_merged``): under blur or
contamination the discs of neighbouring atoms touch, and one blob holding two atoms would give one
atom between them (and teach both as background when relabelled). The rule is the service's
(``elit_stream/core/postprocess.py``, mirrored here without shared code; ``tests/test_postprocess.py``
checks they agree): peaks of the map smoothed by [1, 2, 1] / 4 per axis; two peaks of one blob are
one atom when closer than ``min_peak_distance`` (4/3 × the disc radius, the service's 4 px for the
shipped 3-px discs) or, closer than ``SPLIT_RANGE`` × that, when the map does not dip by more than
``SPLIT_DIP`` between them; the blob's pixels go to the nearest of its atoms.

Figures per (frame, member), on the member's *atom map* ``a = Σ_classes probs`` (probability that a
pixel is an atom of any class):

- ``atoms``: blobs of ``a > 0.5`` with an area of at least ``min_area_frac`` × the mask disc area;
- ``agreement``: IoU of the member's mask ``a > 0.5`` with the consensus mask ``mean_m(a) > 0.5``;
- ``fog``: probability mass far from any blob: ``Σ a`` over pixels outside the member's own kept
  blobs dilated by one atom radius, divided by the number of pixels (mean fog per pixel);
- ``size_median``, ``size_cv``: median and coefficient of variation of the kept blobs' areas (px);
- ``log_count_ratio``: ``log(atoms / median over members of atoms)`` (0 = like the others).

Maps are kept on the frames' own pixel grid (the runner rescales to the artifact's scale and back).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

FIGURES = ("atoms", "agreement", "fog", "size_median", "size_cv", "log_count_ratio")
SPLIT_DIP = 0.05          # merged atoms: split where the map dips this much between two peaks
SPLIT_RANGE = 3.0         # peaks farther apart than this x min_peak_distance: never one atom
SPLIT_SAMPLES = 12        # points on the line between two peaks where the dip is looked for
PLANE = np.zeros((3, 3, 3), bool)
PLANE[1] = ndimage.generate_binary_structure(2, 1)    # connect within a frame, never across


@dataclass
class Analysis:
    frames: np.ndarray           # float32 [T, H, W] raw frames analysed
    frame_index: np.ndarray      # int [T]: index of each frame in the movie
    probs: np.ndarray            # float16 [T, M, C, H, W]
    figures: dict                # name -> float [T, M]
    pixel_size_pm: float         # of the frames
    atom_radius_px: float        # mask disc radius on the frames' grid
    member_ids: list[int]
    artifact: str

    @property
    def atom_maps(self) -> np.ndarray:
        """[T, M, H, W] float32: probability of an atom of any class."""
        return self.probs.astype(np.float32).sum(2)


def parse_frames(spec: str | None, n_frames: int) -> np.ndarray:
    """Frame selection: None/"all", "5", "0:8" (Python slice, end exclusive), "0,3,7" or "0:20:2"."""
    if spec in (None, "", "all"):
        return np.arange(n_frames)
    picked: list[int] = []
    for part in spec.split(","):
        if ":" in part:
            bits = [int(b) if b else None for b in part.split(":")]
            picked += list(range(n_frames))[slice(*bits)]
        else:
            picked.append(int(part))
    bad = [i for i in picked if not -n_frames <= i < n_frames]
    if bad or not picked:
        raise ValueError(f"frame selection {spec!r} is empty or outside 0..{n_frames - 1}")
    return np.array(sorted({i % n_frames for i in picked}))


def analyse_movie(artifact: Path, frames: np.ndarray, pixel_size_pm: float | None,
                  frame_index: np.ndarray | None = None, min_area_frac: float = 0.25,
                  log=print) -> Analysis:
    """Run every member on every frame; compute the per-member figures."""
    from trainer.model.predict import EnsembleRunner

    runner = EnsembleRunner(artifact)
    man = runner.manifest
    scale = 1.0 if pixel_size_pm is None else man["pixel_size_pm"] / pixel_size_pm
    probs = np.stack([runner.probs(f, pixel_size_pm).astype(np.float16) for f in frames])
    log(f"analysed {len(frames)} frames × {probs.shape[1]} members with {artifact}")
    radius = man["atom_radius_px"] * scale
    figures = member_figures(probs.astype(np.float32).sum(2), radius, min_area_frac)
    return Analysis(frames.astype(np.float32),
                    np.arange(len(frames)) if frame_index is None else np.asarray(frame_index),
                    probs, figures, float(pixel_size_pm or man["pixel_size_pm"]), float(radius),
                    [m["id"] for m in man["members"]], str(artifact))


def find_blobs(atom_maps: np.ndarray, radius_px: float, min_area_frac: float = 0.25,
               threshold: float = 0.5) -> tuple[np.ndarray, int, np.ndarray]:
    """Label ``atom_maps > threshold`` per 2-D plane of any leading shape ``[..., H, W]``.
    Returns (labels with small blobs removed, number of labels, area of each label [n+1]);
    label 0 is background, removed labels keep their number but are zeroed in ``labels``."""
    lead = atom_maps.shape[:-2]
    stack = atom_maps.reshape((-1,) + atom_maps.shape[-2:])
    labels, n = ndimage.label(stack > threshold, structure=PLANE)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    small = area < min_area_frac * np.pi * radius_px ** 2
    small[0] = False
    labels[small[labels]] = 0
    return labels.reshape(lead + atom_maps.shape[-2:]), n, np.where(small, 0, area)


def member_figures(atom_maps: np.ndarray, radius_px: float, min_area_frac: float = 0.25) -> dict:
    """The figures above for ``atom_maps [T, M, H, W]``; each value is ``[T, M]``."""
    t_n, m_n = atom_maps.shape[:2]
    labels, n, area = find_blobs(atom_maps, radius_px, min_area_frac)
    plane_of = np.zeros(n + 1, int)
    flat = labels.reshape(t_n * m_n, -1)
    rows, cols = np.nonzero(flat)
    plane_of[flat[rows, cols]] = rows
    kept = np.nonzero(area)[0]
    kept = kept[kept > 0]
    counts = np.bincount(plane_of[kept], minlength=t_n * m_n).reshape(t_n, m_n)
    size_median, size_cv = _grouped_size_stats(plane_of[kept], area[kept], t_n * m_n)
    masks = atom_maps > 0.5
    consensus = atom_maps.mean(1, keepdims=True) > 0.5
    inter = (masks & consensus).sum((2, 3))
    union = (masks | consensus).sum((2, 3))
    grow = int(np.ceil(radius_px))
    near = ndimage.maximum_filter(labels > 0, size=(1, 1, 2 * grow + 1, 2 * grow + 1))
    fog = (atom_maps * ~near).mean((2, 3))
    reference = np.maximum(np.median(counts, axis=1, keepdims=True), 1)
    return {"atoms": counts.astype(float), "agreement": np.where(union > 0, inter / np.maximum(union, 1), 1.0),
            "fog": fog, "size_median": size_median.reshape(t_n, m_n),
            "size_cv": size_cv.reshape(t_n, m_n),
            "log_count_ratio": np.log(np.maximum(counts, 1) / reference)}


def _grouped_size_stats(group: np.ndarray, values: np.ndarray, n_groups: int):
    median, cv = np.zeros(n_groups), np.zeros(n_groups)
    order = np.argsort(group, kind="stable")
    group, values = group[order], values[order].astype(float)
    bounds = np.searchsorted(group, np.arange(n_groups + 1))
    for g in np.nonzero(np.diff(bounds))[0]:
        v = values[bounds[g]:bounds[g + 1]]
        median[g], cv[g] = np.median(v), v.std() / v.mean()
    return median, cv


def min_peak_distance(radius_px: float) -> int:
    """Closest two atoms' peaks can be on a map whose atom discs have ``radius_px``."""
    return max(2, round(4 / 3 * radius_px))


def atom_labels(atom_map: np.ndarray, radius_px: float, min_area_frac: float = 0.25,
                threshold: float = 0.5, split_dip: float = SPLIT_DIP) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the atoms of one map ``[H, W]``: blobs of ``atom_map > threshold``, merged atoms
    split (``split_merged``), parts smaller than ``min_area_frac`` × the disc area removed.
    Returns (labels, ids of the atoms)."""
    labels, n = ndimage.label(atom_map > threshold)
    if split_dip > 0 and n:
        labels = split_merged(labels, n, atom_map, min_peak_distance(radius_px), split_dip)
    area = np.bincount(labels.ravel())
    ids = np.flatnonzero(area >= min_area_frac * np.pi * radius_px ** 2)
    return labels, ids[ids > 0]


def split_merged(labels: np.ndarray, n: int, atom_map: np.ndarray, min_distance: int,
                 dip: float = SPLIT_DIP) -> np.ndarray:
    """``labels`` (``n`` blobs, as ``ndimage.label`` returns them) with every blob that holds
    several atoms divided among them (module docstring); new labels follow ``n``, a divided
    blob's own label disappears."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    smooth = ndimage.correlate1d(ndimage.correlate1d(atom_map.astype(np.float32), kernel, 0,
                                                     mode="nearest"), kernel, 1, mode="nearest")
    top = (smooth >= ndimage.maximum_filter(smooth, size=3, mode="constant", cval=-np.inf)) \
        & (labels > 0)
    py, px = np.nonzero(top)
    plab = labels[py, px]
    several = (np.bincount(plab, minlength=n + 1) >= 2)[plab]
    py, px, plab = py[several], px[several], plab[several]
    if py.size == 0:
        return labels
    pts = np.stack([py, px], 1).astype(np.float64)
    pairs = cKDTree(pts).query_pairs(SPLIT_RANGE * min_distance, output_type="ndarray")
    pairs = pairs[plab[pairs[:, 0]] == plab[pairs[:, 1]]]
    i, j = pairs[:, 0], pairs[:, 1]
    t = np.linspace(0.0, 1.0, SPLIT_SAMPLES)[None, :, None]
    line = pts[i][:, None] + t * (pts[j] - pts[i])[:, None]
    low = ndimage.map_coordinates(smooth, line.reshape(-1, 2).T, order=1).reshape(len(pairs), -1)
    peak = smooth[py, px]
    one = (np.hypot(*(pts[j] - pts[i]).T) < min_distance) | \
        (low.min(1) > np.minimum(peak[i], peak[j]) - dip)
    graph = coo_matrix((np.ones(int(one.sum())), (i[one], j[one])), shape=(len(py), len(py)))
    n_atoms, atom_of = connected_components(graph, directed=False)
    blob_of_atom = np.zeros(n_atoms, np.intp)
    blob_of_atom[atom_of] = plab
    divided = np.bincount(blob_of_atom, minlength=n + 1) >= 2
    keep = divided[blob_of_atom]
    if not keep.any():
        return labels
    count = np.bincount(atom_of, minlength=n_atoms)
    centre = np.stack([np.bincount(atom_of, pts[:, k], n_atoms) / count for k in (0, 1)], 1)[keep]
    owner = blob_of_atom[keep]
    fy, fx = np.nonzero(divided[labels])
    own_blob = labels[fy, fx]
    k = min(4, len(centre))
    near = cKDTree(centre).query(np.stack([fy, fx], 1), k=k)[1].reshape(len(fy), k)
    mine = owner[near] == own_blob[:, None]
    pick = np.where(mine.any(1), near[np.arange(len(fy)), mine.argmax(1)], -1)
    out = labels.copy()
    out[fy, fx] = np.where(pick >= 0, n + 1 + pick, 0)
    return out


def blob_centres(atom_map: np.ndarray, radius_px: float, min_area_frac: float = 0.25,
                 threshold: float = 0.5) -> np.ndarray:
    """Probability-weighted centres ``[n, 2]`` (x = column, y = row) of one map's atoms
    (``atom_labels``: merged atoms split)."""
    labels, ids = atom_labels(atom_map, radius_px, min_area_frac, threshold)
    if len(ids) == 0:
        return np.zeros((0, 2), np.float32)
    rc = np.array(ndimage.center_of_mass(atom_map, labels, ids))
    return rc[:, ::-1].astype(np.float32).reshape(-1, 2)


def value_at(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Nearest-pixel values of ``image [H, W]`` at ``xy [n, 2]``."""
    col = np.clip(np.round(xy[:, 0]).astype(int), 0, image.shape[1] - 1)
    row = np.clip(np.round(xy[:, 1]).astype(int), 0, image.shape[0] - 1)
    return image[row, col]


# ----------------------------------------------------------------------------- run folder


def save_analysis(an: Analysis, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(out_dir / "analysis.npz", frames=an.frames, frame_index=an.frame_index, probs=an.probs,
             member_ids=np.array(an.member_ids), pixel_size_pm=np.float64(an.pixel_size_pm),
             atom_radius_px=np.float64(an.atom_radius_px), artifact=np.array(an.artifact),
             **{f"fig_{k}": v for k, v in an.figures.items()})
    with open(out_dir / "figures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["frame", "member", *FIGURES])
        for t, frame in enumerate(an.frame_index):
            for m, member in enumerate(an.member_ids):
                w.writerow([int(frame), member, *(f"{an.figures[k][t, m]:.5g}" for k in FIGURES)])
    (out_dir / "figures.md").write_text(figures_markdown(an))
    (out_dir / "analysis.json").write_text(json.dumps(
        {"artifact": an.artifact, "frames": an.frame_index.tolist(), "pixel_size_pm": an.pixel_size_pm,
         "members": an.member_ids}, indent=1))
    return out_dir / "analysis.npz"


def load_analysis(path: Path) -> Analysis:
    path = Path(path)
    if path.is_dir():
        path = path / "analysis.npz"
    if not path.is_file():
        raise ValueError(f"{path}: no analysis here (run `elit-train analyse` first)")
    with np.load(path, allow_pickle=False) as z:
        return Analysis(z["frames"], z["frame_index"], z["probs"],
                        {k: z[f"fig_{k}"] for k in FIGURES}, float(z["pixel_size_pm"]),
                        float(z["atom_radius_px"]), z["member_ids"].tolist(), str(z["artifact"]))


def figures_markdown(an: Analysis) -> str:
    """Per-member means over the analysed frames (a per-frame CSV sits beside it)."""
    head = ("| member | atoms/frame | agreement (IoU vs mean) | fog ×1000 | blob size median px | "
            "blob size CV | log count ratio |")
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    f = {k: v.mean(0) for k, v in an.figures.items()}
    for m, member in enumerate(an.member_ids):
        lines.append(f"| {member} | {f['atoms'][m]:.1f} | {f['agreement'][m]:.3f} | "
                     f"{1000 * f['fog'][m]:.2f} | {f['size_median'][m]:.1f} | {f['size_cv'][m]:.3f} | "
                     f"{f['log_count_ratio'][m]:+.3f} |")
    return "\n".join(lines) + "\n"


def atoms_with_uncertainty(mean_map: np.ndarray, std_map: np.ndarray, radius_px: float):
    """Atom centres (probability-weighted; ``atom_labels``: merged atoms split) of ``mean_map``
    and the mean ensemble std over each atom's pixels."""
    labels, ids = atom_labels(mean_map, radius_px)
    if len(ids) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0)
    rc = np.array(ndimage.center_of_mass(mean_map, labels, ids)).reshape(-1, 2)
    std = np.asarray(ndimage.mean(std_map, labels, ids))
    return rc[:, ::-1].astype(np.float32), std
