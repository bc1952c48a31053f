"""Out-of-distribution flag rates and class-confidence AUROC of an artifact, on frames of our own.

    python -m benchmarks.ood [--model models/default] [--id-frames 200] [--ood-frames 25]
                             [--size 256] [--seed 31337] [--json out.json]
    python -m benchmarks.ood --real ../shared/data       # real images, qualitative

Every frame goes the service's way: `Engine.prepare` (no pixel size given, as an operator who does
not say) -> `Engine.run` -> `analyse` (all members) -> `OodReference.score` against the model's
`ood_reference`. Frames (none used for training or for the reference: their own seed):

- in distribution: synthetic frames of the artifact's recorded SynthConfig at `--size`;
- noise: uniform or Gaussian white noise, or Poisson noise at 0.5-50 counts per pixel;
- vacuum: a flat, weakly graded background under Poisson (0.3-30 counts) and read noise;
- amorphous film: 1-6 layers of randomly placed light atoms (38 / nm^2 each), rendered and
  acquired like the training data (so they look like atoms, not like a lattice);
- lattice at 3x the pixel size: the artifact's own SynthConfig with 3x its pixel size.

Reports the flag rate per case and the AUROC of class confidence for wrong-vs-right class
(in-distribution atoms matched to the truth within half a C-C bond, `match_radius_px`): scores 1 - cls_prob and 1 - cls_agree. Not a test; a table to read.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.core.manifest import default_artifact_path
from elit_stream.core.ood import OodReference
from elit_stream.core.postprocess import Params, analyse
from elit_stream.tools.movie import match_pairs
from trainer.data.config import SynthConfig
from trainer.data.synth import _acquire, make_sample, render_gaussians

CASES = ("noise", "vacuum", "amorphous", "lattice_3x_pixel")


def noise_frame(rng, size):
    kind = rng.integers(3)
    if kind == 0:
        return rng.random((size, size))
    if kind == 1:
        return rng.normal(size=(size, size))
    return rng.poisson(np.exp(rng.uniform(np.log(0.5), np.log(50))), (size, size)).astype(float)


def vacuum_frame(rng, size):
    dose = np.exp(rng.uniform(np.log(0.3), np.log(30)))
    t = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    bg = 0.05 + rng.uniform(0, 0.05) * (np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None])
    return rng.poisson(np.maximum(bg, 0) * dose * np.ones((size, size))) \
        + rng.normal(0, 0.5, (size, size))


def amorphous_frame(rng, size, synth: SynthConfig):
    pixel_pm = synth.pixel_size_pm / np.exp(rng.uniform(*np.log(synth.zoom_range)))
    n = int(size * size * (pixel_pm / 1e3) ** 2 * 38 * rng.uniform(1, 6))
    xy = rng.uniform(-5, size + 5, (n, 2))
    clean = render_gaussians(xy, np.ones(n), rng.uniform(*synth.sigma_pm_range) / pixel_pm, size)
    return _acquire(rng, synth, clean)


def frames_of(case: str, rng, n: int, size: int, synth: SynthConfig):
    if case == "in_distribution":
        cfg = replace(synth, size_px=size)
        for _ in range(n):
            s = make_sample(rng, cfg)
            yield s.image, s
    elif case == "lattice_3x_pixel":
        cfg = replace(synth, size_px=size, pixel_size_pm=3 * synth.pixel_size_pm)
        for _ in range(n):
            yield make_sample(rng, cfg).image, None
    else:
        make = {"noise": noise_frame, "vacuum": vacuum_frame,
                "amorphous": lambda r, s: amorphous_frame(r, s, synth)}[case]
        for _ in range(n):
            yield make(rng, size), None


def match_radius_px(synth: SynthConfig, sample) -> float:
    """Half the smallest atom spacing the lattice can have, in this tile's pixels (>= 1.5 px)."""
    return max(1.5, 0.5 * 142.0 / sample.pixel_size_pm)


