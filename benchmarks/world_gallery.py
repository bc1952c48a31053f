"""A picture of the physical training world: a few tiles of every scene, truth on top.

    .venv/bin/python -m benchmarks.world_gallery --out docs/img/training-world.png
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from trainer.data.synth import SynthConfig, make_sample


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-scene", type=int, default=5)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    from matplotlib.figure import Figure

    base = SynthConfig.physical(size_px=args.size)
    n = args.per_scene
    fig = Figure(figsize=(1.9 * n, 2.0 * len(base.scenes)), layout="constrained")
    axes = fig.subplots(len(base.scenes), n, squeeze=False)
    for row, scene in zip(axes, base.scenes):
        cfg = replace(base, scene_weights=tuple(float(s == scene) for s in base.scenes))
        for i, ax in enumerate(row):
            s = make_sample(np.random.default_rng([args.seed, i, len(scene)]), cfg)
            ax.imshow(s.image, cmap="gray", vmin=0, vmax=1)
            colours = np.where(s.cls == 2, "#ff5a36", "#3fb6ff")
            ax.scatter(s.xy[:, 0], s.xy[:, 1], s=1.5, c=colours, linewidths=0)
            ax.set_title(f"{scene} {s.pixel_size_pm:.0f} pm/px", fontsize=7)
            ax.set_axis_off()
    fig.suptitle("physical training world (dots: truth; blue lattice, red heavy)", fontsize=9)
    fig.savefig(args.out, dpi=70)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
