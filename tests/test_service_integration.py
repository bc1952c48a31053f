"""The real service as a subprocess on free ports, driven through real sockets.

Uses the tiny fixture artifact (fast) except the detection-quality test, which needs the shipped
models/default. No timed assertions: timeouts only keep a broken service from hanging the run.
"""
from __future__ import annotations

import math
import threading
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elit_stream.protocol import messages, wire
from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.tools.launcher import ServiceProcess
from tests.fixtures.tiny_artifact import PIXEL_SIZE_PM, build_tiny_artifact, gaussian_blobs

TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("served-models")
    return {"root": root, "tiny": build_tiny_artifact(root, n_members=3, name="tiny"),
            "tiny4": build_tiny_artifact(root, n_members=4, seed=1, name="tiny4")}


class Session:
    """A running service with a control client, a live subscriber and a sender."""

    def __init__(self, models, *args, env=None):
        self.proc = ServiceProcess(["--model", str(models["tiny"]), "--threads", "1",
                                    "--allowed-dir", str(models["root"]), *args], env=env)
        ep = self.proc.endpoints
        self.ctl = ControlClient(ep["control"], timeout_s=TIMEOUT_S)
        self.sub = ResultSubscriber(ep["results"])
        self.sub.wait_ready(self.ctl)
        self.sender = FrameSender(ep["ingest"])

    def send(self, ids, acquisition="acq", shape=(64, 64)):
        for i in ids:
            self.sender.send(gaussian_blobs(shape, seed=i % 7)[0], i, acquisition,
                             timeout_s=TIMEOUT_S)

    def collect(self, until, timeout_s=TIMEOUT_S):
        """Messages until `until(messages)` is true (or fail after timeout_s of silence)."""
        msgs = []
        while not until(msgs):
            msg = self.sub.recv(timeout_s)
            assert msg is not None, f"service silent for {timeout_s} s; got {len(msgs)} " \
                f"messages; log:\n{self.proc.log_tail()}"
            check_against_the_spec(msg)
            msgs.append(msg)
        return msgs

    def results(self, n, **kw):
        msgs = self.collect(lambda ms: sum(m["topic"] == "result" for m in ms) >= n, **kw)
        return [m for m in msgs if m["topic"] == "result"], [m for m in msgs
                                                               if m["topic"] != "result"]

    def close(self):
        for c in (self.sender, self.sub, self.ctl):
            c.close()
        self.proc.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_against_the_spec(msg):
    """Every published document validates against its model in elit_stream.protocol.messages."""
    doc = {k: v for k, v in msg.items() if k not in ("topic", "atoms", "mean", "std")}
    if msg["topic"] == "result":
        messages.ResultHeader.model_validate(doc)
    elif msg["topic"] == "maps":
        messages.MapsHeader.model_validate(doc)
    else:
        assert msg["topic"] == "event." + msg["event"]
        messages.EVENTS[msg["event"]].model_validate(doc)


@pytest.fixture(scope="module")
def lossless(models):
    with Session(models, env={"ELIT_DELIVERY__MAX_FRAME_PX": str(256 * 256)}) as s:
        yield s


def test_lossless_answers_every_frame_once_and_in_order(lossless):
    lossless.send(range(40), acquisition="order")
    results, events = lossless.results(40)
    ids = [r["frame_id"] for r in results]
    assert ids == list(range(40))
    assert not [e for e in events if e["event"] in ("frame_dropped", "frame_rejected")]
    r = results[-1]
    assert r["atoms"]["x"].dtype == np.float32 and len(r["atoms"]["x"]) == r["n_atoms"] > 0
    assert set(r["timings_ms"]) >= {"decode", "prepare", "infer", "analyse", "total"}


def test_results_locate_the_blobs_in_input_frame_pixels(lossless):
    img, true_xy = gaussian_blobs((80, 96), n=10, seed=3)
    lossless.sender.send(img, 0, "geometry")
    (r,), _ = lossless.results(1)
    pred = np.column_stack([r["atoms"]["x"], r["atoms"]["y"]])
    d = np.linalg.norm(pred[:, None] - true_xy[None], axis=2)
    assert r["frame_shape"] == [80, 96]
    assert np.median(d.min(axis=0)) < 1.0  # x = column, y = row, pixel-centre origin


