"""How `heavy_contrast` (the Z-contrast class check, core/postprocess.py) was chosen.

    python -m benchmarks.heavy_contrast_choice [--seeds 777 4242] [--model models/default]

On drift movies of seeds the evaluation suite does not score (default 777 and 4242; the suite
scores 20261202): every frame through the service's engine once, then `analyse` with each
candidate threshold (0 = the networks' classes alone), impurity precision / recall per segment by
the suite's own scoring, and the mean and the worst impurity F1 over all segments of all seeds.
The recommended value (3.2; the check is off by default) is the threshold with the best mean
(docs/evaluation.md, "heavy atoms by Z-contrast"). Prints markdown tables. Not a test.
"""
from __future__ import annotations

import argparse

import numpy as np

from benchmarks.evaluation import movie
from benchmarks.evaluation.runner import ModelRunner
from benchmarks.evaluation.scoring import pool, score_frame
from elit_stream.core.postprocess import analyse

CANDIDATES = (0.0, 2.6, 2.8, 3.0, 3.2, 3.4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[777, 4242])
    ap.add_argument("--model", default="models/default")
    a = ap.parse_args(argv)
    run = ModelRunner(a.model, threads=2)
    eng, heavy = run.engine, run.artifact.heavy_class
    scores = {t: {} for t in CANDIDATES}                      # t -> (seed, segment) -> [scores]
    for seed in a.seeds:
        for f in movie.make_movie(seed):
            x, geom = eng.prepare(f.image, f.pixel_size_pm)
            probs = eng.run(x)
            for t in CANDIDATES:
                fa = analyse(probs, run.active, run.params.replace(heavy_contrast=t),
                             geom.valid_shape, image=x[0, 0], heavy_class=heavy)
                fx, fy = geom.to_frame_xy(fa.x, fa.y)
                s = score_frame(f.xy, f.cls, np.stack([fx, fy], 1), (fa.cls == heavy).astype(np.uint8),
                                f.image.shape, f.spacing_px, f.pixel_size_pm)
                scores[t].setdefault((seed, f.segment), []).append(s)
    keys = list(scores[CANDIDATES[0]])
    print(f"Impurity precision / recall per segment ({a.model}; 0 = the networks' classes):\n")
    print("| heavy_contrast | " + " | ".join(f"{s} {g}" for s, g in keys)
          + " | mean F1 | worst F1 |\n|---|" + "---|" * (len(keys) + 2))
    for t in CANDIDATES:
        pooled = [pool(scores[t][k]) for k in keys]
        pr = [(p["impurity_precision"] or 0.0, p["impurity_recall"] or 0.0) for p in pooled]
        f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in pr]
        print(f"| {t:g} | " + " | ".join(f"{p:.2f} / {r:.2f}" for p, r in pr)
              + f" | {np.mean(f1):.3f} | {min(f1):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
