"""ELIT step 6: split found atoms into classes by local Z-contrast; a 2-class ensemble.

Owns ``multiclass_atoms`` (relabelled atoms of ``trainer.elit.relabel`` with 2 classes) and
``run_multiclass`` (analyse, relabel with classes, train, export, analyse again) and
``class_scores`` (per-class figures against a known truth).

Classes come from each atom's LOCAL Z-contrast (``trainer.elit.intensity.local_contrast``: peak
above the local background, over the median of the neighbouring atoms' heights), heavy above 2.2
(``intensity.split_by_contrast`` says why a fixed threshold) or ``--intensity-threshold``.
The same split is what ``iterate`` uses to carry a 2-class parent's classes into its children.
Heavy atoms are never dropped by the patch GMM (dopants look unlike their lattice neighbours).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.elit.experiment import Analysis
from trainer.elit.intensity import split_by_contrast  # noqa: F401  (re-exported)
from trainer.elit.relabel import FrameAtoms, RelabelConfig, select_atoms


def multiclass_atoms(an: Analysis, members: list[int], cfg: RelabelConfig, nominal_px_pm: float,
                     threshold: float | None = None) -> tuple[list[FrameAtoms], dict]:
    """Relabelled atoms (``select_atoms``) with 2 classes from the local-contrast split."""
    cfg = replace(cfg, n_classes=2, heavy_threshold=threshold if threshold is not None
                  else cfg.heavy_threshold)
    return select_atoms(an, members, cfg, nominal_px_pm)


def run_multiclass(artifact: Path, frames: np.ndarray, pixel_size_pm: float | None, run: Path,
                   cfg: RelabelConfig, rc, command: str, truth: dict | None = None,
                   threshold: float | None = None, log=print) -> Path:
    """Analyse with ``artifact``, split atoms into 2 classes, train and export a 2-class ensemble
    (``RUN/<run>-multiclass``), analyse the movie with it; returns the artifact folder."""
    from trainer.elit.experiment import analyse_movie, save_analysis
    from trainer.elit.iterate import _parent_synth, artifact_name, parent_lineage, retrain
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
    lineage = parent_lineage(artifact, "multi-class (lattice / heavy) ensemble from the atoms' "
                             "local Z-contrast", step="multiclass", frames=[fa.frame for fa in atoms],
                             members=sel.members, filters=info, best_member=sel.best)
    out = retrain(dataset, artifact, run / "train", run / artifact_name(run, 0, "multiclass"), rc,
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

    from trainer.elit.scoring import impurity_scores

    out = {"any_class": detection_report(an, truth), "impurity": impurity_scores(an, truth)}
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
