"""Per-stage latency of the real service, against an in-process baseline measured in the same run.

Not a test. Starts `elit-stream serve` as a subprocess, sends one frame at a time (waiting for its
result, so nothing queues), and reads the per-stage timings every result carries plus the client's
round trip. The baseline runs the same stages in this process without sockets. Prints a markdown
table (median and 90th percentile, ms). Usage:

    .venv/bin/python benchmarks/bench_service.py [--model DIR] [--size 512] [--frames 30]

With `--ab NAME=VALUE` (a `set_params` parameter, e.g. `heavy_contrast=0`) there is no in-process
baseline: the one service alternates frame by frame between its default parameters and NAME=VALUE
(`ctl set_params` before each frame), so load hits both alike, and the table compares the two.
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
sys.path[:0] = [str(ROOT)]

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.core.engine import Engine
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.core.artifact import load_artifact
from elit_stream.tools.movie import make_movie
from elit_stream.core.postprocess import Params, analyse

STAGES = ("decode", "prepare", "infer", "analyse", "total")


def pick_model(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    default = ROOT / "models" / "default"
    if (default / "manifest.json").is_file():
        return default
    from tests.fixtures.tiny_artifact import build_tiny_artifact
    print("models/default missing: using the tiny test artifact", file=sys.stderr)
    return build_tiny_artifact(Path(tempfile.mkdtemp()), n_members=3)


def baseline(model: Path, frames: np.ndarray, threads: int | None,
             device: str = "cpu", precision: str = "fp32") -> dict[str, list[float]]:
    """The same stages in-process: prepare, run, analyse (+ coordinate mapping)."""
    art = load_artifact(model)
    eng = Engine(art, device=device, threads=threads, precision=precision)
    eng.warm_up(frames.shape[1:])
    params, active = Params(), np.arange(art.n_members)
    out: dict[str, list[float]] = {s: [] for s in ("prepare", "infer", "analyse", "total")}
    for f in frames:
        t0 = time.perf_counter()
        x, geom = eng.prepare(f, art.pixel_size_pm)
        t1 = time.perf_counter()
        probs = eng.run(x)
        t2 = time.perf_counter()
        fa = analyse(probs, active, params, geom.valid_shape)
        geom.to_frame_xy(fa.x, fa.y)
        t3 = time.perf_counter()
        for key, seconds in zip(out, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            out[key].append(1e3 * seconds)
    return out


def through_service(model: Path, frames: np.ndarray, threads: int | None, pixel_size_pm: float,
                    device: str = "cpu", precision: str = "fp32", ab: dict | None = None):
    """Per-stage ms of every frame through a real service; with `ab` ({name: value}) two dicts:
    frames under the default parameters, frames under `ab` (alternating)."""
    args = ["--model", str(model), "--device", device, "--precision", precision] + (
        ["--threads", str(threads)] if threads else [])
    stages: dict[str, list[float]] = {s: [] for s in (*STAGES, "round trip")}
    other: dict[str, list[float]] = {s: [] for s in (*STAGES, "round trip")}
    default = {k: getattr(Params(), k) for k in (ab or {})}
    with ServiceProcess(args, timeout_s=120) as sp, \
            ControlClient(sp.endpoints["control"]) as ctl, \
            ResultSubscriber(sp.endpoints["results"], topics=("result",)) as sub, \
            FrameSender(sp.endpoints["ingest"]) as snd:
        sub.wait_ready(ctl)
        for i, f in enumerate(np.concatenate([frames[:3], frames])):  # 3 warm-up frames
            if ab:
                ctl.call("set_params", check=True, **(ab if i % 2 else default))
            t0 = time.perf_counter()
            snd.send(f, i, "bench", pixel_size_pm=pixel_size_pm)
            while (msg := sub.recv(60)) is not None and msg["topic"] != "result":
                pass
            rt = 1e3 * (time.perf_counter() - t0)
            if msg is None:
                raise SystemExit("no result within 60 s:\n" + sp.log_tail())
            if i >= 3:
                into = other if ab and i % 2 else stages
                for s in STAGES:
                    into[s].append(msg["timings_ms"][s])
                into["round trip"].append(rt)
        n_atoms = msg["n_atoms"]
        if ab:
            return (stages, other), n_atoms
        stages.update(metrics_means(sp.endpoints["metrics"]))
    return stages, n_atoms


def metrics_means(url: str) -> dict[str, list[float]]:
    """Mean publish / observe / end-to-end ms from the Prometheus histograms (not in results)."""
    import urllib.request
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    val = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
           if ln.startswith("elit_")}
    out = {}
    for name, key in (("publish (mean)", 'elit_stage_seconds_{}{{stage="publish"}}'),
                      ("observe (mean)", 'elit_stage_seconds_{}{{stage="observe"}}'),
                      ("end to end in service (mean)", "elit_end_to_end_seconds_{}")):
        n = val.get(key.format("count"), 0)
        out[name] = [1e3 * val[key.format("sum")] / n] if n else []
    return out


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:7.2f}"
    return f"{np.median(values):7.2f} / {np.percentile(values, 90):7.2f}" if values else "—"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--ab", metavar="NAME=VALUE",
                    help="alternate frame by frame between the default parameters and this one")
    a = ap.parse_args()
    model = pick_model(a.model)
    ps = load_artifact(model, check_probe=False).pixel_size_pm
    frames = make_movie(n_frames=a.frames, size_px=a.size, seed=0, pixel_size_pm=ps).frames
    if a.ab:
        name, _, value = a.ab.partition("=")
        if not hasattr(Params(), name) or not value:
            ap.error(f"--ab: need NAME=VALUE with NAME a post-processing parameter, got {a.ab!r}")
        (dflt, alt), n_atoms = through_service(model, frames, a.threads, ps, a.device,
                                               a.precision, ab={name: float(value)})
        print(f"\nmodel {model.name}, {a.frames} frames {a.size}x{a.size} alternating, {a.device}, "
              f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} logical CPUs\n")
        print(f"| stage | defaults ({name}={getattr(Params(), name):g}), ms (median / p90) "
              f"| {a.ab}, ms (median / p90) |\n|---|---|---|")
        for s in (*STAGES, "round trip"):
            print(f"| {s} | {fmt(dflt[s])} | {fmt(alt[s])} |")
        return
    base = baseline(model, frames, a.threads, a.device, a.precision)
    served, n_atoms = through_service(model, frames, a.threads, ps, a.device, a.precision)
    print(f"\nmodel {model.name}, {a.frames} frames {a.size}x{a.size} uint16 ({n_atoms} atoms in "
          f"the last), {a.device}, {a.precision}, {a.threads or 'default'} threads, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} logical CPUs\n")
    print("| stage | in-process baseline, ms (median / p90) | service, ms (median / p90) |")
    print("|---|---|---|")
    for s in (*STAGES, "publish (mean)", "observe (mean)", "end to end in service (mean)",
              "round trip"):
        label = {"total": "total in service (receipt → result ready)",
                 "round trip": "client round trip (send → result received)"}.get(s, s)
        print(f"| {label} | {fmt(base.get(s, []))} | {fmt(served[s])} |")


if __name__ == "__main__":
    main()
