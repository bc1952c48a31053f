"""The operator's live view (`elit-stream view`): units, its security rules, the opt-in
`member_maps` topic, and a real Chromium driving the page against the real service.

The browser test needs Debian's `chromium` (scripts/test.sh installs it as root) and Playwright
for Python (the `test` extra; no `playwright install`: the system Chromium is launched). It
skips with the reason when either is missing. No timed assertions: timeouts only keep a broken
run from hanging.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from elit_stream.protocol import wire
from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber
from elit_stream.tools.launcher import ServiceProcess
from tests.fixtures.tiny_artifact import build_tiny_artifact, gaussian_blobs

aiohttp = pytest.importorskip("aiohttp", reason="the `view` extra (aiohttp) is not installed")

from elit_stream.tools.view import render
from elit_stream.tools.view.link import ActionError, check_action
from elit_stream.tools.view.server import View, ViewConfigError, ViewOptions, check_options
from elit_stream.tools.view.state import Health

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_S = 60.0


# ------------------------------------------------------------------ units
def test_render_images_uses_the_active_members_only():
    atom = np.zeros((3, 8, 8), np.float16)
    atom[2] = 1.0                                    # member 2 disagrees everywhere
    mm = {"frame_id": 4, "acquisition": "a", "active": [0, 1], "active_version": 1,
          "frame_px_per_map_px": 2.0, "image": np.linspace(0, 1, 64).reshape(8, 8),
          "atom": atom}
    out = render.images(mm, unc_max=0.25, max_px=4, thumb_px=2)
    assert out["unc_frame_max"] == 0.0               # 0 and 1 agree; 2 is not active
    assert (out["image"]["w"], out["image"]["h"]) == (4, 4) and out["frame_px_per_px"] == 4.0
    assert len(out["members"]) == 3 and out["members"][2]["w"] == 2
    mm["active"] = [0, 2]
    assert render.images(mm, 0.25)["unc_frame_max"] == 0.5


def test_result_summary_caps_atoms_and_keeps_member_figures():
    atoms = {"x": np.arange(5, dtype=np.float32), "y": np.arange(5, dtype=np.float32),
             "cls": np.array([0, 1, 0, 1, 0], np.uint8),
             "uncertainty": np.full(5, 0.123456, np.float32)}
    msg = {"frame_id": 1, "acquisition": "a", "seq": 7, "n_atoms": 5, "atoms": atoms,
           "count_per_member": [5, 6], "disagreement_per_member": [0.01, 0.5]}
    out = render.result_summary(msg, max_atoms=3)
    assert out["atoms_shown"] == 3 and out["atoms"]["cls"] == [0, 1, 0]
    assert out["atoms"]["u"] == [0.1235] * 3 and out["count_per_member"] == [5, 6]
    assert out["unconfirmed"] == 0                   # older results carry no such field
    assert render.result_summary({**msg, "unconfirmed": 4})["unconfirmed"] == 4
    spread = {**atoms, "spread": np.full(5, 0.0456, np.float32)}      # colours: the spread
    assert render.result_summary({**msg, "atoms": spread})["atoms"]["u"] == [0.0456] * 5


def test_result_line_says_how_many_atoms_were_left_unconfirmed():
    from elit_stream.tools.replay import result_line

    msg = {"frame_id": 3, "n_atoms": 12, "mean_uncertainty": 0.2, "active_version": 0,
           "active": [0, 1], "count_per_member": [12, 30],
           "timings_ms": {"total": 5.0, "infer": 4.0}}
    assert "atoms   12  mean" in result_line(msg)
    assert "atoms   12 (+7 unconfirmed)  mean" in result_line({**msg, "unconfirmed": 7})


def test_health_turns_cumulative_counts_into_rates():
    h = Health()
    h.add_result({"infer": 10.0, "total": 12.0}, now=100.2)
    h.add_result({"infer": 20.0, "total": 22.0}, now=100.7)
    h.add_status({"queue_depth": 0, "counts": {"dropped": 3, "rejected": 1}}, now=100.9)
    h.add_status({"queue_depth": 2, "counts": {"dropped": 7, "rejected": 1}}, now=101.1)
    s = h.series()
    assert s["fps"] == [2, 0] and s["infer"] == [15.0, None]
    assert s["dropped"] == [None, 4] and s["rejected"] == [None, 0]
    assert s["dropped_total"] == 7 and s["queue_depth"] == [0, 2]


@pytest.mark.parametrize("req", [{"cmd": "shutdown"}, {"cmd": "set_maps", "mode": "always"},
                                 {"cmd": "deselect", "members": [1], "path": "x"},
                                 {"cmd": "set_params", "maps": 1}])
def test_the_page_can_only_send_operator_actions(req):
    with pytest.raises(ActionError):
        check_action(req)


def test_actions_pass_through_unchanged():
    assert check_action({"type": "action", "id": 3, "cmd": "deselect", "members": [0]}) == \
        ("deselect", {"members": [0]})


def test_beyond_loopback_needs_a_token():
    with pytest.raises(ViewConfigError, match="token"):
        check_options(ViewOptions(host="0.0.0.0"))
    check_options(ViewOptions(host="0.0.0.0", token="s3cret"))
    check_options(ViewOptions(host="::1"))


def test_cli_refuses_to_serve_beyond_loopback_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "ELIT_VIEW_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "elit_stream.tools.cli", "view", "--host",
                           "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, check=False)
    assert proc.returncode == 2 and "access token" in proc.stderr and "Traceback" not in \
        proc.stderr


def test_token_and_origin_are_checked():
    async def go():
        from aiohttp.test_utils import TestClient, TestServer
        view = View(ViewOptions(results="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1",
                                token="s3cret", models_dirs=[]))
        async with TestClient(TestServer(view.app)) as client:
            assert (await client.get("/")).status == 403
            assert (await client.get("/?token=wrong")).status == 403
            assert (await client.get("/?token=s3cret")).status == 200
            assert (await client.get("/static/view.js")).status == 200
            bad = await client.get("/ws?token=s3cret", headers={
                "Origin": "http://evil.example", "Upgrade": "websocket",
                "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
            assert bad.status == 403
            ws = await client.ws_connect("/ws?token=s3cret")
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
            await ws.close()
    asyncio.run(go())


def test_a_stalled_page_neither_blocks_other_pages_nor_queues():
    """One page never reads; the other still gets the newest frame, and the view keeps only
    the latest value per panel (the stalled page's sender waits on one message, no backlog)."""
    async def go():
        from aiohttp.test_utils import TestClient, TestServer
        view = View(ViewOptions(results="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1",
                                models_dirs=[], fps=50.0))
        async with TestClient(TestServer(view.app)) as client:
            stalled = _stalled_page(client.host, client.port)
            ws = await client.ws_connect("/ws")
            while view.state.browsers < 2:
                await asyncio.sleep(0.01)
            blob = "x" * 200_000                      # ~ one frame's images
            for i in range(100):
                view.state.set("images", {"frame_id": i, "blob": blob})
                await asyncio.sleep(0.005)
            got = []
            while not got or got[-1] != 99:
                msg = await ws.receive_json(timeout=30)
                if msg["type"] == "images":
                    got.append(msg["frame_id"])
            assert view.state.browsers == 2           # the stalled page is still connected
            assert got == sorted(got) and len(got) <= 100
            stalled.close()
            await ws.close()
    asyncio.run(go())


def test_a_page_that_reads_nothing_is_dropped(monkeypatch):
    from elit_stream.tools.view import server
    monkeypatch.setattr(server, "SEND_TIMEOUT_S", 0.5)

    async def go():
        from aiohttp.test_utils import TestClient, TestServer
        view = View(ViewOptions(results="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1",
                                models_dirs=[], fps=50.0))
        async with TestClient(TestServer(view.app)) as client:
            stalled = _stalled_page(client.host, client.port)
            while view.state.browsers < 1:
                await asyncio.sleep(0.01)
            assert view.link.maps_subscribed
            for i in range(1000):
                if view.state.browsers == 0:
                    break
                view.state.set("images", {"frame_id": i, "blob": "x" * 200_000})
                await asyncio.sleep(0.02)
            assert view.state.browsers == 0 and not view.link.maps_subscribed
            stalled.close()
    asyncio.run(go())


def _stalled_page(host: str, port: int):
    """A websocket opened by hand that never reads (small receive buffer)."""
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, port))
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    return s


