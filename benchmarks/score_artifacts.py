"""Artifacts on a drift movie with truth, as the service reports them (not a test).

    python -m benchmarks.score_artifacts MOVIE.npz ARTIFACT [ARTIFACT ...] [--threads 2]

For each artifact (e.g. the iterations of an `elit-train iterate` run) every frame of MOVIE (a
`movie.npz` written by `benchmarks.evaluate`) goes through the service's pipeline
(`core.pipeline.analyse_frame`, all members active, default parameters) and is scored by the
suite's own scoring: detection F1 overall and per segment, impurity precision / recall with the
Z-contrast class check (`heavy_contrast` 3.2, the service's default) and without it (0: the
networks' classes alone). Prints a markdown table. The ELIT loop's own truth tables (progress.md) score its
analysis of the class maps; this is what a user who loads the artifact into the service gets.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.evaluation.movie import load_movie
from benchmarks.evaluation.runner import ModelRunner
from benchmarks.evaluation.scoring import pool, score_frame
from elit_stream.core.pipeline import analyse_frame


def score(run: ModelRunner, frames, params) -> dict:
    per_segment: dict[str, list] = {}
    for f in frames:
        out = analyse_frame(run.engine, f.image, f.pixel_size_pm, run.active_set, params)
        fa = out.analysis
        heavy = (fa.cls == run.heavy_index) if run.heavy_index is not None \
            else np.zeros(fa.n_atoms, bool)
        per_segment.setdefault(f.segment, []).append(
            score_frame(f.xy, f.cls, np.stack([out.x, out.y], 1), heavy.astype(np.uint8),
                        f.image.shape, f.spacing_px, f.pixel_size_pm))
    everything = [s for scores in per_segment.values() for s in scores]
    return {"all": pool(everything), **{k: pool(v) for k, v in per_segment.items()}}


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("movie", type=Path)
    ap.add_argument("artifacts", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heavy-contrast", type=float, default=3.2,
                    help="the Z-contrast class check's threshold for the first impurity columns")
    a = ap.parse_args(argv)
    frames = load_movie(a.movie)
    segments = list(dict.fromkeys(f.segment for f in frames))
    print("| artifact | F1 | " + " | ".join(f"F1 {s}" for s in segments)
          + " | impurity P | impurity R | worst segment P / R | networks' classes: P | R |")
    print("|---|" + "---:|" * (len(segments) + 6))
    for path in a.artifacts:
        run = ModelRunner(path, threads=a.threads)
        on = score(run, frames, run.params.replace(heavy_contrast=a.heavy_contrast))
        off = score(run, frames, run.params.replace(heavy_contrast=0.0))
        seg = [on[s] for s in segments]
        worst = min(seg, key=lambda p: min(p["impurity_precision"] or 0, p["impurity_recall"] or 0))
        print(f"| {path} | {fmt(on['all']['f1'])} | " + " | ".join(fmt(p["f1"]) for p in seg)
              + f" | {fmt(on['all']['impurity_precision'])} | {fmt(on['all']['impurity_recall'])}"
              + f" | {fmt(worst['impurity_precision'])} / {fmt(worst['impurity_recall'])}"
              + f" | {fmt(off['all']['impurity_precision'])} | {fmt(off['all']['impurity_recall'])} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
