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
    head = " | ".join(f"F1 frames {s['frames']}" for s in segs)
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
