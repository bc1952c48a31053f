"""The service loop: poll, decode, infer, post-process, publish, observe.

One thread on the hot path and no queues between stages. Per loop turn: answer control
requests; swap in a finished model load (a frame boundary); take frames (lossless: one, in
order; latest: drain the socket, process the newest, report the rest as dropped); per frame
decode (zero-copy) -> prepare -> run all members -> analyse over the active set -> map
coordinates to the input frame -> publish -> observe (policy, metrics). Every frame received
is answered by a result or reported by a frame_dropped / frame_rejected event.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from time import perf_counter

import numpy as np
import zmq

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine, EngineError, bf16_hint
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.manifest import default_artifact_path
from elit_stream.core.postprocess import Params, analyse
from elit_stream.protocol import wire
from elit_stream.protocol.auth import ServerAuth
from elit_stream.protocol.messages import error_reply
from elit_stream.service import control
from elit_stream.service.config import ServiceConfig
from elit_stream.service.metrics import ServiceMetrics
from elit_stream.service.selection import PolicyConfig

log = logging.getLogger(__name__)

POLL_MS = 100
MAX_DRAIN = 10_000
MAX_ACQUISITIONS = 256      # acquisitions whose last frame id is remembered (frame_gap)


def zmq_bind_address(addr: str) -> str:
    """tcp://host:0 -> tcp://host:* (ZeroMQ picks a free port)."""
    return addr[:-2] + ":*" if addr.startswith("tcp://") and addr.endswith(":0") else addr


