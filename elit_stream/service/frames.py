"""The hot path: the frame thread, one frame after another.

Per frame: take the state snapshot under `state.lock` (the frame boundary: changes made later
apply to the next frame) -> decode (zero-copy) -> admit (every header number checked against the
model and the limits, service/admission.py) -> prepare -> run all members -> analyse over the
active set -> map coordinates to the input frame (core/pipeline.py, shared with
`elit-stream batch`) -> result to the control thread over `inproc`
(zero-copy; it publishes) -> observe (policy, metrics). Lossless: one frame at a time, in order;
latest: drain the socket, process the newest, report the rest as dropped. Every frame received
is answered by a result or a frame_dropped / frame_rejected event; any exception on the frame
path becomes such an event naming the frame, and the loop goes on. At a stop: what is still
queued on ingest is rejected `shutting_down`.
"""
from __future__ import annotations

import logging
import threading
import time
from time import perf_counter

import msgpack
import numpy as np
import zmq

from elit_stream.core.engine import EngineError
from elit_stream.core.pipeline import FrameRejected, analyse_frame, result_document, unturn
from elit_stream.protocol import wire
from elit_stream.service import control
from elit_stream.service.admission import Admission, AnsweredFrames, RateLimitedLog
from elit_stream.service.config import ServiceConfig
from elit_stream.service.hub import FRAMES_DONE
from elit_stream.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_DRAIN = 10_000
MAX_ACQUISITIONS = 256      # acquisitions whose last frame id is remembered (frame_gap)
MEMBER_IMAGE_MAX_PX = 512   # member_maps (for a person to look at): longest side of the image,
MEMBER_MAP_MAX_PX = 256     # of each member's map,
MEMBER_MAPS_MIN_GAP_S = 0.1  # and at most 10 per second, whatever the frame rate


