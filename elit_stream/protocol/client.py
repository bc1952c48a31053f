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
             complete: bool = True, meta: dict | None = None,
             timeout_s: float | None = None, copy: bool = True) -> None:
        """Send one frame. `copy=False` sends large frames without a copy: then the array must
        not be modified until ZeroMQ has sent it (do not reuse the buffer at once)."""
        parts = wire.encode_frame(frame, frame_id, acquisition, pixel_size_pm=pixel_size_pm,
                                  acquired_at=acquired_at, complete=complete, meta=meta)
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
