"""One frame through the ensemble, and the result document it becomes.

prepare (rescale, normalise, pad) -> run all members -> analyse over the active set -> map atom
coordinates back to the input frame's pixels -> the result header and atom columns of
docs/protocol.md. The service loop (``service/loop.py``) and ``elit-stream batch``
(``tools/batch.py``) both call ``analyse_frame`` and ``result_document``, so a movie analysed
offline gives exactly what the service publishes for it. Knows no sockets; pure apart from the
engine call.
"""
from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import numpy as np

from elit_stream.core.engine import Engine, EngineError, Geometry
from elit_stream.core.ensemble import ActiveSet
from elit_stream.core.ood import OodReference, OodScore
from elit_stream.core.postprocess import FrameAnalysis, Params, analyse

FAST_SCAN_TURNS = {"x": (False, False), "-x": (False, True),     # (transpose, then reverse
                   "y": (True, False), "-y": (True, True)}       # the columns)


class FrameRejected(Exception):
    """The model cannot take this frame (size, scale): the service's ``bad_frame``."""


@dataclass
class FrameOutput:
    """One analysed frame: atoms in network pixels (``analysis``) and in frame pixels (``x``,
    ``y``), the grid mapping, and the seconds each stage took."""
    analysis: FrameAnalysis
    x: np.ndarray
    y: np.ndarray
    geom: Geometry
    timings_s: dict[str, float]          # prepare, infer, analyse
    net_input: np.ndarray                # [1, 1, H, W] what the members saw (engine's buffer)
    probs: np.ndarray                    # [M, C, H, W] every member's maps (engine's buffer)
    ood: OodScore | None = None          # against the artifact's ood_reference; None without one
    transposed: bool = False             # fast_scan "y" / "-y": net_input and probs are of the
    flipped: bool = False                # frame turned (transposed, then its columns reversed)
    #                                      so that the fast scan runs left to right along rows;
    #                                      x, y, the maps and the result are in the frame's own
    #                                      orientation (`unturn`)


def analyse_frame(engine: Engine, pixels: np.ndarray, pixel_size_pm: float | None,
                  active: ActiveSet, params: Params, want_maps: bool = False,
                  ood_reference: OodReference | None = None,
                  fast_scan: str = "x") -> FrameOutput:
    """Run one frame; FrameRejected when it cannot be prepared, other errors propagate.
    With `ood_reference` (the artifact's, core/ood.py) the frame is scored against it.
    `fast_scan`: which way the scan's fast direction runs in the stored frame: "x" left to
    right along the rows (the usual), "-x" right to left, "y" top to bottom down the columns,
    "-y" bottom to top (a frame turned by 90 degrees counterclockwise after the scan). The
    members see the frame turned so that it runs left to right along the rows, as scan noise,
    jitter and detector lag do in their training world (detector lag trails the fast scan, so
    its sign matters too); atoms and maps come back in the frame's own orientation. The turn
    is a view: `prepare` copies into the network buffer either way."""
    transposed, flipped = FAST_SCAN_TURNS[fast_scan]
    if transposed:
        pixels = pixels.T
    if flipped:
        pixels = pixels[:, ::-1]
    t0 = perf_counter()
    try:
        net_input, geom = engine.prepare(pixels, pixel_size_pm)
    except EngineError as exc:
        raise FrameRejected(str(exc)) from None
    t1 = perf_counter()
    probs = engine.run(net_input)
    t2 = perf_counter()
    fa = analyse(probs, active.indices, params, geom.valid_shape, want_maps,
                 image=net_input[0, 0], heavy_class=engine.artifact.heavy_class)
    x, y = geom.to_frame_xy(fa.x, fa.y)
    if flipped:
        x = np.float32(pixels.shape[1] - 1) - x
    if transposed:
        x, y = y, x
    if want_maps and (transposed or flipped):
        fa.mean_map, fa.std_map = (unturn(m, transposed, flipped) for m in (fa.mean_map,
                                                                             fa.std_map))
    ood = (ood_reference.score(fa.figures, params.threshold, pixel_size_pm) if ood_reference
           else None)
    t3 = perf_counter()
    return FrameOutput(fa, x, y, geom, {"prepare": t1 - t0, "infer": t2 - t1, "analyse": t3 - t2},
                       net_input, probs, ood, transposed, flipped)


def unturn(maps: np.ndarray, transposed: bool, flipped: bool) -> np.ndarray:
    """[..., H, W] maps of the turned frame (valid region) back in the frame's orientation."""
    if flipped:
        maps = maps[..., ::-1]
    return maps.swapaxes(-1, -2) if transposed else maps


def result_document(frame, out: FrameOutput, active: ActiveSet, model_ref: dict,
                    class_names, seq: int, timings_s: dict[str, float], total_s: float
                    ) -> tuple[dict, dict[str, np.ndarray]]:
    """-> (result header, atom columns) as published (docs/protocol.md, "result").
    ``frame``: anything with ``wire.Frame``'s fields (frame_id, acquisition, pixels,
    pixel_size_pm, acquired_at, complete, fast_scan); ``seq``: the publisher's result counter."""
    fa = out.analysis
    header = {
        "protocol": 1, "kind": "result", "frame_id": frame.frame_id,
        "acquisition": frame.acquisition, "complete": frame.complete,
        "seq": seq, "model": model_ref, "active": list(active.active),
        "active_version": active.version, "frame_shape": list(frame.pixels.shape),
        "pixel_size_pm": frame.pixel_size_pm, "acquired_at": frame.acquired_at,
        "fast_scan": frame.fast_scan,
        "n_atoms": fa.n_atoms, "unconfirmed": fa.unconfirmed, "classes": list(class_names),
        "count_per_member": fa.count_per_member.tolist(),
        "disagreement_per_member": fa.disagreement_per_member.tolist(),
        "mean_uncertainty": fa.mean_uncertainty, "figures": fa.figures.as_dict(),
        "ood": None if out.ood is None else out.ood.score, "ood_flag": bool(out.ood and out.ood.flagged),
        "timings_ms": {k: round(v * 1e3, 3) for k, v in timings_s.items()}
        | {"total": round(total_s * 1e3, 3)},
    }
    columns = {"x": out.x.astype(np.float32, copy=False), "y": out.y.astype(np.float32, copy=False),
               "cls": fa.cls.astype(np.uint8, copy=False), "prob": fa.prob,
               "uncertainty": fa.uncertainty, "det_frac": fa.det_frac,
               "cls_prob": fa.cls_prob, "cls_agree": fa.cls_agree, "z_contrast": fa.z_contrast,
               "spread": fa.spread}
    return header, columns