def test_an_unreadable_message_is_reported_and_the_view_goes_on():
    """A publisher that sends garbage and then a good result: the page is told, and still
    gets the result (bad input: a clear message, never a dead view)."""
    import zmq

    async def go():
        from aiohttp.test_utils import TestClient, TestServer
        pub = zmq.Context.instance().socket(zmq.PUB)
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        view = View(ViewOptions(results=f"tcp://127.0.0.1:{port}", control="tcp://127.0.0.1:1",
                                models_dirs=[]))
        good = wire.encode_result({"protocol": 1, "kind": "result", "frame_id": 5,
                                   "acquisition": "a", "n_atoms": 0},
                                  {"x": np.zeros(0, np.float32)})
        try:
            async with TestClient(TestServer(view.app)) as client:
                ws = await client.ws_connect("/ws")
                got, events = None, []
                for _ in range(400):                       # until the subscription is live
                    pub.send_multipart([b"result", b"\xc1not msgpack"])
                    pub.send_multipart(good)
                    await asyncio.sleep(0.05)
                    if view.state.slots["result"].value and view.state.events.items:
                        break
                while got is None or not events:
                    msg = await ws.receive_json(timeout=TIMEOUT_S)
                    got = msg if msg["type"] == "result" else got
                    events = msg["events"] if msg["type"] == "events" else events
                assert got["frame_id"] == 5
                assert events[0]["event"] == "unreadable" and "bad_msgpack" in events[0]["text"]
                await ws.close()
        finally:
            pub.close(0)
    asyncio.run(go())


