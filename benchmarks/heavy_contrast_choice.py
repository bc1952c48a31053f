"""How `heavy_contrast` and the dopant-frame gate of the Z-contrast class check were chosen.

    python -m benchmarks.heavy_contrast_choice [--seeds 777 4242] [--model models/default]

On drift movies of seeds the evaluation suite does not score (default 777 and 4242; the suite
scores 20261202): every frame through the service's engine once, then `analyse` with each
candidate threshold (0 = the networks' classes alone), impurity precision / recall per segment by
the suite's own scoring, and the mean and the worst impurity F1 over all segments of all seeds
(the default, 3.2, has the best mean). Then, at 3.2, the gate `CONTRAST_DOPANT_FRACTION` (demote
only in frames where the networks call fewer than this fraction of the atoms heavy; 1.1 = no
gate): the same mean F1, and with ../shared/data present the heavy calls on the real MoS2 and
SrTiO3 frames, whose heavier sublattice (Mo, Sr) the gate is there to keep
(docs/evaluation.md, "heavy atoms by Z-contrast"). Then the band-pass frame ratio (rescue of
heavy calls and lift of light ones) and `CONTRAST_LIFT` swept alone. Prints markdown tables.
Not a test.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.evaluation import movie
from benchmarks.evaluation.runner import ModelRunner
from benchmarks.evaluation.scoring import pool, score_frame
from benchmarks.postprocess_choice import REAL
from elit_stream.core import postprocess
from elit_stream.core.postprocess import analyse

CANDIDATES = (0.0, 2.6, 2.8, 3.0, 3.2, 3.4)
GATES = (0.1, 0.2, 0.3, 1.1)
RATIOS = (np.inf, 3.5, 4.0, 4.5, 5.0)
LIFTS = (np.inf, 1.5, 1.6, 1.7, 1.8, 2.0, 2.2)
SWEEPS = {"CONTRAST_DOPANT_FRACTION": GATES, "CONTRAST_FRAME_RATIO": RATIOS,   # module constants
          "CONTRAST_LIFT": LIFTS}
TITLES = {"CONTRAST_FRAME_RATIO": "The frame ratio of the band-pass rescue and lift",
          "CONTRAST_LIFT": "The lift of light calls (contrast above this and bright in the frame)"}


@contextmanager
def constant(name: str, value):
    """`elit_stream.core.postprocess.<name>` set to `value` inside the block, restored after."""
    old = getattr(postprocess, name)
    setattr(postprocess, name, value)
    try:
        yield
    finally:
        setattr(postprocess, name, old)


def pr_cells(pooled: list[dict]) -> str:
    return " | ".join(f"{p['impurity_precision'] or 0:.2f} / {p['impurity_recall'] or 0:.2f}"
                      for p in pooled)


def impurity_f1(pooled: list[dict]) -> list[float]:
    pr = [(p["impurity_precision"] or 0.0, p["impurity_recall"] or 0.0) for p in pooled]
    return [2 * p * r / (p + r) if p + r else 0.0 for p, r in pr]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[777, 4242])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    a = ap.parse_args(argv)
    run = ModelRunner(a.model, threads=2)
    eng, heavy = run.engine, run.artifact.heavy_class
    scores = {t: {} for t in CANDIDATES}                      # t -> (seed, segment) -> [scores]
    swept = {name: {v: {} for v in values} for name, values in SWEEPS.items()}   # at 3.2

    def heavy_calls(x, probs, geom, t):
        fa = analyse(probs, run.active, run.params.replace(heavy_contrast=t), geom.valid_shape,
                     image=x[0, 0], heavy_class=heavy)
        fx, fy = geom.to_frame_xy(fa.x, fa.y)
        return np.stack([fx, fy], 1), (fa.cls == heavy).astype(np.uint8)

    for seed in a.seeds:
        for f in movie.make_movie(seed):
            x, geom = eng.prepare(f.image, f.pixel_size_pm)
            probs = eng.run(x)

            def record(into, t):
                xy, cls = heavy_calls(x, probs, geom, t)
                into.setdefault((seed, f.segment), []).append(score_frame(
                    f.xy, f.cls, xy, cls, f.image.shape, f.spacing_px, f.pixel_size_pm))
            for t in CANDIDATES:
                record(scores[t], t)
            for name, values in SWEEPS.items():
                for v in values:
                    with constant(name, v):
                        record(swept[name][v], 3.2)
    keys = list(scores[CANDIDATES[0]])
    print(f"Impurity precision / recall per segment ({a.model}; 0 = the networks' classes):\n")
    print("| heavy_contrast | " + " | ".join(f"{s} {g}" for s, g in keys)
          + " | mean F1 | worst F1 |\n|---|" + "---|" * (len(keys) + 2))
    for t in CANDIDATES:
        pooled = [pool(scores[t][k]) for k in keys]
        f1 = impurity_f1(pooled)
        print(f"| {t:g} | {pr_cells(pooled)} | {np.mean(f1):.3f} | {min(f1):.3f} |")
    real = [(n, px) for n, px in REAL if (Path(a.shared) / n).is_file()]
    print("\nThe gate at heavy_contrast 3.2 (1.1 = no gate):\n")
    print("| CONTRAST_DOPANT_FRACTION | mean F1 | worst F1 | "
          + " | ".join(f"heavy calls {n}" for n, _ in real) + " |\n|---|---|---|"
          + "---|" * len(real))
    images = []
    if real:
        from elit_stream.tools.readers import read_movie
        for n, px in real:
            img = np.asarray(read_movie(Path(a.shared) / n).frames[0], np.float32)
            x, geom = eng.prepare(img, px)
            images.append((x, eng.run(x).copy(), geom))
    def real_calls(name, value):
        with constant(name, value):
            return [int(heavy_calls(x, p, geom, 3.2)[1].sum()) for x, p, geom in images]

    for g in GATES:
        f1 = impurity_f1([pool(swept["CONTRAST_DOPANT_FRACTION"][g][k]) for k in keys])
        calls = real_calls("CONTRAST_DOPANT_FRACTION", g)
        print(f"| {g:g} | {np.mean(f1):.3f} | {min(f1):.3f} | " + " | ".join(map(str, calls)) + " |")
    networks = [int(heavy_calls(x, p, geom, 0.0)[1].sum()) for x, p, geom in images]
    print("| (the networks' classes) | | | " + " | ".join(map(str, networks)) + " |")
    for name, title in TITLES.items():
        print(f"\n{title}, at heavy_contrast 3.2 (inf = none):\n")
        print(f"| {name} | " + " | ".join(f"{s} {g}" for s, g in keys)
              + " | mean F1 | worst F1 | " + " | ".join(f"heavy calls {n}" for n, _ in real)
              + " |\n|---|" + "---|" * (len(keys) + 2 + len(real)))
        for v in SWEEPS[name]:
            pooled = [pool(swept[name][v][k]) for k in keys]
            f1 = impurity_f1(pooled)
            calls = real_calls(name, v)
            print(f"| {v:g} | {pr_cells(pooled)} | {np.mean(f1):.3f} | {min(f1):.3f} | "
                  + " | ".join(map(str, calls)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
