"""The control thread: owns the control ROUTER socket and the results XPUB socket.

ZeroMQ sockets are not thread-safe, so each belongs to one thread. This one (the service's main
thread) answers every command at once, whatever the frame thread is doing; publishes every
event (one `seq` counter); forwards what the frame thread publishes (results and maps as they
are, zero-copy over `inproc`; its events get their `seq` here); tracks `maps` subscriptions;
and swaps in a finished model load. State changes are made under `state.lock`, which the frame
thread holds only while it takes its snapshot at a frame boundary, so a change applies from the
next frame the frame thread starts (the reply's `from_frame_seq`).
"""
from __future__ import annotations

import logging
import time

import msgpack
import zmq

from elit_stream.protocol import wire
from elit_stream.protocol.messages import PROTOCOL_VERSION, error_reply
from elit_stream.service import control
from elit_stream.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

FRAMES_DONE = b"\x00frames-done"      # inproc: the frame thread has stopped (then its report)
MAX_COMMANDS_PER_TURN = 100


class Hub:
    def __init__(self, state: control.State, metrics: ServiceMetrics, control_sock: zmq.Socket,
                 results_sock: zmq.Socket, from_frames: zmq.Socket):
        self.state, self.metrics = state, metrics
        self.control, self.results, self.from_frames = control_sock, results_sock, from_frames
        self.poller = zmq.Poller()
        for s in (control_sock, results_sock, from_frames):
            self.poller.register(s, zmq.POLLIN)
        self.maps_subscribers: set[bytes] = set()
        self.member_maps_subscribers: set[bytes] = set()     # the live view's opt-in topic
        self.frames_report: dict | None = None     # the frame thread's last word, once stopped
        self._event_seq = 0
        self._pending: list[tuple[list, control.Deferred]] = []

    # ------------------------------------------------------------------ one turn
    def turn(self, timeout_ms: int) -> None:
        ready = dict(self.poller.poll(timeout_ms))
        if self.control in ready:
            self.serve_control()
        if self.results in ready:
            self.track_subscriptions()
        if self.from_frames in ready:
            self.forward()
        if self.state.loader is not None and self.state.loader.done:
            self.finish_load()

    def publish_event(self, name: str, **payload) -> None:
        doc = {"protocol": PROTOCOL_VERSION, "kind": "event", "event": name,
               "run_uid": self.state.run_uid, "seq": self._event_seq, "time": time.time(),
               **payload}
        self._event_seq += 1
        self.results.send_multipart(wire.encode_event(doc))

    def forward(self) -> None:
        """Publish what the frame thread sent (bounded per turn so control stays responsive)."""
        for _ in range(1000):
            try:
                parts = self.from_frames.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            topic = parts[0].bytes
            if topic == FRAMES_DONE:
                self.frames_report = msgpack.unpackb(parts[1].bytes)
            elif topic.startswith(wire.TOPIC_EVENT):
                self.publish_event(topic[len(wire.TOPIC_EVENT):].decode(),
                                   **msgpack.unpackb(parts[1].bytes))
            else:
                self.results.send_multipart(parts, copy=False)

    # ------------------------------------------------------------------ control
    def serve_control(self) -> None:
        st = self.state
        for _ in range(MAX_COMMANDS_PER_TURN):
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, body = wire.split_envelope(parts)
            with st.lock:
                reply = control.handle(st, body)
                if isinstance(reply, dict) and reply.get("ok") and reply["cmd"] in control.CHANGES:
                    reply["from_frame_seq"] = st.next_result_seq + (st.in_flight is not None)
            cmd = reply.cmd if isinstance(reply, control.Deferred) else reply.get("cmd")
            ok = isinstance(reply, control.Deferred) or bool(reply.get("ok", False))
            self.metrics.count_command(cmd, ok)
            if cmd in control.CHANGES or cmd in ("load_model", "shutdown"):
                log.info("command %s from peer %s: %s -> %s", cmd, envelope[0].hex()[:16],
                         _args(body), _outcome(reply, st))
            if isinstance(reply, control.Deferred):
                self._pending.append((envelope, reply))
            else:
                self.control.send_multipart(wire.encode_reply(envelope, reply))
        self.flush_outbox()
        self.metrics.set_active(len(st.active.active), st.active.version)

    def finish_load(self) -> None:
        st = self.state
        with st.lock:
            reply = control.swap_in(st, st.loader,
                                    st.next_result_seq + (st.in_flight is not None))
        self.flush_outbox()
        self.metrics.set_model(st.artifact.name, st.artifact.manifest_sha256, st.engine.provider,
                               st.artifact.n_members, st.engine.fallback_reason,
                               st.engine.precision)
        self.metrics.set_active(len(st.active.active), st.active.version)
        log.info("load_model finished: %s", _outcome(reply, st))
        for envelope, deferred in self._pending:
            self.control.send_multipart(wire.encode_reply(envelope, {**reply, "id": deferred.id}))
        self._pending.clear()

    def refuse_pending(self, message: str) -> None:
        for envelope, deferred in self._pending:
            self.control.send_multipart(wire.encode_reply(envelope, error_reply(
                "model_error", message, "load_model", deferred.id)))
        self._pending.clear()

    def flush_outbox(self) -> None:
        with self.state.lock:
            out, self.state.outbox[:] = list(self.state.outbox), []
        for name, payload in out:
            self.publish_event(name, **payload)

    def track_subscriptions(self) -> None:
        """XPUB: remember who subscribed to `maps` / `member_maps` (both are costly)."""
        while True:
            try:
                msg = self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            prefix = msg[1:]
            for topic, subs in ((wire.TOPIC_MAPS, self.maps_subscribers),
                                (wire.TOPIC_MEMBER_MAPS, self.member_maps_subscribers)):
                if prefix and (prefix.startswith(topic) or topic.startswith(prefix)):
                    (subs.add if msg[:1] == b"\x01" else subs.discard)(prefix)


def _args(body: list) -> str:
    try:
        req = wire.decode_request(body)
    except wire.ProtocolError:
        return "(undecodable)"
    return ", ".join(f"{k}={v!r}"[:200] for k, v in req.items() if k not in ("cmd", "id")) or "-"


def _outcome(reply, st: control.State) -> str:
    if isinstance(reply, control.Deferred):
        return f"loading {reply.loader.path}"
    if not reply.get("ok"):
        return f"refused {reply['error']['code']}: {reply['error']['message']}"
    return (f"ok, active v{st.active.version} {list(st.active.active)}, "
            f"from frame seq {reply.get('from_frame_seq', '-')}")
