"""ELIT step 2: the operator report (paper Fig. 2) and the suggested artifact-free member subset.

Owns the scoring rule (``score_members``), the members × frames picture (``report_grid_png``) and
the report folder (``write_report``: ``report.md``, ``grid.png``, ``selection.json``).

The scoring rule (documented in docs/elit.md too). For each member, four "badness" figures are
averaged over the analysed frames (see ``trainer.elit.experiment``):

1. disagreement ``1 − agreement`` (IoU of its atom mask with the ensemble mean's);
2. ``fog`` (probability mass away from its own blobs, per pixel);
3. ``|log count ratio|`` (finds many more or many fewer atoms than the median member);
4. blob-size CV (blobs of very uneven size: smears, merged atoms, speckle).

Each figure becomes a robust z-score across members, ``z = (x − median) / (1.4826 · MAD)``, with the
scale floored at ``max(1.4826 · MAD, rel_floor · |median|, abs_floor)`` so that members which agree
almost perfectly are not flagged for tiny differences; only the bad direction counts (``z`` below 0
becomes 0). A member's score is its largest z. Members with a score above ``threshold`` (default 3)
are flagged; the rest are suggested. At least ``min_keep`` (2) members are kept: if fewer pass, the
``min_keep`` lowest scores are. The "best" member is the suggested one with the lowest sum of z,
ties broken by higher agreement.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainer.elit.experiment import Analysis, blob_centres

BADNESS = ("disagreement", "fog", "abs_log_count_ratio", "size_cv")
ABS_FLOOR = {"disagreement": 0.02, "fog": 2e-4, "abs_log_count_ratio": 0.05, "size_cv": 0.05}


@dataclass
class Selection:
    members: list[int]           # suggested (or operator-chosen) member ids
    flagged: list[int]
    best: int
    scores: dict                 # member id -> score (max z)
    z: dict                      # figure -> list of z per member (member order of the analysis)
    rule: str
    chosen_by: str = "rule"      # "rule" | "operator"


def badness(an: Analysis) -> dict[str, np.ndarray]:
    f = an.figures
    return {"disagreement": 1 - f["agreement"].mean(0), "fog": f["fog"].mean(0),
            "abs_log_count_ratio": np.abs(f["log_count_ratio"]).mean(0), "size_cv": f["size_cv"].mean(0)}


def robust_z(x: np.ndarray, abs_floor: float, rel_floor: float = 0.1) -> np.ndarray:
    med = np.median(x)
    scale = max(1.4826 * np.median(np.abs(x - med)), rel_floor * abs(med), abs_floor)
    return np.maximum((x - med) / scale, 0.0)


def score_members(an: Analysis, threshold: float = 3.0, min_keep: int = 2) -> Selection:
    bad = badness(an)
    z = {k: robust_z(v, ABS_FLOOR[k]) for k, v in bad.items()}
    stacked = np.stack([z[k] for k in BADNESS])             # [4, M]
    score, total = stacked.max(0), stacked.sum(0)
    ids = np.array(an.member_ids)
    ok = score <= threshold
    if ok.sum() < min(min_keep, len(ids)):
        ok = np.zeros(len(ids), bool)
        ok[np.argsort(score, kind="stable")[:min_keep]] = True
    agreement = an.figures["agreement"].mean(0)
    candidates = np.nonzero(ok)[0]
    best = candidates[np.lexsort((-agreement[candidates], total[candidates]))[0]]
    rule = (f"robust z (median/MAD) of {', '.join(BADNESS)}; score = max z; flag > {threshold:g}; "
            f"keep >= {min_keep}; best = lowest sum of z")
    return Selection(ids[ok].tolist(), ids[~ok].tolist(), int(ids[best]),
                     {int(i): float(s) for i, s in zip(ids, score)},
                     {k: v.round(3).tolist() for k, v in z.items()}, rule)


def operator_selection(an: Analysis, members: list[int], best: int | None,
                       suggested: Selection) -> Selection:
    unknown = sorted(set(members) - set(an.member_ids))
    if unknown or not members:
        raise ValueError(f"members {unknown or members} not in the ensemble (ids {an.member_ids})")
    best = members[0] if best is None else best
    if best not in members:
        raise ValueError(f"--best {best} is not among the selected members {members}")
    return Selection(sorted(members), sorted(set(an.member_ids) - set(members)), best,
                     suggested.scores, suggested.z, suggested.rule, "operator")


def save_selection(sel: Selection, path: Path) -> None:
    path.write_text(json.dumps(asdict(sel), indent=1) + "\n")


def load_selection(path: Path) -> Selection:
    d = json.loads(Path(path).read_text())
    d["scores"] = {int(k): v for k, v in d["scores"].items()}
    return Selection(**d)


def pick_report_frames(n: int, k: int = 4) -> list[int]:
    """Positions (into the analysis) of ``k`` frames spread over the movie, first and last included."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(k, n))})


