"""Latency of the model side per 512x512 frame: prepare, run (tiny and default artifacts), analyse.

Not a test. Prints a table of median / min milliseconds over N repeats, plus the load average
(the numbers mean little on a busy machine). Usage:

    .venv/bin/python benchmarks/bench_model_side.py [--repeats 15] [--size 512] [--no-default]
                                                    [--artifact models/NAME]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from synthetic_probs import synthetic_probs

from elit_stream.core.engine import Engine
from elit_stream.core.artifact import load_artifact
from elit_stream.core.postprocess import Params, analyse


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e3, float(np.min(ts)) * 1e3


def engine_rows(name: str, art, frame, repeats: int, spin_both: bool) -> list:
    rows = []
    for spin in ((False, True) if spin_both else (False,)):
        eng = Engine(art, device="auto", spin=spin)
        eng.warm_up(frame.shape)
        x, _ = eng.prepare(frame)
        tag = f"{name} M={eng.n_members} {eng.provider[:4]} t={eng.threads} spin={int(spin)}"
        rows.append((f"run {tag}", *timed(lambda e=eng, x=x: e.run(x), repeats)))
        if not spin:
            rows.append((f"prepare uint16 (scale 1) [{name}]",
                         *timed(lambda e=eng: e.prepare(frame), repeats)))
            ps = art.pixel_size_pm * 0.75
            rows.append((f"prepare uint16 rescale x0.75 [{name}]",
                         *timed(lambda e=eng, ps=ps: e.prepare(frame, ps), repeats)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--no-default", action="store_true")
    ap.add_argument("--artifact", type=Path, help="time this artifact instead of models/default")
    args = ap.parse_args()
    n = args.size
    frame = np.random.default_rng(0).poisson(40, (n, n)).astype(np.uint16)
    rows = []
    from tests.fixtures.tiny_artifact import build_tiny_artifact
    with tempfile.TemporaryDirectory() as tmp:
        tiny = load_artifact(build_tiny_artifact(tmp, n_members=8))
        rows += engine_rows("tiny", tiny, frame, args.repeats, spin_both=True)
    default = args.artifact or ROOT / "models" / "default"
    if not args.no_default and (default / "manifest.json").exists():
        art = load_artifact(default)
        rows += engine_rows(art.name, art, frame, max(3, args.repeats // 3), spin_both=True)
    probs = synthetic_probs(8, 2, n)
    act = np.arange(8)
    p = Params()
    rows.append((f"analyse M=8 C=2 {n}x{n} (all active)", *timed(lambda: analyse(probs, act, p),
                                                                 args.repeats)))
    rows.append(("analyse, 6 active, valid crop", *timed(
        lambda: analyse(probs, act[:6], p, valid_shape=(n - 5, n - 3)), args.repeats)))
    rows.append(("analyse + maps", *timed(lambda: analyse(probs, act, p, want_maps=True),
                                          args.repeats)))
    r = analyse(probs, act, p)
    print(f"# {n}x{n}, {r.n_atoms} atoms in the synthetic maps; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"| {'stage':58s} | median ms | min ms |\n|{'-' * 60}|----------:|-------:|")
    for name, med, best in rows:
        print(f"| {name:58s} | {med:9.2f} | {best:6.2f} |")


if __name__ == "__main__":
    main()
