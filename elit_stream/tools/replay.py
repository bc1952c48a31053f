"""Replay a recorded movie as if it were the microscope, and collect what the service answers.

Reads a movie with `readers.read_movie` (.npy, .npz, HDF5, TIFF, .dm3/.dm4, .emd, .hspy),
converts pixel types the service does not take (`sendable`), sends every frame over a real PUSH socket (at a given rate or as fast as
the service takes them); listens to results and events; can record every message to a JSON-lines
file (docs/protocol.md, "Recording"). Waits until every sent frame is answered (result) or
reported (frame_dropped / frame_rejected), or until a timeout; keeps every frame until then and
sends the unanswered again when the service restarts (docs/protocol.md, Delivery guarantees).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elit_stream.protocol.client import RETRY_CODES, ControlClient, LosslessSender
from elit_stream.tools.readers import StackError, read_movie, read_stack  # noqa: F401 (re-export)

SENDABLE_DTYPES = ("uint8", "uint16", "uint32", "float32", "float64")  # what ingest takes


def sendable(frames, name: str) -> tuple[Iterable[np.ndarray], str | None]:
    """Frames in a pixel type the service takes: others are converted here, once for the whole
    movie (frame by frame as they are sent), with a note saying so; None when nothing changes.
    Signed and 64-bit integers, float16 and bool become float32 (exact up to 2**24)."""
    dtype = np.dtype(frames.dtype)
    if dtype.name in SENDABLE_DTYPES:
        return frames, None
    if dtype.kind not in "biuf":
        raise StackError(f"{name}: pixels of type {dtype} cannot be sent (use "
                         f"{', '.join(SENDABLE_DTYPES)})")
    note = (f"{name}: {dtype} pixels converted to float32 for sending (the service takes "
            f"{', '.join(SENDABLE_DTYPES)})")
    if dtype.kind in "iu" and dtype.itemsize > 2:
        note += "; values beyond +-16,777,216 are rounded"
    return (np.asarray(f, dtype=np.float32) for f in frames), note


def service_model(control: str, timeout_s: float, curve=None) -> dict:
    """The running service's model (`status`): frames are rescaled to its pixel size.
    TimeoutError when no service answers."""
    with ControlClient(control, timeout_s=timeout_s, curve=curve) as ctl:
        return ctl.call("status").get("model", {})


def choose_pixel_size(name: str, movie, flag_pm: float | None, model_pm: float | None
                      ) -> tuple[float | None, str, list[str]]:
    """-> (pixel size to send or None, what was chosen and why, warnings). The option wins over
    the file; with neither the service assumes the model's (a warning); more than 2x off the
    model's means a big rescale (a warning: a factor-10 typo costs minutes per frame)."""
    model = f"{model_pm:g} pm" if model_pm else "its model's"
    if flag_pm is not None:
        ps, source = flag_pm, "--pixel-size-pm"
        if movie.pixel_size_pm is not None and abs(movie.pixel_size_pm - ps) > 1e-6 * ps:
            source += f", not the file's {movie.pixel_size_pm:g} pm"
    elif movie.pixel_size_pm is not None:
        ps, source = movie.pixel_size_pm, movie.pixel_size_from
    else:
        missing = (f"{name} carries no pixel size and no --pixel-size-pm was given: the "
                   f"service assumes the model's, {model}; if the images were taken at another "
                   "magnification the atoms found will be wrong")
        return None, "", [missing]
    said = f"pixel size {ps:g} pm ({source}); the model's is {model}"
    ratio = ps / model_pm if model_pm else 1.0
    if 0.5 <= ratio <= 2.0:
        return ps, said, []
    h, w = movie.frames.shape[1:]
    far = (f"{ps:g} pm is {ratio:.3g}x the model's {model}: every {h}x{w} frame is rescaled "
           f"to {round(h * ratio)}x{round(w * ratio)} px before the networks see it (slower, "
           "and atoms the wrong size if the pixel size is wrong)")
    return ps, said, [far]


@dataclass
class ReplayReport:
    """What happened to each frame sent: the service's answer, by frame id."""

    sent: int = 0
    results: dict = field(default_factory=dict)      # frame_id -> result dict (the first one)
    dropped: list = field(default_factory=list)      # frame ids reported dropped
    rejected: dict = field(default_factory=dict)     # frame_id -> (code, message)
    events: list = field(default_factory=list)       # every event received
    sent_at: dict = field(default_factory=dict)      # frame_id -> perf_counter at send
    complete: bool = False                           # every frame accounted for
    resent: int = 0                                  # frames sent again after a restart
    restarts: int = 0                                # service restarts seen (new run_uid)
    repeats: int = 0                                 # results for frames already answered
    unanswered: list = field(default_factory=list)   # frame ids never answered

    @property
    def answered(self) -> int:
        return len(self.results) + len(self.dropped) + len(self.rejected)


