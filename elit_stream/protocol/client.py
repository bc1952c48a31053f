"""A small client for microscope software: send frames, subscribe to results, send commands.

    from elit_stream.client import FrameSender, ResultSubscriber, ControlClient
    sender = FrameSender("tcp://127.0.0.1:5555")
    results = ResultSubscriber("tcp://127.0.0.1:5556")
    sender.send(frame, frame_id=0, acquisition="scan-42", pixel_size_pm=14.1)
    msg = results.recv(timeout_s=5)          # {"topic": "result", "frame_id": 0, "atoms": {...}}
    while msg is not None and msg["topic"] != "result":   # or an event: "event.ping", ...
        msg = results.recv(timeout_s=5)
    ControlClient("tcp://127.0.0.1:5557").call("deselect", members=[3])

With CURVE authentication (docs/service.md, Security), pass the same `curve` to every client:

    from elit_stream.client import ClientCurve
    curve = ClientCurve.from_files("keys/clients/scope.key_secret", "keys/server.key")
    sender = FrameSender("tcp://gpu-workstation:5555", curve=curve)

Depends on pyzmq, msgpack and numpy only (through `wire`); see docs/protocol.md.
"""
from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import zmq

from elit_stream.protocol import wire
from elit_stream.protocol.auth import ClientCurve


class ControlError(RuntimeError):
    """A control command was refused; `code` and `message` come from the reply."""

    def __init__(self, reply: dict):
        err = reply.get("error") or {}
        self.code, self.message, self.reply = err.get("code"), err.get("message"), reply
        super().__init__(f"{self.code}: {self.message}")


class _SocketClient:
    """Owns `self.socket`; closes it on `close()` or at the end of a `with` block."""

    socket: zmq.Socket

    def close(self) -> None:
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class FrameSender(_SocketClient):
    """PUSH frames to the service's ingest socket. `send` blocks while the service is behind
    (lossless back-pressure) unless `timeout_s` is given (then TimeoutError)."""

    def __init__(self, address: str = "tcp://127.0.0.1:5555", hwm: int = 4,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None):
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.LINGER, 2000)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(address)

    def send(self, frame: np.ndarray, frame_id: int, acquisition: str, *,
             pixel_size_pm: float | None = None, acquired_at: float | None = None,
             complete: bool = True, meta: dict | None = None, fast_scan: str | None = None,
             timeout_s: float | None = None, copy: bool = True) -> None:
        """Send one frame. `copy=False` sends large frames without a copy: then the array must
        not be modified until ZeroMQ has sent it (do not reuse the buffer at once).
        `fast_scan`: which way the fast scan runs in the stored frame, "x" (left to right
        along the rows, the usual; None sends no field), "-x", "y" (down the columns), "-y"
        (docs/protocol.md)."""
        parts = wire.encode_frame(frame, frame_id, acquisition, pixel_size_pm=pixel_size_pm,
                                  acquired_at=acquired_at, complete=complete, meta=meta,
                                  fast_scan=fast_scan)
        self.send_parts(parts, timeout_s, copy)

    def send_parts(self, parts: list, timeout_s: float | None = None, copy: bool = True) -> None:
        """Send raw parts (also malformed ones, for tests).

        With `timeout_s` the send never blocks past it: POLLOUT then a non-blocking send, again
        until the deadline if the peer vanished in between (a refused CURVE handshake drops the
        connection at any moment; a blocking send would then wait for ever)."""
        if timeout_s is None:
            self._send(parts, copy, 0)
            return
        deadline = time.monotonic() + timeout_s
        while (left_ms := int(1000 * (deadline - time.monotonic()))) > 0:
            if not self.socket.poll(left_ms, zmq.POLLOUT):
                break
            try:
                self._send(parts, copy, zmq.NOBLOCK)   # later parts follow the first atomically
                return
            except zmq.Again:
                continue
        raise TimeoutError(f"service did not take a frame within {timeout_s} s")

    def _send(self, parts: list, copy: bool, flags: int) -> None:
        if copy:
            self.socket.send_multipart(parts, flags=flags)
        else:
            wire.send(self.socket, parts, flags)


