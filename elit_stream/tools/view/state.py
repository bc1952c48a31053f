"""What the live view knows about the service, kept as *latest values*, never as queues.

Every browser is served from this one state: the latest frame summary, the latest images,
the latest status, the last events and a bounded health history. A browser's sender asks
"what changed since generation g?" and gets at most one copy of each slot, so a slow or
stalled browser skips frames instead of queueing them. Nothing here
touches sockets: `link.py` fills it, `server.py` reads it.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from statistics import median

HEALTH_WINDOW_S = 600          # health plots cover the last ten minutes
EVENT_LOG_LEN = 300
STAGES = ("decode", "prepare", "infer", "analyse", "total")


@dataclass
class Slot:
    """One latest value and the generation at which it was set."""

    value: dict | None = None
    gen: int = 0


class EventLog:
    """The last `maxlen` events (operator-readable), numbered from 1."""

    def __init__(self, maxlen: int = EVENT_LOG_LEN):
        self.items: deque[dict] = deque(maxlen=maxlen)
        self.last_n = 0

    def add(self, entry: dict) -> None:
        self.last_n += 1
        self.items.append({"n": self.last_n, **entry})

    def last(self, n: int) -> list[dict]:
        return list(self.items)[-n:]


@dataclass
class HealthBin:
    """One second of service health."""

    t: float
    frames: int = 0
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    queue_depth: int | None = None
    dropped: int | None = None           # cumulative counts from `status`
    rejected: int | None = None


class Health:
    """Per-second bins over the last HEALTH_WINDOW_S seconds."""

    def __init__(self, window_s: int = HEALTH_WINDOW_S):
        self.bins: deque[HealthBin] = deque(maxlen=window_s)

    def _bin(self, now: float) -> HealthBin:
        t = float(int(now))
        if not self.bins or self.bins[-1].t < t:
            self.bins.append(HealthBin(t))
        return self.bins[-1]

    def add_result(self, timings_ms: dict, now: float | None = None) -> None:
        b = self._bin(now if now is not None else time.time())
        b.frames += 1
        for s in STAGES:
            if s in timings_ms:
                b.stage_ms[s].append(float(timings_ms[s]))

    def add_status(self, status: dict, now: float | None = None) -> None:
        b = self._bin(now if now is not None else time.time())
        counts = status.get("counts") or {}
        b.queue_depth = status.get("queue_depth")
        b.dropped, b.rejected = counts.get("dropped"), counts.get("rejected")

    def series(self) -> dict:
        """Columns for the plots: t (s, relative to now), fps, median stage ms, queue depth,
        dropped / rejected per second (differences of the cumulative counts)."""
        bins = list(self.bins)
        now = time.time()
        out: dict = {"t": [round(b.t - now, 1) for b in bins], "fps": [b.frames for b in bins],
                     "queue_depth": [b.queue_depth for b in bins]}
        for s in STAGES:
            out[s] = [round(median(b.stage_ms[s]), 2) if b.stage_ms[s] else None for b in bins]
        for key in ("dropped", "rejected"):
            vals, prev, col = [getattr(b, key) for b in bins], None, []
            for v in vals:
                col.append(None if v is None or prev is None else max(0, v - prev))
                prev = v if v is not None else prev
            out[key] = col
            out[key + "_total"] = next((v for v in reversed(vals) if v is not None), None)
        return out


class ViewState:
    """All the view shows; `changed()` wakes every browser sender after an update."""

    SLOTS = ("result", "images", "status", "health", "events")
    EVENTS_SHOWN = 60

    def __init__(self) -> None:
        self.slots = {name: Slot() for name in self.SLOTS}
        self.events = EventLog()
        self.health = Health()
        self.gen = 0
        self._cond: asyncio.Condition | None = None
        self.browsers = 0

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def set(self, name: str, value: dict) -> None:
        self.gen += 1
        self.slots[name].value, self.slots[name].gen = value, self.gen
        self._notify()

    def log(self, entry: dict) -> dict:
        """Add an event line; returns it (fill in later fields, then `touch_events()`)."""
        self.events.add({"time": round(time.time(), 3), **entry})
        self.touch_events()
        return self.events.items[-1]

    def touch_events(self) -> None:
        self.set("events", {"events": self.events.last(self.EVENTS_SHOWN)})

    def _notify(self) -> None:
        cond = self._condition()

        async def wake() -> None:
            async with cond:
                cond.notify_all()
        asyncio.get_running_loop().create_task(wake())

    async def wait_newer(self, gen: int, timeout_s: float) -> None:
        """Return once `self.gen > gen` (or after `timeout_s`)."""
        cond = self._condition()
        async with cond:
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self.gen > gen), timeout_s)
            except TimeoutError:
                pass
