"""Scoring detections against truth: one-to-one matching, counts per frame, pooled figures.

Matching: truth and detections are paired one-to-one (Hungarian assignment on distance) when
closer than MATCH_FRACTION x the atom spacing. Only the frame interior counts: a truth atom
within `margin_px` of the border is neither a hit nor a miss, and a detection there is not a
false positive (the network sees half an atom there; so does a human).

Figures over a group of frames (pooled, not averaged per frame):
- precision / recall / F1 of detection;
- impurity (heavy-class) precision = detections called heavy that match a heavy truth atom /
  detections called heavy; recall = heavy truth atoms matched by a detection called heavy;
- localisation error: RMS distance (pm) of matched pairs;
- uncertainty AUROC: how well the per-atom uncertainty ranks false detections above true ones;
- class-confidence AUROC: among matched detections, how well (1 - class confidence) ranks wrong
  classes above right ones;
- OOD flag rate: fraction of frames flagged out of distribution.
An AUROC needs both kinds present; otherwise it is None ("n/a").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

MATCH_FRACTION = 0.4


@dataclass
class FrameScore:
    """Per-frame matching outcome (interior only) and what the pooled figures need."""

    tp: int
    fp: int
    fn: int
    heavy_pred: int = 0           # interior detections called heavy
    heavy_true: int = 0           # interior heavy truth atoms
    heavy_hits: int = 0           # pairs where both are heavy (one-to-one: hits = both ways)
    dist_pm: np.ndarray = field(default_factory=lambda: np.empty(0))
    unc_true: np.ndarray = field(default_factory=lambda: np.empty(0))   # uncertainty of TPs
    unc_false: np.ndarray = field(default_factory=lambda: np.empty(0))  # ... of FPs
    conf_right: np.ndarray = field(default_factory=lambda: np.empty(0))  # class conf., right
    conf_wrong: np.ndarray = field(default_factory=lambda: np.empty(0))  # ... wrong class


def match(truth_xy: np.ndarray, pred_xy: np.ndarray, radius_px: float
          ) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (truth index, prediction index) closer than radius_px, minimising the
    total distance."""
    if len(truth_xy) == 0 or len(pred_xy) == 0:
        return np.empty(0, int), np.empty(0, int)
    sparse = cKDTree(truth_xy).sparse_distance_matrix(cKDTree(pred_xy), radius_px,
                                                      output_type="coo_matrix")
    if sparse.nnz == 0:
        return np.empty(0, int), np.empty(0, int)
    rows, cols = np.unique(sparse.row), np.unique(sparse.col)
    cost = np.full((len(rows), len(cols)), 1e6)
    cost[np.searchsorted(rows, sparse.row), np.searchsorted(cols, sparse.col)] = sparse.data
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < 1e6
    return rows[r[ok]], cols[c[ok]]


def interior(xy: np.ndarray, shape: tuple[int, int], margin_px: float) -> np.ndarray:
    h, w = shape
    return (xy[:, 0] >= margin_px) & (xy[:, 0] <= w - 1 - margin_px) \
        & (xy[:, 1] >= margin_px) & (xy[:, 1] <= h - 1 - margin_px)


def score_frame(truth_xy, truth_cls, pred_xy, pred_cls, shape, spacing_px: float,
                pixel_pm: float, uncertainty=None, class_conf=None,
                margin_px: float | None = None) -> FrameScore:
    """Match and count one frame; `uncertainty` / `class_conf` per detection, optional."""
    truth_xy, pred_xy = np.asarray(truth_xy, float).reshape(-1, 2), \
        np.asarray(pred_xy, float).reshape(-1, 2)
    truth_cls, pred_cls = np.asarray(truth_cls).ravel(), np.asarray(pred_cls).ravel()
    margin = spacing_px if margin_px is None else margin_px
    ti, pi = match(truth_xy, pred_xy, MATCH_FRACTION * spacing_px)
    t_in, p_in = interior(truth_xy, shape, margin), interior(pred_xy, shape, margin)
    paired = np.zeros(len(pred_xy), bool)
    paired[pi] = True
    false = p_in & ~paired                       # unpaired detections in the interior
    ti, pi = ti[t_in[ti]], pi[t_in[ti]]          # a pair counts where its truth atom counts
    counted = false.copy()
    counted[pi] = True
    heavy_t, heavy_p = truth_cls == 1, pred_cls == 1
    heavy_hits = int((heavy_p[pi] & heavy_t[ti]).sum())
    s = FrameScore(tp=len(ti), fp=int(false.sum()), fn=int(t_in.sum() - len(ti)),
                   heavy_pred=int((heavy_p & counted).sum()), heavy_true=int((heavy_t & t_in).sum()),
                   heavy_hits=heavy_hits,
                   dist_pm=np.hypot(*(truth_xy[ti] - pred_xy[pi]).T) * pixel_pm)
    if uncertainty is not None:
        u = np.asarray(uncertainty, float).ravel()
        s.unc_true, s.unc_false = u[pi], u[false]
    if class_conf is not None:
        c = np.asarray(class_conf, float).ravel()
        right = pred_cls[pi] == truth_cls[ti]
        s.conf_right, s.conf_wrong = c[pi][right], c[pi][~right]
    return s


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """AUROC of a score ranking positives above negatives; None unless both are present."""
    if len(negatives) == 0 or len(positives) == 0:
        return None
    y = np.r_[np.zeros(len(negatives)), np.ones(len(positives))]
    return float(roc_auc_score(y, np.r_[negatives, positives]))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def pool(scores: list[FrameScore]) -> dict:
    """Pooled figures of a group of frames (see the module docstring); None = n/a."""
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("tp", "fp", "fn"))
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    dist = np.concatenate([s.dist_pm for s in scores]) if scores else np.empty(0)
    cat = lambda k: np.concatenate([getattr(s, k) for s in scores]) if scores else np.empty(0)
    conf_right, conf_wrong = cat("conf_right"), cat("conf_wrong")
    return {
        "frames": len(scores), "tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r,
        "f1": f1, "fp_per_frame": fp / len(scores) if scores else None,
        "impurity_precision": _ratio(sum(s.heavy_hits for s in scores),
                                     sum(s.heavy_pred for s in scores)),
        "impurity_recall": _ratio(sum(s.heavy_hits for s in scores),
                                  sum(s.heavy_true for s in scores)),
        "heavy_called": sum(s.heavy_pred for s in scores),
        "heavy_true": sum(s.heavy_true for s in scores),
        "loc_rms_pm": float(np.sqrt(np.mean(dist**2))) if dist.size else None,
        "uncertainty_auroc": auroc(cat("unc_true"), cat("unc_false")),
        "class_conf_auroc": auroc(1 - conf_right, 1 - conf_wrong),
    }
