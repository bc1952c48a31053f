"""Frame admission: every number of a decoded frame header checked against the loaded model and
the configured limits before any work is done, plus the memory of answered frames (repeats) and
rate-limited warnings.

`wire.decode_frame` has already checked types, the frame id range (0 .. 2^63 - 1), the pixel
count (`delivery.max_frame_px`) and finiteness. Here: the pixel size against the model's
`pixel_size_range_pm` widened by `limits.pixel_size_factor`, and the network input the frame
would become (after rescaling and padding) against `limits.max_input_px`. A frame without a
pixel size is taken at the model's own; a `warning` event says so once per acquisition.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from elit_stream.core.engine import Engine, EngineError
from elit_stream.protocol.wire import Frame, ProtocolError

log = logging.getLogger(__name__)

MAX_REMEMBERED_FRAMES = 65_536     # answered (acquisition, frame id) pairs kept for repeats
MAX_REMEMBERED_ACQUISITIONS = 256  # acquisitions warned about a missing pixel size


class Admission:
    """`check(frame, engine) -> pixel size to use`; raises ProtocolError naming the frame."""

    def __init__(self, pixel_size_factor: float, max_input_px: int,
                 warn: Callable[[str, str, Frame], None]):
        self.pixel_size_factor, self.max_input_px = pixel_size_factor, max_input_px
        self._warn = warn
        self._warned: OrderedDict[str, None] = OrderedDict()

    def pixel_size_range_pm(self, engine: Engine) -> tuple[float, float]:
        lo, hi = engine.artifact.manifest["pixel_size_range_pm"]
        return lo / self.pixel_size_factor, hi * self.pixel_size_factor

    def check(self, frame: Frame, engine: Engine) -> float:
        art = engine.artifact
        ps = frame.pixel_size_pm
        if ps is None:
            ps = art.pixel_size_pm
            self._warn_missing_pixel_size(frame, ps)
        lo, hi = self.pixel_size_range_pm(engine)
        if not lo <= ps <= hi:
            raise ProtocolError("bad_pixel_size", f"pixel_size_pm {ps:g} is outside "
                                f"{lo:g}..{hi:g} (the model's range {art.manifest['pixel_size_range_pm']}"
                                f" widened by limits.pixel_size_factor {self.pixel_size_factor:g})",
                                frame.acquisition, frame.frame_id)
        try:
            _valid, net, _scale = engine.net_shape_for(frame.pixels.shape, ps)
        except EngineError as exc:
            raise ProtocolError("bad_frame", str(exc), frame.acquisition, frame.frame_id) from None
        if net[0] * net[1] > self.max_input_px:
            raise ProtocolError("too_large", f"frame {frame.pixels.shape[0]}x"
                                f"{frame.pixels.shape[1]} at {ps:g} pm/px becomes a {net[0]}x"
                                f"{net[1]} network input, more than limits.max_input_px "
                                f"{self.max_input_px}", frame.acquisition, frame.frame_id)
        return ps

    def _warn_missing_pixel_size(self, frame: Frame, assumed_pm: float) -> None:
        if frame.acquisition in self._warned:
            return
        self._warned[frame.acquisition] = None
        if len(self._warned) > MAX_REMEMBERED_ACQUISITIONS:
            self._warned.popitem(last=False)
        self._warn("no_pixel_size", f"acquisition {frame.acquisition!r} sends no pixel_size_pm "
                   f"(first at frame {frame.frame_id}); assuming the model's {assumed_pm:g} pm/px "
                   "for all its frames (said once per acquisition)", frame)


class AnsweredFrames:
    """The (acquisition, frame id) pairs this run has published a result for, the most recent
    MAX_REMEMBERED_FRAMES of them: a resent frame is recognised and its result marked a repeat."""

    def __init__(self, capacity: int = MAX_REMEMBERED_FRAMES):
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, int]) -> None:
        self._seen[key] = None
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)


class RateLimitedLog:
    """At most one log line per key per `interval_s`; the next one says how many were held back."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0):
        self.logger, self.interval_s = logger, interval_s
        self._last: dict[str, tuple[float, int]] = {}    # key -> (time of last line, held back)

    def warning(self, key: str, msg: str, *args) -> bool:
        """Log (True) or count (False)."""
        now = time.monotonic()
        last_s, held = self._last.get(key, (-1e18, 0))
        if now - last_s < self.interval_s:
            self._last[key] = (last_s, held + 1)
            return False
        if len(self._last) > 1024:          # keys come from a fixed set; guard anyway
            self._last.clear()
        self._last[key] = (now, 0)
        if held:
            msg += f" ({held} more like this in the last {now - last_s:.0f} s not logged)"
        self.logger.warning(msg, *args)
        return True
