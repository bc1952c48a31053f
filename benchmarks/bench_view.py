"""The service's frame latency with and without the live view attached (docs/view.md).

Not a test. Starts `elit-stream serve` (models/default), then measures in phases, in this order:

  no view · view, no page · view + 1 page reading · view + 1 stalled page · no view (again)

"page reading" is a websocket client that takes every message (what a browser does);
"stalled page" completes the websocket handshake and then never reads (a frozen browser tab).
Per phase: closed loop (send one frame, wait for its result: client round trip, median and
90th percentile), the service's own `publish` stage (Prometheus `elit_stage_seconds`, mean),
and throughput with the sender running ahead (lossless, frames/s). The two `no view` phases
bracket the others so the noise of a shared machine shows. Last, what `member_maps` costs the
service per frame on its own (the same operations as loop.py, in this process). Usage:

    .venv/bin/python benchmarks/bench_view.py [--frames 20] [--size 256] [--threads N]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.tools.launcher import ServiceProcess
from elit_stream.tools.movie import make_movie

SETTLE_S = 1.0          # subscriptions travel to the service asynchronously


def stage_publish(metrics_url: str) -> tuple[float, int]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    total = re.search(r'elit_stage_seconds_sum\{stage="publish"\} (\S+)', text)
    count = re.search(r'elit_stage_seconds_count\{stage="publish"\} (\S+)', text)
    return (float(total.group(1)), int(float(count.group(1)))) if total and count else (0.0, 0)


def closed_loop(ep: dict, frames: np.ndarray, ps: float, acq: str) -> list[float]:
    with FrameSender(ep["ingest"]) as tx, ResultSubscriber(ep["results"], topics=("result",)) \
            as rx, ControlClient(ep["control"]) as ctl:
        rx.wait_ready(ctl)
        out = []
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            tx.send(frame, i, acq, pixel_size_pm=ps)
            while (msg := rx.recv(60)) is not None and msg["acquisition"] != acq:
                pass
            out.append(1e3 * (time.perf_counter() - t0))
        return out


def throughput(ep: dict, frames: np.ndarray, ps: float, acq: str) -> float:
    with FrameSender(ep["ingest"]) as tx, ResultSubscriber(ep["results"], topics=("result",)) \
            as rx, ControlClient(ep["control"]) as ctl:
        rx.wait_ready(ctl)
        done = threading.Event()

        def send():
            for i, frame in enumerate(frames):
                tx.send(frame, i, acq, pixel_size_pm=ps)
            done.set()
        t0 = time.perf_counter()
        threading.Thread(target=send, daemon=True).start()
        n = 0
        while n < len(frames) and (msg := rx.recv(60)) is not None:
            n += msg["acquisition"] == acq
        return n / (time.perf_counter() - t0)


@contextlib.contextmanager
def view_process(ep: dict):
    proc = subprocess.Popen([sys.executable, "-m", "elit_stream.tools.cli", "view", "--results",
                             ep["results"], "--control", ep["control"], "--port", "0",
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        yield json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def reading_page(url: str):
    """A websocket client that reads everything, in its own thread and event loop."""
    import aiohttp
    stop, stats = threading.Event(), {"messages": 0, "bytes": 0}

    async def run():
        async with aiohttp.ClientSession() as s, s.ws_connect(url + "ws") as ws:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    msg = await ws.receive(timeout=0.2)
                    stats["messages"] += 1
                    stats["bytes"] += len(msg.data or "")
    t = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    t.start()
    try:
        yield stats
    finally:
        stop.set()
        t.join(10)


@contextlib.contextmanager
def stalled_page(port: int):
    """Websocket handshake by hand, then never read a byte (receive buffer kept small)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n" % port)
    assert s.recv(12) == b"HTTP/1.1 101", "no websocket upgrade"
    try:
        yield {}
    finally:
        s.close()


def member_maps_cost_ms(size_px: int, n_members: int = 8, repeats: int = 50) -> float:
    """What the service adds per frame for `member_maps`, in this process: the same slicing,
    class sum, float16 conversion and zero-copy send as loop.py (median ms)."""
    import zmq

    from elit_stream.protocol import wire
    from elit_stream.service.loop import MEMBER_IMAGE_MAX_PX, MEMBER_MAP_MAX_PX
    probs = np.random.default_rng(0).random((n_members, 2, size_px, size_px), np.float32)
    net = probs[:1, :1].copy()
    ki, km = (-(-size_px // n) for n in (MEMBER_IMAGE_MAX_PX, MEMBER_MAP_MAX_PX))
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind("tcp://127.0.0.1:*")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        atom = probs[:, :, ::km, ::km].sum(axis=1, dtype=np.float32)
        wire.send(pub, wire.encode_member_maps({"shape": list(atom.shape)},
                                               net[0, 0, ::ki, ::ki], atom))
        times.append(1e3 * (time.perf_counter() - t0))
    pub.close(0)
    ctx.term()
    return float(np.median(times))


def run_phase(name: str, ep: dict, frames: np.ndarray, ps: float, attach) -> dict:
    with attach() as extra:
        time.sleep(SETTLE_S)
        pub0 = stage_publish(ep["metrics"])
        lat = closed_loop(ep, frames, ps, f"{name}-closed")
        fps = throughput(ep, frames, ps, f"{name}-open")
        pub1 = stage_publish(ep["metrics"])
    pub_ms = 1e3 * (pub1[0] - pub0[0]) / max(1, pub1[1] - pub0[1])
    return {"phase": name, "median": np.median(lat), "p90": np.percentile(lat, 90),
            "publish": pub_ms, "fps": fps, "extra": extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    movie = make_movie(n_frames=args.frames, size_px=args.size, seed=1)
    extra = ["--threads", str(args.threads)] if args.threads else []
    rows = []
    with ServiceProcess(extra) as svc:
        ep = svc.endpoints
        none = contextlib.nullcontext
        rows.append(run_phase("no view", ep, movie.frames, movie.pixel_size_pm, lambda: none({})))
        with view_process(ep) as ready:
            url, port = ready["url"], ready["port"]
            for name, attach in (("view, no page", lambda: none({})),
                                 ("view + 1 page reading", lambda: reading_page(url)),
                                 ("view + 1 stalled page", lambda: stalled_page(port))):
                rows.append(run_phase(name, ep, movie.frames, movie.pixel_size_pm, attach))
        rows.append(run_phase("no view (again)", ep, movie.frames, movie.pixel_size_pm,
                              lambda: none({})))
    print(f"\n{args.frames} frames of {args.size}x{args.size} px per phase, models/default, "
          f"{'threads ' + str(args.threads) if args.threads else 'default threads'}\n")
    print("| phase | round trip median (ms) | p90 (ms) | publish stage mean (ms) | "
          "throughput (frames/s) | page received |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        got = r["extra"]
        page = f"{got['messages']} msgs, {got['bytes'] / 1e6:.1f} MB" if got else "–"
        print(f"| {r['phase']} | {r['median']:.0f} | {r['p90']:.0f} | {r['publish']:.2f} | "
              f"{r['fps']:.2f} | {page} |")
    print("\nmember_maps build + send alone, in this process (8 members, 2 classes), median ms:")
    print("| frame | ms |\n|---|---|")
    for size in (256, 512, 1024):
        print(f"| {size}x{size} | {member_maps_cost_ms(size):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
