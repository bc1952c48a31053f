"""Frame preparation, the step before the network: checks, per-frame min-max normalisation,
optional rescale to the artifact's pixel size and mirror padding to a valid network size, written
straight into the network's input buffer; and the `Geometry` that maps network pixels back to the
frame's. No inference runtime here (that is `engine.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from elit_stream.core.manifest import Artifact

RESCALE_TOLERANCE = 0.01          # rescale only when pixel sizes differ by more than 1 %
_WIDE = 1e30                      # |values| above / ranges below 1/_WIDE: float64 path (_tame)


class EngineError(Exception):
    """A frame cannot be prepared or a session cannot be created or run."""


@dataclass(frozen=True)
class Geometry:
    """How the network grid maps to the input frame.

    The frame occupies `valid_shape` at the top-left of the `net_shape` grid; `scale` is network
    pixels per frame pixel. Pixel-centre convention: x_frame = (x_net + 0.5) / scale - 0.5.
    """

    frame_shape: tuple[int, int]
    net_shape: tuple[int, int]
    valid_shape: tuple[int, int]
    scale: float

    def to_frame_xy(self, x_net: np.ndarray, y_net: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.scale == 1.0:
            return x_net, y_net
        inv = np.float32(1.0 / self.scale)
        return ((x_net + np.float32(0.5)) * inv - np.float32(0.5),
                (y_net + np.float32(0.5)) * inv - np.float32(0.5))

    def to_net_xy(self, x_frame: np.ndarray, y_frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.scale == 1.0:
            return x_frame, y_frame
        s = np.float32(self.scale)
        return (x_frame + np.float32(0.5)) * s - np.float32(0.5), \
            (y_frame + np.float32(0.5)) * s - np.float32(0.5)


# --- frame preparation (pure numpy) -------------------------------------------------------------

def _check_frame(frame: np.ndarray) -> tuple[float, float]:
    """Validate dtype/ndim and return (min, max); refuses NaN/Inf."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 2:
        raise EngineError(f"frame must be a 2-D array, got {getattr(frame, 'shape', type(frame))}")
    if frame.dtype.kind not in "uif":
        raise EngineError(f"frame dtype {frame.dtype} not supported (integer or float only)")
    if frame.size == 0:
        raise EngineError("frame is empty")
    lo, hi = frame.min(), frame.max()
    if frame.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise EngineError("frame contains NaN or Inf")
    return float(lo), float(hi)


def _affine_inplace(view: np.ndarray, lo: float, hi: float) -> None:
    """view <- (view - lo) / (hi - lo); a constant frame becomes zeros."""
    if hi > lo:
        view -= np.float32(lo)
        view *= np.float32(1.0 / (hi - lo))
    else:
        view.fill(0.0)


def _normalise_into(frame: np.ndarray, out: np.ndarray, lo: float, hi: float) -> None:
    """out[:] = minmax(frame) in float32, one subtraction pass + one scaling pass."""
    if hi > lo:
        np.subtract(frame, lo if frame.dtype.itemsize > 2 else np.float32(lo), out=out,
                    casting="unsafe")
        out *= np.float32(1.0 / (hi - lo))
    else:
        out.fill(0.0)


def _tame(frame: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, float, float]:
    """Float frames with values beyond +-1e30 or a range below 1e-30 would overflow float32
    arithmetic: pre-normalise them in float64 (dividing, and halving huge values so that
    hi - lo cannot overflow). Every other frame passes through untouched."""
    if frame.dtype.kind != "f" or not hi > lo:
        return frame, lo, hi
    huge = max(abs(lo), abs(hi)) > _WIDE
    if not huge and hi - lo >= 1.0 / _WIDE:
        return frame, lo, hi
    k = 0.5 if huge else 1.0
    x = frame.astype(np.float64) * k
    x -= lo * k
    x /= hi * k - lo * k
    return x.astype(np.float32), 0.0, 1.0


