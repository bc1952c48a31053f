"""Replay the ELIT loop's judge on finished runs: which iteration would each rule recommend, and
was it the run's best against the truth?

    python -m benchmarks.judge_replay [RUN_DIR ...]      # default: every runs/elit14*/*/

Reads each run's `progress.json` (written by `elit-train iterate`, with `--keep-going` so every
iteration is there): the label-free figures of every iteration (`label_free`) and, only to score
the rules, the truth F1 of the movie (`all.f1`). Every rule sees the label-free figures alone and
decides child against parent with `trainer.elit.judge.figure_verdicts` (worse below -0.10,
better above +0.02, as the loop); the recommendation is the last iteration reached through accepted
steps, as `trainer.elit.judge.recommend`. Prints a markdown table per run and a tally. Not a test.

Rules:
  jitter-or-keep   no figure worse, and count jitter or keep fraction better (the rule until
                   session 7)
  any-better       no figure worse, and any figure better (`trainer.elit.judge.compare` since
                   session 7)
  any-better, jitter ≥ 1 atom
                   the same, but a count jitter that moves by less than one atom per frame is
                   "about the same" (tried in session 8 because the jitter vetoed a better first
                   child by 1.5 -> 2.0 atoms; not adopted: it lets later, worse children through)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.elit.judge import figure_verdicts

ROOT = Path(__file__).resolve().parents[1]


def verdicts(child: dict, parent: dict, jitter_atoms: float) -> tuple[set, set]:
    """(figures worse, figures better) of a child against its parent, as the loop judges them."""
    v = figure_verdicts(child, parent, jitter_atoms=jitter_atoms)
    return ({n for n, x in v.items() if x and x[0] == "worse"},
            {n for n, x in v.items() if x and x[0] == "better"})


RULES = {   # name: (accept(worse, better), count-jitter resolution in atoms per frame)
    "jitter-or-keep": (lambda w, b: not w and bool(b & {"count_jitter", "keep_fraction"}), 0.0),
    "any-better": (lambda w, b: not w and bool(b), 0.0),
    "any-better, jitter ≥ 1 atom": (lambda w, b: not w and bool(b), 1.0),
}


def recommend(rows: list[dict], rule) -> int:
    accept, jitter_atoms = rule
    best = 0
    for parent, child in zip(rows, rows[1:]):
        if not accept(*verdicts(child["label_free"], parent["label_free"], jitter_atoms)):
            break
        best = child["iteration"]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    a = ap.parse_args(argv)
    runs = a.runs or sorted(p.parent for p in ROOT.glob("runs/elit14*/*/progress.json"))
    tally = {r: [0, 0, 0] for r in RULES}                # best, worse than best, runs
    print("| run | F1 per iteration | best | " + " | ".join(RULES) + " |\n|---|---|---|"
          + "---|" * len(RULES))
    for run in runs:
        rows = json.loads((run / "progress.json").read_text())
        if len(rows) < 2 or any("label_free" not in r for r in rows):
            continue
        f1 = [r["all"]["f1"] for r in rows]
        best = max(range(len(f1)), key=f1.__getitem__)
        cells = []
        for name, rule in RULES.items():
            pick = recommend(rows, rule)
            hit = f1[pick] >= f1[best] - 1e-9
            tally[name][0] += hit
            tally[name][1] += f1[pick] < f1[0] - 1e-9
            tally[name][2] += 1
            cells.append(f"{pick} ({f1[pick]:.3f}){' ✓' if hit else ''}")
        print(f"| {run.relative_to(ROOT) if run.is_relative_to(ROOT) else run} | "
              + " / ".join(f"{v:.3f}" for v in f1) + f" | {best} | " + " | ".join(cells) + " |")
    print("\n| rule | recommends the best-F1 iteration | recommends one worse than iteration 0 |"
          "\n|---|---|---|")
    for name, (hit, worse, n) in tally.items():
        print(f"| {name} | {hit} of {n} | {worse} of {n} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