def test_pixel_size_rescale_maps_back_to_input_frame_pixels(lossless):
    """A frame at twice the model's pixel size is upsampled for inference; the atoms still come
    back in the pixels of the frame as sent. Header fields are echoed."""
    img, true_xy = gaussian_blobs((64, 72), n=8, sigma_px=1.2, seed=5)
    lossless.sender.send(img, 3, "rescaled", pixel_size_pm=2 * PIXEL_SIZE_PM,
                         acquired_at=123.5, complete=False)
    (r,), _ = lossless.results(1)
    assert (r["pixel_size_pm"], r["acquired_at"], r["complete"]) == (2 * PIXEL_SIZE_PM, 123.5,
                                                                     False)
    pred = np.column_stack([r["atoms"]["x"], r["atoms"]["y"]])
    d = np.linalg.norm(pred[:, None] - true_xy[None], axis=2)
    assert r["n_atoms"] >= 6 and np.median(d.min(axis=0)) < 1.0


def test_a_frame_scanned_down_its_columns_gives_the_atoms_of_its_transpose(lossless):
    """fast_scan "y": the service turns the frame for the members and the atoms back; the result
    is that of the transposed frame sent as usual, with x and y swapped, and says fast_scan."""
    img, true_xy = gaussian_blobs((64, 80), n=10, seed=4)
    lossless.sender.send(np.ascontiguousarray(img.T), 0, "columns-usual")
    lossless.sender.send(img, 0, "columns-y", fast_scan="y")
    (usual, turned), _ = lossless.results(2)
    assert (usual["fast_scan"], turned["fast_scan"]) == ("x", "y")
    assert turned["frame_shape"] == [64, 80] and turned["n_atoms"] == usual["n_atoms"] > 0
    np.testing.assert_array_equal(turned["atoms"]["x"], usual["atoms"]["y"])
    np.testing.assert_array_equal(turned["atoms"]["y"], usual["atoms"]["x"])
    pred = np.column_stack([turned["atoms"]["x"], turned["atoms"]["y"]])
    assert np.median(np.linalg.norm(pred[:, None] - true_xy[None], axis=2).min(axis=0)) < 1.0


def test_deselect_mid_stream_applies_from_one_frame_on(lossless):
    lossless.send(range(10), acquisition="desel")
    first, events = lossless.results(1)         # one frame surely ran with every member (was a
    reply = lossless.ctl.call("deselect", members=[1])      # race: a slow first frame could
    assert reply["ok"] and reply["active"] == [0, 2]        # see the deselect already)
    lossless.send(range(10, 20), acquisition="desel")
    rest, later = lossless.results(19)
    results, events = first + rest, events + later
    versions = [r["active_version"] for r in results]
    assert versions == sorted(versions) and len(set(versions)) == 2  # one switch, at a frame
    for r in results:
        if r["active_version"] == reply["active_version"]:
            assert r["active"] == [0, 2]
        else:
            assert r["active"] == [0, 1, 2]
    assert all(r["active_version"] == reply["active_version"] for r in results[10:])
    assert any(e["event"] == "subset_changed" and e["active"] == [0, 2] for e in events)
    assert lossless.ctl.call("reset")["active"] == [0, 1, 2]


