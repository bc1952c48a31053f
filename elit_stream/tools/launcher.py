"""Start `elit-stream serve` as a subprocess on free ports and wait until it is ready.

Used by `elit-stream demo` and by the integration tests. `serve` binds port 0 (ZeroMQ picks a
free port) and prints one JSON line `{"ready": true, "endpoints": {...}}` on stdout; this
module reads that line, so there is no race on port numbers.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FREE_PORT_ARGS = ["--ingest", "tcp://127.0.0.1:0", "--results", "tcp://127.0.0.1:0",
                  "--control", "tcp://127.0.0.1:0", "--metrics-port", "0"]


class ServiceStartError(RuntimeError):
    """The service exited or did not report ready; the message has the tail of its log."""


class ServiceProcess:
    """A running `elit-stream serve` subprocess; `endpoints` has ingest/results/control/metrics."""

    def __init__(self, args: list[str], timeout_s: float = 60.0, env: dict | None = None,
                 log_path: Path | None = None):
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="elit-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "elit_stream.tools.cli", "serve", *FREE_PORT_ARGS, *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     env={**os.environ, **(env or {})})
        self.ready: dict = {}                     # the service's whole `ready` line
        self.endpoints = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        buf = b""
        while time.monotonic() < deadline:
            chunk = self.proc.stdout.read()
            if chunk:
                buf += chunk
                for line in buf.splitlines():
                    if line.startswith(b"{"):
                        doc = json.loads(line)
                        if doc.get("ready"):
                            self.ready = doc
                            return doc["endpoints"]
            if self.proc.poll() is not None:
                raise ServiceStartError(f"service exited with {self.proc.returncode}:\n"
                                        + self.log_tail())
            time.sleep(0.05)
        self.kill()
        raise ServiceStartError(f"service not ready within {timeout_s} s:\n" + self.log_tail())

    def log_tail(self, n_chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (kills after `timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self._log.close()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
