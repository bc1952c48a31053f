"""The service: sockets, the frame thread (the hot path) and the stop sequence.

Two threads. The control thread (the main thread; service/hub.py) owns the control and results
sockets: it answers commands at once and publishes. The frame thread owns the ingest socket and
runs the hot path, per frame: take the state snapshot (a frame boundary) -> decode (zero-copy)
-> admit (every header number checked against the model and the limits) -> prepare -> run all
members -> analyse over the active set -> result to the control thread over `inproc` (zero-copy)
-> observe. Lossless: one frame at a time, in order; latest: drain the socket, process the
newest, report the rest as dropped. Every frame received is answered by a result or reported by
a frame_dropped / frame_rejected event; any exception on the frame path becomes such an event
naming the frame, and the loop goes on.

Stop (SIGTERM, SIGINT, `shutdown`): the frame thread finishes the frame in hand, then rejects
what is still queued in the ingest socket (`shutting_down`); the control thread keeps answering,
waits for that and for a model load, at most `limits.stop_grace_s`, then publishes `stop`
saying whether the frame in hand was finished or abandoned.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from time import perf_counter

import msgpack
import numpy as np
import zmq

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine, EngineError, bf16_hint
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.manifest import default_artifact_path
from elit_stream.core.postprocess import Params, analyse
from elit_stream.protocol import wire
from elit_stream.service import control
from elit_stream.service.admission import Admission, AnsweredFrames, RateLimitedLog
from elit_stream.service.config import ServiceConfig
from elit_stream.service.hub import FRAMES_DONE, Hub
from elit_stream.service.metrics import ServiceMetrics
from elit_stream.service.selection import PolicyConfig, SelectionPolicy

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_DRAIN = 10_000
MAX_ACQUISITIONS = 256      # acquisitions whose last frame id is remembered (frame_gap)


def zmq_bind_address(addr: str) -> str:
    """tcp://host:0 -> tcp://host:* (ZeroMQ picks a free port)."""
    return addr[:-2] + ":*" if addr.startswith("tcp://") and addr.endswith(":0") else addr


