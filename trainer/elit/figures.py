"""Pictures of the ELIT relabelling: kept / ignored / background atoms on frames
(``kept_dropped_png``), and the filter's effect against a known truth (``filter_truth_png``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.elit.experiment import Analysis


def kept_dropped_png(an: Analysis, atoms: list, path: Path, k: int = 3) -> None:
    from matplotlib.figure import Figure

    where = {int(f): i for i, f in enumerate(an.frame_index)}
    picks = [atoms[round(i)] for i in np.linspace(0, len(atoms) - 1, min(k, len(atoms)))]
    fig = Figure(figsize=(4.4 * len(picks), 4.8), layout="constrained")
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, fa in zip(axes, picks):
        ax.imshow(an.frames[where[fa.frame]], cmap="gray")
        for reason, colour, marker, label in ((0, "lime", "o", "kept"),
                                              (1, "red", "x", "GMM: not lattice → ignore"),
                                              (3, "magenta", "x", "vacuum → background"),
                                              (2, "orange", "+", "high uncertainty → ignore"),
                                              (4, "cyan", "+", "faint blob → ignore")):
            sel = fa.reason == reason
            ax.scatter(fa.xy[sel, 0], fa.xy[sel, 1], s=6 if reason == 0 else 14, c=colour,
                       marker=marker, linewidths=0.8 if reason else 0,
                       label=f"{label} ({sel.sum()})")
        ax.set_title(f"frame {fa.frame}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.set_axis_off()
    fig.savefig(path, dpi=90)


def filter_truth_png(an: Analysis, atoms: list, truth: dict, table: dict, path: Path,
                     k: int = 3) -> None:
    """Left: bars of kept / ignored / background / not found per kind of true atom (the table of
    ``scoring.filter_vs_truth``); right: frames with the true atoms coloured by what happened."""
    from matplotlib.figure import Figure

    from trainer.elit.scoring import OUTCOMES, match_atoms

    where = {int(f): i for i, f in enumerate(an.frame_index)}
    picks = [atoms[round(i)] for i in np.linspace(0, len(atoms) - 1, min(k, len(atoms)))]
    fig = Figure(figsize=(5 + 4.2 * len(picks), 4.6), layout="constrained")
    axes = fig.subplots(1, 1 + len(picks), squeeze=False)[0]
    kinds, outcomes = list(table), ("kept", "ignored", "background", "not found")
    colours = {"kept": "limegreen", "ignored": "orange", "background": "magenta", "not found": "red"}
    left = np.zeros(len(kinds))
    for o in outcomes:
        vals = np.array([table[kd][o] for kd in kinds], float)
        axes[0].barh(kinds, vals, left=left, color=colours[o], label=o)
        left += vals
    axes[0].set_xscale("symlog")
    axes[0].legend(fontsize=7)
    axes[0].set_title("filter vs truth (all relabelled frames)", fontsize=9)
    for ax, fa in zip(axes[1:], picks):
        ax.imshow(an.frames[where[fa.frame]], cmap="gray")
        t_xy = truth["xy"][fa.frame]
        ok, partner = match_atoms(fa.xy, t_xy, 0.4 * truth["bond_px"])
        fate = np.full(len(t_xy), "not found", dtype=object)
        fate[partner[ok]] = [OUTCOMES[int(r)] for r in fa.reason[ok]]
        for o in outcomes:
            sel = fate == o
            ax.scatter(t_xy[sel, 0], t_xy[sel, 1], s=7, c=colours[o], label=f"{o} ({sel.sum()})")
        ghost = fa.xy[~ok]
        ax.scatter(ghost[:, 0], ghost[:, 1], s=16, c="cyan", marker="x",
                   label=f"no true atom ({len(ghost)})")
        ax.set_title(f"frame {fa.frame}: true atoms by fate", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
        ax.set_axis_off()
    fig.savefig(path, dpi=80)
