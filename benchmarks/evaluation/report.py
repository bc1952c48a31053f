"""The suite's outputs: a printed table, results.md (docs-ready), results.json and one PNG per
case and segment (the group's last frame: truth vs detections, and the uncertainty map)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

COLUMNS = (  # (header, key, format)
    ("case", "case", "s"), ("segment", "segment", "s"), ("px pm", "pixel_size_pm", ".0f"),
    ("frames", "frames", "d"), ("atoms/fr", "atoms_per_frame", ".0f"),
    ("P", "precision", ".3f"), ("R", "recall", ".3f"), ("F1", "f1", ".3f"),
    ("FP/fr", "fp_per_frame", ".1f"), ("imp P", "impurity_precision", ".3f"),
    ("imp R", "impurity_recall", ".3f"), ("heavy called/true", None, "s"),
    ("loc pm", "loc_rms_pm", ".1f"), ("unc AUROC", "uncertainty_auroc", ".3f"),
    ("cls AUROC", "class_conf_auroc", ".3f"), ("OOD rate", "ood_flag_rate", ".2f"),
    ("mean unc", "mean_uncertainty", ".3f"), ("base F1", "baseline_f1", ".3f"),
    ("base FP/fr", "baseline_fp_per_frame", ".1f"),
    ("base imp P", "baseline_impurity_precision", ".3f"),
    ("base imp R", "baseline_impurity_recall", ".3f"),
)


def _cell(group: dict, key, fmt) -> str:
    if key is None:
        return f"{group['heavy_called']}/{group['heavy_true']}"
    value = group.get(key)
    if value is None:
        return "n/a"
    return format(value, fmt)


def rows(result: dict) -> list[list[str]]:
    return [[_cell(g, k, f) for _, k, f in COLUMNS] for g in result["groups"]]


def text_table(result: dict) -> str:
    head = [h for h, _, _ in COLUMNS]
    body = rows(result)
    width = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, width)))
    return "\n".join([line(head), line(["-" * w for w in width]), *map(line, body)])


def markdown_table(result: dict) -> str:
    head = [h for h, _, _ in COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows(result)]
    return "\n".join(out)


def write(result: dict, out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pics = [_picture(f, d, out) for f, d in result["pictures"]]
    about = (f"Seed {result['seed']}{' (quick)' if result['quick'] else ''}; model pixel size "
             f"{result['model_pixel_pm']:.2f} pm, manifest range "
             f"{result['manifest_pixel_range_pm']} pm; {result['seconds']:.0f} s.")
    md = [f"# Evaluation of `{result['artifact']}`", "", f"Command: `{command}`  ", about, "",
          markdown_table(result), "", "Baseline parameters (tuned on a separate seed):", ""]
    md += [f"- {c}: {p}" for c, p in result["baseline_params"].items()]
    md += ["", *[f"![{p}]({p})" for p in pics], ""]
    (out / "results.md").write_text("\n".join(md))
    clean = {k: v for k, v in result.items() if k not in ("pictures", "movie")}
    clean["pictures"] = pics
    clean["command"] = command
    (out / "results.json").write_text(json.dumps(clean, indent=1, default=_json_default))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _picture(frame, det, out: Path) -> str:
    """Left: the frame with truth (circles) and detections (crosses; red = heavy); right: the
    std over members of the atom map (the uncertainty map), in frame coordinates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{frame.case}-{frame.segment}") + ".png"
    h, w = frame.image.shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), constrained_layout=True)
    ax = axes[0]
    ax.imshow(frame.image, cmap="gray", interpolation="nearest")
    light, heavy = frame.cls == 0, frame.cls == 1
    ms = max(2.0, 180.0 / max(h, w))
    ax.plot(*frame.xy[light].T, "o", mfc="none", mec="deepskyblue", ms=ms * 1.6, mew=0.6,
            label="truth")
    ax.plot(*frame.xy[heavy].T, "o", mfc="none", mec="gold", ms=ms * 2.2, mew=1.0,
            label="truth heavy")
    d_heavy = det.heavy == 1
    ax.plot(*det.xy[~d_heavy].T, "+", c="lime", ms=ms * 1.4, mew=0.7, label="detected")
    ax.plot(*det.xy[d_heavy].T, "x", c="red", ms=ms * 1.6, mew=1.0, label="detected heavy")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.04), ncol=4, fontsize=7)
    ax.set_title(f"{frame.case} / {frame.segment} #{frame.index}: {len(frame.xy)} atoms, "
                 f"{len(det.xy)} detected ({frame.pixel_size_pm:g} pm/px)", fontsize=9)
    ax = axes[1]
    if det.std_map is not None:
        vh, vw = det.std_map.shape
        im = ax.imshow(det.std_map, cmap="magma", vmin=0, vmax=0.5,
                       extent=(-0.5, vw / det.scale - 0.5, vh / det.scale - 0.5, -0.5))
        fig.colorbar(im, ax=ax, shrink=0.8, label="std over members of the atom map")
    ax.set_title(f"uncertainty map; frame mean uncertainty {det.mean_uncertainty:.3f}"
                 + ("" if det.ood is None else f"; OOD flag {det.ood}"), fontsize=9)
    fig.savefig(out / name, dpi=80)
    plt.close(fig)
    return name