# ------------------------------------------------------------------ the opt-in topic
def test_member_maps_roundtrip_through_the_wire():
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    atom = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    parts = wire.encode_member_maps({"kind": "member_maps", "shape": [2, 3, 4]}, image, atom)
    msg = wire.decode_published([bytes(memoryview(p)) for p in parts])
    assert msg["topic"] == "member_maps" and msg["image"].shape == (3, 4)
    np.testing.assert_allclose(msg["atom"], atom.astype(np.float16))
    with pytest.raises(wire.ProtocolError):
        wire.decode_published(parts[:3])


@pytest.mark.slow
def test_service_publishes_member_maps_only_to_a_subscriber(tmp_path):
    art = build_tiny_artifact(tmp_path, n_members=3, name="tiny")
    frame = gaussian_blobs((64, 64), seed=1)[0]
    with ServiceProcess(["--model", str(art), "--threads", "1"]) as svc:
        ep = svc.endpoints
        with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
                FrameSender(ep["ingest"]) as sender, \
                ResultSubscriber(ep["results"], topics=("",)) as everything:
            everything.wait_ready(ctl)       # "" (everything) does not ask for member_maps
            sender.send(frame, 0, "mm", timeout_s=TIMEOUT_S)
            assert _topics(everything, ctl) == ["result"]
            with ResultSubscriber(ep["results"], topics=("member_maps",)) as mm:
                mm.wait_ready(ctl)
                ctl.call("set_maps", downsample=2)
                sender.send(frame, 1, "mm", timeout_s=TIMEOUT_S)
                msg = _next_member_maps(mm)
                big, fid = msg, 2              # at most 10 per s: resend until one comes
                while big["frame_id"] < 2:
                    sender.send(gaussian_blobs((600, 600), seed=2)[0], fid, "mm",
                                timeout_s=TIMEOUT_S)
                    fid += 1
                    got = mm.recv(0.5)
                    big = got if got is not None and got["topic"] == "member_maps" else big
                    assert fid < 200, "no member_maps for the larger frames"
                # capped: maps at most 192 px, image at most 512 px
                assert big["shape"] == [3, 200, 200] and big["frame_px_per_map_px"] == 3.0
                assert big["image_shape"] == [300, 300] and big["frame_px_per_image_px"] == 2.0
                assert big["atom"].max() <= 2.0
            assert msg is not None, svc.log_tail()
            assert msg["shape"] == [3, 32, 32] and msg["image"].shape == (32, 32)
            assert msg["active"] == [0, 1, 2] and msg["frame_px_per_map_px"] == 2.0
            assert msg["frame_px_per_image_px"] == 2.0 and msg["image_shape"] == [32, 32]
            assert 0.0 <= float(msg["atom"].min()) and float(msg["atom"].max()) <= 2.0
            topics = _topics(everything, ctl)
            assert topics[:2] == ["result", "member_maps"] and "maps" not in topics, topics


