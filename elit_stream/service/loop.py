"""The service: sockets, its two threads, and the stop sequence.

The control thread (the main thread; service/hub.py) owns the control and results sockets: it
answers commands at once and publishes. The frame thread (service/frames.py, the hot path) owns
the ingest socket and sends results and events to the control thread over `inproc`.

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

import zmq

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine, bf16_hint
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.manifest import default_artifact_path
from elit_stream.core.postprocess import Params
from elit_stream.protocol import wire
from elit_stream.service import control
from elit_stream.service.config import ServiceConfig
from elit_stream.service.frames import POLL_MS, FrameLoop
from elit_stream.service.hub import Hub
from elit_stream.service.metrics import ServiceMetrics
from elit_stream.service.selection import PolicyConfig

log = logging.getLogger(__name__)



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
        self.state = control.State(
            engine=engine, active=ActiveSet.full(art.member_ids),
            params=Params().replace(**cfg.postprocess.overrides()),
            policy=control.new_policy(policy_cfg, art), policy_cfg=policy_cfg,
            delivery=cfg.delivery.mode, run_uid=uuid.uuid4().hex,
            allowed_dirs=list(cfg.model.allowed_dirs), maps_mode=cfg.maps.mode,
            maps_downsample=cfg.maps.downsample, warm_shape=tuple(cfg.model.warmup_shape_px),
            limits={"max_frame_px": cfg.delivery.max_frame_px, **cfg.limits.model_dump()})
        self.endpoints: dict[str, str] = {}
        self.auth = None
        self.hard_exit = False
        self._frames_started = False
        self._stop = threading.Event()          # stop requested (signal, shutdown, stop())
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
        self.frames = FrameLoop(self.cfg, self.state, self.metrics, self.ingest, self._to_hub,
                                self.hub.maps_subscribers, self.hub.member_maps_subscribers)
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
        frames = threading.Thread(target=self.frames.run, name="elit-frames", daemon=True)
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
        self.frames.stop_event.set()
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

    def _model_metrics(self) -> None:
        st = self.state
        self.metrics.set_model(st.artifact.name, st.artifact.manifest_sha256,
                               st.engine.provider, st.artifact.n_members,
                               st.engine.fallback_reason, st.engine.precision)
        self.metrics.set_active(len(st.active.active), st.active.version)