def replay(frames: Iterable[np.ndarray], endpoints: dict, *, acquisition: str | None = None,
           rate_fps: float | None = None, pixel_size_pm: float | None = None,
           record: Path | None = None, on_message: Callable[[dict, ReplayReport], None] | None = None,
           wait_s: float = 60.0, first_id: int = 0, curve=None,
           silence_s: float = 3.0, fast_scan: str | None = None) -> ReplayReport:
    """Send `frames`, collect answers; `on_message(msg, report)` sees every message live.
    Lossless across restarts: every frame is kept until answered and sent again when the
    service restarts (client.LosslessSender). `curve`: an auth.ClientCurve for CURVE."""
    acq = acquisition or f"replay-{int(time.time() * 1000)}"
    rep = ReplayReport()
    out = open(record, "w") if record else None

    def seen(msg: dict) -> None:
        _account(msg, acq, rep)
        if out:
            out.write(to_json_line(msg) + "\n")
        if on_message:
            on_message(msg, rep)

    with LosslessSender(endpoints, curve=curve, silence_s=silence_s) as ls:
        ls.start()
        t_start = time.perf_counter()
        for i, frame in enumerate(frames):
            if rate_fps:
                while (left := t_start + i / rate_fps - time.perf_counter()) > 0:
                    if (msg := ls.poll(left)) is not None:
                        seen(msg)
            fid = first_id + i
            rep.sent_at[fid] = time.perf_counter()
            ls.send(np.asarray(frame), fid, acq, pixel_size_pm=pixel_size_pm,
                    acquired_at=time.time(), fast_scan=fast_scan)
            rep.sent += 1
            while (msg := ls.poll(0)) is not None:
                seen(msg)
        rep.complete = ls.wait(wait_s, on_message=seen)
        rep.resent, rep.restarts, rep.repeats = ls.resent, ls.restarts, ls.repeats
        rep.unanswered = sorted(fid for a, fid in ls.pending if a == acq)
    if out:
        out.close()
    return rep


def _account(msg: dict, acq: str, rep: ReplayReport) -> None:
    topic = msg["topic"]
    if topic == "result" and msg["acquisition"] == acq:
        rep.results.setdefault(msg["frame_id"], msg)
    elif topic.startswith("event."):
        rep.events.append(msg)
        if msg["event"] == "frame_dropped":
            rep.dropped += [f["frame_id"] for f in msg["frames"] if f["acquisition"] == acq]
        elif (msg["event"] == "frame_rejected" and msg["frame"]["acquisition"] == acq
              and msg["code"] not in RETRY_CODES):
            rep.rejected[msg["frame"]["frame_id"]] = (msg["code"], msg["message"])


def to_json_line(msg: dict) -> str:
    """One message as one JSON line (numpy arrays become lists; float16 maps as floats)."""
    return json.dumps(msg, default=_json_default, separators=(",", ":"))


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "f" and np.isnan(obj).any():      # JSON has no NaN: null
            return np.where(np.isnan(obj), None, obj).tolist()
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def result_line(msg: dict, rep=None) -> str:
    """One human line per result (demo and replay)."""
    import time
    rt = ""
    if rep is not None and msg["frame_id"] in rep.sent_at:
        rt = f"  since sent {1e3 * (time.perf_counter() - rep.sent_at[msg['frame_id']]):6.1f} ms"
    t = msg["timings_ms"]
    unconfirmed = msg.get("unconfirmed", 0)
    more = f" (+{unconfirmed} unconfirmed)" if unconfirmed else ""
    return (f"frame {msg['frame_id']:4d}  atoms {msg['n_atoms']:4d}{more}  "
            f"mean uncertainty {msg['mean_uncertainty']:.3f}  "
            f"service {t['total']:6.1f} ms (infer {t['infer']:.1f}){rt}  "
            f"active v{msg['active_version']} {len(msg['active'])}/"
            f"{len(msg['count_per_member'])}{ood_text(msg)}")


def ood_text(msg: dict) -> str:
    """'  ood 0.00', '  OOD 3.41 (out of distribution)' or '' (no reference in the model)."""
    score = msg.get("ood")
    if score is None:
        return ""
    return f"  OOD {score:.2f} (out of distribution)" if msg.get("ood_flag") else f"  ood {score:.2f}"
