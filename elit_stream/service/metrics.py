"""Prometheus metrics of the service: one private registry and its HTTP endpoint (/metrics).

The hot path calls a few cheap methods per frame; exposition happens in prometheus-client's
own HTTP thread, off the hot path.
"""
from __future__ import annotations

import logging
import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)

COMMANDS = ("ping", "status", "members", "set_active", "deselect", "select", "reset",
            "set_params", "set_maps", "load_model", "shutdown")   # = messages.REQUESTS
STAGES = ("decode", "prepare", "infer", "analyse", "publish", "observe")
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ADVISORIES = ("drift", "outlier", "ood", "ood_cleared")   # the fixed label set
_ATOM_BUCKETS = (0, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


class ServiceMetrics:
    """All service metrics, in their own registry (so tests can run several services)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.received = Counter("elit_frames_received", "Frames received on ingest", registry=r)
        self.processed = Counter("elit_frames_processed", "Frames answered with a result",
                                 registry=r)
        self.dropped = Counter("elit_frames_dropped", "Frames skipped (latest mode), each "
                               "reported in a frame_dropped event", registry=r)
        self.rejected = Counter("elit_frames_rejected", "Frames refused, by error code",
                                ["reason"], registry=r)
        self.gaps = Counter("elit_frame_id_gaps", "Frame-id gaps within an acquisition",
                            registry=r)
        self.commands = Counter("elit_control_commands", "Control requests, by command and "
                                "outcome", ["cmd", "ok"], registry=r)
        self.stage = Histogram("elit_stage_seconds", "Per-stage latency", ["stage"],
                               buckets=_LATENCY_BUCKETS_S, registry=r)
        self.end_to_end = Histogram("elit_end_to_end_seconds", "From receipt of a frame to "
                                    "its result being sent", buckets=_LATENCY_BUCKETS_S,
                                    registry=r)
        self.queue_depth = Gauge("elit_queue_depth", "Frames waiting when the last frame was "
                                 "taken (latest mode: drained batch size - 1)", registry=r)
        self.active_members = Gauge("elit_active_members", "Members in the active set",
                                    registry=r)
        self.active_version = Gauge("elit_active_version", "Version of the active set",
                                    registry=r)
        self.atoms = Histogram("elit_atoms_per_frame", "Atoms found per frame",
                               buckets=_ATOM_BUCKETS, registry=r)
        self.mean_uncertainty = Gauge("elit_mean_uncertainty", "Mean per-atom uncertainty of "
                                      "the last frame", registry=r)
        self.auth_failures = Counter("elit_auth_failures", "Connections refused by CURVE "
                                     "authentication, by socket and reason (refused_key, "
                                     "no_curve, crypto, protocol, handshake)", ["socket", "reason"],
                                     registry=r)
        self.socket_auth = Gauge("elit_socket_curve", "1 if the socket requires CURVE "
                                 "authentication, else 0", ["socket"], registry=r)
        self.provider_fallback = Gauge("elit_provider_fallback", "1 if the requested GPU "
                                       "provider failed and the ensemble runs on CPU", registry=r)
        self.advisories = Counter("elit_drift_advisories", "drift_advisory events published, by "
                                  "kind (drift, outlier, ood, ood_cleared)", ["advisory"],
                                  registry=r)
        for kind in ADVISORIES:
            self.advisories.labels(advisory=kind)
        self.ood_score = Gauge("elit_ood_score", "Out-of-distribution score of the last frame "
                               "against the model's reference (NaN: the model has none)",
                               registry=r)
        self.ood_flag = Gauge("elit_ood_flag", "1 if the last frame was flagged out of "
                              "distribution, else 0", registry=r)
        self.ood_frames = Counter("elit_ood_frames", "Frames flagged out of distribution",
                                  registry=r)
        self.ood_score.set(math.nan)
        self.model = Info("elit_model", "Loaded model artifact and provider", registry=r)
        self._stage_children = {s: self.stage.labels(stage=s) for s in STAGES}
        for reason in ("bad_msgpack", "bad_header", "size_mismatch", "non_finite", "too_large",
                       "bad_pixel_size", "shutting_down", "internal"):
            self.rejected.labels(reason=reason)  # show zeros for the common reasons
        self._server = None

    def observe_frame(self, timings_s: dict[str, float], e2e_s: float, n_atoms: int,
                      mean_uncertainty: float, ood=None) -> None:
        self.processed.inc()
        for stage, seconds in timings_s.items():
            child = self._stage_children.get(stage)
            if child is not None:
                child.observe(seconds)
        self.end_to_end.observe(e2e_s)
        self.atoms.observe(n_atoms)
        if not math.isnan(mean_uncertainty):
            self.mean_uncertainty.set(mean_uncertainty)
        self.ood_score.set(math.nan if ood is None else ood.score)
        self.ood_flag.set(int(ood is not None and ood.flagged))
        if ood is not None and ood.flagged:
            self.ood_frames.inc()

    def count_command(self, cmd, ok: bool) -> None:
        """Labels from a fixed set: client-chosen names would grow /metrics without bound."""
        label = cmd if cmd in COMMANDS else "unknown"
        self.commands.labels(cmd=label, ok=str(bool(ok))).inc()

    def set_model(self, name: str, sha256: str, provider: str, n_members: int,
                  fallback_reason: str | None = None, precision: str = "fp32") -> None:
        self.model.info({"name": name, "sha256": sha256, "provider": provider,
                         "precision": precision, "members": str(n_members)})
        self.provider_fallback.set(1 if fallback_reason else 0)

    def set_active(self, n_active: int, version: int) -> None:
        self.active_members.set(n_active)
        self.active_version.set(version)

    def serve(self, host: str, port: int) -> int | None:
        """Start the HTTP endpoint; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
