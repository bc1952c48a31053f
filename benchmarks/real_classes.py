"""Classes on the real images of ../shared/data as the service reports them (qualitative).

    python -m benchmarks.real_classes [--out docs/img/real-classes.png]
    python -m benchmarks.real_classes --orientations [--orient-png docs/img/real-orientations.png]

Each image through the service's pipeline (all members, default parameters), once with the
Z-contrast class check (`heavy_contrast` 3.2, the default) and once without (0): prints atoms and atoms
called heavy, and draws the image with the heavy atoms of both (PNG). `--orientations`: the same
for the image as recorded, transposed, turned and flipped (a mirrored or turned frame is the same
sample: the counts should not move), and a picture of a corner of each image as recorded and
transposed with the service's classes. Skips images that are not
there (the data are not part of the repository; ../shared/data/README.md for their licences).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.evaluation.runner import ModelRunner
from benchmarks.postprocess_choice import REAL
from elit_stream.core.pipeline import analyse_frame


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/default")
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="docs/img/real-classes.png")
    ap.add_argument("--heavy-contrast", type=float, default=3.2, help="the check's threshold")
    ap.add_argument("--orientations", action="store_true",
                    help="each image transposed, turned and flipped too")
    ap.add_argument("--orient-png", default="docs/img/real-orientations.png")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from elit_stream.tools.readers import read_movie

    run = ModelRunner(a.model, threads=2)
    found = [(f, px) for f, px in REAL if (Path(a.shared) / f).is_file()]
    if not found:
        print(f"no real images under {a.shared}; nothing to do")
        return 0
    if a.orientations:
        return orientations(run, [(Path(a.shared) / f, px) for f, px in found], a.orient_png)
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 6.4), squeeze=False)
    print("| image | atoms | heavy (Z-contrast check) | heavy (networks' classes) | z_contrast median |")
    print("|---|---:|---:|---:|---:|")
    for ax, (name, px) in zip(axes[0], found):
        img = np.asarray(read_movie(Path(a.shared) / name).frames[0], np.float32)
        got = {}
        for label, params in (("check", run.params.replace(heavy_contrast=a.heavy_contrast)),
                              ("net", run.params.replace(heavy_contrast=0))):
            out = analyse_frame(run.engine, img, px, run.active_set, params)
            got[label] = (out.x, out.y, out.analysis.cls == run.heavy_index, out.analysis)
        x, y, heavy, fa = got["check"]
        _, _, heavy_net, _ = got["net"]
        print(f"| {name} ({px} pm/px) | {fa.n_atoms} | {int(heavy.sum())} | {int(heavy_net.sum())} "
              f"| {np.nanmedian(fa.z_contrast) if np.isfinite(fa.z_contrast).any() else float('nan'):.2f} |")
        ax.imshow(img, cmap="gray")
        ax.scatter(x[heavy_net], y[heavy_net], s=40, facecolors="none", edgecolors="tab:blue",
                   linewidths=0.8, label="heavy by the networks")
        ax.scatter(x[heavy], y[heavy], s=12, c="tab:red", label="heavy after the Z-contrast check")
        ax.set_title(f"{name}: {fa.n_atoms} atoms, heavy {int(heavy.sum())} (networks {int(heavy_net.sum())})",
                     fontsize=9)
        ax.axis("off")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


ORIENTATIONS = {"as read": lambda a: a, "transposed": lambda a: a.T,
                "quarter turn": np.rot90, "flipped top-bottom": lambda a: a[::-1],
                "flipped left-right": lambda a: a[:, ::-1], "half turn": lambda a: a[::-1, ::-1]}
# where the fast scan of the image as read (left to right along the rows) runs after each turn
FAST_SCAN = {"as read": "x", "transposed": "y", "quarter turn": "-y", "flipped top-bottom": "x",
             "flipped left-right": "-x", "half turn": "-x"}


def orientations(run: ModelRunner, images, png: str, corner: int = 160) -> int:
    import matplotlib.pyplot as plt

    from elit_stream.tools.readers import read_movie

    print("| image | orientation | atoms | heavy (service) | heavy (networks' classes) "
          "| fast_scan | atoms, heavy with it declared |")
    print("|---|---|---:|---:|---:|---|---|")
    fig, axes = plt.subplots(len(images), 2, figsize=(10, 5 * len(images)), squeeze=False)
    for row, (path, px) in enumerate(images):
        img = np.asarray(read_movie(path).frames[0], np.float32)
        for name, turn in ORIENTATIONS.items():
            frame = np.ascontiguousarray(turn(img))
            heavy = {}
            for label, hc in (("service", run.params.heavy_contrast), ("net", 0.0)):
                out = analyse_frame(run.engine, frame, px, run.active_set,
                                    run.params.replace(heavy_contrast=hc))
                heavy[label] = out.analysis.cls == run.heavy_index
                if label == "service":
                    x, y, n = out.x, out.y, out.analysis.n_atoms
            told = analyse_frame(run.engine, frame, px, run.active_set, run.params,
                                 fast_scan=FAST_SCAN[name]).analysis
            print(f"| {path.name} | {name} | {n} | {int(heavy['service'].sum())} | "
                  f"{int(heavy['net'].sum())} | {FAST_SCAN[name]} | {told.n_atoms}, "
                  f"{int((told.cls == run.heavy_index).sum())} |")
            if name in ("as read", "transposed"):
                ax = axes[row][0 if name == "as read" else 1]
                ax.imshow(frame[:corner, :corner], cmap="gray")
                near = (x < corner - 0.5) & (y < corner - 0.5)
                for sel, colour, label in ((heavy["service"], "tab:red", "heavy"),
                                           (~heavy["service"], "tab:cyan", "light")):
                    ax.plot(x[near & sel], y[near & sel], ".", color=colour, ms=6, label=label)
                ax.set_title(f"{path.name}, {name}: {n} atoms, {int(heavy['service'].sum())} heavy",
                             fontsize=9)
                ax.axis("off")
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
