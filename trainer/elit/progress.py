"""The loop's ``progress.md``: label-free figures and verdicts per iteration (what the loop decides
on), its recommendation, and — when the movie's truth is known — detection F1 overall and per
segment, impurity precision / recall and the filter's effect per kind of atom (never used by the
loop, only reported)."""
from __future__ import annotations


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def label_free_table(rows: list[dict]) -> list[str]:
    lines = ["| iteration | artifact | classes | members | atoms/frame | agreement | uncertainty "
             "(frame mean std) | count jitter | filter keeps | verdict vs parent |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lf, v = r.get("label_free") or {}, r.get("verdict")
        verdict = "–" if not v else ("accepted: " if v["accepted"] else "rejected: ") + v["why"]
        name = r["artifact"].rstrip("/").split("/")[-1]
        lines.append(f"| {r['iteration']} | {name} | {r.get('classes', '–')} | {r['members']} | "
                     f"{_f(lf.get('atoms_per_frame'), 1)} | {_f(lf.get('agreement'))} | "
                     f"{_f(lf.get('uncertainty'), 4)} | {_f(lf.get('count_jitter'), 4)} | "
                     f"{_f(lf.get('keep_fraction'))} | {verdict} |")
    return lines


def truth_table(rows: list[dict]) -> list[str]:
    n_seg = max((len(r.get("segments") or []) for r in rows), default=0)
    segs = next((r["segments"] for r in rows if r.get("segments")), [])
    head = " | ".join(f"F1 {s['segment']}" if s.get("segment") else f"F1 frames {s['frames']}"
                      for s in segs)
    lines = [f"| iteration | F1 | precision | recall | {head} | impurity P | impurity R | "
             "AUROC unc. |", "|---:|---:|---:|---:|" + "---:|" * n_seg + "---:|---:|---:|"]
    for r in rows:
        a, imp = r.get("all"), r.get("impurity") or {}
        if not a:
            continue
        seg = " | ".join(_f(s["f1"]) for s in r.get("segments") or [])
        lines.append(f"| {r['iteration']} | {_f(a['f1'])} | {_f(a['precision'])} | {_f(a['recall'])} | "
                     f"{seg} | {_f(imp.get('precision'))} | {_f(imp.get('recall'))} | "
                     f"{_f(a.get('auroc_uncertainty'))} |")
    return lines


def filter_table(rows: list[dict]) -> list[str]:
    lines = ["| relabel of iteration | kind of atom (truth) | kept | ignored | taught as background "
             "| not found |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        for kind, c in (r.get("filter_truth") or {}).items():
            lines.append(f"| {r['iteration']} | {kind} | {c['kept']} | {c['ignored']} | "
                         f"{c['background']} | {c['not found'] if kind != 'no atom' else '–'} |")
    return lines


def progress_markdown(rows: list[dict], rec: dict) -> str:
    out = ["## Label-free figures (what the loop judges on)", ""] + label_free_table(rows)
    for r in rows:
        if r.get("verdict"):
            out += ["", f"iteration {r['iteration']} vs {r['iteration'] - 1}: "
                    + "; ".join(r["verdict"]["figures"])]
    out += ["", f"**Recommended: iteration {rec['iteration']} (`{rec['artifact']}`)** — {rec['why']}."]
    if any(r.get("all") for r in rows):
        out += ["", "## Against the truth (not used by the loop)", ""] + truth_table(rows)
        out += ["", "What the relabelling filter did with each kind of true atom:", ""] + filter_table(rows)
    return "\n".join(out) + "\n"


def filter_iterations_png(rows: list[dict], path) -> bool:
    """One panel per relabelled iteration: kept / ignored / taught as background / not found per
    kind of true atom (share of that kind). False when no row has a filter-vs-truth table."""
    import numpy as np
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("filter_truth")]
    if not rows:
        return False
    outcomes = ("kept", "ignored", "background", "not found")
    colours = ("limegreen", "orange", "magenta", "red")
    fig = Figure(figsize=(3.6 * len(rows) + 1.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(rows), squeeze=False, sharey=True)[0]
    for ax, r in zip(axes, rows):
        table = r["filter_truth"]
        kinds = list(table)
        total = np.array([max(sum(table[k].values()), 1) for k in kinds], float)
        left = np.zeros(len(kinds))
        for o, c in zip(outcomes, colours):
            share = np.array([table[k][o] for k in kinds]) / total
            ax.barh(kinds, share, left=left, color=c, label=o)
            left += share
        ax.set_xlim(0, 1)
        ax.set_title(f"relabel of iteration {r['iteration']}", fontsize=9)
        ax.set_xlabel("share of that kind")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=90)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.elit.progress RUN``: rewrite RUN/progress.md and RUN/filter_truth.png
    from RUN/progress.json."""
    import argparse
    import json
    from pathlib import Path

    from trainer.elit.judge import compare, recommend

    p = argparse.ArgumentParser(prog="python -m trainer.elit.progress", description=main.__doc__)
    p.add_argument("run", type=Path)
    p.add_argument("--rejudge", action="store_true",
                   help="recompute the verdicts from the stored label-free figures (current rule)")
    args = p.parse_args(argv)
    run = args.run
    rows = json.loads((run / "progress.json").read_text())
    if args.rejudge:
        for parent, child in zip(rows, rows[1:]):
            if parent.get("label_free") and child.get("label_free"):
                child["verdict"] = compare(child["label_free"], parent["label_free"])
    rec = recommend([r for r in rows if "label_free" in r] or rows[:1])
    (run / "progress.md").write_text(progress_markdown(rows, rec))
    if filter_iterations_png(rows, run / "filter_truth.png"):
        print(f"wrote {run / 'filter_truth.png'}")
    print((run / "progress.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
