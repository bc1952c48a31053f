"""The artifact on the suite's frames, exactly as the service runs it: `core.pipeline.analyse_frame`
(the function the service's frame thread and `elit-stream batch` call): `Engine.prepare(frame,
pixel_size_pm)` (rescale to the model's pixel size, per-frame min-max, pad), `Engine.run`,
`postprocess.analyse` over the active members (here: all) with the default `Params`, coordinates
back to the input frame's pixels, and the OOD score against the artifact's `ood_reference`.
In-process, no sockets.

Optional outputs, used where the artifact provides them: a class-confidence column (first of
CLASS_CONF_NAMES found on the FrameAnalysis) and the out-of-distribution flag (None for an
artifact without an `ood_reference`). Absent -> None, reported as "n/a".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.ood import OodReference
from elit_stream.core.pipeline import FrameRejected, analyse_frame
from elit_stream.core.postprocess import Params

CLASS_CONF_NAMES = ("cls_prob", "class_conf", "class_prob", "cls_conf", "class_confidence")
HEAVY_CLASS_NAMES = ("impurity", "heavy")


@dataclass
class Detections:
    xy: np.ndarray                   # [N, 2] (x, y) in frame pixels
    heavy: np.ndarray                # [N] uint8, 1 = the artifact's heavy class
    uncertainty: np.ndarray          # [N]
    class_conf: np.ndarray | None    # [N] or None
    ood: bool | None
    mean_uncertainty: float
    count_per_member: list
    seconds: float
    error: str | None = None
    atom_map: np.ndarray | None = None    # consensus atom map, network grid, valid region
    std_map: np.ndarray | None = None     # std over members of the atom map
    scale: float = 1.0                    # network pixels per frame pixel


class ModelRunner:
    """One artifact, one engine, all members active."""

    def __init__(self, model_dir, threads: int | None = None):
        self.artifact = load_artifact(model_dir)
        self.engine = Engine(self.artifact, device="cpu", threads=threads)
        self.active_set = ActiveSet.full(self.artifact.member_ids)
        self.active = self.active_set.indices
        self.params = Params()
        self.ood_reference = OodReference.of(self.artifact.ood_reference,
                                             self.artifact.manifest["pixel_size_range_pm"])
        names = [n.lower() for n in self.artifact.class_names]
        self.heavy_index = next((names.index(n) for n in HEAVY_CLASS_NAMES if n in names), None)

    @property
    def pixel_range_pm(self) -> tuple[float, float]:
        lo, hi = self.artifact.manifest.get("pixel_size_range_pm", [None, None])
        return lo, hi

    def detect(self, image: np.ndarray, pixel_size_pm: float | None,
               want_maps: bool = False) -> Detections:
        t0 = time.perf_counter()
        try:
            out = analyse_frame(self.engine, image, pixel_size_pm, self.active_set, self.params,
                                ood_reference=self.ood_reference)
        except FrameRejected as exc:      # the service rejects such a frame (bad_frame)
            return _rejected(str(exc), time.perf_counter() - t0)
        fa, geom, probs, x, y = out.analysis, out.geom, out.probs, out.x, out.y
        seconds = time.perf_counter() - t0
        heavy = (fa.cls == self.heavy_index) if self.heavy_index is not None \
            else np.zeros(fa.n_atoms, bool)
        det = Detections(np.stack([x, y], 1).astype(np.float32), heavy.astype(np.uint8),
                         np.asarray(fa.uncertainty, float), _first(fa, CLASS_CONF_NAMES),
                         None if out.ood is None else bool(out.ood.flagged),
                         float(fa.mean_uncertainty),
                         [int(c) for c in fa.count_per_member], seconds, scale=geom.scale)
        if want_maps:
            vh, vw = geom.valid_shape
            atom = probs[self.active, :, :vh, :vw].sum(axis=1)
            det.atom_map, det.std_map = atom.mean(axis=0), atom.std(axis=0)
        return det


def _first(fa, names):
    for name in names:
        value = getattr(fa, name, None)
        if value is not None:
            return value
    return None


def _rejected(message: str, seconds: float) -> Detections:
    empty = np.empty(0)
    return Detections(np.empty((0, 2), np.float32), np.empty(0, np.uint8), empty, None, None,
                      0.0, [], seconds, error=message)
