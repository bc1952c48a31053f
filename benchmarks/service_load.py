"""End-to-end figures through the real service (subprocess) and real sockets.

closed loop: one frame in flight (send, wait for its result): latency without queueing, interleaved
with the same stages in this process (prepare, run, analyse) so that load drifts hit both alike.
fixed rate: frames sent on a clock (open loop) at a given rate; latency = result received - sent.
flood (lossless): every frame sent as fast as the service takes them; sustained frames/s, and
whether every frame came back (lossless mode drops nothing, the sender is slowed instead).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.core.engine import Engine
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.core.postprocess import Params, analyse


# Pause before each timed call, a precaution: onnxruntime's, OpenVINO's (TBB) and PyTorch's
# (OpenMP) thread pools, in this process or the service's, may still spin after their work.
# Not shown to matter on the shared test host (benchmarks/thread_interference.py,
# docs/benchmarks.md); every side gets it, so it cannot bias a ratio.
SETTLE_S = 0.3


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, MiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) / 1024
    return out


def _result(sub: ResultSubscriber, timeout_s: float) -> dict:
    while (msg := sub.recv(timeout_s)) is not None:
        if msg["topic"] == "result":
            return msg
    raise RuntimeError(f"no result within {timeout_s} s")


def _in_process(engine: Engine, frame: np.ndarray, ps: float) -> float:
    t0 = time.perf_counter()
    x, geom = engine.prepare(frame, ps)
    fa = analyse(engine.run(x), np.arange(engine.n_members), Params(), geom.valid_shape)
    geom.to_frame_xy(fa.x, fa.y)
    return time.perf_counter() - t0


class ServiceBench:
    """A started service plus client sockets; use as a context manager."""

    def __init__(self, model: Path, threads: int | None, device: str = "cpu",
                 precision: str = "fp32"):
        args = ["--model", str(model), "--device", device, "--delivery", "lossless",
                "--precision", precision]
        self.sp = ServiceProcess(args + (["--threads", str(threads)] if threads else []),
                                 timeout_s=300)

    def __enter__(self):
        self.sp.__enter__()
        ep = self.sp.endpoints
        self.ctl = ControlClient(ep["control"])
        self.sub = ResultSubscriber(ep["results"], topics=("result",))
        self.snd = FrameSender(ep["ingest"])
        self.sub.wait_ready(self.ctl)
        return self

    def __exit__(self, *exc):
        for s in (self.snd, self.sub, self.ctl):
            s.close()
        self.sp.__exit__(*exc)

    @property
    def pid(self) -> int:
        return self.sp.proc.pid

    def closed_loop(self, frames: np.ndarray, ps: float, engine: Engine, warmup: int = 3,
                    settle_s: float = SETTLE_S):
        """(service round trips, in-process pipeline times), seconds, alternating per frame,
        with a pause before each so that neither side's thread pool is still spinning."""
        served, local = [], []
        for i, f in enumerate(np.concatenate([frames[:warmup], frames])):
            time.sleep(settle_s)
            t0 = time.perf_counter()
            self.snd.send(f, i, "bench-closed", pixel_size_pm=ps)
            _result(self.sub, 120)
            if i >= warmup:
                served.append(time.perf_counter() - t0)
                time.sleep(settle_s)
                local.append(_in_process(engine, f, ps))
        return served, local

    def open_loop(self, frames: np.ndarray, ps: float, interval_s: float, tag: str):
        """Send on a clock (interval_s; 0 = as fast as the service takes them) from a thread and
        receive here. Returns (latencies s, frames received, frames sent, wall s)."""
        sent: dict[int, float] = {}
        base = 10_000 * (1 + len(tag))

        def sender():
            start = time.perf_counter()
            for i, f in enumerate(frames):
                delay = start + i * interval_s - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                sent[base + i] = time.perf_counter()
                self.snd.send(f, base + i, tag, pixel_size_pm=ps)

        thread = threading.Thread(target=sender, daemon=True)
        t0 = time.perf_counter()
        thread.start()
        lat, got = [], 0
        while got < len(frames):
            msg = self.sub.recv(120)
            if msg is None:
                break
            if msg["topic"] == "result" and msg.get("frame_id") in sent:
                lat.append(time.perf_counter() - sent[msg["frame_id"]])
                got += 1
        wall = time.perf_counter() - t0
        thread.join(5)
        return lat, got, len(frames), wall