def class_pairs(fa, sample, synth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wrong class?, cls_prob, cls_agree) for predicted atoms matched to true atoms."""
    pred = np.column_stack([fa.x, fa.y])
    p, t, _ = match_pairs(pred, sample.xy, match_radius_px(synth, sample))
    wrong = fa.cls[p].astype(int) != (sample.cls[t].astype(int) - 1)
    return wrong, fa.cls_prob[p], fa.cls_agree[p]


def run(model: Path, n_id: int, n_ood: int, size: int, seed: int, log=print) -> dict:
    art = load_artifact(model)
    if art.ood_reference is None:
        raise SystemExit(f"{model}: no ood_reference in the manifest (elit-train reference)")
    ref = OodReference.from_manifest(art.ood_reference)
    synth = SynthConfig.from_dict(art.manifest["training"]["synth"])
    eng = Engine(art, threads=int(os.environ.get("ELIT_BENCH_THREADS", "1")))
    rng = np.random.default_rng(seed)
    act, params = np.arange(art.n_members), Params()
    out = {"model": str(model), "size": size, "seed": seed, "cases": {}}
    wrong, cprob, cagree = [], [], []
    for case in ("in_distribution", *CASES):
        n = n_id if case == "in_distribution" else n_ood
        scores, figures = [], []
        for image, sample in frames_of(case, rng, n, size, synth):
            x, geom = eng.prepare(np.asarray(image, np.float32))
            fa = analyse(eng.run(x), act, params, geom.valid_shape)
            scores.append(ref.score(fa.figures, params.threshold).score)
            figures.append(fa.figures.as_dict())
            if sample is not None and art.n_classes > 1:
                w, p, a = class_pairs(fa, sample, synth)
                wrong.append(w), cprob.append(p), cagree.append(a)
        s = np.array(scores)
        out["cases"][case] = {"frames": n, "flag_rate": float((s > ref.flag_above).mean()),
                              "score_median": float(np.median(s)),
                              "score_p5": float(np.percentile(s, 5)),
                              "score_p95": float(np.percentile(s, 95)), "figures": figures}
        log(f"{case:18s} {n:4d} frames  flagged {100 * out['cases'][case]['flag_rate']:5.1f} %  "
            f"score median {np.median(s):.2f} (p5 {np.percentile(s, 5):.2f}, "
            f"p95 {np.percentile(s, 95):.2f})")
    if wrong:
        w, p, a = (np.concatenate(v) for v in (wrong, cprob, cagree))
        out["class_confidence"] = {
            "atoms": int(w.size), "wrong": int(w.sum()),
            "auroc_cls_prob": float(roc_auc_score(w, -p)) if 0 < w.sum() < w.size else None,
            "auroc_cls_agree": float(roc_auc_score(w, -a)) if 0 < w.sum() < w.size else None}
        log(f"class confidence: {w.size} matched atoms, {w.sum()} with the wrong class; AUROC "
            f"wrong vs right: 1 - cls_prob {out['class_confidence']['auroc_cls_prob']}, "
            f"1 - cls_agree {out['class_confidence']['auroc_cls_agree']}")
    return out


REAL_IMAGES = (("MoS2_stem_Exp-000-2.npy", None, 17.6), ("MoS2_stem_Exp-001-5.npy", None, 13.7),
               ("Acquisition_18.emd", "data/single/data", 12.25))


def real_images(model: Path, folder: Path, log=print) -> None:
    """The OOD score and class confidence on the real images of ../shared/data (qualitative),
    without and with their pixel size; one markdown row each."""
    from trainer.model.predict import read_frames

    art = load_artifact(model)
    eng, ref = Engine(art, threads=1), OodReference.from_manifest(art.ood_reference)
    for name, key, pixel_pm in REAL_IMAGES:
        if not (folder / name).is_file():
            log(f"| {name} | missing in {folder} |")
            continue
        img = read_frames(folder / name, key)[0].astype(np.float32)
        for given in (None, pixel_pm):
            x, geom = eng.prepare(img, given)
            fa = analyse(eng.run(x), np.arange(art.n_members), Params(), geom.valid_shape)
            s, f = ref.score(fa.figures, 0.5), fa.figures
            log(f"| {name} | {given or '—'} | {fa.n_atoms} | {fa.mean_uncertainty:.3f} | "
                f"{s.score:.2f} | {'yes' if s.flagged else 'no'} | {f.density:.3f} | "
                f"{f.disagreement:.3f} | {f.crystallinity:.0f} | {f.order:.0f} | "
                f"{np.median(fa.cls_prob):.2f} | {100 * (fa.cls_agree < 0.75).mean():.1f} % |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_artifact_path())
    ap.add_argument("--id-frames", type=int, default=200)
    ap.add_argument("--ood-frames", type=int, default=25, help="per out-of-distribution case")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=31337)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--real", type=Path, metavar="DIR",
                    help="instead: score the real images in DIR (e.g. ../shared/data)")
    a = ap.parse_args(argv)
    if a.real:
        real_images(a.model, a.real)
        return 0
    res = run(a.model, a.id_frames, a.ood_frames, a.size, a.seed)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
