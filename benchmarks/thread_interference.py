"""Why the suite pauses before each timed call (service_load.SETTLE_S): the engine and the
PyTorch baseline in one process, timed alone and then alternating back to back with and without
the pause. Not a test; prints one line per case.

    .venv/bin/python -m benchmarks.thread_interference                 # 8 members, 512², fp32
    .venv/bin/python -m benchmarks.thread_interference --precision bf16
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ensembles                              # noqa: E402
from benchmarks.baseline import AtomAIStyleEnsemble          # noqa: E402
from benchmarks.service_load import SETTLE_S                  # noqa: E402
from benchmarks.suite import engine_step, frame_of            # noqa: E402
from elit_stream.core.engine import Engine                         # noqa: E402
from elit_stream.core.artifact import load_artifact                # noqa: E402


def ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.thread_interference",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    src, cfg = ensembles.source_members(a.source)
    key = json.loads((a.source / "manifest.json").read_text())["files"]["ensemble.onnx"]["sha256"]
    path = ensembles.build_artifact(src, cfg, a.members, ROOT / "runs" / "bench" / "artifacts",
                                    key, print)
    art = load_artifact(path)
    base = AtomAIStyleEnsemble.from_artifact(path, art.manifest)
    eng = Engine(art, device="cpu", precision=a.precision)
    frame = frame_of(a.size, art.pixel_size_pm)
    eng.warm_up((a.size, a.size))
    base.predict(frame)

    def show(label, pairs):
        e, b = np.array(pairs).T
        print(f"{label:34s} engine {np.median(e):7.1f} ms ({e.min():.0f}-{e.max():.0f})   "
              f"baseline {np.median(b):7.1f} ms ({b.min():.0f}-{b.max():.0f})", flush=True)

    print(f"{a.members} members, {a.size}², engine {a.precision}, {a.repeats} repeats")
    alone_e = [ms(lambda: engine_step(eng, frame)) for _ in range(a.repeats)]
    alone_b = [ms(lambda: base.predict(frame)) for _ in range(a.repeats)]
    show("alone (each side in a row)", list(zip(alone_e, alone_b)))
    for pause in (0.0, SETTLE_S):
        pairs = []
        for _ in range(a.repeats):
            time.sleep(pause)
            e = ms(lambda: engine_step(eng, frame))
            time.sleep(pause)
            pairs.append((e, ms(lambda: base.predict(frame))))
        show(f"alternating, pause {pause:.1f} s", pairs)


if __name__ == "__main__":
    main()