class Service:
    """Build with a config; `bind()` the sockets; `run()` until stopped; returns an exit code.
    After `run`, `hard_exit` is True when a thread could not be finished (a frame abandoned, a
    model load still running): the process should then leave with os._exit."""

    def __init__(self, cfg: ServiceConfig, engine: Engine | None = None):
        self.cfg = cfg
        self.metrics = ServiceMetrics()
        engine = engine or self._initial_engine(cfg)
        art = engine.artifact
        policy_cfg = PolicyConfig(**cfg.policy.overrides())
        lim = cfg.limits
        self.state = control.State(
            engine=engine, active=ActiveSet.full(art.member_ids),
            params=Params().replace(**cfg.postprocess.overrides()),
            policy=SelectionPolicy(policy_cfg, list(art.member_ids)), policy_cfg=policy_cfg,
            delivery=cfg.delivery.mode, run_uid=uuid.uuid4().hex,
            allowed_dirs=list(cfg.model.allowed_dirs), maps_mode=cfg.maps.mode,
            maps_downsample=cfg.maps.downsample, warm_shape=tuple(cfg.model.warmup_shape_px),
            limits={"max_frame_px": cfg.delivery.max_frame_px, **lim.model_dump()})
        self.admission = Admission(lim.pixel_size_factor, lim.max_input_px, self._warn)
        self.answered = AnsweredFrames()
        self.warnings = RateLimitedLog(log)
        self.endpoints: dict[str, str] = {}
        self.auth = None
        self.hard_exit = False
        self._frames_started = False
        self._last_ids: dict[str, int] = {}     # acquisition -> last frame id (LRU order)
        self._stop = threading.Event()          # stop requested (signal, shutdown, stop())
        self._frames_stop = threading.Event()   # the frame thread: finish and drain
        self._stop_reason = "stopped"

    @staticmethod
    def _initial_engine(cfg: ServiceConfig) -> Engine:
        art = load_artifact(cfg.model.path or default_artifact_path())
        engine = Engine(art, device=cfg.model.device, threads=cfg.model.threads,
                        cpu_fallback=cfg.model.cpu_fallback, precision=cfg.model.precision)
        engine.warm_up(tuple(cfg.model.warmup_shape_px))
        log.info("model %s (%d members, classes %s) on %s, %s", art.name, art.n_members,
                 ",".join(art.class_names), engine.provider, engine.precision)
        if (hint := bf16_hint(engine.provider, engine.precision)) is not None:
            log.info("%s", hint)
        return engine

    # ------------------------------------------------------------------ sockets
    def bind(self) -> dict[str, str]:
        """Bind all sockets (and the metrics endpoint); returns the actual endpoints."""
        from elit_stream.protocol.auth import ServerAuth
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
        max_bytes = self.cfg.delivery.max_frame_px * 8 + wire.MAX_HEADER_BYTES
        self.ingest = self._socket(zmq.PULL, ep.ingest, "ingest", rcvhwm=hwm, max_bytes=max_bytes)
        self.results = self._socket(zmq.XPUB, ep.results, "results",
                                    sndhwm=self.cfg.limits.results_sndhwm)
        self.control = self._socket(zmq.ROUTER, ep.control, "control", max_bytes=1 << 20)
        inproc = f"inproc://frames-{self.state.run_uid}"
        self._from_frames = self.ctx.socket(zmq.PULL)
        self._from_frames.bind(inproc)
        self._to_hub = self.ctx.socket(zmq.PUSH)       # used by the frame thread only
        self._to_hub.setsockopt(zmq.SNDHWM, 1000)
        self._to_hub.connect(inproc)
        self.hub = Hub(self.state, self.metrics, self.control, self.results, self._from_frames)
        if self.auth is not None:
            self.auth.watch()
        if self.cfg.metrics.enabled:
            port = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
            self.endpoints["metrics"] = f"http://{self.cfg.metrics.host}:{port}/metrics"
        return self.endpoints

    def _socket(self, kind: int, addr: str, name: str, rcvhwm: int = 1000,
                sndhwm: int = 1000, max_bytes: int = -1) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.RCVHWM, rcvhwm)
        s.setsockopt(zmq.SNDHWM, sndhwm)
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes)   # a bigger message: ZeroMQ drops the peer
        s.setsockopt(zmq.LINGER, 1000)
        if self.auth is not None:
            self.auth.secure(s, name)
        s.bind(zmq_bind_address(addr))
        self.endpoints[name] = s.getsockopt_string(zmq.LAST_ENDPOINT)
        return s

    # ------------------------------------------------------------------ run and stop
    def run(self, install_signals: bool = True) -> int:
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, _f: self.stop(signal.Signals(signum).name))
        st, hub = self.state, self.hub
        self._model_metrics()
        hub.publish_event("start", model=st.model_ref(), provider=st.engine.provider,
                          precision=st.engine.precision, delivery=st.delivery,
                          endpoints=self.endpoints)
        frames = threading.Thread(target=self._frame_thread, name="elit-frames", daemon=True)
        frames.start()
        self._frames_started = True
        status = "success"
        try:
            while not self._stop.is_set() and st.stop_reason is None and frames.is_alive():
                hub.turn(POLL_MS)
        except Exception as exc:  # a bug: report it in the stop document
            log.exception("control thread failed")
            status, self._stop_reason = "fail", f"{type(exc).__name__}: {exc}"
        reason = st.stop_reason or self._stop_reason
        in_hand = st.in_flight
        log.info("stopping (%s)%s", reason, f"; frame {in_hand} in hand" if in_hand else "")
        outcome = self._wind_down(frames)
        self._event_stop(status, reason, in_hand, outcome)
        self.close()
        return 0 if status == "success" else 1

    def _wind_down(self, frames: threading.Thread) -> str:
        """Let the frame thread finish and drain, and a model load end, within the grace."""
        self._frames_stop.set()
        deadline = time.monotonic() + self.cfg.limits.stop_grace_s
        hub, st = self.hub, self.state
        while time.monotonic() < deadline and (hub.frames_report is None or (
                st.loader is not None and not st.loader.done)):
            hub.turn(POLL_MS)
        if st.loader is not None and not st.loader.done:
            hub.refuse_pending("service stopped before the load finished")
            self.hard_exit = True
        if hub.frames_report is None:
            self.hard_exit = True
            return "abandoned"
        return "finished"

    def _event_stop(self, status: str, reason: str, in_hand, outcome: str) -> None:
        st = self.state
        extra = {} if in_hand is None else {
            "frame_in_hand": {"acquisition": in_hand[0], "frame_id": in_hand[1]},
            "frame_in_hand_outcome": outcome}
        if outcome == "abandoned":
            log.warning("frame %s abandoned after %.0f s of grace (limits.stop_grace_s); "
                        "a lossless client resends it", in_hand, self.cfg.limits.stop_grace_s)
        self.hub.publish_event("stop", exit_status=status, reason=reason,
                               counts=dict(st.counts), **extra)
        log.info("stopped (%s): %s", reason, st.counts)

    def stop(self, reason: str = "stop requested") -> None:
        """Thread- and signal-safe: the service finishes the frame in hand and exits."""
        self._stop_reason = reason
        self._stop.set()

    def close(self) -> None:
        self.metrics.close()
        if self.auth is not None:
            self.auth.stop()
        own = [self.results, self.control, self._from_frames]
        if not self._frames_started:        # else the frame thread closes its own
            own += [self.ingest, self._to_hub]
        for s in own:
            s.close(linger=1000)
        if not self.hard_exit:          # the frame thread closed its own sockets
            self.ctx.term()
        else:
            time.sleep(0.3)             # let the stop event leave; the process exits hard

    # ------------------------------------------------------------------ the frame thread
    def _frame_thread(self) -> None:
        poller = zmq.Poller()
        poller.register(self.ingest, zmq.POLLIN)
        try:
            while not self._frames_stop.is_set():
                if poller.poll(POLL_MS):
                    self._take_frames()
            self._drain_ingest()
        except Exception:  # a bug outside a frame: the control thread stops the service
            log.exception("frame thread failed")
            self._stop_reason = "frame thread failed"
            self._stop.set()
        finally:
            self._to_hub.send_multipart([FRAMES_DONE, msgpack.packb({})])
            self.ingest.close(linger=0)
            self._to_hub.close(linger=1000)

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

    def _drain_ingest(self) -> None:
        """At a stop: every frame already queued for us is answered `shutting_down`."""
        for attempt in range(2):
            while True:
                try:
                    parts = self.ingest.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if (decoded := self._decode(parts, perf_counter(), check_finite=False)):
                    f = decoded[0]
                    self._reject(f.acquisition, f.frame_id, "shutting_down", "the service is "
                                 "stopping; send this frame again to the next run")
            if attempt == 0:
                try:
                    self.ingest.unbind(self.endpoints["ingest"])   # no new peers; last drain
                except zmq.ZMQError:
                    pass
                time.sleep(0.05)

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
        except Exception as exc:  # noqa: BLE001 - a bug in decoding: report, keep serving
            log.exception("decoding a frame failed")
            self._reject(None, None, "internal", f"{type(exc).__name__}: {exc}")
            return None
        self._check_gap(frame)
        return frame, t_recv, perf_counter() - t_recv

    def _process(self, frame: wire.Frame, t_recv: float, decode_s: float) -> None:
        """One frame, from the state snapshot to its result; never raises."""
        st, key = self.state, (frame.acquisition, frame.frame_id)
        with st.lock:        # the frame boundary: changes made after this apply to the next one
            engine, active, params, st.in_flight = st.engine, st.active, st.params, key
        try:
            self._infer_and_publish(frame, t_recv, decode_s, engine, active, params)
        except wire.ProtocolError as exc:
            self._reject(frame.acquisition, frame.frame_id, exc.code, exc.message)
        except EngineError as exc:  # the model cannot take this frame
            self._reject(frame.acquisition, frame.frame_id, "bad_frame", str(exc))
        except Exception as exc:  # a bug or a failed inference: report the frame, keep serving
            log.exception("frame %s/%s failed", frame.acquisition, frame.frame_id)
            self._reject(frame.acquisition, frame.frame_id, "internal",
                         f"{type(exc).__name__}: {exc}")
        finally:
            with st.lock:
                st.in_flight = None

    def _infer_and_publish(self, frame, t_recv, decode_s, engine, active, params) -> None:
        want_maps = self._maps_wanted()
        t0 = perf_counter()
        pixel_size_pm = self.admission.check(frame, engine)   # ProtocolError before any work
        net_input, geom = engine.prepare(frame.pixels, pixel_size_pm)
        t1 = perf_counter()
        probs = engine.run(net_input)
        t2 = perf_counter()
        fa = analyse(probs, active.indices, params, geom.valid_shape, want_maps)
        x, y = geom.to_frame_xy(fa.x, fa.y)
        t3 = perf_counter()
        timings = {"decode": decode_s, "prepare": t1 - t0, "infer": t2 - t1, "analyse": t3 - t2}
        self._publish_result(frame, fa, x, y, engine.artifact, active, timings, t3 - t_recv)
        try:
            if want_maps:
                self._publish_maps(frame, fa, geom, engine.artifact, active)
            t4 = perf_counter()
            timings["publish"] = t4 - t3
            self._observe(frame, fa, active, timings, t4 - t_recv)
            self.metrics.stage.labels(stage="observe").observe(perf_counter() - t4)
        except Exception as exc:  # the result is out; report the failure as an event
            log.exception("after frame %s/%s", frame.acquisition, frame.frame_id)
            self._event("error", code="internal", message=f"after frame {frame.acquisition}/"
                        f"{frame.frame_id}: {type(exc).__name__}: {exc}")

    def _publish_result(self, frame, fa, x, y, art, active, timings_s, total_s) -> None:
        st = self.state
        key = (frame.acquisition, frame.frame_id)
        header = {
            "protocol": 1, "kind": "result", "frame_id": frame.frame_id,
            "acquisition": frame.acquisition, "complete": frame.complete,
            "seq": st.next_result_seq,
            "model": {"name": art.name, "sha256": art.manifest_sha256}, "active": list(active.active),
            "active_version": active.version, "frame_shape": list(frame.pixels.shape),
            "pixel_size_pm": frame.pixel_size_pm, "acquired_at": frame.acquired_at,
            "n_atoms": fa.n_atoms, "classes": list(art.class_names),
            "count_per_member": fa.count_per_member.tolist(),
            "disagreement_per_member": fa.disagreement_per_member.tolist(),
            "mean_uncertainty": fa.mean_uncertainty,
            "timings_ms": {k: round(v * 1e3, 3) for k, v in timings_s.items()}
            | {"total": round(total_s * 1e3, 3)},
        }
        if key in self.answered:
            header["repeat"] = True
        columns = {"x": x.astype(np.float32, copy=False), "y": y.astype(np.float32, copy=False),
                   "cls": fa.cls.astype(np.uint8, copy=False), "prob": fa.prob,
                   "uncertainty": fa.uncertainty, "det_frac": fa.det_frac}
        wire.send(self._to_hub, wire.encode_result(header, columns))
        self.answered.add(key)
        with st.lock:
            st.next_result_seq += 1
        st.counts["processed"] += 1

    def _publish_maps(self, frame, fa, geom, art, active) -> None:
        k = self.state.maps_downsample
        mean, std = fa.mean_map[:, ::k, ::k], fa.std_map[:, ::k, ::k]
        header = {"protocol": 1, "kind": "maps", "frame_id": frame.frame_id,
                  "acquisition": frame.acquisition, "active_version": active.version,
                  "shape": list(mean.shape), "dtype": "float16",
                  "classes": list(art.class_names),
                  "frame_px_per_map_px": k / geom.scale}
        wire.send(self._to_hub, wire.encode_maps(header, mean, std))

    def _observe(self, frame, fa, active, timings_s, e2e_s) -> None:
        self.metrics.observe_frame(timings_s, e2e_s, fa.n_atoms, fa.mean_uncertainty)
        st = self.state
        with st.lock:
            advisories = list(st.policy.observe(fa, active))
        for adv in advisories:
            self.metrics.advisories.labels(advisory=adv.kind).inc()
            self._event("drift_advisory", advisory=adv.kind, members=list(adv.members),
                        message=adv.message, figures=dict(adv.figures),
                        frame_id=frame.frame_id, acquisition=frame.acquisition)
        if st.policy_cfg.auto_deselect:
            self._auto_deselect()

    def _auto_deselect(self) -> None:
        st = self.state
        with st.lock:
            out = [i for i in st.policy.suggest_deselect() if i in st.active.active]
            if not out or len(st.active.active) - len(out) < max(1, st.policy_cfg.min_active):
                return
            st.active = st.active.deselect(out)
        self._event("subset_changed", active=list(st.active.active),
                    active_version=st.active.version, cause="policy",
                    detail=f"auto-deselected outlier member(s) {out}")
        self.metrics.set_active(len(st.active.active), st.active.version)

    # ------------------------------------------------------------------ reports
    def _reject(self, acquisition, frame_id, code: str, message: str) -> None:
        self.state.counts["rejected"] += 1
        self.metrics.rejected.labels(reason=code).inc()
        self.warnings.warning(f"rejected:{code}", "frame %s/%s rejected: %s: %s",
                              acquisition, frame_id, code, message[:500])
        self._event("frame_rejected", frame={"acquisition": acquisition, "frame_id": frame_id},
                    code=code, message=message)

    def _warn(self, code: str, message: str, frame: wire.Frame) -> None:
        self.warnings.warning(f"warning:{code}", "%s", message)
        self._event("warning", code=code, message=message,
                    frame={"acquisition": frame.acquisition, "frame_id": frame.frame_id})

    def _report_dropped(self, frames: list, kept: wire.Frame) -> None:
        self.state.counts["dropped"] += len(frames)
        self.metrics.dropped.inc(len(frames))
        self._event("frame_dropped", reason="stale",
                    frames=[{"acquisition": f.acquisition, "frame_id": f.frame_id}
                            for f in frames],
                    kept={"acquisition": kept.acquisition, "frame_id": kept.frame_id})

    def _check_gap(self, frame: wire.Frame) -> None:
        """frame_gap when an id is not the acquisition's previous id + 1, or when the first frame
        of an acquisition this run sees is not frame 0 (e.g. the service restarted mid-way).
        A resent frame (one this run has answered) is not a gap."""
        if (frame.acquisition, frame.frame_id) in self.answered:
            return
        last = self._last_ids.pop(frame.acquisition, -1)
        self._last_ids[frame.acquisition] = frame.frame_id        # most recent at the end
        if len(self._last_ids) > MAX_ACQUISITIONS:
            self._last_ids.pop(next(iter(self._last_ids)))
        if frame.frame_id != last + 1:
            self.metrics.gaps.inc()
            self._event("frame_gap", acquisition=frame.acquisition, expected=last + 1,
                        got=frame.frame_id)

    def _event(self, name: str, **payload) -> None:
        """From the frame thread: the control thread adds seq and publishes, in order."""
        self._to_hub.send_multipart([wire.TOPIC_EVENT + name.encode(), wire.pack(payload)])

    def _model_metrics(self) -> None:
        st = self.state
        self.metrics.set_model(st.artifact.name, st.artifact.manifest_sha256,
                               st.engine.provider, st.artifact.n_members,
                               st.engine.fallback_reason, st.engine.precision)
        self.metrics.set_active(len(st.active.active), st.active.version)

    def _maps_wanted(self) -> bool:
        mode = self.state.maps_mode
        return mode == "always" or (mode == "subscribe" and bool(self.hub.maps_subscribers))
