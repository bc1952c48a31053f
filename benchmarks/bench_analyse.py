"""Post-processing time: `analyse` of this checkout against `analyse` of a git revision, one run.

    python -m benchmarks.bench_analyse [--rev REV] [--size 512] [--repeats 30]

Both versions reduce the same engine output (models/default on `frame_of(size)`, all members
active), interleaved call by call so that load on a shared machine hits both alike. Prints
median / p90 in ms per version and the atom counts (which must agree). Not a test.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from time import perf_counter, process_time

import numpy as np

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.core.manifest import default_artifact_path
from elit_stream.core.postprocess import Params, analyse

ROOT = Path(__file__).resolve().parents[1]
MODULE = "elit_stream/core/postprocess.py"


def module_at(rev: str):
    """`elit_stream.core.postprocess` as it was at git revision `rev`."""
    src = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "postprocess_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("postprocess_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                      # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def with_image(fn, x, art):
    """`fn` given the network input and the heavy class where it takes them (the Z-contrast
    class check, since 2026-12-02), so each version does what the service does with it."""
    if "image" not in inspect.signature(fn).parameters:
        return fn
    return functools.partial(fn, image=x[0, 0], heavy_class=art.heavy_class)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="HEAD", help="baseline git revision (default HEAD)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--heavy-contrast", type=float, default=None,
                    help="this checkout with the Z-contrast class check at this threshold")
    a = ap.parse_args(argv)
    from benchmarks.suite import frame_of

    art = load_artifact(default_artifact_path())
    eng = Engine(art, threads=1)
    x, geom = eng.prepare(frame_of(a.size, art.pixel_size_pm))
    probs = eng.run(x)
    base = module_at(a.rev)
    act, vs = np.arange(art.n_members), geom.valid_shape
    runs = {f"baseline ({a.rev})": (with_image(base.analyse, x, art), base.Params()),
            "this checkout": (with_image(analyse, x, art), Params() if a.heavy_contrast is None
                              else Params(heavy_contrast=a.heavy_contrast))}
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    atoms = {k: fn(probs, act, p, vs).n_atoms for k, (fn, p) in runs.items()}
    for _ in range(a.repeats):
        for k, (fn, p) in runs.items():
            t0, c0 = perf_counter(), process_time()
            fn(probs, act, p, vs)
            times[k].append(perf_counter() - t0)
            cpu[k].append(process_time() - c0)
    print(f"analyse at {a.size}x{a.size}, {art.n_members} members, {a.repeats} interleaved calls")
    print("(wall: elapsed; cpu: this process's CPU time, less sensitive to a loaded machine)")
    print(f"{'version':28s} {'wall median':>11s} {'wall p90':>9s} {'cpu median':>11s} "
          f"{'atoms':>6s}  (ms)")
    for k, t in times.items():
        ms, cms = np.array(t) * 1e3, np.array(cpu[k]) * 1e3
        print(f"{k:28s} {np.median(ms):11.2f} {np.percentile(ms, 90):9.2f} "
              f"{np.median(cms):11.2f} {atoms[k]:6d}")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