class ResultSubscriber(_SocketClient):
    """SUB to results and events (and maps if `maps=True`). Yields decoded dicts."""

    def __init__(self, address: str = "tcp://127.0.0.1:5556",
                 topics: tuple[str, ...] = ("result", "event."), maps: bool = False,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None):
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        for t in topics + (("maps",) if maps else ()):
            self.socket.setsockopt(zmq.SUBSCRIBE, t.encode())
        self.socket.connect(address)

    def recv(self, timeout_s: float | None = None) -> dict | None:
        """The next message as a dict, or None after `timeout_s` seconds without one."""
        if timeout_s is not None and not self.socket.poll(int(timeout_s * 1000)):
            return None
        return wire.decode_published(self.socket.recv_multipart(copy=False))

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.recv()

    def wait_ready(self, control: ControlClient, timeout_s: float = 10.0) -> None:
        """Block until this subscription is live (ZeroMQ drops messages published before a
        subscriber's subscription arrives). Pings with a token until its event comes back."""
        self.socket.setsockopt(zmq.SUBSCRIBE, b"event.ping")
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            control.call("ping", token=token)
            end = time.monotonic() + 0.2
            while (left := end - time.monotonic()) > 0:
                msg = self.recv(timeout_s=left)
                if msg and msg.get("event") == "ping" and msg.get("token") == token:
                    return
        raise TimeoutError(f"no subscription to the results socket within {timeout_s} s")


class ControlClient(_SocketClient):
    """DEALER client of the control socket: `call(cmd, **args) -> reply dict`.

    Raises TimeoutError when no reply arrives within `timeout_s`, and ControlError on
    `ok: false` if `check=True` (default False: the reply is returned as it is)."""

    def __init__(self, address: str = "tcp://127.0.0.1:5557", timeout_s: float = 10.0,
                 context: zmq.Context | None = None, curve: ClientCurve | None = None):
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.apply(self.socket)
        self.socket.connect(address)
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]

    def call(self, cmd: str, *, timeout_s: float | None = None, check: bool = False,
             **args: Any) -> dict:
        req_id = f"{self._prefix}-{next(self._ids)}"
        self.socket.send_multipart(wire.encode_request({"cmd": cmd, "id": req_id, **args}))
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        while (left := deadline - time.monotonic()) > 0:
            if not self.socket.poll(int(left * 1000) + 1):
                break
            reply = wire.decode_reply(self.socket.recv_multipart())
            if reply.get("id") == req_id:  # skip late replies to earlier, timed-out calls
                if check and not reply.get("ok"):
                    raise ControlError(reply)
                return reply
        raise TimeoutError(f"no reply to {cmd!r} within {timeout_s or self.timeout_s} s")

    def send_raw(self, parts: list) -> None:
        """Send raw parts (for tests of malformed requests); read with `recv_raw`."""
        self.socket.send_multipart(parts)

    def recv_raw(self, timeout_s: float = 5.0) -> dict:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply")
        return wire.decode_reply(self.socket.recv_multipart())


FINAL_EVENTS = ("frame_dropped", "frame_rejected")
RETRY_CODES = frozenset({"shutting_down"})   # a rejection that asks for the frame again


