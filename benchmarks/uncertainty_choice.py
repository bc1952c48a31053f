"""Which per-atom uncertainty ranks false detections above true ones (docs/evaluation.md,
"per-atom uncertainty").

    python -m benchmarks.uncertainty_choice [--seeds 777 4242 9001] [--model models/default]

On cases of seeds the evaluation suite does not score (its drift movie per segment, and the
heavy atoms on a support at each pixel size; default seeds 777, 4242, 9001): every frame through
the service's pipeline, detections matched to the truth by the suite's own scoring, and the
AUROC (false vs true detections) of three per-atom figures: `uncertainty` (the ensemble's total
predictive uncertainty at the atom's peak, sqrt(prob (1 - prob)): the streamed column since
session 6), `spread` (the std over members, the column's meaning before) and 1 - `prob` (which
ranks exactly as `uncertainty` does; shown as a check). Prints a markdown table. Not a test.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.evaluation import cases, movie
from benchmarks.evaluation.runner import ModelRunner
from benchmarks.evaluation.scoring import auroc, score_frame
from elit_stream.core.pipeline import analyse_frame

FIGURES = {"uncertainty (total, at the peak)": lambda fa: fa.uncertainty,
           "spread": lambda fa: fa.spread,
           "1 - prob": lambda fa: 1.0 - fa.prob}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[777, 4242, 9001])
    ap.add_argument("--model", default="models/default")
    a = ap.parse_args(argv)
    run = ModelRunner(a.model, threads=2)
    groups: dict[str, list] = {}
    for seed in a.seeds:
        for f in movie.make_movie(seed):
            groups.setdefault(f"{seed} drift {f.segment}", []).append(f)
        for px in cases.HEAVY_PIXEL_PM:
            groups[f"{seed} heavy atoms {px:.0f} pm"] = [cases.heavy_atoms(seed, px, i)
                                                         for i in range(3)]
    print(f"AUROC, false vs true detections ({a.model}):\n")
    print("| case | false / true | " + " | ".join(FIGURES) + " |\n|---|---|"
          + "---:|" * len(FIGURES))
    wins = {k: 0 for k in FIGURES}
    for name, frames in groups.items():
        neg = {k: [] for k in FIGURES}
        pos = {k: [] for k in FIGURES}
        for f in frames:
            out = analyse_frame(run.engine, f.image, f.pixel_size_pm, run.active_set, run.params)
            fa = out.analysis
            for k, fig in FIGURES.items():
                s = score_frame(f.xy, f.cls, np.stack([out.x, out.y], 1), fa.cls, f.image.shape,
                                f.spacing_px, f.pixel_size_pm, uncertainty=fig(fa))
                neg[k].append(s.unc_true)
                pos[k].append(s.unc_false)
        values = {k: auroc(np.concatenate(neg[k]), np.concatenate(pos[k])) for k in FIGURES}
        n_false = sum(len(p) for p in pos[next(iter(FIGURES))])
        n_true = sum(len(p) for p in neg[next(iter(FIGURES))])
        if all(v is not None for v in values.values()):
            for k, v in values.items():                           # ties count for each
                wins[k] += v >= max(values.values()) - 1e-9
        print(f"| {name} | {n_false} / {n_true} | "
              + " | ".join("n/a" if v is None else f"{v:.3f}" for v in values.values()) + " |")
    print("\nbest (or tied best) in how many cases: "
          + ", ".join(f"{k} {v}" for k, v in wins.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
