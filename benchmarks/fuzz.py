"""Fuzz a running service (a command, not a test): seeded mutations of valid frames and control
requests over real loopback sockets; every frame must be answered (result) or reported
(frame_rejected), every request must get one reply, and the service must survive and stop
cleanly with consistent counts.

    .venv/bin/python benchmarks/fuzz.py --frames 60000 --requests 60000 --seed 1

Starts its own service (tiny fixture artifact, lossless, 127.0.0.1, free ports, log level ERROR).
Exit status 0 only if nothing is unaccounted for, no `internal` error occurred, and the service
exited 0 after SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from elit_stream.protocol.client import ControlClient  # noqa: E402
from elit_stream.tools.launcher import ServiceProcess  # noqa: E402
from tests.fixtures.fuzz import run_fuzz  # noqa: E402
from tests.fixtures.tiny_artifact import build_tiny_artifact  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=60_000)
    p.add_argument("--requests", type=int, default=60_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch", type=int, default=500)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="elit-fuzz-"))
    art = build_tiny_artifact(root, name="tiny")
    with ServiceProcess(["--model", str(art), "--threads", "1", "--allowed-dir", str(root),
                         "--log-level", "ERROR"], timeout_s=120) as sp:
        def progress(r):
            if r.frames_sent % 10_000 < args.batch:
                print(f"  {r.frames_sent} frames ({r.results} results, {r.rejected} rejected), "
                      f"{r.requests_sent} requests ({r.replies} replies), {r.seconds:.0f} s",
                      flush=True)
        rep = run_fuzz(sp.endpoints, args.frames, args.requests, args.seed, args.batch,
                       progress=progress)
        alive = sp.proc.poll() is None
        with ControlClient(sp.endpoints["control"], timeout_s=30) as ctl:
            counts = ctl.call("status")["counts"]
        code = sp.terminate(60)
        log = sp.log_tail(200_000)
    summary = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "frames_sent": rep.frames_sent, "results": rep.results, "rejected": rep.rejected,
        "frames_unaccounted": rep.frames_unaccounted, "requests_sent": rep.requests_sent,
        "replies": rep.replies, "requests_unanswered": rep.requests_unanswered,
        "reject_codes": dict(rep.reject_codes.most_common()),
        "reply_error_codes": {str(k): v for k, v in rep.reply_errors.most_common()},
        "service_counts": counts, "alive_after": alive, "exit_code": code,
        "tracebacks_in_log": log.count("Traceback"), "seconds": round(rep.seconds, 1)}
    print(json.dumps(summary, indent=1))
    internal = rep.reject_codes.get("internal", 0) + rep.reply_errors.get("internal", 0)
    ok = (alive and code == 0 and rep.frames_unaccounted == 0 and rep.requests_unanswered == 0
          and internal == 0 and counts["received"] == rep.frames_sent)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