MALFORMED = {  # name: (parts builder, expected code, frame_id named in the event)
    "bad msgpack": (lambda: [b"\xc1\x00", b""], "bad_msgpack", None),
    "wrong part count": (lambda: [msgpack.packb({"protocol": 1, "frame_id": 5})], "bad_parts", 5),
    "wrong shape": (lambda: _frame_parts(6, shape=[8, 8, 8]), "bad_shape", 6),
    "wrong dtype": (lambda: _frame_parts(7, dtype="int16"), "bad_dtype", 7),
    "size mismatch": (lambda: [_frame_parts(8)[0], b"\0" * 10], "size_mismatch", 8),
    "unknown fast scan": (lambda: _frame_parts(12, fast_scan="diagonal"), "bad_header", 12),
    "NaN": (lambda: wire.encode_frame(np.full((32, 32), np.nan, np.float32), 9, "bad"),
            "non_finite", 9),
    "oversized": (lambda: wire.encode_frame(np.zeros((300, 300), np.uint8), 10, "bad"),
                  "too_large", 10),
    "too small for the model": (lambda: wire.encode_frame(np.zeros((4, 4), np.uint8), 11, "bad"),
                                "bad_frame", 11),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frame_is_reported_and_the_service_goes_on(lossless, name):
    build, code, fid = MALFORMED[name]
    lossless.sender.send_parts(build())
    lossless.send([100], acquisition="after-" + code)
    msgs = lossless.collect(lambda ms: any(m["topic"] == "result" for m in ms))
    rejected = [m for m in msgs if m.get("event") == "frame_rejected"]
    assert len(rejected) == 1, name
    assert rejected[0]["code"] == code and rejected[0]["message"]
    assert rejected[0]["frame"]["frame_id"] == fid


def _frame_parts(fid, **kw):
    h = {"protocol": 1, "frame_id": fid, "acquisition": "bad", "shape": [8, 8],
         "dtype": "uint8", **kw}
    return [msgpack.packb(h), b"\0" * 64]


@pytest.mark.parametrize("request_,code", [
    ({"cmd": "fly"}, "unknown_command"),
    ({"members": [1]}, "missing_field"),
    ({"cmd": "deselect", "members": "one"}, "bad_args"),
    ({"cmd": "deselect", "members": [1], "force": True}, "bad_args"),
    ({"cmd": "deselect", "members": [0, 1, 2]}, "empty_set"),
    ({"cmd": "set_active", "members": []}, "empty_set"),
    ({"cmd": "select", "members": [7]}, "unknown_member"),
    ({"cmd": "set_params", "threshold": 2.0}, "bad_params"),
    ({"cmd": "set_params", "min_blob_px": 50, "max_blob_px": 10}, "bad_params"),
    ({"cmd": "load_model", "path": "/etc"}, "model_error"),
])
def test_malformed_command_gets_an_error_reply_and_changes_nothing(lossless, request_, code):
    before = lossless.ctl.call("status")
    lossless.ctl.socket.send_multipart(wire.encode_request({**request_, "id": 77}))
    reply = lossless.ctl.recv_raw(TIMEOUT_S)
    assert reply["ok"] is False and reply["id"] == 77
    assert reply["error"]["code"] == code and reply["error"]["message"]
    after = lossless.ctl.call("status")
    for key in ("active", "active_version", "params", "model"):
        assert after[key] == before[key]


@pytest.mark.parametrize("body", [[b"\xc1"], [msgpack.packb([1, 2])], [b"a", b"b"]])
def test_undecodable_command_gets_an_error_reply(lossless, body):
    lossless.ctl.send_raw([b"", *body])
    reply = lossless.ctl.recv_raw(TIMEOUT_S)
    assert reply["ok"] is False and reply["error"]["code"] in ("bad_msgpack", "bad_header",
                                                               "bad_parts")
    assert lossless.ctl.call("ping")["ok"]


def test_load_model_mid_stream_loses_no_frame(lossless, models):
    loaded = threading.Event()
    sent = []

    def stream():  # frames keep flowing until 10 after the load's reply
        after = 0
        while after < 10 and len(sent) < 5000:
            lossless.send([len(sent)], acquisition="swap")
            sent.append(len(sent))
            after += loaded.is_set()

    sender = threading.Thread(target=stream)
    sender.start()
    reply = lossless.ctl.call("load_model", path=str(models["tiny4"]), timeout_s=120)
    loaded.set()
    sender.join(TIMEOUT_S)
    assert reply["ok"], reply
    assert reply["model"]["name"] == "tiny4" and reply["members"] == [0, 1, 2, 3]
    msgs = lossless.collect(lambda ms: sum(m["topic"] == "result" for m in ms) >= len(sent)
                            and any(m.get("event") == "model_loaded" for m in ms))
    results = [m for m in msgs if m["topic"] == "result"]
    assert [r["frame_id"] for r in results] == sent  # every frame, once, in order
    names = [r["model"]["name"] for r in results]
    assert names[-1] == "tiny4"
    assert names == sorted(names, key=lambda s: s == "tiny4")  # one switch, at a frame boundary
    assert all(len(r["count_per_member"]) == (4 if r["model"]["name"] == "tiny4" else 3)
               for r in results)
    assert results[names.index("tiny4")]["seq"] == reply["from_frame_seq"]
    back = lossless.ctl.call("load_model", path="tiny", timeout_s=120)  # relative to allowed dir
    assert back["ok"] and back["model"]["name"] == "tiny"


def test_metrics_endpoint_reports_the_counts(lossless):
    status = lossless.ctl.call("status")
    text = urllib.request.urlopen(lossless.proc.endpoints["metrics"], timeout=10).read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    c = status["counts"]
    assert values["elit_frames_received_total"] >= c["received"] > 0
    assert values["elit_frames_processed_total"] >= c["processed"] > 0
    assert values['elit_frames_rejected_total{reason="non_finite"}'] >= 1
    assert values["elit_active_members"] >= 1
    assert 'elit_stage_seconds_bucket{le="0.5",stage="infer"}' in values
    assert any(k.startswith("elit_model_info{") for k in values)


# ---------------------------------------------------------------- own services
@pytest.mark.slow
def test_latest_mode_reports_every_skipped_frame(models):
    with Session(models, "--delivery", "latest", env={"ELIT_DELIVERY__INGEST_HWM": "1000"}) as s:
        # A large first frame keeps the service busy while the small ones queue up; the last
        # frame is NaN, so the newest *valid* frame (49) must be the one processed.
        s.sender.send(gaussian_blobs((1024, 1024), n=200, seed=0)[0], 0, "late")
        s.send(range(1, 50), acquisition="late")
        s.sender.send(np.full((64, 64), np.nan, np.float32), 50, "late")
        seen: dict[int, str] = {}

        def done(msgs):
            for m in msgs[done.n:]:
                refs = {"result": [m.get("frame_id")],
                        "event.frame_dropped": [f["frame_id"] for f in m.get("frames", [])],
                        "event.frame_rejected": [m.get("frame", {}).get("frame_id")]}
                for fid in refs.get(m["topic"], []):
                    assert fid not in seen, f"frame {fid} answered twice"
                    seen[fid] = m["topic"].split("_")[-1]
            done.n = len(msgs)
            return len(seen) == 51
        done.n = 0
        s.collect(done)
        assert sorted(seen) == list(range(51))  # every frame answered or reported, once
        assert seen[50] == "rejected" and seen[49] == "result"
        assert "dropped" in seen.values()
        c = s.ctl.call("status")["counts"]
        assert c["dropped"] == list(seen.values()).count("dropped")
        assert c["processed"] + c["dropped"] + c["rejected"] == c["received"] == 51


@pytest.mark.slow
def test_sigterm_publishes_stop_with_counts_and_exits_zero(models):
    with Session(models) as s:
        s.sender.send_parts([b"junk", b""])
        s.send(range(5), acquisition="term")
        s.results(5)  # in order: the junk frame was taken first
        assert s.proc.terminate(TIMEOUT_S) == 0
        stop = next(m for m in s.collect(lambda ms: any(m.get("event") == "stop" for m in ms))
                    if m.get("event") == "stop")
        assert stop["exit_status"] == "success" and stop["reason"] == "SIGTERM"
        assert stop["counts"] == {"received": 6, "processed": 5, "dropped": 0, "rejected": 1}


@pytest.mark.slow
def test_shutdown_command_stops_the_service(models):
    with Session(models) as s:
        assert s.ctl.call("shutdown")["ok"]
        assert s.proc.wait(TIMEOUT_S) == 0


def test_maps_only_when_asked(lossless):
    with ResultSubscriber(lossless.proc.endpoints["results"], topics=(), maps=True) as maps:
        lossless.ctl.call("set_maps", downsample=2)
        for attempt in range(50):  # the maps subscription reaches the service asynchronously
            lossless.send([attempt], acquisition="maps")
            msg = maps.recv(0.2)
            if msg is not None:
                break
        assert msg is not None and msg["topic"] == "maps"
        check_against_the_spec(msg)
        c, h, w = msg["shape"]
        assert msg["mean"].shape == (c, h, w) == (2, 32, 32) and msg["mean"].dtype == np.float16
        assert msg["frame_px_per_map_px"] == 2.0
        assert math.isfinite(float(msg["std"].max()))
    lossless.ctl.call("set_maps", downsample=1)
    lossless.results(1, timeout_s=TIMEOUT_S)  # drain what the loop above produced


def test_frame_id_gap_within_an_acquisition_is_an_event(lossless):
    lossless.send([0, 1, 4], acquisition="gappy")
    # Count only this acquisition's results: an earlier test may leave results unread.
    msgs = lossless.collect(lambda ms: sum(m["topic"] == "result"
                                           and m["acquisition"] == "gappy" for m in ms) >= 3)
    gaps = [m for m in msgs if m.get("event") == "frame_gap"]
    assert [(g["acquisition"], g["expected"], g["got"]) for g in gaps] == [("gappy", 2, 4)]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=3)
       | st.tuples(st.dictionaries(st.sampled_from(["protocol", "frame_id", "acquisition",
                                                    "shape", "dtype", "junk"]),
                                   st.integers(-1, 3) | st.text(max_size=3)
                                   | st.lists(st.integers(0, 4), max_size=3)),
                   st.binary(max_size=40)).map(lambda t: [msgpack.packb(t[0]), t[1]]))
