"""Programmatic member selection: per-member agreement scores, drift advisories, outliers.

Pure (no I/O, no clock): the service feeds every `FrameAnalysis` to `observe`, publishes the
returned advisories as events, and — only if `auto_deselect` is on — applies `suggest_deselect()`
to its `ActiveSet` (never going below `min_active`; always reported; reversible by command).

Scores, frame by frame:
- member disagreement d_m = `FrameAnalysis.disagreement_per_member` (1 - IoU with the consensus).
- outlier: among the ACTIVE members (at least 3), robust z_m = (d_m - median) / (1.4826 MAD + floor);
  z_m > `outlier_z` on `outlier_frames` consecutive frames raises one "outlier" advisory (again only
  after the streak has been broken).
- drift: the frame's mean uncertainty and the active members' mean disagreement are compared with
  the median of the previous `window` frames; a value above `drift_factor` x baseline + `drift_floor`
  raises one "drift" advisory, re-armed when values fall back. The baseline restarts when the active
  set changes (figures over different sets are not comparable) and needs `min_baseline` frames.
- out of distribution (absolute, from the first frame; `OodWatch`): each frame's figures are scored
  against the artifact's `ood_reference` (core/ood.py). Per acquisition, the first flagged frame
  raises an "ood" advisory and a later unflagged one an "ood_cleared" advisory (each state change
  once). An artifact without a reference gives no score and no such advisory.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.ood import OodReference, OodScore
from elit_stream.core.postprocess import FrameAnalysis

MAD_TO_SIGMA = 1.4826
MAX_ACQUISITIONS = 256      # acquisitions whose OOD state is remembered


@dataclass(frozen=True)
class PolicyConfig:
    window: int = 20
    drift_factor: float = 2.0
    outlier_z: float = 3.0
    auto_deselect: bool = False
    min_active: int = 2
    outlier_frames: int = 3
    min_baseline: int = 5
    drift_floor: float = 0.02
    mad_floor: float = 0.02

    def __post_init__(self) -> None:
        for name in ("window", "min_active", "outlier_frames", "min_baseline"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an integer >= 1")
        for name in ("drift_factor", "outlier_z", "drift_floor", "mad_floor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0")


@dataclass
class Advisory:
    kind: str                      # "drift" | "outlier" | "ood" | "ood_cleared"
    members: tuple[int, ...]       # member ids concerned (all active ones for drift)
    message: str
    figures: dict = field(default_factory=dict)   # plain floats/ints (msgpack-ready)


class OodWatch:
    """Scores frames against an OOD reference; per acquisition, advisories on state changes."""

    def __init__(self, reference: dict | None, pixel_range_pm=None):
        self.reference = OodReference.of(reference, pixel_range_pm)
        self._state: dict[str, bool] = {}          # acquisition -> flagged (LRU order)
        self.last: dict | None = None

    def score(self, analysis: FrameAnalysis, threshold: float,
              pixel_size_pm: float | None = None) -> OodScore | None:
        if self.reference is None:
            return None
        return self.reference.score(analysis.figures, threshold, pixel_size_pm)

    def observe(self, ood: OodScore | None, acquisition: str, frame_id: int,
                members: tuple[int, ...]) -> list[Advisory]:
        if ood is None:
            return []
        self.last = {"acquisition": acquisition, "frame_id": frame_id,
                     "score": round(ood.score, 4), "flagged": ood.flagged}
        was = self._state.pop(acquisition, False)
        self._state[acquisition] = ood.flagged
        if len(self._state) > MAX_ACQUISITIONS:
            self._state.pop(next(iter(self._state)))
        if ood.flagged == was:
            return []
        figures = {"ood": round(ood.score, 4), "flag_above": self.reference.flag_above,
                   "excursions": dict(ood.excursions)}
        if ood.flagged:
            worst = ood.worst
            if worst == "pixel_size" and self.reference.pixel_range_pm:
                worst += " (outside the trained {:g}-{:g} pm/px)".format(*self.reference.pixel_range_pm)
            msg = (f"frame {frame_id} of {acquisition!r} is out of distribution (score "
                   f"{ood.score:.2f} > {self.reference.flag_above:g}, mostly {worst}): "
                   f"the ensemble has not been trained for data like this")
            return [Advisory("ood", members, msg, figures)]
        msg = f"frame {frame_id} of {acquisition!r} is back in distribution (score {ood.score:.2f})"
        return [Advisory("ood_cleared", members, msg, figures)]

    def status(self) -> dict:
        if self.reference is None:
            return {"reference": False, "note": "the artifact has no ood_reference: no absolute "
                    "out-of-distribution score (add one with `elit-train reference ARTIFACT`)"}
        ref = self.reference
        return {"reference": True, "figures": sorted(ref.bands), "flag_above": ref.flag_above,
                "threshold": ref.threshold, "reference_frames": ref.frames,
                "flagged_acquisitions": sorted(a for a, f in self._state.items() if f),
                "last": self.last}


class SelectionPolicy:
    def __init__(self, cfg: PolicyConfig, member_ids, ood_reference: dict | None = None,
                 pixel_range_pm=None):
        self.cfg = cfg
        self.member_ids = tuple(int(m) for m in member_ids)
        n, w = len(self.member_ids), cfg.window
        self._dis = np.zeros((w, n), np.float32)
        self._count = np.zeros((w, n), np.int32)
        self._z = np.zeros(n, np.float32)
        self._frames = 0
        self._streak = np.zeros(n, np.int32)
        self._baseline = {"mean_uncertainty": deque(maxlen=w), "mean_disagreement": deque(maxlen=w)}
        self._drifting = False
        self._version: int | None = None
        self._active_idx = np.arange(n)
        self.ood = OodWatch(ood_reference, pixel_range_pm)

    def observe(self, analysis: FrameAnalysis, active: ActiveSet, ood: OodScore | None = None,
                acquisition: str = "", frame_id: int = 0) -> list[Advisory]:
        if active.all_members != self.member_ids:
            raise ValueError("active set is for another ensemble (member ids differ)")
        dis = np.asarray(analysis.disagreement_per_member, np.float32)
        row = self._frames % self.cfg.window
        self._dis[row], self._count[row] = dis, analysis.count_per_member
        self._frames += 1
        idx = active.indices
        if active.version != self._version:
            self._version, self._active_idx = active.version, idx
            for series in self._baseline.values():
                series.clear()
            self._drifting = False
            self._streak[:] = 0
        out = self._outliers(dis, idx)
        drift = self._drift({"mean_uncertainty": float(analysis.mean_uncertainty),
                             "mean_disagreement": float(dis[idx].mean())}, active)
        return out + drift + self.ood.observe(ood, acquisition, frame_id, active.active)

    def _outliers(self, dis: np.ndarray, idx: np.ndarray) -> list[Advisory]:
        self._z[:] = 0.0
        if idx.size < 3:
            self._streak[:] = 0
            return []
        d = dis[idx]
        med = float(np.median(d))
        scale = MAD_TO_SIGMA * float(np.median(np.abs(d - med))) + self.cfg.mad_floor
        self._z[idx] = (d - med) / scale
        flagged = np.zeros_like(self._streak, bool)
        flagged[idx] = self._z[idx] > self.cfg.outlier_z
        self._streak = np.where(flagged, self._streak + 1, 0).astype(np.int32)
        new = np.flatnonzero(self._streak == self.cfg.outlier_frames)
        if new.size == 0:
            return []
        ids = tuple(self.member_ids[i] for i in new)
        figures = {"z": {str(self.member_ids[i]): round(float(self._z[i]), 3) for i in new},
                   "disagreement": {str(self.member_ids[i]): round(float(dis[i]), 4) for i in new},
                   "median_disagreement": round(med, 4), "frames": self.cfg.outlier_frames}
        msg = (f"member(s) {list(ids)} disagree with the consensus far more than the other "
               f"active members (robust z > {self.cfg.outlier_z} for "
               f"{self.cfg.outlier_frames} frames)")
        return [Advisory("outlier", ids, msg, figures)]

    def _drift(self, now: dict[str, float], active: ActiveSet) -> list[Advisory]:
        cfg = self.cfg
        jumped = {}
        for key, value in now.items():
            series = self._baseline[key]
            if len(series) >= cfg.min_baseline:
                base = float(np.median(series))
                if value > cfg.drift_factor * base + cfg.drift_floor:
                    jumped[key] = {"value": round(value, 4), "baseline": round(base, 4)}
            series.append(value)
        if not jumped:
            self._drifting = False
            return []
        if self._drifting:
            return []
        self._drifting = True
        names = " and ".join(k.replace("_", " ") for k in jumped)
        msg = (f"{names} jumped above {cfg.drift_factor}x the median of the last "
               f"{cfg.window} frames: the data may have left what the ensemble knows")
        return [Advisory("drift", active.active, msg, jumped)]

    def suggest_deselect(self) -> tuple[int, ...]:
        """Active members in a current outlier streak, worst first, keeping min_active."""
        idx = self._active_idx
        bad = idx[self._streak[idx] >= self.cfg.outlier_frames]
        room = max(0, idx.size - self.cfg.min_active)
        bad = bad[np.argsort(-self._z[bad], kind="stable")][:room]
        return tuple(self.member_ids[i] for i in bad)

    def member_stats(self) -> dict[int, dict]:
        """Per member, over the last `window` frames (plain Python numbers)."""
        n = min(self._frames, self.cfg.window)
        dis, count = self._dis[:n], self._count[:n]
        last = (self._frames - 1) % self.cfg.window
        active = set(self._active_idx.tolist())
        stats = {}
        for i, mid in enumerate(self.member_ids):
            stats[mid] = {
                "active": i in active, "frames": n,
                "disagreement_mean": float(dis[:, i].mean()) if n else None,
                "disagreement_last": float(self._dis[last, i]) if n else None,
                "count_mean": float(count[:, i].mean()) if n else None,
                "count_last": int(self._count[last, i]) if n else None,
                "z_last": float(self._z[i]), "outlier_streak": int(self._streak[i])}
        return stats
