"""Before/after of the export's inference form (not a test): the same members exported plainly
(``EnsembleGraph(fast=False)``) and in the inference form (``fast=True``, what ``write_artifact``
ships), timed back to back in onnxruntime with the engine's session options.

    .venv/bin/python -m benchmarks.compare_export [--source models/default] [--size 512]
                                                  [--repeats 5] [--threads N]
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
sys.path.insert(0, str(ROOT))

from benchmarks.ensembles import source_members          # noqa: E402
from elit_stream.core.engine import CPU, _create, _session_options   # noqa: E402
from trainer.model.export import EnsembleGraph, check_parity, export_onnx   # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    members, _ = source_members(a.source)
    x = np.random.default_rng(0).random((1, 1, a.size, a.size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for fast in (False, True):
            graph = EnsembleGraph(members, fast=fast).eval()
            path = Path(tmp) / f"{'inference' if fast else 'plain'}.onnx"
            export_onnx(graph, path)
            worst = max(check_parity(graph, path, [x[..., :96, :128]]))
            sessions[path.stem] = _create(path, _session_options(a.threads, False), [CPU])
            print(f"{path.stem}: parity vs PyTorch {worst:.1e}")
        outs = {k: s.run(None, {"frame": x})[0] for k, s in sessions.items()}
        print(f"max |plain - inference| at {a.size}²: "
              f"{np.abs(outs['plain'] - outs['inference']).max():.1e}")
        times = {k: [] for k in sessions}
        for _ in range(a.repeats):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"frame": x})
                times[k].append(1e3 * (time.perf_counter() - t0))
    one, five, _ = os.getloadavg()
    print(f"\n{len(members)} members, {a.size}×{a.size}, {a.repeats} repeats after warm-up, "
          f"load average {one:.2f} / {five:.2f}")
    print("| graph | median ms | min–max ms |\n|---|---:|---|")
    for k, t in times.items():
        print(f"| {k} | {np.median(t):.0f} | {min(t):.0f}–{max(t):.0f} |")
    ratio = np.asarray(times["plain"]) / np.asarray(times["inference"])
    print(f"\nplain / inference, per repeat: median {np.median(ratio):.2f} "
          f"({ratio.min():.2f}–{ratio.max():.2f})")


if __name__ == "__main__":
    main()
