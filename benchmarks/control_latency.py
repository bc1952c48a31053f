"""Control round-trip latency while frames are inferred, and the memory a stalled subscriber
costs. A command, not a test; prints tables (docs/operations.md has the figures).

Part 1. `ping` round trips (DEALER -> ROUTER -> DEALER, client clock) on an idle service, then
while frames of each size are streamed into it back to back (one frame queued behind the one
in hand, lossless). Before the control thread (issue #12) a command waited for the frame in
hand: p99 about one frame time.

Part 2. A subscriber that asks for `maps` and then never reads, over a few hundred frames: the
service's RSS after every 50 frames, with the default `limits.results_sndhwm` and with the old
setting (100,000 messages per subscriber) as the baseline, in the same run.

    .venv/bin/python benchmarks/control_latency.py --model models/default --threads 2
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.tools.launcher import ServiceProcess

REPO = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles_ms(rtts_s: list[float]) -> tuple[float, float, float]:
    a = np.asarray(rtts_s) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def ping_rtts(ctl: ControlClient, duration_s: float, min_n: int, gap_s: float) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end or len(out) < min_n:
        t0 = time.perf_counter()
        ctl.call("ping", timeout_s=600)
        out.append(time.perf_counter() - t0)
        time.sleep(gap_s)
    return out


class Streamer(threading.Thread):
    """Keeps the service busy: at most 2 frames unanswered (one in hand, one queued)."""

    def __init__(self, ep: dict, side_px: int, ps: float):
        super().__init__(daemon=True)
        self.ep, self.side_px, self.ps = ep, side_px, ps
        self.halt, self.done = threading.Event(), 0
        self.infer_ms: list[float] = []

    def run(self) -> None:
        rng = np.random.default_rng(0)
        frame = rng.random((self.side_px, self.side_px), dtype=np.float32)
        with FrameSender(self.ep["ingest"]) as tx, ResultSubscriber(self.ep["results"],
                                                                    topics=("result",)) as rx:
            time.sleep(0.5)                      # let the subscription arrive
            sent = 0
            while not self.halt.is_set():
                while sent - self.done < 2:
                    tx.send(frame, sent, f"load-{self.side_px}", pixel_size_pm=self.ps)
                    sent += 1
                msg = rx.recv(0.2)
                if msg is not None:
                    self.done += 1
                    self.infer_ms.append(msg["timings_ms"]["infer"])


def part_latency(args) -> None:
    sp = ServiceProcess(["--model", str(args.model), "--device", "cpu", "--maps", "never",
                         *(["--threads", str(args.threads)] if args.threads else [])])
    print(f"service pid {sp.proc.pid}, model {args.model}", flush=True)
    rows = []
    try:
        ps = sp.ready.get("pixel_size_pm") or 14.1421
        with ControlClient(sp.endpoints["control"], timeout_s=600) as ctl:
            ps = ctl.call("status")["model"]["pixel_size_pm"]
            rows.append(("idle", "-", *percentiles_ms(ping_rtts(ctl, 5, 200, 0.01)), 0))
            for side in args.sizes:
                st = Streamer(sp.endpoints, side, ps)
                st.start()
                while st.done < 1:                # the first result: the engine is warm
                    time.sleep(0.05)
                rtts = ping_rtts(ctl, args.load_s, 30, 0.05)
                st.halt.set()
                st.join(600)
                infer = f"{np.median(st.infer_ms):.0f}" if st.infer_ms else "-"
                rows.append((f"{side}x{side} frames", infer, *percentiles_ms(rtts), len(rtts)))
                time.sleep(2 * float(infer) / 1e3 if infer != "-" else 1)   # let it drain
    finally:
        sp.terminate()
    print("\n| service state | frame infer p50 (ms) | ping RTT p50 (ms) | p99 (ms) | max (ms) "
          "| pings |\n|---|---|---|---|---|---|")
    for name, infer, p50, p99, mx, n in rows:
        print(f"| {name} | {infer} | {p50:.2f} | {p99:.2f} | {mx:.2f} | {n or '200+'} |")


def part_stalled(args) -> None:
    print(f"\nstalled maps subscriber: {args.stall_frames} frames of {args.stall_px}^2 px, "
          "RSS (MiB) after every 50 frames", flush=True)
    table = {}
    for label, hwm in (("limits.results_sndhwm = 100 (default)", None),
                       ("baseline: 100000 (before #12)", 100_000)):
        env = {"ELIT_LIMITS__RESULTS_SNDHWM": str(hwm)} if hwm else {}
        sp = ServiceProcess(["--model", str(args.model), "--device", "cpu", "--maps",
                             "subscribe", *(["--threads", str(args.threads)] if args.threads
                                            else [])], env=env)
        try:
            table[label] = stall(sp, args)
        finally:
            sp.terminate()
    marks = list(range(0, args.stall_frames + 1, 50))
    print("\n| setting | " + " | ".join(f"{n}" for n in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for label, rss in table.items():
        print(f"| {label} | " + " | ".join(f"{v:.0f}" for v in rss) + " |")


def stall(sp: ServiceProcess, args) -> list[float]:
    ep = sp.endpoints
    rng = np.random.default_rng(1)
    frame = rng.random((args.stall_px, args.stall_px), dtype=np.float32)
    stalled = zmq.Context.instance().socket(zmq.SUB)   # reads nothing, and its own ZeroMQ
    stalled.setsockopt(zmq.RCVHWM, 1)                  # queue is tiny: the backlog is the
    stalled.setsockopt(zmq.RCVBUF, 65536)              # service's (a hung viewer process)
    stalled.setsockopt(zmq.LINGER, 0)
    stalled.setsockopt(zmq.SUBSCRIBE, b"maps")
    stalled.connect(ep["results"])
    with ControlClient(ep["control"], timeout_s=60) as ctl, \
            ResultSubscriber(ep["results"], topics=("result",)) as rx, \
            FrameSender(ep["ingest"]) as tx:
        ps = ctl.call("status")["model"]["pixel_size_pm"]
        time.sleep(1.0)                           # both subscriptions arrive
        rss = [rss_mb(sp.proc.pid)]
        for i in range(args.stall_frames):
            tx.send(frame, i, "stall", pixel_size_pm=ps)
            while (msg := rx.recv(120)) is not None and msg["topic"] != "result":
                pass
            if (i + 1) % 50 == 0:
                rss.append(rss_mb(sp.proc.pid))
                print(f"  {i + 1} frames: {rss[-1]:.0f} MiB", flush=True)
    stalled.close()
    return rss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--load-s", type=float, default=20.0, help="seconds of pings per size")
    p.add_argument("--stall-frames", type=int, default=300)
    p.add_argument("--stall-px", type=int, default=256)
    p.add_argument("--skip-stall", action="store_true")
    p.add_argument("--skip-latency", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_latency:
        part_latency(args)
    if not args.skip_stall:
        part_stalled(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