class Service:
    """Build with a config; `bind()` the sockets; `run()` until stopped; returns an exit code."""

    def __init__(self, cfg: ServiceConfig, engine: Engine | None = None):
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        engine = engine or self._initial_engine(cfg)
        art = engine.artifact
        policy_cfg = PolicyConfig(**cfg.policy.overrides())
        self.state = control.State(
            engine=engine, active=ActiveSet.full(art.member_ids),
            params=Params().replace(**cfg.postprocess.overrides()),
            policy=control.new_policy(policy_cfg, art), policy_cfg=policy_cfg,
            delivery=cfg.delivery.mode, run_uid=uuid.uuid4().hex,
            allowed_dirs=list(cfg.model.allowed_dirs), maps_mode=cfg.maps.mode,
            maps_downsample=cfg.maps.downsample, warm_shape=tuple(cfg.model.warmup_shape_px))
        self.endpoints: dict[str, str] = {}
        self.auth: ServerAuth | None = None
        self._event_seq = 0
        self._frame_seq = 0
        self._last_ids: dict[str, int] = {}     # acquisition -> last frame id (LRU order)
        self._maps_subs: set[bytes] = set()
        self._pending: list[tuple[list, control.Deferred]] = []
        self._stop = threading.Event()
        self._stop_reason = "stopped"

    @staticmethod
    def _initial_engine(cfg: ServiceConfig) -> Engine:
        art = load_artifact(cfg.model.path or default_artifact_path())
        engine = Engine(art, device=cfg.model.device, threads=cfg.model.threads,
                        cpu_fallback=cfg.model.cpu_fallback, precision=cfg.model.precision)
        engine.warm_up(tuple(cfg.model.warmup_shape_px))
        log.info("model %s (%d members, classes %s) on %s, %s; %s", art.name, art.n_members,
                 ",".join(art.class_names), engine.provider, engine.precision,
                 "OOD reference present" if art.ood_reference else "no OOD reference (no "
                 "absolute out-of-distribution score; elit-train reference adds one)")
        if (hint := bf16_hint(engine.provider, engine.precision)) is not None:
            log.info("%s", hint)
        return engine

    # ------------------------------------------------------------------ sockets
    def bind(self) -> dict[str, str]:
        """Bind all sockets (and the metrics endpoint); returns the actual endpoints."""
        self.ctx = zmq.Context()
        ep, hwm = self.cfg.endpoints, self.cfg.delivery.ingest_hwm
        need = self.cfg.auth.required()
        self.auth = ServerAuth(self.cfg.auth.keys_dir, need, self.metrics.auth_failures) \
            if need else None
        if self.auth is not None:
            self.auth.start(self.ctx)
        for name in ("ingest", "results", "control"):
            self.metrics.socket_auth.labels(socket=name).set(int(name in need))
        self.state.auth = {name: name in need for name in ("ingest", "results", "control")}
        self.ingest = self._socket(zmq.PULL, ep.ingest, "ingest", rcvhwm=hwm)
        self.results = self._socket(zmq.XPUB, ep.results, "results", sndhwm=100_000)
        self.control = self._socket(zmq.ROUTER, ep.control, "control")
        self.poller = zmq.Poller()
        for s in (self.control, self.results, self.ingest):
            self.poller.register(s, zmq.POLLIN)
        if self.auth is not None:
            self.auth.watch()
        if self.cfg.metrics.enabled:
            port = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            self.endpoints["metrics"] = f"http://{self.cfg.metrics.host}:{port}/metrics"
        return self.endpoints

    def _socket(self, kind: int, addr: str, name: str, rcvhwm: int = 1000,
                sndhwm: int = 1000) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.RCVHWM, rcvhwm)
        s.setsockopt(zmq.SNDHWM, sndhwm)
        s.setsockopt(zmq.LINGER, 1000)
        if self.auth is not None:
            self.auth.secure(s, name)
        s.bind(zmq_bind_address(addr))
        self.endpoints[name] = s.getsockopt_string(zmq.LAST_ENDPOINT)
        return s

    # ------------------------------------------------------------------ the loop
    def run(self, install_signals: bool = True) -> int:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _f: self.stop(signal.Signals(signum).name))
        st = self.state
        self._model_metrics()
        self._event("start", model=st.model_ref(), provider=st.engine.provider,
                    precision=st.engine.precision,
                    delivery=st.delivery, endpoints=self.endpoints)
        status, reason = "success", "stopped"
        try:
            while not self._stop.is_set() and st.stop_reason is None:
                ready = dict(self.poller.poll(POLL_MS))
                if self.control in ready:
                    self._serve_control()
                if self.results in ready:
                    self._track_subscriptions()
                if st.loader is not None and st.loader.done:
                    self._finish_load()
                if self.ingest in ready and st.stop_reason is None and not self._stop.is_set():
                    self._take_frames()
            reason = st.stop_reason or self._stop_reason
        except Exception as exc:  # a bug: report it in the stop document
            log.exception("service loop failed")
            status, reason = "fail", f"{type(exc).__name__}: {exc}"
        for envelope, deferred in self._pending:  # a load still running: answer it anyway
            self.control.send_multipart(wire.encode_reply(envelope, error_reply(
                "model_error", "service stopped before the load finished", "load_model",
                deferred.id)))
        self._event("stop", exit_status=status, reason=reason, counts=dict(st.counts))
        log.info("stopped (%s): %s", reason, st.counts)
        self.close()
        return 0 if status == "success" else 1

    def stop(self, reason: str = "stop requested") -> None:
        """Thread- and signal-safe: the loop finishes the frame in hand and exits."""
        self._stop_reason = reason
        self._stop.set()

    def close(self) -> None:
        self.metrics.close()
        if self.auth is not None:
            self.auth.stop()
        for s in (self.ingest, self.results, self.control):
            s.close(linger=1000)
        self.ctx.term()

    # ------------------------------------------------------------------ frames
    def _take_frames(self) -> None:
        if self.state.delivery == "lossless":
            self.state.queue_depth = 0
            self._frame(self.ingest.recv_multipart(copy=False), perf_counter())
            return
        batch = []
        while len(batch) < MAX_DRAIN:
            try:
                batch.append((self.ingest.recv_multipart(zmq.NOBLOCK, copy=False),
                              perf_counter()))
            except zmq.Again:
                break
        self.state.queue_depth = len(batch) - 1
        self.metrics.queue_depth.set(len(batch) - 1)
        # Full checks only for the frame that will be processed: the newest one that passes.
        decoded = [d for d in (self._decode(p, t, check_finite=False) for p, t in batch) if d]
        while decoded:
            newest = decoded.pop()
            try:
                wire.ensure_finite(newest[0])
            except wire.ProtocolError as exc:
                self._reject(exc.acquisition, exc.frame_id, exc.code, exc.message)
                continue
            if decoded:
                self._report_dropped([f for f, _, _ in decoded], newest[0])
            self._process(*newest)
            return

    def _frame(self, parts: list, t_recv: float) -> None:
        decoded = self._decode(parts, t_recv)
        if decoded is not None:
            self._process(*decoded)

    def _decode(self, parts: list, t_recv: float, check_finite: bool = True):
        """-> (Frame, t_recv, decode_s) or None after a frame_rejected event."""
        self.state.counts["received"] += 1
        self.metrics.received.inc()
        try:
            frame = wire.decode_frame(parts, self.cfg.delivery.max_frame_px, check_finite)
        except wire.ProtocolError as exc:
            self._reject(exc.acquisition, exc.frame_id, exc.code, exc.message)
            return None
        self._check_gap(frame)
        return frame, t_recv, perf_counter() - t_recv

    def _process(self, frame: wire.Frame, t_recv: float, decode_s: float) -> None:
        st = self.state
        engine, active, params = st.engine, st.active, st.params  # fixed for this frame
        want_maps = self._maps_wanted()
        try:
            t0 = perf_counter()
            net_input, geom = engine.prepare(frame.pixels, frame.pixel_size_pm)
        except EngineError as exc:  # the model cannot take this frame (size, scale)
            self._reject(frame.acquisition, frame.frame_id, "bad_frame", str(exc))
            return
        try:
            t1 = perf_counter()
            probs = engine.run(net_input)
            t2 = perf_counter()
            fa = analyse(probs, active.indices, params, geom.valid_shape, want_maps)
            x, y = geom.to_frame_xy(fa.x, fa.y)
            ood = st.policy.ood.score(fa, params.threshold)   # None: no reference in the model
            t3 = perf_counter()
            timings = {"decode": decode_s, "prepare": t1 - t0, "infer": t2 - t1,
                       "analyse": t3 - t2}
            self._publish_result(frame, fa, x, y, active, timings, t3 - t_recv, ood)
        except Exception as exc:  # a bug or a failed inference: report the frame, keep serving
            log.exception("frame %s/%s failed", frame.acquisition, frame.frame_id)
            self._reject(frame.acquisition, frame.frame_id, "internal",
                         f"{type(exc).__name__}: {exc}")
            return
        try:
            if want_maps:
                self._publish_maps(frame, fa, geom, active)
            t4 = perf_counter()
            timings["publish"] = t4 - t3
            self._observe(frame, fa, active, timings, t4 - t_recv, ood)
            self.metrics.stage.labels(stage="observe").observe(perf_counter() - t4)
        except Exception as exc:  # the result is out; report the failure as an event
            log.exception("after frame %s/%s", frame.acquisition, frame.frame_id)
            self._event("error", code="internal", message=f"{type(exc).__name__}: {exc}")

    def _publish_result(self, frame, fa, x, y, active, timings_s, total_s, ood) -> None:
        st, art = self.state, self.state.artifact
        header = {
            "protocol": 1, "kind": "result", "frame_id": frame.frame_id,
            "acquisition": frame.acquisition, "complete": frame.complete,
            "seq": self._frame_seq, "model": st.model_ref(), "active": list(active.active),
            "active_version": active.version, "frame_shape": list(frame.pixels.shape),
            "pixel_size_pm": frame.pixel_size_pm, "acquired_at": frame.acquired_at,
            "n_atoms": fa.n_atoms, "classes": list(art.class_names),
            "count_per_member": fa.count_per_member.tolist(),
            "disagreement_per_member": fa.disagreement_per_member.tolist(),
            "mean_uncertainty": fa.mean_uncertainty, "figures": fa.figures.as_dict(),
            "ood": None if ood is None else ood.score, "ood_flag": bool(ood and ood.flagged),
            "timings_ms": {k: round(v * 1e3, 3) for k, v in timings_s.items()}
            | {"total": round(total_s * 1e3, 3)},
        }
        columns = {"x": x.astype(np.float32, copy=False), "y": y.astype(np.float32, copy=False),
                   "cls": fa.cls.astype(np.uint8, copy=False), "prob": fa.prob,
                   "uncertainty": fa.uncertainty, "det_frac": fa.det_frac,
                   "cls_prob": fa.cls_prob, "cls_agree": fa.cls_agree}
        wire.send(self.results, wire.encode_result(header, columns))
        self._frame_seq += 1
        st.counts["processed"] += 1

    def _publish_maps(self, frame, fa, geom, active) -> None:
        k = self.state.maps_downsample
        mean, std = fa.mean_map[:, ::k, ::k], fa.std_map[:, ::k, ::k]
        header = {"protocol": 1, "kind": "maps", "frame_id": frame.frame_id,
                  "acquisition": frame.acquisition, "active_version": active.version,
                  "shape": list(mean.shape), "dtype": "float16",
                  "classes": list(self.state.artifact.class_names),
                  "frame_px_per_map_px": k / geom.scale}
        wire.send(self.results, wire.encode_maps(header, mean, std))

    def _observe(self, frame, fa, active, timings_s, e2e_s, ood) -> None:
        self.metrics.observe_frame(timings_s, e2e_s, fa.n_atoms, fa.mean_uncertainty, ood)
        st = self.state
        for adv in st.policy.observe(fa, active, ood, frame.acquisition, frame.frame_id):
            log.warning("%s advisory: %s", adv.kind, adv.message)
            self.metrics.advisories.labels(advisory=adv.kind).inc()
            self._event("drift_advisory", advisory=adv.kind, members=list(adv.members),
                        message=adv.message, figures=dict(adv.figures),
                        frame_id=frame.frame_id, acquisition=frame.acquisition)
        if st.policy_cfg.auto_deselect:
            self._auto_deselect()

    def _auto_deselect(self) -> None:
        st = self.state
        out = [i for i in st.policy.suggest_deselect() if i in st.active.active]
        if out and len(st.active.active) - len(out) >= max(1, st.policy_cfg.min_active):
            st.active = st.active.deselect(out)
            self._event("subset_changed", active=list(st.active.active),
                        active_version=st.active.version, cause="policy",
                        detail=f"auto-deselected outlier member(s) {out}")
            self.metrics.set_active(len(st.active.active), st.active.version)

    # ------------------------------------------------------------------ reports
    def _reject(self, acquisition, frame_id, code: str, message: str) -> None:
        self.state.counts["rejected"] += 1
        self.metrics.rejected.labels(reason=code).inc()
        log.warning("frame %s/%s rejected: %s: %s", acquisition, frame_id, code, message)
        self._event("frame_rejected", frame={"acquisition": acquisition, "frame_id": frame_id},
                    code=code, message=message)

    def _report_dropped(self, frames: list, kept: wire.Frame) -> None:
        self.state.counts["dropped"] += len(frames)
        self.metrics.dropped.inc(len(frames))
        self._event("frame_dropped", reason="stale",
                    frames=[{"acquisition": f.acquisition, "frame_id": f.frame_id}
                            for f in frames],
                    kept={"acquisition": kept.acquisition, "frame_id": kept.frame_id})

    def _check_gap(self, frame: wire.Frame) -> None:
        """frame_gap when an id is not the acquisition's previous id + 1, or when the first frame
        of an acquisition this run sees is not frame 0 (e.g. the service restarted mid-way)."""
        last = self._last_ids.pop(frame.acquisition, -1)
        self._last_ids[frame.acquisition] = frame.frame_id        # most recent at the end
        if len(self._last_ids) > MAX_ACQUISITIONS:
            self._last_ids.pop(next(iter(self._last_ids)))
        if frame.frame_id != last + 1:
            self.metrics.gaps.inc()
            self._event("frame_gap", acquisition=frame.acquisition, expected=last + 1,
                        got=frame.frame_id)

    def _event(self, name: str, **payload) -> None:
        doc = {"protocol": 1, "kind": "event", "event": name, "run_uid": self.state.run_uid,
               "seq": self._event_seq, "time": time.time(), **payload}
        self._event_seq += 1
        self.results.send_multipart(wire.encode_event(doc))

    # ------------------------------------------------------------------ control
    def _serve_control(self) -> None:
        st = self.state
        for _ in range(100):  # bounded: frames must not starve behind a flood of commands
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            envelope, body = wire.split_envelope(parts)
            reply = control.handle(st, body)
            ok = isinstance(reply, control.Deferred) or reply.get("ok", False)
            self.metrics.commands.labels(cmd=str(reply.cmd if isinstance(
                reply, control.Deferred) else reply.get("cmd")), ok=str(ok)).inc()
            if isinstance(reply, control.Deferred):
                self._pending.append((envelope, reply))
            else:
                self.control.send_multipart(wire.encode_reply(envelope, reply))
        self._flush_outbox()
        self.metrics.set_active(len(st.active.active), st.active.version)

    def _finish_load(self) -> None:
        reply = control.swap_in(self.state, self.state.loader, self._frame_seq)
        self._flush_outbox()
        self._model_metrics()
        for envelope, deferred in self._pending:
            self.control.send_multipart(wire.encode_reply(envelope, {**reply, "id": deferred.id}))
        self._pending.clear()

    def _flush_outbox(self) -> None:
        for name, payload in self.state.outbox:
            self._event(name, **payload)
        self.state.outbox.clear()

    def _model_metrics(self) -> None:
        st = self.state
        self.metrics.set_model(st.artifact.name, st.artifact.manifest_sha256,
                               st.engine.provider, st.artifact.n_members,
                               st.engine.fallback_reason, st.engine.precision)
        self.metrics.set_active(len(st.active.active), st.active.version)

    def _track_subscriptions(self) -> None:
        """XPUB: remember whether anyone subscribed to `maps` (maps are costly)."""
        while True:
            try:
                msg = self.results.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if msg[1:] and (msg[1:].startswith(wire.TOPIC_MAPS)
                            or wire.TOPIC_MAPS.startswith(msg[1:])):
                (self._maps_subs.add if msg[:1] == b"\x01" else self._maps_subs.discard)(msg[1:])

    def _maps_wanted(self) -> bool:
        mode = self.state.maps_mode
        return mode == "always" or (mode == "subscribe" and bool(self._maps_subs))