class FrameLoop:
    """Owns the ingest socket and the frame thread's end of the inproc pipe to the hub."""

    def __init__(self, cfg: ServiceConfig, state: control.State, metrics: ServiceMetrics,
                 ingest: zmq.Socket, to_hub: zmq.Socket, maps_subscribers: set,
                 member_maps_subscribers: set):
        self.cfg, self.state, self.metrics = cfg, state, metrics
        self.ingest, self.to_hub, self.maps_subscribers = ingest, to_hub, maps_subscribers
        self.member_maps_subscribers, self._member_maps_t = member_maps_subscribers, 0.0
        lim = cfg.limits
        self.admission = Admission(lim.pixel_size_factor, lim.max_input_px, self._warn)
        self.answered = AnsweredFrames()
        self.warnings = RateLimitedLog(log)
        self.stop_event = threading.Event()      # set by the control thread: finish and drain
        self._last_ids: dict[str, int] = {}      # acquisition -> last frame id (LRU order)

    def run(self) -> None:
        """The frame thread: frames until `stop_event`, then the ingest drain; never raises."""
        poller = zmq.Poller()
        poller.register(self.ingest, zmq.POLLIN)
        try:
            while not self.stop_event.is_set():
                if poller.poll(POLL_MS):
                    self._take_frames()
            self._drain_ingest()
        except Exception:  # a bug outside a frame: the control thread sees the thread end
            log.exception("frame thread failed")
        finally:
            self.to_hub.send_multipart([FRAMES_DONE, msgpack.packb({})])
            self.ingest.close(linger=0)
            self.to_hub.close(linger=1000)

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
                    self.ingest.unbind(self.ingest.getsockopt_string(zmq.LAST_ENDPOINT))   # no new peers; last drain
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
        except Exception as exc:  # a bug in decoding: report it, keep serving
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
            policy = st.policy      # the snapshot's model's (OOD reference, member statistics)
        try:
            self._infer_and_publish(frame, t_recv, decode_s, engine, active, params, policy)
        except wire.ProtocolError as exc:
            self._reject(frame.acquisition, frame.frame_id, exc.code, exc.message)
        except (FrameRejected, EngineError) as exc:  # the model cannot take this frame
            self._reject(frame.acquisition, frame.frame_id, "bad_frame", str(exc))
        except Exception as exc:  # a bug or a failed inference: report the frame, keep serving
            log.exception("frame %s/%s failed", frame.acquisition, frame.frame_id)
            self._reject(frame.acquisition, frame.frame_id, "internal",
                         f"{type(exc).__name__}: {exc}")
        finally:
            with st.lock:
                st.in_flight = None

    def _infer_and_publish(self, frame, t_recv, decode_s, engine, active, params,
                           policy) -> None:
        want_maps, want_members = self._maps_wanted(), self._member_maps_wanted()
        t0 = perf_counter()
        pixel_size_pm = self.admission.check(frame, engine)   # ProtocolError before any work
        admit_s = perf_counter() - t0
        out = analyse_frame(engine, frame.pixels, pixel_size_pm, active, params, want_maps,
                            policy.ood.reference, frame.fast_scan)
        fa, t3 = out.analysis, perf_counter()
        timings = {"decode": decode_s + admit_s, **out.timings_s}
        self._publish_result(frame, out, engine.artifact, active, timings, t3 - t_recv)
        try:
            if want_maps:
                self._publish_maps(frame, fa, out.geom, engine.artifact, active)
            if want_members:
                self._publish_member_maps(frame, out, active)
            t4 = perf_counter()
            timings["publish"] = t4 - t3
            self._observe(frame, fa, active, timings, t4 - t_recv, out.ood, policy)
            self.metrics.stage.labels(stage="observe").observe(perf_counter() - t4)
        except Exception as exc:  # the result is out; report the failure as an event
            log.exception("after frame %s/%s", frame.acquisition, frame.frame_id)
            self._event("error", code="internal", message=f"after frame {frame.acquisition}/"
                        f"{frame.frame_id}: {type(exc).__name__}: {exc}")

    def _publish_result(self, frame, out, art, active, timings_s, total_s) -> None:
        st = self.state
        key = (frame.acquisition, frame.frame_id)
        header, columns = result_document(
            frame, out, active, {"name": art.name, "sha256": art.manifest_sha256},
            art.class_names, st.next_result_seq, timings_s, total_s)
        if key in self.answered:
            header["repeat"] = True
        self.answered.add(key)
        with st.lock:        # counted before it is sent: `status` never lags a result seen
            st.next_result_seq += 1
            st.counts["processed"] += 1
            st.in_flight = None  # the snapshot is used up: from_frame_seq = next_result_seq
        wire.send(self.to_hub, wire.encode_result(header, columns))

    def _publish_maps(self, frame, fa, geom, art, active) -> None:
        k = self.state.maps_downsample
        mean, std = fa.mean_map[:, ::k, ::k], fa.std_map[:, ::k, ::k]
        header = {"protocol": 1, "kind": "maps", "frame_id": frame.frame_id,
                  "acquisition": frame.acquisition, "active_version": active.version,
                  "shape": list(mean.shape), "dtype": "float16",
                  "classes": list(art.class_names),
                  "frame_px_per_map_px": k / geom.scale}
        wire.send(self.to_hub, wire.encode_maps(header, mean, std))

    def _publish_member_maps(self, frame, out, active) -> None:
        """Opt-in (topic `member_maps`, for the live view): the frame as the members saw it and
        each member's atom map (sum over classes), valid region, every k-th pixel (like `maps`;
        block means cost ~50x more, memory-bound) for at most MEMBER_IMAGE_MAX_PX /
        MEMBER_MAP_MAX_PX per side, k >= maps.downsample."""
        geom, (vh, vw), k = out.geom, out.geom.valid_shape, self.state.maps_downsample
        ki, km = (max(k, -(-max(vh, vw) // n)) for n in (MEMBER_IMAGE_MAX_PX, MEMBER_MAP_MAX_PX))
        image = out.net_input[0, 0, :vh:ki, :vw:ki]
        atom = out.probs[:, :, :vh:km, :vw:km].sum(axis=1, dtype=np.float32)
        image, atom = (unturn(a, out.transposed, out.flipped)     # the frame's orientation
                       for a in (image, atom))
        header = {"protocol": 1, "kind": "member_maps", "frame_id": frame.frame_id,
                  "acquisition": frame.acquisition, "active": list(active.active),
                  "active_version": active.version, "shape": list(atom.shape),
                  "image_shape": list(image.shape), "dtype": "float16",
                  "frame_px_per_map_px": km / geom.scale, "frame_px_per_image_px": ki / geom.scale}
        wire.send(self.to_hub, wire.encode_member_maps(header, image, atom))

    def _observe(self, frame, fa, active, timings_s, e2e_s, ood, policy) -> None:
        self.metrics.observe_frame(timings_s, e2e_s, fa.n_atoms, fa.mean_uncertainty, ood)
        st = self.state
        with st.lock:       # a model loaded mid-frame has a new policy: not fed the old one's frame
            advisories = (list(policy.observe(fa, active, ood, frame.acquisition, frame.frame_id))
                          if st.policy is policy else [])
        for adv in advisories:
            log.warning("%s advisory: %s", adv.kind, adv.message)
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
        self.to_hub.send_multipart([wire.TOPIC_EVENT + name.encode(), wire.pack(payload)])

    def _member_maps_wanted(self) -> bool:
        if self.state.maps_mode == "never" or not self.member_maps_subscribers \
                or perf_counter() - self._member_maps_t < MEMBER_MAPS_MIN_GAP_S:
            return False
        self._member_maps_t = perf_counter()
        return True

    def _maps_wanted(self) -> bool:
        mode = self.state.maps_mode
        return mode == "always" or (mode == "subscribe" and bool(self.maps_subscribers))