def _next_member_maps(sub: ResultSubscriber) -> dict:
    msg = sub.recv(TIMEOUT_S)
    while msg is not None and msg["topic"] != "member_maps":
        msg = sub.recv(TIMEOUT_S)
    assert msg is not None, "no member_maps"
    return msg


def _topics(sub: ResultSubscriber, ctl: ControlClient) -> list[str]:
    """Topics (events left out) up to the next result and then up to a ping sent after it: the
    loop answers the ping after the frame in hand, so all that the frame published comes first."""
    topics: list[str] = []
    while "result" not in topics:
        msg = sub.recv(TIMEOUT_S)
        assert msg is not None, "no result"
        if not msg["topic"].startswith("event."):
            topics.append(msg["topic"])
    ctl.call("ping", token="fence")
    while (msg := sub.recv(TIMEOUT_S)) is not None and msg.get("token") != "fence":
        if not msg["topic"].startswith("event."):
            topics.append(msg["topic"])
    assert msg is not None, "no ping event"
    return topics


@pytest.mark.slow
def test_page_actions_reach_a_curve_service_with_the_views_keys(tmp_path):
    """The view against the real service with CURVE on every socket: status, a threshold, a
    model load and a refused action travel with the view's key pair; events reach the log."""
    from elit_stream.protocol.auth import ClientCurve, create_keys
    keys = tmp_path / "keys"
    create_keys(keys, ["operator"])
    curve = ClientCurve.from_files(keys / "clients" / "operator.key_secret", keys / "server.key")
    root = tmp_path / "models"
    tiny = build_tiny_artifact(root, n_members=3, name="tiny")
    build_tiny_artifact(root, n_members=4, seed=1, name="tiny4")
    with ServiceProcess(["--model", str(tiny), "--threads", "1", "--allowed-dir", str(root),
                         "--auth", "all", "--keys", str(keys)]) as svc:
        opts = ViewOptions(results=svc.endpoints["results"], control=svc.endpoints["control"],
                           curve=curve, models_dirs=[root])
        replies, status, events = asyncio.run(_act_through_the_page(opts))
    assert status["ok"] and status["models"] == ["tiny", "tiny4"], status
    assert replies["set_params"]["ok"] and replies["set_params"]["params"]["threshold"] == 0.4
    assert replies["load_model"]["ok"] and replies["load_model"]["members"] == [0, 1, 2, 3]
    assert replies["deselect"]["error"]["code"] == "unknown_member"
    shown = {e["event"] for e in events}
    assert {"params_changed", "model_loaded", "subset_changed", "set_params", "deselect"} <= shown
    refused = next(e for e in events if e["event"] == "deselect")
    assert "refused: unknown_member" in refused["text"]


async def _act_through_the_page(opts: ViewOptions):
    from aiohttp.test_utils import TestClient, TestServer
    view = View(opts)
    replies, status, events = {}, None, []
    async with TestClient(TestServer(view.app)) as client:
        ws = await client.ws_connect("/ws")
        actions = [{"cmd": "set_params", "threshold": 0.4},
                   {"cmd": "load_model", "path": "tiny4"},
                   {"cmd": "deselect", "members": [9]}]
        deadline = time.monotonic() + 3 * TIMEOUT_S
        wanted = {"params_changed", "model_loaded", "subset_changed", "set_params", "deselect"}
        while time.monotonic() < deadline and (len(replies) < 3 or status is None or
                                               not wanted <= {e["event"] for e in events}):
            if actions and (status or {}).get("ok"):
                await ws.send_json({"type": "action", "id": 1, **actions.pop(0)})
            msg = await ws.receive_json(timeout=TIMEOUT_S)
            if msg["type"] == "reply":
                replies[msg["cmd"]] = msg["reply"]
            elif msg["type"] == "status":
                status = msg
            elif msg["type"] == "events":
                events = msg["events"]
        await ws.close()
    return replies, status, events


