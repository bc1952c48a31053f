"""The view's side of the service: a results subscriber and a control client like any other.

- `result` and `event.` are subscribed for the whole run (small messages: health history
  and the event log are there when a page opens).
- `member_maps` (per-member atom maps + the frame, docs/protocol.md 2.2b) is subscribed only
  while at least one page is open; the service computes it only while someone subscribes.
  Its socket has a receive high-water mark of 2 and is read as fast as it arrives: stale maps
  are dropped here, never queued.
- `status` and `members` are asked once per `poll_s`; operator actions go through a second
  control client so a slow `load_model` never stalls the polling.

With CURVE (`curve`), every socket uses the view's key pair: the view has exactly the authority
of `elit-stream ctl` with the same keys.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zmq
import zmq.asyncio

from elit_stream.protocol import wire
from elit_stream.protocol.client import ControlClient
from elit_stream.protocol.messages import SetParamsRequest
from elit_stream.tools.view import render
from elit_stream.tools.view.state import ViewState

log = logging.getLogger(__name__)

ACTIONS = {"select", "deselect", "set_active", "reset", "set_params", "load_model"}
PARAM_KEYS = frozenset(SetParamsRequest.model_fields) - {"cmd", "id"}   # what set_params takes
RECENT_RESULTS = 16


class ActionError(ValueError):
    """A browser request that the view refuses before it reaches the service."""


def list_models(dirs: list[Path]) -> list[str]:
    """Names of the artifact folders (with a manifest.json) directly under `dirs`."""
    names = set()
    for d in dirs:
        if d.is_dir():
            names.update(p.parent.name for p in d.glob("*/manifest.json"))
    return sorted(names)


def check_action(req: dict) -> tuple[str, dict]:
    """Browser request -> (cmd, args) for the control socket; ActionError if not allowed."""
    cmd = req.get("cmd")
    if cmd not in ACTIONS:
        raise ActionError(f"{cmd!r} is not an action of the view (allowed: {sorted(ACTIONS)})")
    args = {k: v for k, v in req.items() if k not in ("type", "cmd", "id")}
    allowed = {"select": {"members"}, "deselect": {"members"}, "set_active": {"members"},
               "reset": set(), "set_params": PARAM_KEYS, "load_model": {"path"}}[cmd]
    extra = set(args) - allowed
    if extra:
        raise ActionError(f"{cmd}: unexpected argument(s) {sorted(extra)}")
    return cmd, args


class ServiceLink:
    """Fills a ViewState from the service; `run()` until cancelled."""

    def __init__(self, state: ViewState, results: str, control: str, curve=None, *,
                 models_dirs: list[Path] = (), unc_max: float = 0.25, fps: float = 5.0,
                 max_px: int = 384, thumb_px: int = 96, poll_s: float = 1.0):
        self.state, self.results_addr, self.control_addr = state, results, control
        self.curve, self.models_dirs = curve, [Path(d) for d in models_dirs]
        self.unc_max, self.min_gap_s, self.max_px, self.thumb_px = unc_max, 1.0 / fps, max_px, \
            thumb_px
        self.poll_s = poll_s
        self.ctx = zmq.asyncio.Context()
        # Commands are answered between frames: allow a few slow frames before "not answering".
        self._poll_ctl = ControlClient(control, timeout_s=max(10.0, 2 * poll_s), curve=curve)
        self._action_ctl = ControlClient(control, timeout_s=120.0, curve=curve)
        self._poll_pool = ThreadPoolExecutor(1, thread_name_prefix="view-poll")
        self._action_pool = ThreadPoolExecutor(1, thread_name_prefix="view-action")
        self._recent: dict[tuple, dict] = {}
        self._pending_subset: list[dict] = []          # subset lines waiting for their frame
        self._last_result_s = self._last_images_s = 0.0
        self.maps_subscribed = False
        self.counts = {"results": 0, "member_maps": 0, "member_maps_skipped": 0}

    # ------------------------------------------------------------------ sockets
    def _sub(self, hwm: int) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, hwm)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(s)
        s.connect(self.results_addr)
        return s

    async def run(self) -> None:
        self.sub = self._sub(100_000)
        for t in (b"result", b"event."):
            self.sub.setsockopt(zmq.SUBSCRIBE, t)
        self.maps = self._sub(2)
        self.browsers_changed(self.state.browsers)        # a page may have come first
        try:
            await asyncio.gather(self._read_results(), self._read_maps(), self._poll())
        finally:
            self.close()

    def close(self) -> None:
        for s in (getattr(self, "sub", None), getattr(self, "maps", None)):
            if s is not None:
                s.close(0)
        self._poll_pool.shutdown(wait=False, cancel_futures=True)
        self._action_pool.shutdown(wait=False, cancel_futures=True)
        self._poll_ctl.close()
        self._action_ctl.close()
        self.ctx.term()

    def browsers_changed(self, n: int) -> None:
        """Subscribe to member_maps while a page is open, unsubscribe when the last closes."""
        want = n > 0
        if want != self.maps_subscribed and hasattr(self, "maps"):
            opt = zmq.SUBSCRIBE if want else zmq.UNSUBSCRIBE
            self.maps.setsockopt(opt, wire.TOPIC_MEMBER_MAPS)
            self.maps_subscribed = want
            log.info("%s member_maps", "subscribed to" if want else "unsubscribed from")

    # ------------------------------------------------------------------ readers
    async def _read_results(self) -> None:
        while True:
            parts = await self.sub.recv_multipart(copy=False)
            try:
                msg = wire.decode_published(parts)
                if msg["topic"] == "result":
                    self._on_result(msg)
                else:
                    self._on_event(msg)
            except (wire.ProtocolError, KeyError, TypeError, ValueError) as exc:
                self._unreadable(exc)

    def _unreadable(self, exc: Exception) -> None:
        """A message the view cannot read: said in the log and on the page, then go on."""
        log.warning("unreadable message from the service: %s", exc)
        self.state.log({"kind": "error", "event": "unreadable", "text": str(exc)})

    def _on_result(self, msg: dict) -> None:
        self.counts["results"] += 1
        self.state.health.add_result(msg.get("timings_ms", {}))
        self._recent[(msg["acquisition"], msg["frame_id"])] = msg
        while len(self._recent) > RECENT_RESULTS:
            self._recent.pop(next(iter(self._recent)))
        self._fill_subset_frames(msg)
        now = time.monotonic()
        if self.state.browsers and now - self._last_result_s >= self.min_gap_s:
            self._last_result_s = now
            self.state.set("result", render.result_summary(msg))

    def _fill_subset_frames(self, msg: dict) -> None:
        """A subset change applies from the first result that names its version."""
        done = [e for e in self._pending_subset
                if msg.get("active_version", -1) >= e["active_version"]]
        for e in done:
            e["frame"] = msg["frame_id"]
            self._pending_subset.remove(e)
        if done:
            self.state.touch_events()

    def _on_event(self, doc: dict) -> None:
        entry = render.event_entry(doc)
        if entry is None:
            return
        line = self.state.log(entry)
        if entry["kind"] == "subset":
            self._pending_subset.append(line)

    async def _read_maps(self) -> None:
        while True:
            parts = await self.maps.recv_multipart(copy=False)
            self.counts["member_maps"] += 1
            now = time.monotonic()
            if now - self._last_images_s < self.min_gap_s or not self.state.browsers:
                self.counts["member_maps_skipped"] += 1
                continue
            self._last_images_s = now
            try:
                mm = wire.decode_published(parts)
                payload = render.images(mm, self.unc_max, self.max_px, self.thumb_px)
                raw = self._recent.get((mm["acquisition"], mm["frame_id"]))
                payload["result"] = render.result_summary(raw) if raw is not None else None
            except (wire.ProtocolError, KeyError, TypeError, ValueError) as exc:
                self._unreadable(exc)
                continue
            self.state.set("images", payload)

    # ------------------------------------------------------------------ control
    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = time.monotonic()
            status = await loop.run_in_executor(self._poll_pool, self._status)
            self.state.set("status", status)
            if status.get("ok"):
                self.state.health.add_status(status)
            self.state.set("health", self.state.health.series())
            await asyncio.sleep(max(0.05, self.poll_s - (time.monotonic() - t0)))

    def _status(self) -> dict:
        """status + members in one dict for the page; {"ok": False, "error"} if unreachable."""
        try:
            st = self._poll_ctl.call("status")
            mem = self._poll_ctl.call("members")
        except (TimeoutError, wire.ProtocolError) as exc:
            why = "does not answer" if isinstance(exc, TimeoutError) else f"answered {exc}"
            return {"ok": False, "error": f"the service at {self.control_addr} {why}",
                    "models": list_models(self.models_dirs)}
        return {**st, "members": mem.get("members", []), "models": list_models(self.models_dirs),
                "view": {"maps_subscribed": self.maps_subscribed, **self.counts}}

    async def action(self, req: dict) -> dict:
        """Send one operator action; the reply (or a refusal) goes back to the page and into
        the event log."""
        try:
            cmd, args = check_action(req)
        except ActionError as exc:
            return {"ok": False, "cmd": req.get("cmd"), "error": {"code": "bad_args",
                                                                   "message": str(exc)}}
        loop = asyncio.get_running_loop()
        try:
            reply = await loop.run_in_executor(self._action_pool,
                                               lambda: self._action_ctl.call(cmd, **args))
        except (TimeoutError, wire.ProtocolError) as exc:
            reply = {"ok": False, "cmd": cmd, "error": {"code": "timeout", "message":
                     f"the service did not answer ({exc})"}}
        self.state.log({"kind": "action", "event": cmd, "members": args.get("members"),
                        "text": _action_text(cmd, args, reply)})
        return reply


def _action_text(cmd: str, args: dict, reply: dict) -> str:
    shown = " ".join(f"{k}={v}" for k, v in args.items())
    if reply.get("ok"):
        tail = f"active {reply['active']} (v{reply.get('active_version')})" \
            if "active" in reply else str(reply.get("params", ""))
        return f"operator: {cmd} {shown} -> ok, {tail}"
    err = reply.get("error") or {}
    return f"operator: {cmd} {shown} -> refused: {err.get('code')}: {err.get('message')}"
