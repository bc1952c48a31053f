"""A few hundred fuzzed frames and control requests against the real service (the long run is
benchmarks/fuzz.py, recorded in docs/operations.md): every frame answered or reported, every
request answered, no internal error, the service alive and its counts consistent."""
from __future__ import annotations

import msgpack
import numpy as np

from elit_stream.protocol.client import ControlClient
from elit_stream.tools.launcher import ServiceProcess
from tests.fixtures.fuzz import fuzz_request, run_fuzz


def test_fuzzed_frames_and_requests_are_each_answered(tiny_artifact):
    with ServiceProcess(["--model", str(tiny_artifact), "--threads", "1", "--allowed-dir",
                         str(tiny_artifact.parent), "--log-level", "ERROR"]) as sp:
        rep = run_fuzz(sp.endpoints, n_frames=300, n_requests=300, seed=7, batch=100,
                       wait_s=30)
        assert rep.frames_unaccounted == 0 and rep.requests_unanswered == 0, sp.log_tail()
        assert rep.reject_codes["internal"] == 0 and rep.reply_errors["internal"] == 0
        assert len(rep.reject_codes) >= 5 and rep.results > 0         # the mutator is varied
        with ControlClient(sp.endpoints["control"], timeout_s=30) as ctl:
            counts = ctl.call("status")["counts"]
        assert counts["received"] == 300
        assert counts["processed"] + counts["rejected"] == 300 and counts["dropped"] == 0
        assert sp.terminate(30) == 0
        assert "Traceback" not in sp.log_tail(100_000)


def test_the_mutator_never_sends_shutdown():
    rng = np.random.default_rng(0)
    for i in range(2000):
        for part in fuzz_request(rng, i):
            try:
                doc = msgpack.unpackb(part, strict_map_key=False)
            except Exception:  # noqa: BLE001
                continue
            assert not (isinstance(doc, dict) and doc.get("cmd") == "shutdown")
