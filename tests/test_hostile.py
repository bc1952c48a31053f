"""Hostile input and control under load, against the real service as a subprocess.

Each hostile header gets a frame_rejected event naming the frame, and `ping` is answered right
after it (the service is still there). Commands are answered while a long frame is inferred:
shown by `status` reporting that frame as in flight, not by a clock.
No timed assertions: timeouts only keep a broken service from hanging the run.
"""
from __future__ import annotations

import urllib.request

import msgpack
import pytest

from elit_stream.protocol import wire
from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM, gaussian_blobs
from tests.test_service_integration import TIMEOUT_S, Session, models  # noqa: F401 (fixture)

FRAME = gaussian_blobs((64, 64), seed=1)[0]


@pytest.fixture(scope="module")
def svc(models):  # noqa: F811
    with Session(models, env={"ELIT_DELIVERY__MAX_FRAME_PX": str(1024 * 1024),
                              "ELIT_LIMITS__MAX_INPUT_PX": str(2048 * 2048)}) as s:
        yield s


def header(**fields):
    h = {"protocol": 1, "frame_id": 0, "acquisition": "hostile", "shape": [64, 64],
         "dtype": "float32"}
    return msgpack.packb({**h, **fields})


HOSTILE = {   # name -> (parts, frame id named in the event, expected code)
    "pixel size 1e308": ([header(frame_id=1, pixel_size_pm=1e308), FRAME.tobytes()], 1,
                         "bad_pixel_size"),
    "pixel size 0": ([header(frame_id=2, pixel_size_pm=0.0), FRAME.tobytes()], 2, "bad_header"),
    "pixel size -3": ([header(frame_id=3, pixel_size_pm=-3.0), FRAME.tobytes()], 3, "bad_header"),
    "1x1 uint32 at 57926 pm": ([header(frame_id=4, shape=[1, 1], dtype="uint32",
                                       pixel_size_pm=57926.0), b"\0\0\0\1"], 4, "bad_pixel_size"),
    "frame id 2^64-1": ([header(frame_id=2**64 - 1), FRAME.tobytes()], 2**64 - 1,
                        "bad_header"),
    "upscaled past the cap": ([header(frame_id=5, shape=[1024, 1024], dtype="uint8",
                                      pixel_size_pm=PIXEL_SIZE_PM * 3.9),
                               bytes(1024 * 1024)], 5, "too_large"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_rejected_by_name_and_ping_answers_after(svc, name):
    parts, fid, code = HOSTILE[name]
    svc.sender.send_parts(parts, timeout_s=TIMEOUT_S)
    msgs = svc.collect(lambda ms: any(m.get("event") == "frame_rejected" for m in ms))
    rej = next(m for m in msgs if m.get("event") == "frame_rejected")
    assert rej["frame"]["frame_id"] == fid, rej
    assert rej["frame"]["acquisition"] == "hostile"
    assert code is None or rej["code"] == code, rej
    assert rej["message"]
    assert svc.ctl.call("ping")["ok"]


def test_frame_id_at_the_top_then_zero_is_a_gap_not_a_crash(svc):
    top = wire.MAX_FRAME_ID
    svc.sender.send(FRAME, top, "top", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
    svc.sender.send(FRAME, 0, "top", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
    results, events = svc.results(2)
    assert [r["frame_id"] for r in results] == [top, 0]
    gaps = [e for e in events if e.get("event") == "frame_gap"]
    assert gaps[-1]["expected"] == top + 1 and gaps[-1]["got"] == 0
    assert svc.ctl.call("ping")["ok"]


def test_missing_pixel_size_is_assumed_and_said_once_per_acquisition(svc):
    for i in range(5):
        svc.sender.send(FRAME, i, "no-scale", timeout_s=TIMEOUT_S)
    results, events = svc.results(5)
    warnings = [e for e in events if e.get("event") == "warning"]
    assert len(warnings) == 1 and warnings[0]["code"] == "no_pixel_size"
    assert str(PIXEL_SIZE_PM) in warnings[0]["message"] or "14.1" in warnings[0]["message"]
    assert warnings[0]["frame"] == {"acquisition": "no-scale", "frame_id": 0}
    log = svc.proc.log_tail(100_000)
    assert log.count("sends no pixel_size_pm") == 1


def test_control_is_answered_during_a_long_frame_and_applies_from_the_next(svc):
    big = gaussian_blobs((1024, 1024), seed=3)[0]
    svc.sender.send(big, 0, "long", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
    status = None
    for _ in range(10_000):      # status answered while the frame is inferred
        status = svc.ctl.call("status")
        if status["in_flight"] is not None:
            break
    assert status["in_flight"] == {"acquisition": "long", "frame_id": 0}, status
    reply = svc.ctl.call("deselect", members=[2])
    assert reply["ok"] and reply["from_frame_seq"] == status["counts"]["processed"] + 1
    assert svc.ctl.call("status")["in_flight"] is not None   # still the same long frame
    svc.sender.send(FRAME, 1, "long", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
    results, _ = svc.results(2, timeout_s=120)
    assert [r["frame_id"] for r in results] == [0, 1]
    assert results[0]["active"] == [0, 1, 2] and results[1]["active"] == [0, 1]
    assert results[1]["seq"] == reply["from_frame_seq"]
    svc.ctl.call("reset", check=True)


def test_unknown_commands_share_one_metric_label(svc):
    for i in range(50):
        assert svc.ctl.call(f"nonsense-{i}")["error"]["code"] == "unknown_command"
    text = urllib.request.urlopen(svc.proc.endpoints["metrics"], timeout=10).read().decode()
    assert "nonsense" not in text
    assert 'elit_control_commands_total{cmd="unknown",ok="False"} 50.0' in text


def test_an_oversized_ingest_message_is_refused_by_zeromq_and_the_service_goes_on(svc):
    from elit_stream.protocol.client import FrameSender
    limit_b = 1024 * 1024 * 8 + wire.MAX_HEADER_BYTES
    with FrameSender(svc.proc.endpoints["ingest"]) as junk:
        junk.send_parts([header(frame_id=99), bytes(limit_b + 1)], timeout_s=TIMEOUT_S)
        status = svc.ctl.call("status")
    assert svc.ctl.call("ping")["ok"]
    assert status["limits"]["max_frame_px"] == 1024 * 1024
    svc.sender.send(FRAME, 0, "after-junk", pixel_size_pm=PIXEL_SIZE_PM, timeout_s=TIMEOUT_S)
    results, _ = svc.results(1)
    assert results[0]["acquisition"] == "after-junk"
    assert svc.ctl.call("status")["counts"]["received"] == status["counts"]["received"] + 1
