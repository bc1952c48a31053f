"""Faults, each with real processes: a killed and restarted service, clients that vanish
mid-reply, a bad artifact given to load_model mid-stream, a GPU provider that cannot start.
(SIGTERM: test_sigterm_publishes_stop_with_counts_and_exits_zero in test_service_integration.)

No timed assertions: timeouts only keep a broken service from hanging the run.
"""
from __future__ import annotations

import json
import signal
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import onnxruntime as ort
import pytest

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.tools.launcher import ServiceProcess, ServiceStartError
from tests.fixtures.tiny_artifact import build_tiny_artifact, gaussian_blobs

TIMEOUT_S = 30.0
FRAME = gaussian_blobs((64, 64), seed=2)[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    return {"root": root, "tiny": build_tiny_artifact(root, n_members=3, name="tiny")}


def start(models, *args) -> ServiceProcess:
    return ServiceProcess(["--model", str(models["tiny"]), "--threads", "1",
                           "--allowed-dir", str(models["root"]), *args])


def collect(sub, until, sp, timeout_s=TIMEOUT_S) -> list[dict]:
    msgs: list[dict] = []
    while not until(msgs):
        msg = sub.recv(timeout_s)
        assert msg is not None, f"silent for {timeout_s} s after {len(msgs)}:\n{sp.log_tail()}"
        msgs.append(msg)
    return msgs


def result_ids(msgs, acquisition):
    return [m["frame_id"] for m in msgs if m["topic"] == "result"
            and m["acquisition"] == acquisition]


def metric(sp, name) -> float:
    text = urllib.request.urlopen(sp.endpoints["metrics"], timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


class Streamer(threading.Thread):
    """The microscope: sends frames 0, 1, 2, ... of one acquisition on one PUSH socket, without
    pausing, until stopped; a send blocks while no service takes frames (ZeroMQ reconnects)."""

    def __init__(self, address: str, acquisition: str):
        super().__init__(daemon=True)
        self.sender, self.acquisition = FrameSender(address), acquisition
        self.sent = 0                   # frames whose send returned
        self.halt = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set() and self.sent < 100_000:
                self.sender.send(FRAME, self.sent, self.acquisition, timeout_s=120)
                self.sent += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.sender.close()

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while self.sent < n and self.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.sent >= n, f"sender stuck at {self.sent} ({self.error})"


@pytest.mark.slow
def test_killed_and_restarted_service_reports_the_gap_and_loses_nothing_after(models):
    first = start(models)
    ep = first.endpoints
    same_ports = ["--ingest", ep["ingest"], "--results", ep["results"], "--control", ep["control"]]
    streamer = Streamer(ep["ingest"], "scan")      # one sender for both runs: it reconnects
    second = None
    try:
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(ep["results"]) as sub:
            sub.wait_ready(ctl)
            streamer.start()
            seen_first = collect(sub, lambda ms: len(result_ids(ms, "scan")) >= 5, first)
        first.proc.kill()                 # SIGKILL mid-acquisition: no stop document, no clean-up
        first.wait(TIMEOUT_S)
        last_of_first = max(result_ids(seen_first, "scan"))
        second = start(models, *same_ports)            # the sender keeps trying meanwhile
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(ep["results"]) as sub:
            sub.wait_ready(ctl)
            ready_at = streamer.sent                   # every frame from here on must arrive
            streamer.wait_for(ready_at + 15)
            streamer.halt.set()
            streamer.join(TIMEOUT_S)
            assert streamer.error is None, streamer.error
            msgs = collect(sub, lambda ms: streamer.sent - 1 in result_ids(ms, "scan"), second)
            ids = result_ids(msgs, "scan")
            assert set(range(ready_at, streamer.sent)) <= set(ids)   # nothing after restart lost
            assert ids == list(range(ids[0], streamer.sent))         # in order, once
            assert ids[0] > last_of_first
            counts = ctl.call("status")["counts"]
            assert counts["received"] == counts["processed"] and counts["rejected"] == 0
            # The restarted run saw the acquisition start at some frame > 0: one gap, reported
            # (the event may precede this subscription; the counter cannot be missed).
            assert metric(second, "elit_frame_id_gaps_total") == 1
            assert counts["received"] <= streamer.sent - last_of_first - 1
    finally:
        streamer.halt.set()
        if streamer.is_alive():
            streamer.join(TIMEOUT_S)
        first.close()
        if second is not None:
            second.close()


@pytest.mark.slow
def test_restarted_service_publishes_the_gap_event(models):
    """The same gap as an event: frames resume only once the new run's subscriber is live."""
    with start(models) as sp:
        ep = sp.endpoints
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(ep["results"]) as sub, FrameSender(ep["ingest"]) as sender:
            sub.wait_ready(ctl)
            for i in range(8, 12):         # as if frames 0..7 went to a previous run
                sender.send(FRAME, i, "resumed", timeout_s=TIMEOUT_S)
            msgs = collect(sub, lambda ms: len(result_ids(ms, "resumed")) == 4, sp)
            gaps = [m for m in msgs if m.get("event") == "frame_gap"]
            assert [(g["acquisition"], g["expected"], g["got"]) for g in gaps] == \
                [("resumed", 0, 8)]


VANISHING_CLIENT = """
import os, signal, sys, zmq, msgpack
ctx = zmq.Context()
ctl = ctx.socket(zmq.DEALER); ctl.connect(sys.argv[1])
sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.SUBSCRIBE, b""); sub.setsockopt(zmq.RCVHWM, 1)
sub.connect(sys.argv[2])
for i in range(200):   # requests whose replies nobody will read
    ctl.send_multipart([b"", msgpack.packb({"cmd": "status" if i % 2 else "members", "id": i})])
ctl.send_multipart([b"", msgpack.packb({"cmd": "ping", "id": "last", "token": "vanish"})])
while True:            # wait until the service has answered the last one, then die mid-stream
    msg = sub.recv_multipart()
    if msg[0] == b"event.ping" and msgpack.unpackb(msg[1]).get("token") == "vanish":
        break
print("ready", flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_subscriber_and_control_client_that_vanish_leave_the_service_unaffected(models):
    with start(models) as sp:
        ep = sp.endpoints
        client = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, ep["control"],
                                   ep["results"]], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                    ResultSubscriber(ep["results"]) as sub, FrameSender(ep["ingest"]) as sender:
                sub.wait_ready(ctl)
                assert client.stdout.readline().strip() == "ready"
                for i in range(10):                   # results flow to both subscribers ...
                    sender.send(FRAME, i, "vanish", timeout_s=TIMEOUT_S)
                client.stdin.write("\n")
                client.stdin.flush()                  # ... and one of them is SIGKILLed
                assert client.wait(TIMEOUT_S) == -9
                for i in range(10, 30):
                    sender.send(FRAME, i, "vanish", timeout_s=TIMEOUT_S)
                msgs = collect(sub, lambda ms: len(result_ids(ms, "vanish")) == 30, sp)
                assert result_ids(msgs, "vanish") == list(range(30))
                st = ctl.call("status")
                assert st["counts"]["processed"] == 30 and st["counts"]["rejected"] == 0
                assert sp.proc.poll() is None and ctl.call("ping")["ok"]
        finally:
            client.kill()
            client.wait(10)
        assert sp.terminate(TIMEOUT_S) == 0


def _corrupted(models, name):
    bad = models["root"] / name
    shutil.copytree(models["tiny"], bad)
    data = bytearray((bad / "ensemble.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "ensemble.onnx").write_bytes(bytes(data))
    return bad


def _incompatible(models, name):
    bad = models["root"] / name
    shutil.copytree(models["tiny"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = "2.0"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


@pytest.mark.slow
def test_bad_artifacts_are_refused_mid_stream_and_the_old_ensemble_keeps_serving(models):
    corrupted, incompatible = _corrupted(models, "corrupt"), _incompatible(models, "v2")
    with start(models) as sp:
        ep = sp.endpoints
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(ep["results"]) as sub, FrameSender(ep["ingest"]) as sender:
            sub.wait_ready(ctl)
            done, sent = threading.Event(), []

            def stream():
                while not done.is_set() and len(sent) < 5000:
                    sender.send(FRAME, len(sent), "swap", timeout_s=TIMEOUT_S)
                    sent.append(len(sent))

            feeder = threading.Thread(target=stream)
            feeder.start()
            try:
                replies = [ctl.call("load_model", path=str(p), timeout_s=120)
                           for p in (corrupted, incompatible)]
            finally:
                done.set()
                feeder.join(TIMEOUT_S)
            assert [r["error"]["code"] for r in replies] == ["model_error", "model_error"]
            assert "ensemble.onnx" in replies[0]["error"]["message"]
            assert "sha256" in replies[0]["error"]["message"]
            assert "format_version" in replies[1]["error"]["message"]
            msgs = collect(sub, lambda ms: len(result_ids(ms, "swap")) == len(sent), sp)
            assert result_ids(msgs, "swap") == sent                      # no frame lost
            assert {m["model"]["name"] for m in msgs if m["topic"] == "result"} == {"tiny"}
            errors = [m for m in msgs if m.get("event") == "error"]
            assert len(errors) == 2 and all(e["code"] == "model_error" for e in errors)
            assert ctl.call("status")["model"]["name"] == "tiny"


NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has CUDA: cannot simulate its failure")
def test_cuda_that_cannot_start_falls_back_to_cpu_visibly(models):
    with start(models, "--device", "cuda") as sp:
        with ControlClient(sp.endpoints["control"], timeout_s=TIMEOUT_S) as ctl:
            model = ctl.call("status")["model"]
        assert model["provider"] == "CPUExecutionProvider"
        assert "CUDA" in model["fallback_reason"]
        assert metric(sp, "elit_provider_fallback") == 1
        assert "falling back to CPU" in sp.log_tail(20000)


@pytest.mark.skipif(not NO_CUDA, reason="this onnxruntime has CUDA: cannot simulate its failure")
def test_cuda_that_cannot_start_refuses_to_serve_when_fallback_is_off(models):
    with pytest.raises(ServiceStartError) as exc:
        ServiceProcess(["--model", str(models["tiny"]), "--device", "cuda"],
                       env={"ELIT_MODEL__CPU_FALLBACK": "false"})
    assert "CUDA requested but unavailable" in str(exc.value)
    assert "Traceback" not in str(exc.value)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_replay_across_a_restart_ends_with_exactly_one_result_per_frame(models, how):
    """`replay` of a 40-frame movie; the service is stopped mid-way and started again on the
    same ports: every frame ends with exactly one result accepted by the replay (a result the
    service publishes again for a resent frame carries `repeat: true`)."""
    from collections import Counter

    from elit_stream.tools.replay import replay
    first = start(models)
    ep = first.endpoints
    same_ports = ["--ingest", ep["ingest"], "--results", ep["results"], "--control", ep["control"]]
    results: list[dict] = []
    stopped_first, out = threading.Event(), {}

    def seen(msg, rep):
        if msg["topic"] == "result":
            results.append(msg)
            if len(rep.results) >= 8:
                stopped_first.set()

    def run_replay():
        try:
            out["rep"] = replay([FRAME] * 40, ep, acquisition="movie", rate_fps=10,
                                on_message=seen, wait_s=90, silence_s=1.0)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            out["error"] = exc

    runner = threading.Thread(target=run_replay, daemon=True)
    runner.start()
    second = None
    try:
        assert stopped_first.wait(TIMEOUT_S), first.log_tail()
        if how == "kill -9":
            first.proc.kill()
            first.wait(TIMEOUT_S)
        else:
            assert first.terminate(TIMEOUT_S) == 0, first.log_tail()
        time.sleep(1.0)          # the service is down for a while; the replay keeps trying
        second = start(models, *same_ports)
        runner.join(120)
        assert not runner.is_alive() and "error" not in out, out.get("error")
        rep = out["rep"]
        assert rep.complete and not rep.rejected and not rep.dropped, (
            rep.unanswered, rep.restarts, rep.resent, rep.repeats,
            [(e["event"], e["run_uid"][:6], e.get("code"), e.get("frame")) for e in rep.events],
            second.log_tail())
        assert sorted(rep.results) == list(range(40))          # one accepted result each
        assert sorted({m["frame_id"] for m in results}) == list(range(40))
        # a frame published twice in one run is marked: never two unmarked results for it
        fresh = Counter(m["frame_id"] for m in results if not m.get("repeat"))
        assert max(fresh.values()) == 1, fresh
        assert rep.restarts == 1
        assert len(results) - rep.repeats == 40   # the replay counted every extra as a repeat
    finally:
        first.kill()
        if second is not None:
            second.terminate()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "shutdown"])
def test_stop_during_a_long_frame_finishes_it_and_drains_the_queue(models, how):
    """Stop while a long frame is inferred and more are queued: the command is answered while
    the frame is in hand; the frame is finished; every queued frame is rejected
    `shutting_down` before `stop`, whose counts add up."""
    from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM
    sp = start(models, "--delivery", "lossless")
    big = gaussian_blobs((1024, 1024), seed=4)[0]
    try:
        with ControlClient(sp.endpoints["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(sp.endpoints["results"]) as sub, \
                FrameSender(sp.endpoints["ingest"]) as sender:
            sub.wait_ready(ctl)
            for i in range(4):
                sender.send(big, i, "long", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
            status = None
            for _ in range(10_000):
                status = ctl.call("status")
                if status["in_flight"] is not None:
                    break
            in_hand = status["in_flight"]
            assert in_hand is not None
            if how == "SIGTERM":
                sp.proc.send_signal(signal.SIGTERM)
            else:
                assert ctl.call("shutdown")["ok"]
                assert ctl.call("status")["in_flight"] == in_hand   # answered mid-frame
            msgs = collect(sub, lambda ms: any(m.get("event") == "stop" for m in ms), sp)
        assert sp.wait(TIMEOUT_S) == 0
        stop = msgs[-1]
        assert stop["event"] == "stop" and stop["exit_status"] == "success"
        assert stop["frame_in_hand"] == in_hand and stop["frame_in_hand_outcome"] == "finished"
        answered = {m["frame_id"] for m in msgs if m["topic"] == "result"}
        answered |= {m["frame"]["frame_id"] for m in msgs if m.get("event") == "frame_rejected"
                     and m["code"] == "shutting_down"}
        assert in_hand["frame_id"] in answered
        c = stop["counts"]
        assert c["received"] == c["processed"] + c["rejected"] == len(answered)
    finally:
        sp.kill()


@pytest.mark.slow
def test_sigterm_during_load_model_exits_cleanly(models):
    """SIGTERM while load_model builds the shipped 8-member ensemble (it used to abort with
    "terminate called without an active exception"): exit 0, a stop event, no abort."""
    from pathlib import Path
    repo_models = Path(__file__).resolve().parents[1] / "models"
    sp = start(models, "--allowed-dir", str(repo_models), "--warmup-shape", "512x512")
    try:
        with ControlClient(sp.endpoints["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(sp.endpoints["results"]) as sub:
            sub.wait_ready(ctl)
            ctl.send_raw([b"", __import__("msgpack").packb({"cmd": "load_model",
                                                           "path": "default", "id": "L"})])
            for _ in range(10_000):
                if ctl.call("status")["loading"]:
                    break
            sp.proc.send_signal(signal.SIGTERM)
            msgs = collect(sub, lambda ms: any(m.get("event") == "stop" for m in ms), sp)
        assert sp.wait(TIMEOUT_S) == 0, sp.log_tail()
        assert msgs[-1]["exit_status"] == "success"
        assert "terminate called" not in sp.log_tail(100_000)
    finally:
        sp.kill()


@pytest.mark.slow
def test_a_frame_longer_than_the_stop_grace_is_abandoned_and_said_so(models):
    from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM
    sp = ServiceProcess(["--model", str(models["tiny"]), "--threads", "1"],
                        env={"ELIT_LIMITS__STOP_GRACE_S": "0.2"})
    big = gaussian_blobs((2048, 2048), seed=5)[0]
    try:
        with ControlClient(sp.endpoints["control"], timeout_s=TIMEOUT_S) as ctl, \
                ResultSubscriber(sp.endpoints["results"]) as sub, \
                FrameSender(sp.endpoints["ingest"]) as sender:
            sub.wait_ready(ctl)
            sender.send(big, 7, "huge", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
            for _ in range(10_000):
                if ctl.call("status")["in_flight"] is not None:
                    break
            sp.proc.send_signal(signal.SIGTERM)
            msgs = collect(sub, lambda ms: any(m.get("event") == "stop" for m in ms), sp)
        assert sp.wait(TIMEOUT_S) == 0, sp.log_tail()
        stop = msgs[-1]
        assert not [m for m in msgs if m["topic"] == "result"]
        assert stop["frame_in_hand"] == {"acquisition": "huge", "frame_id": 7}
        assert stop["frame_in_hand_outcome"] == "abandoned"
        assert "abandoned" in sp.log_tail() and "terminate called" not in sp.log_tail()
    finally:
        sp.kill()