def test_arbitrary_messages_on_the_live_socket_are_each_reported(lossless, parts):
    lossless.sender.send_parts(parts)
    lossless.send([0], acquisition="after-fuzz")
    msgs = lossless.collect(lambda ms: any(m["topic"] == "result" for m in ms))
    assert len([m for m in msgs if m.get("event") == "frame_rejected"]) == 1


# ---------------------------------------------------------------- detection quality
DEFAULT_MODEL = REPO / "models" / "default"
# Matching radius: half the graphene C-C distance (142 pm). A prediction within it is closer to
# its atom than to any neighbour, so one-to-one matching cannot pair it with the wrong atom.
MATCH_FRACTION_OF_BOND = 0.5
# Thresholds (see the test's docstring for why these numbers).
MIN_PRECISION, MIN_RECALL = 0.90, 0.95


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_MODEL / "manifest.json").is_file(),
                    reason="models/default (the shipped ensemble) does not exist yet; "
                           "train it with elit-train (trainer issue)")
def test_detection_precision_recall_on_a_synthetic_movie():
    """A movie with known atoms, drift and a growing hole, replayed through the real service.

    Measured with the shipped 8-member ensemble (movie seeds 11 and 3, 6 frames of 256 px at the
    model's pixel size): recall 1.000, precision 0.943 / 0.938. Two thirds of the false positives
    (113 of 171) lie within the match radius of the frame border: atoms whose centres are just
    outside the frame, half visible, which the ground truth does not count (it keeps atoms with
    centres inside the frame). So a perfect model scores about 0.96 here; the remaining ~2 % are
    detections on the hole's rim and doubles. Thresholds: recall >= 0.95 (every interior atom is
    clearly visible at this dose: losing 5 % means a real regression), precision >= 0.90 (room
    for the border effect plus twice today's interior false positives, no more).
    """
    from elit_stream.core.artifact import load_artifact
    from elit_stream.tools.movie import CC_BOND_PM, make_movie, match_atoms
    from elit_stream.tools.replay import replay

    art = load_artifact(DEFAULT_MODEL, check_probe=False)
    mov = make_movie(n_frames=6, size_px=256, seed=11, pixel_size_pm=art.pixel_size_pm)
    with ServiceProcess(["--model", str(DEFAULT_MODEL)], timeout_s=120) as sp:
        rep = replay(mov.frames, sp.endpoints, acquisition="quality",
                     pixel_size_pm=mov.pixel_size_pm, wait_s=120)
    assert rep.complete and len(rep.results) == len(mov.frames)
    radius_px = MATCH_FRACTION_OF_BOND * CC_BOND_PM / mov.pixel_size_pm
    tp = fp = fn = 0
    for fid, r in rep.results.items():
        t, f, n = match_atoms(np.column_stack([r["atoms"]["x"], r["atoms"]["y"]]),
                              mov.xy[fid], radius_px)
        tp, fp, fn = tp + t, fp + f, fn + n
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    print(f"precision {precision:.3f} recall {recall:.3f} (tp {tp} fp {fp} fn {fn})")
    assert precision >= MIN_PRECISION and recall >= MIN_RECALL


def test_a_plain_req_socket_can_talk_to_control(lossless):
    import zmq
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(lossless.proc.endpoints["control"])
    try:
        req.send(msgpack.packb({"cmd": "status", "id": 1}))
        assert req.poll(int(TIMEOUT_S * 1000))
        reply = msgpack.unpackb(req.recv())
        assert reply["ok"] and reply["id"] == 1 and reply["model"]["name"] in ("tiny", "tiny4")
    finally:
        req.close()
