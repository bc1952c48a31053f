"""Per-scene atom IoU of artifacts on tiles of the physical training world (or the legacy one),
through onnxruntime, on seeds the trainer never used. Pixels masked "ignore" count neither way.

    .venv/bin/python -m benchmarks.world_iou models/default runs/candidate --frames 16 --seed 4242

Prints one markdown row per (artifact, scene): IoU mean ± std over the members, and of the
ensemble mean. Frames are fed at their own pixel size (no rescaling), as in training.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from trainer.data.synth import IGNORE, SynthConfig, make_dataset
from trainer.model.predict import EnsembleRunner


def scene_sets(world: str, frames: int, seed: int, size: int) -> dict:
    if world == "legacy":
        return {lat: make_dataset(frames, seed, SynthConfig(lattice=lat, size_px=size))
                for lat in ("graphene", "perovskite")}
    base = SynthConfig.physical(size_px=size)
    return {scene: make_dataset(frames, seed, replace(
        base, scene_weights=tuple(float(s == scene) for s in base.scenes))) for scene in base.scenes}


def iou(runner: EnsembleRunner, ds) -> tuple[np.ndarray, float, float]:
    """Member IoUs, the ensemble mean's IoU, and the ensemble mean's false-atom pixel fraction
    (predicted atom where the truth is background: hallucination, e.g. in vacuum)."""
    m = len(runner.manifest["members"])
    inter, union = np.zeros(m + 1), np.zeros(m + 1)
    false_px = valid_px = 0
    for image, mask in zip(ds.images[:, 0], ds.masks):
        atom = runner.probs(image).sum(1)                      # [M, H, W]: P(atom, any class)
        p = np.concatenate([atom > 0.5, [atom.mean(0) > 0.5]])
        valid = mask != IGNORE
        truth = (mask > 0) & valid
        inter += (p & truth).sum((1, 2))
        union += ((p | truth) & valid).sum((1, 2))
        false_px += int((p[m] & (mask == 0)).sum())
        valid_px += int(valid.sum())
    values = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return values[:m], float(values[m]), false_px / max(valid_px, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--world", choices=["physical", "legacy"], default="physical")
    parser.add_argument("--frames", type=int, default=16, help="tiles per scene")
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args(argv)
    sets = scene_sets(args.world, args.frames, args.seed, args.size)
    print(f"{args.world} world, {args.frames} tiles of {args.size} px per scene, seed {args.seed}\n")
    print("| artifact | scene | member IoU (mean ± std) | ensemble-mean IoU | false-atom px |")
    print("|---|---|---:|---:|---:|")
    for artifact in args.artifacts:
        runner = EnsembleRunner(artifact)
        for scene, ds in sets.items():
            members, ensemble, false = iou(runner, ds)
            print(f"| {artifact} | {scene} | {np.nanmean(members):.3f} ± {np.nanstd(members):.3f} | "
                  f"{ensemble:.3f} | {100 * false:.1f} % |")


if __name__ == "__main__":
    main()
