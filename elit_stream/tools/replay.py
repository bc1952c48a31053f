"""Replay a recorded movie as if it were the microscope, and collect what the service answers.

Reads .npy, .npz (a `frames` array, e.g. the movie format of `movie.save_movie`), multi-page
TIFF and HDF5 stacks; sends every frame over a real PUSH socket (at a given rate or as fast as
the service takes them); listens to results and events; can record every message to a JSON-lines
file (docs/protocol.md, "Recording"). Waits until every sent frame is answered (result) or
reported (frame_dropped / frame_rejected), or until a timeout.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from elit_stream.protocol.client import ControlClient, FrameSender, ResultSubscriber


class StackError(ValueError):
    """A movie file cannot be read as a stack of 2-D frames."""


def read_stack(path: str | Path, dataset: str | None = None) -> tuple[np.ndarray, float | None]:
    """-> (frames [T, H, W] (may be an h5py dataset or memory map), pixel_size_pm or None)."""
    p = Path(path)
    if not p.is_file():
        raise StackError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            return _as_stack(np.load(p, mmap_mode="r"), p), None
        if suffix == ".npz":
            return _read_npz(p)
        if suffix in (".tif", ".tiff"):
            import tifffile
            return _as_stack(tifffile.imread(p), p), None
        if suffix in (".h5", ".hdf5", ".hdf", ".nxs"):
            return _read_h5(p, dataset)
    except StackError:
        raise
    except Exception as exc:  # unreadable file: say which and why
        raise StackError(f"{p}: cannot read ({type(exc).__name__}: {exc})") from None
    raise StackError(f"{p}: unknown file type {suffix!r} (use .npy, .npz, .tif/.tiff, .h5/.hdf5)")


def _as_stack(a, p: Path):
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise StackError(f"{p}: need a 2-D frame or a 3-D stack [T, H, W], got shape {a.shape}")
    return a


def _read_npz(p: Path):
    with np.load(p) as z:
        if "frames" not in z.files:
            raise StackError(f"{p}: no 'frames' array (has {z.files})")
        ps = float(z["pixel_size_pm"]) if "pixel_size_pm" in z.files else None
        return _as_stack(z["frames"], p), ps


def _read_h5(p: Path, dataset: str | None):
    import h5py
    f = h5py.File(p, "r")
    if dataset is None:
        found: list[str] = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset)
                     and obj.ndim in (2, 3) and not found else None)
        if not found:
            raise StackError(f"{p}: no 2-D or 3-D dataset inside")
        dataset = found[0]
    if dataset not in f:
        raise StackError(f"{p}: no dataset {dataset!r}")
    ps = f[dataset].attrs.get("pixel_size_pm")
    return _as_stack(f[dataset], p), (float(ps) if ps is not None else None)


@dataclass
class ReplayReport:
    """What happened to each frame sent: the service's answer, by frame id."""

    sent: int = 0
    results: dict = field(default_factory=dict)      # frame_id -> result dict
    dropped: list = field(default_factory=list)      # frame ids reported dropped
    rejected: dict = field(default_factory=dict)     # frame_id -> (code, message)
    events: list = field(default_factory=list)       # every event received
    sent_at: dict = field(default_factory=dict)      # frame_id -> perf_counter at send
    complete: bool = False                           # every frame accounted for

    @property
    def answered(self) -> int:
        return len(self.results) + len(self.dropped) + len(self.rejected)


def replay(frames: Iterable[np.ndarray], endpoints: dict, *, acquisition: str | None = None,
           rate_fps: float | None = None, pixel_size_pm: float | None = None,
           record: Path | None = None, on_message: Callable[[dict, ReplayReport], None] | None = None,
           wait_s: float = 60.0, first_id: int = 0, curve=None) -> ReplayReport:
    """Send `frames`, collect answers; `on_message(msg, report)` sees every message live.
    `curve`: an auth.ClientCurve when the service requires CURVE."""
    acq = acquisition or f"replay-{int(time.time() * 1000)}"
    rep = ReplayReport()
    out = open(record, "w") if record else None
    with FrameSender(endpoints["ingest"], curve=curve) as sender, \
            ResultSubscriber(endpoints["results"], curve=curve) as sub, \
            ControlClient(endpoints["control"], curve=curve) as ctl:
        sub.wait_ready(ctl)

        def take(timeout_s: float) -> bool:
            msg = sub.recv(timeout_s)
            if msg is None:
                return False
            _account(msg, acq, rep)
            if out:
                out.write(to_json_line(msg) + "\n")
            if on_message:
                on_message(msg, rep)
            return True

        t_start = time.perf_counter()
        for i, frame in enumerate(frames):
            if rate_fps:
                while (left := t_start + i / rate_fps - time.perf_counter()) > 0:
                    take(left)
            fid = first_id + i
            rep.sent_at[fid] = time.perf_counter()
            sender.send(np.asarray(frame), fid, acq, pixel_size_pm=pixel_size_pm,
                        acquired_at=time.time())
            rep.sent += 1
            while take(0):
                pass
        deadline = time.monotonic() + wait_s
        while rep.answered < rep.sent and time.monotonic() < deadline:
            take(min(0.2, max(0.0, deadline - time.monotonic())))
        rep.complete = rep.answered >= rep.sent
    if out:
        out.close()
    return rep


def _account(msg: dict, acq: str, rep: ReplayReport) -> None:
    topic = msg["topic"]
    if topic == "result" and msg["acquisition"] == acq:
        rep.results[msg["frame_id"]] = msg
    elif topic.startswith("event."):
        rep.events.append(msg)
        if msg["event"] == "frame_dropped":
            rep.dropped += [f["frame_id"] for f in msg["frames"] if f["acquisition"] == acq]
        elif msg["event"] == "frame_rejected" and msg["frame"]["acquisition"] == acq:
            rep.rejected[msg["frame"]["frame_id"]] = (msg["code"], msg["message"])


def to_json_line(msg: dict) -> str:
    """One message as one JSON line (numpy arrays become lists; float16 maps as floats)."""
    return json.dumps(msg, default=_json_default, separators=(",", ":"))


def _json_default(obj):
    if isinstance(obj, np.ndarray):
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
    return (f"frame {msg['frame_id']:4d}  atoms {msg['n_atoms']:4d}  "
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
