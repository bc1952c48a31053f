"""Orchestration: make the cases, tune the baseline on a separate seed, run the model, score.

Seeds: the scored frames use `seed` (default 20261202), the baseline's tuning frames
`seed + TUNE_OFFSET`; neither is a seed of any training run, and the image model is this
package's own (`optics`), not the trainer's.
"""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from benchmarks.evaluation import baseline, cases, movie, scoring
from benchmarks.evaluation.runner import ModelRunner

DEFAULT_SEED = 20261202
TUNE_OFFSET = 7919
CASE_ORDER = ("drift_movie", "heavy_atoms", "nanoparticle", "perovskite", "compound", "ood")


def make_frames(seed: int, quick: bool, max_pixel_pm: float) -> list:
    """All scored frames, in report order. quick: a few frames per case."""
    per_seg = movie.FRAMES_PER_SEGMENT
    movie_idx = [s * per_seg + per_seg - 1 for s in range(len(movie.SEGMENTS))] if quick \
        else None
    n_heavy, n_other, n_ood = (1, 1, 1) if quick else (4, 4, 3)
    frames = movie.make_movie(seed, movie_idx)
    frames += [cases.heavy_atoms(seed, p, i) for p in cases.HEAVY_PIXEL_PM for i in range(n_heavy)]
    frames += [cases.nanoparticle(seed, i) for i in range(n_other)]
    frames += [cases.perovskite(seed, i) for i in range(n_other)]
    frames += [cases.compound(seed, i, turned) for turned in (False, True)
               for i in range(n_other)]
    frames += [cases.ood(seed, k, i, max_pixel_pm) for k in cases.OOD_KINDS for i in range(n_ood)]
    return frames


def tuning_frames(seed: int, quick: bool, max_pixel_pm: float) -> dict:
    """Frames for tuning the baseline, per case (frames with truth atoms only)."""
    tseed = seed + TUNE_OFFSET
    step = 8 if quick else 3
    return {
        "drift_movie": movie.make_movie(tseed, list(range(0, movie.N_FRAMES, step))),
        "heavy_atoms": [cases.heavy_atoms(tseed, p, 0) for p in cases.HEAVY_PIXEL_PM],
        "nanoparticle": [cases.nanoparticle(tseed, i) for i in range(1 if quick else 2)],
        "perovskite": [cases.perovskite(tseed, i) for i in range(1 if quick else 2)],
        "compound": [cases.compound(tseed, 0, False), cases.compound(tseed, 1, True)],
        "ood": [cases.ood(tseed, "lattice_3x", 0, max_pixel_pm)],
    }


def picture_keys(frames: list) -> set:
    """(case, segment, index) of the last frame of each group: the one drawn."""
    last = {}
    for f in frames:
        last[(f.case, f.segment)] = f.index
    return {(c, s, i) for (c, s), i in last.items()}


def run(model_dir, seed: int = DEFAULT_SEED, quick: bool = False, threads=None,
        log=print, params: dict | None = None) -> dict:
    """Everything the report needs: per-frame records, per-group figures, picture frames.
    `params`: post-processing parameters other than the service's defaults."""
    t_start = time.perf_counter()
    runner = ModelRunner(model_dir, threads)
    runner.params = runner.params.replace(**(params or {}))
    max_pm = runner.pixel_range_pm[1] or 20.0
    frames = make_frames(seed, quick, max_pm)
    log(f"{len(frames)} frames made ({time.perf_counter() - t_start:.0f} s)")
    tuned = {case: baseline.tune(fs) for case, fs in tuning_frames(seed, quick, max_pm).items()}
    log(f"baseline tuned ({time.perf_counter() - t_start:.0f} s): "
        + ", ".join(f"{c} sigma={p.sigma} thr={p.threshold} heavy={p.heavy_factor}"
                    for c, p in tuned.items()))
    drawn = picture_keys(frames)
    records, model_scores, base_scores, pictures = [], defaultdict(list), defaultdict(list), []
    for f in frames:
        key = (f.case, f.segment)
        det = runner.detect(f.image, f.pixel_size_pm, want_maps=(*key, f.index) in drawn)
        ms = scoring.score_frame(f.xy, f.cls, det.xy, det.heavy, f.image.shape, f.spacing_px,
                                 f.pixel_size_pm, det.uncertainty, det.class_conf)
        bxy, bcls = baseline.find_peaks(f.image, f.spacing_px, tuned[f.case])
        bs = scoring.score_frame(f.xy, f.cls, bxy, bcls, f.image.shape, f.spacing_px,
                                 f.pixel_size_pm)
        model_scores[key].append((ms, det))
        base_scores[key].append(bs)
        records.append(_record(f, det, ms, bs))
        if det.atom_map is not None:
            pictures.append((f, det))
    groups = [_group(key, model_scores[key], base_scores[key], frames) for key in model_scores]
    return {"model": str(runner.artifact.path), "artifact": runner.artifact.name,
            "manifest_pixel_range_pm": list(runner.pixel_range_pm),
            "model_pixel_pm": runner.artifact.pixel_size_pm, "seed": seed, "quick": quick,
            "baseline_params": {c: p.__dict__ for c, p in tuned.items()},
            "groups": groups, "frames": records, "pictures": pictures,
            "movie": [f for f in frames if f.case == "drift_movie"],
            "seconds": time.perf_counter() - t_start}


def _record(f, det, ms, bs) -> dict:
    return {"case": f.case, "segment": f.segment, "index": f.index, "shape": list(f.image.shape),
            "pixel_size_pm": f.pixel_size_pm, "in_distribution": f.in_distribution,
            "n_truth": len(f.xy), "n_truth_heavy": int((f.cls == 1).sum()),
            "n_detected": len(det.xy), "n_called_heavy": int(det.heavy.sum()),
            "tp": ms.tp, "fp": ms.fp, "fn": ms.fn, "baseline_tp": bs.tp, "baseline_fp": bs.fp,
            "baseline_fn": bs.fn, "mean_uncertainty": det.mean_uncertainty, "ood": det.ood,
            "count_per_member": det.count_per_member, "seconds": round(det.seconds, 3),
            "rejected": det.error, "conditions": {k: float(v) for k, v in f.conditions.items()}}


def _group(key, model, base, frames) -> dict:
    scores = [s for s, _ in model]
    dets = [d for _, d in model]
    fig = scoring.pool(scores)
    flags = [d.ood for d in dets]
    group_frames = [f for f in frames if (f.case, f.segment) == key]
    return {"case": key[0], "segment": key[1], **fig,
            "pixel_size_pm": group_frames[0].pixel_size_pm,
            "in_distribution": group_frames[0].in_distribution,
            "atoms_per_frame": float(np.mean([len(f.xy) for f in group_frames])),
            "mean_uncertainty": float(np.mean([d.mean_uncertainty for d in dets])),
            "ood_flag_rate": None if any(x is None for x in flags) else float(np.mean(flags)),
            "rejected": sum(d.error is not None for d in dets),
            "baseline_f1": scoring.pool(base)["f1"],
            "baseline_fp_per_frame": scoring.pool(base)["fp_per_frame"],
            "baseline_impurity_precision": scoring.pool(base)["impurity_precision"],
            "baseline_impurity_recall": scoring.pool(base)["impurity_recall"]}
