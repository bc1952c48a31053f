"""Scoring detections against a movie's ground truth (the test movie of `trainer.data.testmovie`).

Owns one-to-one matching of predicted to true atoms, detection precision / recall / F1 on the
frame interior, per-atom uncertainty AUROC for wrong vs right detections, the per-half breakdown
table of the ELIT benchmark, F1 per segment of the movie, impurity (heavy-class) precision /
recall, and what the relabelling filter did with each kind of true atom (``filter_vs_truth``).
Truth never reaches training: only these figures use it (and the truth's amorphous atoms, class 3,
count as atoms).

    python -m trainer.elit.scoring MOVIE.npz ANALYSIS_DIR [ANALYSIS_DIR ...]   # breakdown table
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from trainer.data.testmovie import MovieConfig, feature_centres_px, load_truth
from trainer.elit.experiment import Analysis


def match_atoms(pred: np.ndarray, truth: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching within radius (Hungarian on distances); returns (pred_matched [P] bool,
    truth_index_of_pred [P] int, -1 if unmatched)."""
    matched = np.zeros(len(pred), bool)
    partner = np.full(len(pred), -1)
    if len(pred) == 0 or len(truth) == 0:
        return matched, partner
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(truth), radius_px, output_type="coo_matrix")
    if pairs.nnz == 0:
        return matched, partner
    cost = np.full((len(pred), len(truth)), 1e6)
    cost[pairs.row, pairs.col] = pairs.data
    rows, cols = linear_sum_assignment(cost)
    good = cost[rows, cols] <= radius_px
    matched[rows[good]], partner[rows[good]] = True, cols[good]
    return matched, partner


def inside_margin(xy: np.ndarray, shape: tuple[int, int], margin_px: float) -> np.ndarray:
    return np.all((xy >= margin_px) & (xy <= np.array(shape[::-1]) - 1 - margin_px), axis=1)


def detection_scores(pred_xy: list[np.ndarray], truth_xy: list[np.ndarray], shape, bond_px: float,
                     match_frac: float = 0.4, margin_px: float = 4.0) -> dict:
    """Precision / recall / F1 over all frames (atoms within ``margin_px`` of the edge are not
    scored); a detection is right if matched one-to-one within ``match_frac`` × bond length."""
    tp = fp = fn = 0
    for p, t in zip(pred_xy, truth_xy):
        p, t = p[inside_margin(p, shape, margin_px)], t[inside_margin(t, shape, margin_px)]
        ok, _ = match_atoms(p, t, match_frac * bond_px)
        tp, fp, fn = tp + ok.sum(), fp + (~ok).sum(), fn + len(t) - ok.sum()
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": float(precision),
            "recall": float(recall), "f1": float(f1)}


def detections(an: Analysis, member_cols: list[int] | None = None) -> tuple[list, list]:
    """Atoms of the mean map of the given member columns (all by default) per analysed frame, and
    each atom's uncertainty (mean ensemble std over its blob)."""
    from trainer.elit.experiment import atoms_with_uncertainty

    maps = an.atom_maps if member_cols is None else an.atom_maps[:, member_cols]
    xy, unc = [], []
    for t in range(len(maps)):
        p, s = atoms_with_uncertainty(maps[t].mean(0), maps[t].std(0), an.atom_radius_px)
        xy.append(p)
        unc.append(s)
    return xy, unc


def detection_report(an: Analysis, truth: dict, member_cols: list[int] | None = None) -> dict:
    """F1 (one-to-one within 0.4 × bond) over the analysed frames, and the AUROC of per-atom
    uncertainty for separating wrong detections (unmatched) from right ones (matched)."""
    from sklearn.metrics import roc_auc_score


    xy, unc = detections(an, member_cols)
    t_xy = [truth["xy"][int(f)] for f in an.frame_index]
    scores = detection_scores(xy, t_xy, an.frames.shape[1:], truth["bond_px"])
    wrong, u = [], []
    for p, s, t in zip(xy, unc, t_xy):
        keep = inside_margin(p, an.frames.shape[1:], 4.0)
        ok, _ = match_atoms(p[keep], t[inside_margin(t, an.frames.shape[1:], 4.0)], 0.4 * truth["bond_px"])
        wrong.append(~ok)
        u.append(s[keep])
    wrong, u = np.concatenate(wrong), np.concatenate(u)
    scores["auroc_uncertainty"] = (float(roc_auc_score(wrong, u)) if 0 < wrong.sum() < len(wrong)
                                   else None)
    scores["mean_uncertainty"] = float(u.mean()) if len(u) else 0.0
    scores["atoms_per_frame"] = float(np.mean([len(p) for p in xy]))
    return scores