class LosslessSender:
    """Send frames and keep each until the service answers it; resend what is unanswered when
    the service restarts. The acknowledgement is the answer itself: a result, or a
    frame_rejected / frame_dropped event naming the frame (except `shutting_down`, which asks
    for the frame again).

    A restart is seen as a new `run_uid` on any event, or, after `silence_s` without a message
    while frames are unanswered, in the reply to a `status`. Then, once the subscription is
    known to reach the new run (a ping token comes back), every unanswered frame is sent again,
    in the order first sent; also when the same run is silent with nothing in hand. The service marks a result for a frame it has already
    answered in the same run `repeat: true`; `poll` returns every message: keep the first answer
    per (acquisition, frame id) — a later one for the same frame is counted in `repeats`. If this process dies, its unanswered frames are lost with it
    (docs/protocol.md, Delivery guarantees).

        with LosslessSender(endpoints) as ls:
            for i, frame in enumerate(frames):
                ls.send(frame, i, "scan-1", pixel_size_pm=14.1)
                while (msg := ls.poll(0)) is not None: ...
            ls.wait(timeout_s=60)
    """

    def __init__(self, endpoints: dict, *, curve: ClientCurve | None = None,
                 silence_s: float = 3.0, ping_timeout_s: float = 1.0,
                 context: zmq.Context | None = None):
        self.sender = FrameSender(endpoints["ingest"], context=context, curve=curve)
        self.sub = ResultSubscriber(endpoints["results"], context=context, curve=curve)
        self.ctl = ControlClient(endpoints["control"], timeout_s=ping_timeout_s,
                                 context=context, curve=curve)
        self.silence_s = silence_s
        self.pending: dict[tuple[str, int], list] = {}     # insertion order = first-sent order
        self.answered = 0                                  # frames answered (first answers)
        self.run_uid: str | None = None
        self.restarts = self.resent = self.repeats = 0
        self._resend_due = False
        self._last_heard = time.monotonic()
        self._inbox: collections.deque[dict] = collections.deque()   # taken while blocked

    def start(self, timeout_s: float = 10.0) -> None:
        """Wait until the subscription is live; remember the service's run_uid."""
        self.sub.wait_ready(self.ctl, timeout_s)
        self.run_uid = self.ctl.call("ping", timeout_s=timeout_s)["run_uid"]

    def send(self, frame: np.ndarray, frame_id: int, acquisition: str, **header: Any) -> None:
        """Encode, remember and send one frame; handles answers and restarts while blocked."""
        key = (acquisition, int(frame_id))
        parts = wire.encode_frame(np.array(frame, copy=True), frame_id, acquisition, **header)
        self.pending[key] = parts
        self._push(parts)
        self._resend_if_due()

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        """The next message from the service (accounted), or None; resends when due."""
        if self._inbox:
            msg = self._inbox.popleft()
        elif (msg := self.sub.recv(timeout_s)) is not None:
            self._account(msg)
        else:
            self._check_silence()
        self._resend_if_due()
        return msg

    def wait(self, timeout_s: float, on_message=None) -> bool:
        """Poll until every frame is answered (True) or `timeout_s` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while self.pending and (left := deadline - time.monotonic()) > 0:
            msg = self.poll(min(0.2, left))
            if msg is not None and on_message is not None:
                on_message(msg)
        return not self.pending

    # ------------------------------------------------------------------ internals
    def _push(self, parts: list) -> None:
        while True:
            try:
                self.sender.send_parts(parts, timeout_s=0.2)
                return
            except TimeoutError:         # the service is behind or gone: listen meanwhile
                while (msg := self.sub.recv(0)) is not None:
                    self._account(msg)
                    self._inbox.append(msg)
                self._check_silence()

    def _account(self, msg: dict) -> None:
        self._last_heard = time.monotonic()
        topic = msg["topic"]
        if topic == "result":
            self._answered((msg["acquisition"], msg["frame_id"]), msg)
            return
        uid = msg.get("run_uid")
        if uid is not None and uid != self.run_uid:
            self._restarted(uid)
        event = msg.get("event")
        if event == "frame_dropped":
            for f in msg["frames"]:
                self._answered((f["acquisition"], f["frame_id"]), msg)
        elif event == "frame_rejected" and msg["code"] not in RETRY_CODES:
            self._answered((msg["frame"]["acquisition"], msg["frame"]["frame_id"]), msg)

    def _answered(self, key: tuple, msg: dict) -> None:
        if self.pending.pop(key, None) is not None:
            self.answered += 1
        elif msg.get("topic") == "result":
            self.repeats += 1

    def _check_silence(self) -> None:
        """Unanswered frames and nothing heard for `silence_s`: ask the service. A new run_uid
        is a restart; the same one with nothing in hand means our frames or their answers were
        lost (e.g. published before our subscription reached a restarted service): resend."""
        if not self.pending or time.monotonic() - self._last_heard < self.silence_s:
            return
        self._last_heard = time.monotonic()          # ask at most once per silence_s
        try:
            status = self.ctl.call("status")
        except TimeoutError:
            return                                   # down: ask again after the next silence
        if status.get("run_uid") != self.run_uid:
            self._restarted(status.get("run_uid"))
        elif status.get("in_flight") is None and not status.get("queue_depth"):
            self._resend_due = True

    def _restarted(self, uid: str | None) -> None:
        self.restarts += self.run_uid is not None
        self.run_uid = uid
        self._resend_due = True

    def _resend_if_due(self) -> None:
        while self._resend_due:
            if not self._sync_subscription():
                return                               # not reachable yet: try again later
            self._resend_due = False
            for key, parts in list(self.pending.items()):
                if key in self.pending:
                    self.resent += 1
                    self._push(parts)

    def _sync_subscription(self, timeout_s: float = 5.0) -> bool:
        """Make sure our subscription reaches the (restarted) service before resending: ping
        with a token until its event comes back; messages read meanwhile are kept."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.ctl.call("ping", token=token)
            except TimeoutError:
                continue
            end = time.monotonic() + 0.2
            while (left := end - time.monotonic()) > 0:
                msg = self.sub.recv(timeout_s=left)
                if msg is None:
                    continue
                if msg.get("event") == "ping" and msg.get("token") == token:
                    return True
                self._account(msg)
                self._inbox.append(msg)
        return False

    def close(self) -> None:
        for c in (self.sender, self.sub, self.ctl):
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