def normalise(raw: np.ndarray) -> np.ndarray:
    """Reference per-frame min-max normalisation (docs/artifact.md), float32 [H, W]."""
    raw, lo, hi = _tame(raw, *_check_frame(raw))
    out = np.empty(raw.shape, np.float32)
    _normalise_into(raw, out, lo, hi)
    return out


def _bilinear_taps(n_out: int, n_in: int, scale: float):
    """Source indices and weights for output pixel centres (pixel-centre convention)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    np.clip(src, 0, n_in - 1, out=src)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def _rescale_into(frame: np.ndarray, out: np.ndarray, scale: float) -> None:
    """Separable bilinear resampling of `frame` into `out` (float32, shape sets the size)."""
    h, w = out.shape
    y0, y1, wy = _bilinear_taps(h, frame.shape[0], scale)
    x0, x1, wx = _bilinear_taps(w, frame.shape[1], scale)
    rows = frame[y0].astype(np.float32)               # [h, W]; a + (b - a) w: exact when a == b
    rows += (frame[y1].astype(np.float32) - rows) * wy[:, None]
    np.take(rows, x0, axis=1, out=out)
    out += (np.take(rows, x1, axis=1) - out) * wx


def _pad_symmetric(buf: np.ndarray, h: int, w: int) -> None:
    """Fill buf[h:, :] and buf[:, w:] by half-sample mirroring of buf[:h, :w]."""
    hp, wp = buf.shape
    if hp > h:
        buf[h:, :w] = buf[_mirror(np.arange(h, hp), h), :w]
    if wp > w:
        buf[:, w:] = buf[:, _mirror(np.arange(w, wp), w)]


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    k = idx % (2 * n)
    return np.where(k < n, k, 2 * n - 1 - k)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def net_shape_for(artifact: Artifact, frame_shape: tuple[int, int],
                  pixel_size_pm: float | None = None):
    """(valid_shape, net_shape, scale) for a frame of this shape and pixel size."""
    scale = 1.0
    if pixel_size_pm is not None:
        if not (pixel_size_pm > 0 and np.isfinite(pixel_size_pm)):
            raise EngineError(f"pixel_size_pm must be > 0, got {pixel_size_pm}")
        ratio = pixel_size_pm / artifact.pixel_size_pm
        if abs(ratio - 1.0) > RESCALE_TOLERANCE:
            scale = ratio
    valid = tuple(round(n * scale) if scale != 1.0 else int(n) for n in frame_shape)
    net = tuple(_round_up(n, artifact.multiple_of) for n in valid)
    if min(valid) < artifact.min_px or max(net) > artifact.max_px:
        raise EngineError(f"frame {frame_shape[0]}x{frame_shape[1]} px becomes "
                          f"{valid[0]}x{valid[1]} at scale {scale:.3f}; the model takes "
                          f"{artifact.min_px}..{artifact.max_px} px per side")
    return valid, net, scale


def prepare(artifact: Artifact, frame: np.ndarray, pixel_size_pm: float | None = None
            ) -> tuple[np.ndarray, Geometry]:
    """frame [H, W] -> normalised, rescaled, padded float32 [1, 1, h, w] and its Geometry."""
    lo, hi = _check_frame(frame)
    valid, net, scale = net_shape_for(artifact, frame.shape, pixel_size_pm)
    frame, lo, hi = _tame(frame, lo, hi)
    buf = np.empty((1, 1, *net), np.float32)
    plane = buf[0, 0]
    view = plane[: valid[0], : valid[1]]
    if scale == 1.0:
        _normalise_into(frame, view, lo, hi)
    else:
        _rescale_into(frame, view, scale)                # float32, monotonic rounding:
        _affine_inplace(view, float(np.float32(lo)), float(np.float32(hi)))   # stays >= 0
    _pad_symmetric(plane, *valid)
    return buf, Geometry(tuple(frame.shape), net, valid, scale)