# ------------------------------------------------------------------ the page in Chromium
def _playwright():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (scripts/test.sh installs Debian's chromium as root)")
    return pytest.importorskip("playwright.sync_api",
                               reason="playwright for Python is not installed (test extra)")


def _start_view(ep: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    with open(log_path, "w") as log:               # the child keeps its own copy of the fd
        proc = subprocess.Popen(
            [sys.executable, "-m", "elit_stream.tools.cli", "view", "--results", ep["results"],
             "--control", ep["control"], "--port", "0", "--models", str(REPO / "models")],
            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    if not line.startswith("{"):
        proc.kill()
        raise AssertionError(f"the view did not start:\n{log_path.read_text()}")
    return proc, json.loads(line)["url"]


@pytest.mark.slow
def test_operator_deselects_member_0_in_a_real_browser(tmp_path):
    sync_api = _playwright()
    from elit_stream.tools.movie import make_movie, save_movie
    movie = save_movie(make_movie(n_frames=120, size_px=256, seed=3), tmp_path / "movie.npz")
    procs: list[subprocess.Popen] = []
    with ServiceProcess(["--threads", "1"], log_path=tmp_path / "serve.log") as svc:
        ep = svc.endpoints
        try:
            view, url = _start_view(ep, tmp_path / "view.log")
            procs.append(view)
            with open(tmp_path / "replay.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "elit_stream.tools.cli", "replay", str(movie),
                     "--rate", "3", "--quiet", "--ingest", ep["ingest"], "--results",
                     ep["results"], "--control", ep["control"]], stdout=subprocess.DEVNULL,
                    stderr=log))
            _drive_the_page(sync_api, url, ep, tmp_path)
        finally:
            for p in procs:
                p.kill()
                p.wait(10)


def _drive_the_page(sync_api, url: str, ep: dict, out: Path) -> None:
    timeout_ms = TIMEOUT_S * 1000
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=[
            "--no-sandbox", "--disable-background-networking", "--disable-component-update",
            "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url)
            page.wait_for_function("/^\\d+$/.test(document.getElementById('frame-counter')"
                                   ".textContent)", timeout=timeout_ms)
            first = int(page.text_content("#frame-counter"))
            page.wait_for_function(f"Number(document.getElementById('frame-counter')"
                                   f".textContent) > {first}", timeout=timeout_ms)
            page.wait_for_function("Number(document.getElementById('frame').dataset.atomsDrawn)"
                                   " > 0", timeout=timeout_ms)
            page.click("#member-0 button:has-text('deselect')", timeout=timeout_ms)
            page.wait_for_selector("#reply.ok:has-text('deselect: ok')", timeout=timeout_ms)
            _member_0_has_left(ep)
            page.wait_for_selector("#member-0.inactive", timeout=timeout_ms)
            page.wait_for_function("document.querySelector('#events li.subset') !== null",
                                   timeout=timeout_ms)
            time.sleep(2.0)                  # a few more frames on screen for the picture
            page.screenshot(path=str(out / "view.png"), full_page=True)
            if os.environ.get("ELIT_VIEW_SCREENSHOT"):        # docs/img/view.png: 256 colours
                from PIL import Image
                Image.open(out / "view.png").convert("RGB").quantize(256).save(
                    os.environ["ELIT_VIEW_SCREENSHOT"], optimize=True)
        finally:
            browser.close()


def _member_0_has_left(ep: dict) -> None:
    """Through the control socket: 0 is not active; a later result does not count it."""
    with ControlClient(ep["control"], timeout_s=TIMEOUT_S) as ctl, \
            ResultSubscriber(ep["results"], topics=("result",)) as sub:
        status = ctl.call("status")
        assert status["ok"] and 0 not in status["active"], status
        # A frame already being inferred when the deselect arrived keeps its snapshot: the
        # change applies from the next result seq (docs/protocol.md, from_frame_seq).
        from_seq = status["counts"]["processed"] + (status["in_flight"] is not None)
        sub.wait_ready(ctl)
        msg = sub.recv(TIMEOUT_S)
        while msg is not None and (msg["topic"] != "result" or msg["seq"] < from_seq):
            msg = sub.recv(TIMEOUT_S)
        assert msg is not None, "no result after the deselect"
        assert msg["active_version"] >= status["active_version"] and 0 not in msg["active"]
