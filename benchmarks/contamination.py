"""Where the drift movie's atoms are lost: detection by local contamination thickness.

    python -m benchmarks.contamination MODEL [--active 0] [--seeds 4242 777] [--every 2] \
        [--png docs/img/contamination-split.png]

Drift movies of seeds the evaluation suite does not score (default 4242 and 777), every
`--every`-th frame through the artifact as the service runs it (`--active`: only these members),
the suite's matching (0.4 bond, interior); each truth atom and each detection binned by the
contamination film's areal density within 200 pm of it (atoms/nm²; graphene itself has 38). Prints
TP / FN / FP / F1 per segment and bin, the per-atom uncertainty of true and false detections per
bin, the heavy class (impurity) per bin, and what lies near the misses under the film.

A one-member artifact made by `elit-train train --members 1 --init-from models/default:K
[--set FIELD=VALUE] --export OUT` compares with `python -m benchmarks.contamination models/default --active K`.
Not a test (docs/evaluation.md, "Atoms under contamination (session 9)").
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

BINS = (0.0, 40.0, 80.0, 120.0, 160.0, np.inf)
RADIUS_PM = 200.0


@dataclass
class Split:
    counts: dict = field(default_factory=dict)        # (segment, bin or "all") -> [TP, FN, FP]
    uncertainty: dict = field(default_factory=dict)   # bin -> ([true detections], [false ones])
    heavy: dict = field(default_factory=dict)         # bin -> [Si called heavy, not, false heavy]
    # misses under the film (>= 40/nm²) by what lies within 100 pm of them
    misses: dict = field(default_factory=lambda: {"displaced": 0, "merged": 0, "nothing": 0})


def split(model: str, seeds: list[int], every: int, active: list[int] | None) -> Split:
    from benchmarks.evaluation import movie as mv
    from benchmarks.evaluation import scoring as sc
    from benchmarks.evaluation.runner import ModelRunner

    runner = ModelRunner(model, threads=1)
    if active:
        runner.active_set = runner.active_set.set_active(active)
        runner.active = runner.active_set.indices
    out = Split()
    counts, unc, heavy, misses = out.counts, out.uncertainty, out.heavy, out.misses
    for seed in seeds:
        sheet = mv.build_sheet(seed)
        film = cKDTree(sheet.contamination[0])
        for f in mv.make_movie(seed, range(0, mv.N_FRAMES, every)):
            det = runner.detect(f.image, f.pixel_size_pm)
            centre = np.array(f.image.shape[::-1]) * f.pixel_size_pm / 2 + sheet.drift_pm[f.index]
            ti, pi = sc.match(f.xy, det.xy, sc.MATCH_FRACTION * f.spacing_px)
            t_in = sc.interior(f.xy, f.image.shape, f.spacing_px)
            p_in = sc.interior(det.xy, f.image.shape, f.spacing_px)
            found, paired = np.zeros(len(f.xy), bool), np.zeros(len(det.xy), bool)
            found[ti], paired[pi] = True, True
            bt, bp = (np.digitize(_density(film, xy * f.pixel_size_pm - centre), BINS) - 1
                      for xy in (f.xy, det.xy))
            truth_of = np.full(len(det.xy), -1)
            truth_of[pi] = f.cls[ti]
            called = np.zeros(len(f.xy), bool)
            called[ti] = det.heavy[pi] == 1
            for b in range(len(BINS) - 1):
                h = heavy.setdefault(b, np.zeros(3, int))
                si = t_in & (f.cls == 1) & (bt == b)
                h += [(si & called).sum(), (si & ~called).sum(),
                      (p_in & (bp == b) & (det.heavy == 1) & (truth_of != 1)).sum()]
            if len(det.xy):
                dist, j = cKDTree(det.xy).query(f.xy[t_in & ~found & (bt >= 1)])
                near = dist * f.pixel_size_pm < 100.0
                misses["displaced"] += int((near & ~paired[j]).sum())
                misses["merged"] += int((near & paired[j]).sum())
                misses["nothing"] += int((~near).sum())
            for b in (*range(len(BINS) - 1), "all"):
                tb = t_in & ((bt == b) if b != "all" else True)
                pb = p_in & ((bp == b) if b != "all" else True)
                c = counts.setdefault((f.segment, b), np.zeros(3, int))
                c += [(tb & found).sum(), (tb & ~found).sum(), (pb & ~paired).sum()]
                if b != "all":
                    u = unc.setdefault(b, ([], []))
                    u[0].append(det.uncertainty[pb & paired])
                    u[1].append(det.uncertainty[pb & ~paired])
    for b, (t, f) in unc.items():
        unc[b] = (np.concatenate(t), np.concatenate(f))
    return out


def _label(b: int) -> str:
    return f"{BINS[b]:.0f}–{BINS[b + 1]:.0f}" if np.isfinite(BINS[b + 1]) else f"≥ {BINS[b]:.0f}"


def print_uncertainty(unc: dict) -> None:
    from benchmarks.evaluation.scoring import auroc

    print("\n| film atoms/nm² | true detections | their median uncertainty | false | theirs "
          "| AUROC (false vs true) |\n|---|---:|---:|---:|---:|---:|")
    for b, (t, f) in sorted(unc.items()):
        a = auroc(t, f)
        print(f"| {_label(b)} | {len(t)} | {np.median(t):.3f} | {len(f)} | "
              f"{np.median(f) if len(f) else float('nan'):.3f} | {'n/a' if a is None else f'{a:.3f}'} |")


def _density(film: cKDTree, xy_pm: np.ndarray) -> np.ndarray:
    """Film atoms per nm² within RADIUS_PM of each point (sheet coordinates, pm)."""
    near = film.query_ball_point(xy_pm, RADIUS_PM)
    return np.array([len(n) for n in near], float) / (np.pi * (RADIUS_PM / 1e3) ** 2)


def print_split(counts: dict) -> None:
    print("| segment | film atoms/nm² | TP | FN | FP | F1 |\n|---|---|---:|---:|---:|---:|")
    for (seg, b), (tp, fn, fp) in counts.items():
        label = "all" if b == "all" else _label(b)
        f1 = 2 * tp / (2 * tp + fn + fp) if tp else 0.0
        print(f"| {seg} | {label} | {tp} | {fn} | {fp} | {f1:.3f} |")


def plot_split(counts: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segments = list(dict.fromkeys(seg for seg, _ in counts))
    n_bins = len(BINS) - 1
    labels = [_label(b) for b in range(n_bins)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(segments)
    for i, seg in enumerate(segments):
        f1 = [2 * c[0] / max(2 * c[0] + c[1] + c[2], 1) for c in (counts[(seg, b)] for b in range(n_bins))]
        ax.bar(np.arange(n_bins) + (i - (len(segments) - 1) / 2) * width, f1, width, label=seg)
    ax.axhline(0.97, color="k", ls="--", lw=0.8)
    ax.set(xticks=range(n_bins), xticklabels=labels, ylim=(0.5, 1.0), ylabel="detection F1",
           xlabel="contamination film within 200 pm (atoms/nm²; graphene: 38)", title=title)
    ax.legend(fontsize=8, loc="lower left")
    lost = np.array([[counts[(seg, b)][1] + counts[(seg, b)][2] for b in range(n_bins)]
                     for seg in segments]).sum(0)
    ax2.bar(labels, lost, color="tab:red")
    ax2.set(ylabel="misses + false atoms (all segments)", xlabel="film atoms/nm²",
            title="where the errors are")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[4242, 777])
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--active", type=int, nargs="+")
    ap.add_argument("--png", type=Path, help="also draw F1 per film density bin here")
    args = ap.parse_args(argv)
    result = split(args.model, args.seeds, args.every, args.active)
    misses = result.misses
    print_split(result.counts)
    print_uncertainty(result.uncertainty)
    print("\n| film atoms/nm² | heavy atoms called heavy | not called heavy | false heavy calls |"
          "\n|---|---:|---:|---:|")
    for b, (hit, miss, false) in sorted(result.heavy.items()):
        print(f"| {_label(b)} | {hit} | {miss} | {false} |")
    print(f"\nmisses under the film (>= 40 atoms/nm²): {misses['displaced']} with an unpaired "
          f"detection within 100 pm (displaced), {misses['merged']} next to a detection paired "
          f"with another atom (merged), {misses['nothing']} with nothing within 100 pm")
    if args.png:
        plot_split(result.counts, args.png, f"{args.model}, seeds {' '.join(map(str, args.seeds))}")
        print(f"picture: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