def breakdown(movie_path: Path, analysis_dirs: list[Path]) -> str:
    """Markdown: per analysis, first/second half of the movie: precision, recall, false detections
    per frame in the amorphous patch and in the hole, missed atoms per frame."""
    from trainer.elit.experiment import load_analysis

    truth = load_truth(movie_path)
    with np.load(movie_path, allow_pickle=False) as z:
        cfg = MovieConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in json.loads(str(z["config"])).items()})
    change = round(cfg.change_frame_frac * cfg.frames)
    lines = [("| analysis | frames | precision | recall | false/frame | in amorphous | in hole | "
              "missed/frame |"), "|---|---|---:|---:|---:|---:|---:|---:|"]
    for path in analysis_dirs:
        an = load_analysis(path)
        rows = []
        for p, f in zip(detections(an)[0], an.frame_index):
            t = truth["xy"][int(f)]
            p, t = p[inside_margin(p, an.frames.shape[1:], 4)], t[inside_margin(t, an.frames.shape[1:], 4)]
            ok, _ = match_atoms(p, t, 0.4 * truth["bond_px"])
            c = feature_centres_px(cfg, int(f))
            fp = p[~ok]
            rows.append([f, ok.sum(), len(p), len(t), len(fp),
                         (np.hypot(*(fp - c["amorphous"]).T) < cfg.amorphous_radius_px + 4).sum(),
                         (np.hypot(*(fp - c["hole"]).T) < cfg.hole_max_radius_px).sum()])
        r = np.array(rows, float)
        for name, sel in ((f"0–{change - 1}", r[:, 0] < change), (f"{change}–{cfg.frames - 1}", r[:, 0] >= change)):
            s = r[sel].sum(0)
            n = max(sel.sum(), 1)
            lines.append(f"| {path} | {name} | {s[1] / max(s[2], 1):.3f} | {s[1] / max(s[3], 1):.3f} | "
                         f"{s[4] / n:.1f} | {s[5] / n:.1f} | {s[6] / n:.1f} | {(s[3] - s[1]) / n:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.elit.scoring", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("movie", type=Path, help="the test movie (.npz with truth)")
    p.add_argument("analyses", type=Path, nargs="+", metavar="ANALYSIS_DIR",
                   help="analysis folders (elit-train analyse) to score: first/second half, "
                   "false detections in the amorphous patch / hole")
    args = p.parse_args(argv)
    print(breakdown(args.movie, args.analyses))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------- per segment, per class


def segment_scores(an: Analysis, truth: dict, n_segments: int = 4) -> list[dict]:
    """F1 / precision / recall per segment of the analysed frames: the movie's own named segments
    when the truth has them (the evaluation suite's drift movie), else ``n_segments`` equal runs."""
    xy, _ = detections(an)
    t_xy = [truth["xy"][int(f)] for f in an.frame_index]
    names = truth.get("segment")
    if names:
        labels = [names[int(f)] for f in an.frame_index]
        order = list(dict.fromkeys(labels))
        parts = [np.flatnonzero(np.array(labels) == name) for name in order]
    else:
        parts = np.array_split(np.arange(len(xy)), min(n_segments, len(xy)))
        order = [None] * len(parts)
    out = []
    for name, part in zip(order, parts):
        s = detection_scores([xy[i] for i in part], [t_xy[i] for i in part], an.frames.shape[1:],
                             truth["bond_px"])
        s["frames"] = f"{int(an.frame_index[part[0]])}–{int(an.frame_index[part[-1]])}"
        if name is not None:
            s["segment"] = name
        out.append(s)
    return out


def impurity_scores(an: Analysis, truth: dict) -> dict | None:
    """Heavy-class precision / recall (truth class 2) of a multi-class ensemble; class of a
    detection = the argmax of the mean class maps at its centre. None for a 1-class ensemble."""
    from trainer.elit.experiment import value_at

    if an.probs.shape[2] < 2:
        return None
    xy, _ = detections(an)
    tp = pred_heavy = true_heavy = 0
    for t, f in enumerate(an.frame_index):
        mean = an.probs[t].astype(np.float32).mean(0)                       # [C, H, W]
        p = xy[t][inside_margin(xy[t], an.frames.shape[1:], 4.0)]
        keep_t = inside_margin(truth["xy"][int(f)], an.frames.shape[1:], 4.0)
        t_xy, t_cls = truth["xy"][int(f)][keep_t], truth["cls"][int(f)][keep_t]
        heavy = (np.argmax(np.stack([value_at(m, p) for m in mean]), 0) == 1) if len(p) else np.zeros(0, bool)
        ok, partner = match_atoms(p, t_xy, 0.4 * truth["bond_px"])
        pred_heavy += heavy.sum()
        true_heavy += (t_cls == 2).sum()
        if len(t_cls):
            tp += (heavy & ok & (t_cls[np.maximum(partner, 0)] == 2)).sum()
    return {"precision": float(tp / max(pred_heavy, 1)), "recall": float(tp / max(true_heavy, 1)),
            "predicted_heavy": int(pred_heavy), "true_heavy": int(true_heavy), "right": int(tp)}


KINDS = ("lattice", "lattice at frame edge", "Si", "amorphous", "no atom")
OUTCOMES = {0: "kept", 1: "ignored", 2: "ignored", 4: "ignored", 3: "background"}


def filter_vs_truth(atoms, truth: dict, shape, edge_px: float) -> dict:
    """What the relabelling did with each kind of true atom: counts of kept / ignored / taught as
    background per kind (lattice within ``edge_px`` of the frame edge counted apart; "no atom" =
    detections matching no true atom). True atoms the ensemble missed are "not found" (taught as
    background too, by omission)."""
    table = {k: {"kept": 0, "ignored": 0, "background": 0, "not found": 0} for k in KINDS}
    for fa in atoms:
        t_xy, t_cls = truth["xy"][fa.frame], truth["cls"][fa.frame]
        edge = ~inside_margin(t_xy, shape, edge_px)
        kind = np.where(t_cls == 2, "Si", np.where(t_cls == 3, "amorphous",
                        np.where(edge, "lattice at frame edge", "lattice")))
        ok, partner = match_atoms(fa.xy, t_xy, 0.4 * truth["bond_px"])
        for r, good, j in zip(fa.reason, ok, partner):
            table[kind[j] if good else "no atom"][OUTCOMES[int(r)]] += 1
        found = np.zeros(len(t_xy), bool)
        found[partner[ok]] = True
        for k in KINDS[:4]:
            table[k]["not found"] += int((~found & (kind == k)).sum())
    return table
