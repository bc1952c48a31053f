"""Delivery-mode A/B check for the soak (a command, not a test): short phases back to back on the
same machine, to tell a mode's own cost from the machine's load. Order: latest at 16 fps,
lossless (2 frames in flight), latest at 16 fps, latest at 4 fps (below capacity); 25 s each;
models/default on 128 px frames, one inference thread (as benchmarks/soak.py).

    .venv/bin/python benchmarks/soak_ab.py
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import soak  # noqa: E402

from elit_stream.core.artifact import load_artifact  # noqa: E402
from elit_stream.tools.movie import make_movie  # noqa: E402

LATEST = (["--delivery", "latest"], {"ELIT_DELIVERY__INGEST_HWM": "100"})
PHASES = [("latest", 16.0, *LATEST), ("lossless", None, ["--delivery", "lossless"], {}),
          ("latest", 16.0, *LATEST), ("latest-below-capacity", 4.0, *LATEST)]


def main() -> int:
    args = argparse.Namespace(model=ROOT / "models" / "default", threads=1, window_s=1000,
                              in_flight=2)
    art = load_artifact(args.model, check_probe=False)
    mov = make_movie(n_frames=16, size_px=128, seed=5, pixel_size_pm=art.pixel_size_pm)
    frames = [np.ascontiguousarray(f) for f in mov.frames]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELIT_")}
    env["ELIT_MODEL__WARMUP_SHAPE_PX"] = "[128, 128]"
    print("| phase | sent at | answered fps | dropped | service p50 / p95 / p99 ms |")
    rows = []
    for name, rate, extra, more_env in PHASES:
        r = soak.run_phase(name, args, frames, mov.pixel_size_pm, 25, rate, extra,
                           {**env, **more_env})
        t = r["service_total_ms"]
        rows.append(f"| {name} | {'max' if rate is None else rate} | {r['rate_answered_fps']} "
                    f"| {r['dropped']} | {t['p50']} / {t['p95']} / {t['p99']} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
