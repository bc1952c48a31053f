"""Classes on the real images of ../shared/data as the service reports them (qualitative).

    python -m benchmarks.real_classes [--out docs/img/real-classes.png]

Each image through the service's pipeline (all members, default parameters), once with the
Z-contrast class check (`heavy_contrast` 3.2, the default) and once without (0): prints atoms and atoms
called heavy, and draws the image with the heavy atoms of both (PNG). Skips images that are not
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


if __name__ == "__main__":
    raise SystemExit(main())
