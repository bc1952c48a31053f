"""Soak run of the real service (a command, not a test): hours-like behaviour in minutes.

Phase 1, lossless: the sender sends as fast as the service answers, keeping at most
`--in-flight` frames unanswered (ZeroMQ's back-pressure alone would let the kernel's TCP buffers
queue ~100 small frames), so the achieved rate is the maximum sustainable rate with a bounded
queue; nothing may be lost. Phase 2, latest: a
fresh service in latest mode, the sender paced at 2x phase 1's rate; every frame must be answered
by a result or reported in a frame_dropped event. Per window: frames sent / answered / dropped,
latency percentiles (service `total` and client "since sent"), and the service's RSS.

    .venv/bin/python benchmarks/soak.py --model models/default --size 128 --threads 1 \
        --lossless-min 10 --latest-min 3 --out runs/soak/report.json

Loopback only (the service binds 127.0.0.1 on free ports).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber  # noqa: E402
from elit_stream.tools.launcher import ServiceProcess  # noqa: E402
from elit_stream.core.artifact import load_artifact  # noqa: E402
from elit_stream.tools.movie import make_movie  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Listener(threading.Thread):
    """Collects results and events of one acquisition on its own thread."""

    def __init__(self, sub: ResultSubscriber, acq: str):
        super().__init__(daemon=True)
        self.sub, self.acq = sub, acq
        self.results: dict[int, tuple[float, float]] = {}   # id -> (t_client, service total ms)
        self.dropped: set[int] = set()
        self.rejected: set[int] = set()
        self.drop_events = 0
        self.events: list[dict] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            msg = self.sub.recv(0.2)
            if msg is None:
                continue
            t = time.perf_counter()
            if msg["topic"] == "result" and msg["acquisition"] == self.acq:
                self.results[msg["frame_id"]] = (t, msg["timings_ms"]["total"])
            elif msg["topic"].startswith("event."):
                if msg["event"] == "frame_dropped":
                    self.drop_events += 1
                    self.dropped.update(f["frame_id"] for f in msg["frames"])
                elif msg["event"] == "frame_rejected":
                    self.rejected.add(msg["frame"]["frame_id"])
                elif msg["event"] not in ("ping",):
                    self.events.append({k: msg.get(k) for k in ("event", "advisory", "code",
                                                                 "counts", "reason")})

    def answered(self) -> int:
        return len(self.results) + len(self.dropped) + len(self.rejected)


def pct(values, q) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


def run_phase(name: str, args, frames, pixel_size_pm: float, duration_s: float,
              rate_fps: float | None, extra: list[str], env: dict) -> dict:
    how = f"max ({args.in_flight} in flight)" if rate_fps is None else f"{rate_fps:.2f} fps"
    print(f"== {name}: {duration_s / 60:.1f} min, rate {how}", flush=True)
    svc_args = ["--model", str(args.model), "--threads", str(args.threads),
                "--precision", args.precision, *extra]
    with ServiceProcess(svc_args, timeout_s=300, env=env) as sp:
        ep, pid = sp.endpoints, sp.proc.pid
        ctl = ControlClient(ep["control"], timeout_s=60)
        sub = ResultSubscriber(ep["results"])
        sub.wait_ready(ctl)
        sender = FrameSender(ep["ingest"])
        acq = f"soak-{name}"
        lis = Listener(sub, acq)
        lis.start()
        sent_at: dict[int, float] = {}
        windows, rss = [], [(0.0, rss_mib(pid))]
        t0 = time.perf_counter()
        next_win, next_rss, win_start_id, fid = t0 + args.window_s, t0 + 10, 0, 0
        while (now := time.perf_counter()) - t0 < duration_s:
            if rate_fps is not None:
                wait = t0 + fid / rate_fps - now
                if wait > 0:
                    time.sleep(min(wait, 0.5))
                    continue
            elif fid - lis.answered() >= args.in_flight:  # lossless: a bounded queue
                time.sleep(0.001)
                continue
            sent_at[fid] = time.perf_counter()
            sender.send(frames[fid % len(frames)], fid, acq, pixel_size_pm=pixel_size_pm,
                        timeout_s=60)
            fid += 1
            if now >= next_rss:
                rss.append((round(now - t0, 1), rss_mib(pid)))
                next_rss += 10
            if now >= next_win:
                windows.append(window(len(windows), win_start_id, fid, sent_at, lis))
                print(fmt_window(windows[-1]), flush=True)
                win_start_id, next_win = fid, next_win + args.window_s
        t_end = time.perf_counter()
        deadline = time.monotonic() + 120
        while lis.answered() < fid and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        windows.append(window(len(windows), win_start_id, fid, sent_at, lis))
        print(fmt_window(windows[-1]), flush=True)
        rss.append((round(time.perf_counter() - t0, 1), rss_mib(pid)))
        status = ctl.call("status")
        code = sp.terminate(60)
        stop_deadline = time.monotonic() + 10
        while not any(e["event"] == "stop" for e in lis.events) and \
                time.monotonic() < stop_deadline:
            time.sleep(0.1)
        lis.halt.set()
        lis.join(5)
        for c in (sender, sub, ctl):
            c.close()
    stop = next((e for e in lis.events if e["event"] == "stop"), None)
    t_last = max((v[0] for v in lis.results.values()), default=t_end)
    warm = [r for t, r in rss if t >= 60] or [rss[-1][1]]
    lat = [1e3 * (lis.results[i][0] - sent_at[i]) for i in lis.results if i in sent_at]
    svc = [v[1] for v in lis.results.values()]
    return {
        "phase": name, "duration_s": round(t_end - t0, 1), "sent": fid,
        "answered": len(lis.results), "dropped": len(lis.dropped),
        "drop_events": lis.drop_events, "rejected": len(lis.rejected),
        "unaccounted": fid - lis.answered(), "rate_sent_fps": round(fid / (t_end - t0), 2),
        "rate_answered_fps": round(len(lis.results) / (t_last - t0), 2),
        "service_total_ms": {"p50": pct(svc, 50), "p95": pct(svc, 95), "p99": pct(svc, 99)},
        "since_sent_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99)},
        "rss_mib": {"start": round(rss[0][1], 1), "after_1_min": round(warm[0], 1),
                    "end": round(rss[-1][1], 1), "max": round(max(r for _, r in rss), 1)},
        "exit_code": code, "stop_counts": stop and stop["counts"],
        "service_counts": status.get("counts"), "windows": windows,
        "other_events": sorted({e["event"] + (f"/{e['advisory']}" if e.get("advisory") else "")
                                for e in lis.events}),
    }


def window(i: int, first: int, end: int, sent_at: dict, lis: Listener) -> dict:
    ids = range(first, end)
    res = [lis.results[j] for j in ids if j in lis.results]
    lat = [1e3 * (lis.results[j][0] - sent_at[j]) for j in ids if j in lis.results]
    return {"window": i, "sent": len(ids), "answered": len(res),
            "dropped": sum(j in lis.dropped for j in ids),
            "service_ms_p50": pct([r[1] for r in res], 50),
            "service_ms_p99": pct([r[1] for r in res], 99),
            "since_sent_ms_p50": pct(lat, 50), "since_sent_ms_p99": pct(lat, 99)}


def fmt_window(w: dict) -> str:
    return (f"  window {w['window']:3d}: sent {w['sent']:5d} answered {w['answered']:5d} "
            f"dropped {w['dropped']:5d}  service p50/p99 {w['service_ms_p50']}/"
            f"{w['service_ms_p99']} ms  since-sent p50/p99 {w['since_sent_ms_p50']}/"
            f"{w['since_sent_ms_p99']} ms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    p.add_argument("--size", type=int, default=128, help="frame side, px")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--lossless-min", type=float, default=10.0)
    p.add_argument("--latest-min", type=float, default=3.0)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--in-flight", type=int, default=2,
                   help="lossless phase: frames sent but not yet answered, at most")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "soak" / "report.json")
    args = p.parse_args()
    art = load_artifact(args.model, check_probe=False)
    mov = make_movie(n_frames=16, size_px=args.size, seed=5, pixel_size_pm=art.pixel_size_pm)
    frames = [np.ascontiguousarray(f) for f in mov.frames]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELIT_")}
    env_common = {"ELIT_MODEL__WARMUP_SHAPE_PX": json.dumps([args.size, args.size])}
    first = run_phase("lossless", args, frames, mov.pixel_size_pm, 60 * args.lossless_min, None,
                      ["--delivery", "lossless"], {**env, **env_common})
    rate2 = 2 * first["rate_answered_fps"]
    second = run_phase("latest", args, frames, mov.pixel_size_pm, 60 * args.latest_min, rate2,
                       ["--delivery", "latest"],
                       {**env, **env_common, "ELIT_DELIVERY__INGEST_HWM": "100"})
    report = {"command": " ".join(sys.argv), "model": str(args.model), "size_px": args.size,
              "threads": args.threads, "phases": [first, second]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for ph in (first, second):
        print(json.dumps({k: v for k, v in ph.items() if k != "windows"}))
    print(f"report: {args.out}")
    ok = first["unaccounted"] == 0 and first["dropped"] == 0 and second["unaccounted"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
