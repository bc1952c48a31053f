"""What Ray costs on one machine (a command, not a test): wall time of the same work through the
local executor and through a local Ray, and of `elit-stream batch` against replaying the same movie
through the running service. On a 2-core machine no speed-up is expected: the point is the
mechanism and its overhead (docs/cluster.md records the figures).

    .venv/bin/python benchmarks/ray_overhead.py [--members 4] [--frames 8] [--size 256]

Training: N tiny members (32 px tiles, 4 base filters, 32 training tiles, 2 epochs), one torch
thread each (so both runs give the same weights); every run makes its own small data set (in
its run folder). Each way twice: the first local run pays this process's one-time costs, the
first Ray run starts Ray's worker processes (which import torch); the second run of each finds
them warm. Ray: a fresh local Ray with 2 CPUs, its start timed apart. Batch: models/default on an N-frame synthetic movie; the service replays it as fast
as it takes frames (lossless), its start-up timed apart; batch local (one engine, default threads)
and batch through Ray (2 workers x 1 thread, model sent once).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray
import torch

from elit_stream.tools.batch import BatchConfig, run_batch
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.tools.movie import make_movie, save_movie
from elit_stream.tools.replay import read_stack, replay
from trainer.data.synth import SynthConfig
from trainer.model.executor import ExecutorSpec
from trainer.model.train import TrainConfig, train_ensemble
from trainer.model.unet import UNetConfig

QUIET = lambda s: None


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training_rows(tmp: Path, members: int) -> list[tuple[str, float]]:
    cfg = TrainConfig(members=members, n_train=32, n_val=8, n_test=8, batch_size=8, max_epochs=2,
                      threads=1, synth=SynthConfig(size_px=32),
                      unet=UNetConfig(n_classes=2, base_filters=4))
    torch.set_num_threads(1)
    local = timed(lambda: train_ensemble(cfg, tmp / "local", QUIET, False))
    local_again = timed(lambda: train_ensemble(cfg, tmp / "local-again", QUIET, False))
    start = timed(lambda: ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False))
    through_ray = timed(lambda: train_ensemble(cfg, tmp / "ray", QUIET, False,
                                               ExecutorSpec(kind="ray")))
    again = timed(lambda: train_ensemble(cfg, tmp / "ray-again", QUIET, False,
                                         ExecutorSpec(kind="ray")))
    return [(f"train {members} members, local (1 after another, 1 thread; first in this process)",
             local),
            (f"train {members} members, local again", local_again),
            ("start a local Ray (2 CPUs)", start),
            (f"train {members} members, Ray (2 tasks at a time, 1 CPU each; starts the workers)",
             through_ray),
            (f"train {members} members, Ray again (workers already running)", again)]


def batch_rows(tmp: Path, frames: int, size_px: int) -> list[tuple[str, float]]:
    model = ROOT / "models" / "default"
    movie = save_movie(make_movie(n_frames=frames, size_px=size_px, seed=9), tmp / "movie.npz")
    stack, ps = read_stack(movie)
    t0 = time.perf_counter()
    with ServiceProcess(["--model", str(model), "--no-metrics", "--warmup-shape",
                         f"{size_px}x{size_px}"]) as sp:
        started = time.perf_counter() - t0
        served = timed(lambda: replay(stack, sp.endpoints, pixel_size_pm=ps, wait_s=600))
    out = lambda name: BatchConfig(model=model, out=tmp / name, executor=name,
                                   threads=1 if name == "ray" else None, workers=2, chunk_frames=2)
    local = timed(lambda: run_batch([movie], out("local"), QUIET, False))
    through_ray = timed(lambda: run_batch([movie], out("ray"), QUIET, False))
    return [("service: start + load + warm up", started),
            (f"service replay of {frames} frames {size_px}² (default threads)", served),
            (f"batch local, {frames} frames (one engine, default threads, model load included)", local),
            (f"batch Ray, {frames} frames (2 workers x 1 thread, chunks of 2, model load included)",
             through_ray)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = training_rows(Path(tmp), args.members) + batch_rows(Path(tmp), args.frames,
                                                                   args.size)
        ray.shutdown()
    print("| what | wall s |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