def report_grid_png(an: Analysis, sel: Selection, path: Path, positions: list[int]) -> None:
    """Rows: raw frame, each member (atom map, found atoms as dots; flagged members in red titles),
    mean of the suggested subset, its std. Columns: the chosen frames."""
    from matplotlib.figure import Figure

    maps = an.atom_maps[positions]                          # [K, M, H, W]
    keep = [an.member_ids.index(m) for m in sel.members]
    rows = len(an.member_ids) + 3
    fig = Figure(figsize=(2.3 * len(positions), 2.3 * rows), layout="constrained")
    axes = fig.subplots(rows, len(positions), squeeze=False)
    for col, pos in enumerate(positions):
        axes[0, col].imshow(an.frames[pos], cmap="gray")
        axes[0, col].set_title(f"frame {int(an.frame_index[pos])}", fontsize=8)
        for m, member in enumerate(an.member_ids):
            _map_with_atoms(axes[1 + m, col], maps[col, m], an.atom_radius_px)
        _map_with_atoms(axes[-2, col], maps[col, keep].mean(0), an.atom_radius_px)
        axes[-1, col].imshow(maps[col, keep].std(0), cmap="magma", vmin=0, vmax=0.5)
    for m, member in enumerate(an.member_ids):
        flagged = member in sel.flagged
        label = f"member {member}" + (" ✗" if flagged else "") + (" ★" if member == sel.best else "")
        axes[1 + m, 0].set_ylabel(f"{label}\nscore {sel.scores[member]:.1f}", fontsize=8,
                                  color="red" if flagged else "black")
    axes[0, 0].set_ylabel("input", fontsize=8)
    axes[-2, 0].set_ylabel("mean (suggested)", fontsize=8)
    axes[-1, 0].set_ylabel("std (suggested)\n0 … 0.5", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("atom maps (Σ classes); dots: atoms found; ✗ flagged, ★ best", fontsize=9)
    fig.savefig(path, dpi=80)


def _map_with_atoms(ax, atom_map: np.ndarray, radius_px: float) -> None:
    ax.imshow(atom_map, cmap="viridis", vmin=0, vmax=1)
    xy = blob_centres(atom_map, radius_px)
    ax.scatter(xy[:, 0], xy[:, 1], s=1.5, c="red", linewidths=0)


def write_report(an: Analysis, out_dir: Path, threshold: float = 3.0, min_keep: int = 2,
                 frames_shown: int = 4) -> Selection:
    """The report folder; returns the suggested selection (also in ``suggested.json``)."""
    from trainer.elit.experiment import figures_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    sel = score_members(an, threshold, min_keep)
    save_selection(sel, out_dir / "suggested.json")
    positions = pick_report_frames(len(an.frame_index), frames_shown)
    report_grid_png(an, sel, out_dir / "grid.png", positions)
    z_rows = ["| member | " + " | ".join(f"z {k}" for k in BADNESS) + " | score | |",
              "|---:|" + "---:|" * (len(BADNESS) + 1) + "---|"]
    for m, member in enumerate(an.member_ids):
        verdict = "flagged" if member in sel.flagged else ("best" if member == sel.best else "ok")
        z_rows.append(f"| {member} | " + " | ".join(f"{sel.z[k][m]:.2f}" for k in BADNESS)
                      + f" | {sel.scores[member]:.2f} | {verdict} |")
    text = [f"# ELIT report: {an.artifact}", "",
            (f"{len(an.frame_index)} frames analysed at {an.pixel_size_pm:g} pm/px; "
             f"grid: `grid.png` (frames {[int(an.frame_index[p]) for p in positions]}); "
             "per-frame figures: `../analysis/figures.csv`."), "",
            "## Per-member figures (mean over frames)", "", figures_markdown(an),
            "## Scoring", "", f"Rule: {sel.rule}.", "", *z_rows, "",
            (f"**Suggested members: {sel.members}** (flagged: {sel.flagged}); best member: "
             f"**{sel.best}**."), ""]
    (out_dir / "report.md").write_text("\n".join(text))
    return sel
