"""ELIT step 6: split found atoms into classes by their image intensity; multi-class training set.

Owns ``atom_intensities`` (per-atom brightness, comparable across frames), ``split_by_intensity``
(lattice vs heavier impurity: a 1-D two-component Gaussian mixture on log intensity, or a fixed
threshold) and ``multiclass_atoms`` (relabelled atoms of ``trainer.elit.relabel`` given classes).

Intensity of an atom: the raw frame smoothed by a Gaussian of half the atom radius, sampled at the
atom's centre, minus the frame's 5th percentile (background), divided by the median of that over
the frame's atoms (so 1 = a typical atom of that frame, whatever the dose or contrast).

Split rule: with ``threshold`` given, heavy = intensity > threshold. Otherwise a 2-component GMM on
log intensity; heavy = atoms whose posterior for the brighter component is > 0.5 AND whose
intensity is above ``min_ratio`` (1.3): a unimodal sample then yields (almost) no heavy atoms
instead of half of them. The heavier class is never dropped by the patch GMM (dopants look unlike
their lattice neighbours, so the lattice filter would otherwise throw them away).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.elit.experiment import Analysis
from trainer.elit.intensity import atom_intensities
from trainer.elit.relabel import FrameAtoms, RelabelConfig, select_atoms


def split_by_intensity(intensity: np.ndarray, threshold: float | None = None,
                       min_ratio: float = 1.3, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Classes ``[n]`` (1 lattice, 2 heavy) and a description of the split."""
    if threshold is not None:
        heavy = intensity > threshold
        return np.where(heavy, 2, 1).astype(np.uint8), {"rule": f"threshold {threshold:g}",
                                                       "heavy": int(heavy.sum())}
    from sklearn.mixture import GaussianMixture

    x = np.log(np.maximum(intensity, 1e-3))[:, None]
    if len(x) < 10:
        return np.ones(len(x), np.uint8), {"rule": "too few atoms", "heavy": 0}
    gmm = GaussianMixture(2, random_state=seed, n_init=3).fit(x)
    bright = int(np.argmax(gmm.means_[:, 0]))
    heavy = (gmm.predict_proba(x)[:, bright] > 0.5) & (intensity > min_ratio)
    info = {"rule": f"1-D GMM on log intensity, posterior > 0.5 and intensity > {min_ratio:g}",
            "means": np.exp(gmm.means_[:, 0]).round(3).tolist(),
            "weights": gmm.weights_.round(4).tolist(), "heavy": int(heavy.sum())}
    return np.where(heavy, 2, 1).astype(np.uint8), info


def multiclass_atoms(an: Analysis, members: list[int], cfg: RelabelConfig, nominal_px_pm: float,
                     threshold: float | None = None) -> tuple[list[FrameAtoms], dict]:
    """Relabelled atoms (``select_atoms``) with classes from the intensity split (one split over
    all chosen frames)."""
    atoms, info = select_atoms(an, members, cfg, nominal_px_pm)
    where = {int(f): i for i, f in enumerate(an.frame_index)}
    values = [atom_intensities(an.frames[where[fa.frame]], fa.xy, an.atom_radius_px) for fa in atoms]
    cls, split = split_by_intensity(np.concatenate(values) if values else np.zeros(0), threshold)
    start = 0
    for fa in atoms:
        fa.cls = cls[start:start + len(fa.xy)]
        start += len(fa.xy)
        rescued = (fa.cls == 2) & ((fa.reason == 1) | (fa.reason == 3))
        fa.reason[rescued] = 0
    info["classes"] = split
    info["heavy_kept"] = int(sum(((fa.cls == 2) & fa.kept).sum() for fa in atoms))
    return atoms, info


def run_multiclass(artifact: Path, frames: np.ndarray, pixel_size_pm: float | None, run: Path,
                   cfg: RelabelConfig, rc, command: str, truth: dict | None = None,
                   threshold: float | None = None, log=print) -> Path:
    """Analyse with ``artifact``, split atoms into 2 classes, train and export a 2-class ensemble
    (``RUN/artifact``), analyse the movie with it; returns the artifact folder."""
    from trainer.elit.experiment import analyse_movie, save_analysis
    from trainer.elit.iterate import _parent_synth, parent_lineage, retrain
    from trainer.elit.relabel import build_dataset, write_relabel
    from trainer.elit.report import write_report
    from trainer.model.artifact import read_manifest

    an = analyse_movie(artifact, frames, pixel_size_pm, log=log)
    save_analysis(an, run / "analysis")
    sel = write_report(an, run / "report")
    manifest = read_manifest(artifact)
    atoms, info = multiclass_atoms(an, sel.members, cfg, manifest["pixel_size_pm"], threshold)
    log(f"classes: {info['classes']}")
    ds = build_dataset(an, atoms, replace(cfg, n_classes=2), manifest["pixel_size_pm"],
                       manifest["atom_radius_px"], _parent_synth(manifest))
    dataset = write_relabel(run / "relabel", ds, atoms, info, cfg, an, sel.members)
    lineage = parent_lineage(artifact, "multi-class (lattice / heavy) ensemble from intensities at "
                             "the atoms", frames=[fa.frame for fa in atoms], members=sel.members,
                             filters=info, best_member=sel.best)
    out = retrain(dataset, artifact, run / "train", run / "artifact", rc,
                  None if rc.from_scratch else sel.best, lineage, command, force=True, log=log)
    after = analyse_movie(out, frames, pixel_size_pm, log=log)
    save_analysis(after, run / "analysis_after")
    write_report(after, run / "report_after")
    if truth is not None:
        scores = class_scores(after, truth)
        (run / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        log(f"against the truth: {json.dumps(scores)}")
    return out


def class_scores(an: Analysis, truth: dict) -> dict:
    """Any-class F1, and per true class the recall with the right predicted class."""
    from trainer.elit.experiment import blob_centres, value_at
    from trainer.elit.scoring import detection_report, match_atoms

    out = {"any_class": detection_report(an, truth)}
    mean = an.probs.astype(np.float32).mean(1)                  # [T, C, H, W]
    hits, totals = np.zeros(3), np.zeros(3)
    for t, f in enumerate(an.frame_index):
        xy = blob_centres(mean[t].sum(0), an.atom_radius_px)
        pred_cls = 1 + np.argmax(np.stack([value_at(m, xy) for m in mean[t]]), 0) if len(xy) else xy[:, 0]
        t_xy, t_cls = truth["xy"][int(f)], truth["cls"][int(f)]
        ok, partner = match_atoms(xy, t_xy, 0.4 * truth["bond_px"])
        for c in (1, 2):
            totals[c] += (t_cls == c).sum()
            hits[c] += ((t_cls[partner[ok]] == c) & (pred_cls[ok] == c)).sum()
    out["recall_with_class"] = {"lattice": float(hits[1] / max(totals[1], 1)),
                                "heavy": float(hits[2] / max(totals[2], 1)),
                                "heavy_atoms_in_truth": int(totals[2])}
    return out
