"""Control commands: command name -> handler table, and the background model loader.

`handle(state, body)` turns one request body into exactly one reply dict (or a `Deferred` for
`load_model`, answered when the load finishes). No exception escapes: unknown commands, bad
arguments and refused changes become `{ok: false, error: {code, message}}`, and a refused
change leaves the state as it was. Handlers run on the control thread (service/hub.py) under
`state.lock`; the frame thread takes its snapshot of the state under the same lock at each frame
boundary, so every change applies from the next frame it starts. Events go to `state.outbox`.
"""
from __future__ import annotations

import dataclasses
import logging
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from elit_stream.core.artifact import load_artifact
from elit_stream.core.engine import Engine
from elit_stream.core.ensemble import ActiveSet, SelectionError
from elit_stream.core.manifest import Artifact
from elit_stream.core.postprocess import Params
from elit_stream.protocol import messages as m
from elit_stream.protocol import wire
from elit_stream.service.selection import PolicyConfig, SelectionPolicy

log = logging.getLogger(__name__)


class Refused(Exception):
    """A handler refuses a request; becomes an error reply with this code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class State:
    """Everything control commands read or change. Changed under `lock` (control thread); the
    frame thread reads engine/active/params once per frame under the same lock."""

    engine: Engine
    active: ActiveSet
    params: Params
    policy: SelectionPolicy
    policy_cfg: PolicyConfig
    delivery: str
    run_uid: str
    allowed_dirs: list[Path]
    maps_mode: str = "subscribe"
    maps_downsample: int = 1
    counts: dict = field(default_factory=lambda: dict(received=0, processed=0, dropped=0,
                                                        rejected=0))
    queue_depth: int = 0
    warm_shape: tuple = (256, 256)
    started_s: float = field(default_factory=time.time)
    outbox: list = field(default_factory=list)   # (event name, payload) to publish
    loader: ModelLoader | None = None
    stop_reason: str | None = None
    auth: dict = field(default_factory=dict)      # socket -> requires CURVE
    lock: threading.RLock = field(default_factory=threading.RLock)
    in_flight: tuple | None = None     # (acquisition, frame id) the frame thread is working on
    next_result_seq: int = 0           # `seq` of the next result published
    limits: dict = field(default_factory=dict)   # shown by `status`

    @property
    def artifact(self) -> Artifact:
        return self.engine.artifact

    def model_ref(self) -> dict:
        return {"name": self.artifact.name, "sha256": self.artifact.manifest_sha256}


@dataclass
class Deferred:
    """The reply comes later (load_model): the service answers when `loader` is done."""

    loader: ModelLoader
    cmd: str
    id: Any


# --------------------------------------------------------------------------- dispatch
def handle(state: State, body: list) -> dict | Deferred:
    """One request body -> one reply (never raises)."""
    cmd = rid = None
    try:
        raw = wire.decode_request(body)
        cmd, rid = raw.get("cmd"), raw.get("id")
        if not isinstance(cmd, str):
            raise Refused("missing_field", "request has no 'cmd' string; commands: "
                          + ", ".join(HANDLERS))
        if cmd not in HANDLERS:
            raise Refused("unknown_command", f"unknown command {cmd!r}; commands: "
                          + ", ".join(HANDLERS))
        req = _validate(cmd, raw)
        result = HANDLERS[cmd](state, req)
        if isinstance(result, Deferred):
            result.cmd, result.id = cmd, req.id
            return result
        return {"ok": True, "cmd": cmd, "id": req.id, **result}
    except wire.ProtocolError as exc:
        return m.error_reply(exc.code, exc.message, _str(cmd), rid)
    except Refused as exc:
        return m.error_reply(exc.code, exc.message, _str(cmd), rid)
    except Exception as exc:  # a bug: report it, keep serving
        log.exception("control: %s failed", cmd)
        return m.error_reply("internal", f"{type(exc).__name__}: {exc}", _str(cmd), rid)


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _validate(cmd: str, raw: dict) -> m.Request:
    try:
        return m.REQUESTS[cmd].model_validate(raw)
    except ValidationError as exc:
        errs = [f"{'.'.join(map(str, e['loc'])) or cmd}: {e['msg']}" for e in exc.errors()]
        raise Refused("bad_args", f"{cmd}: " + "; ".join(errs)) from None


# --------------------------------------------------------------------------- handlers
def ping(state: State, req: m.PingRequest) -> dict:
    if req.token is not None:
        state.outbox.append(("ping", {"token": req.token}))
    return {"protocol": m.PROTOCOL_VERSION, "time": time.time(), "run_uid": state.run_uid}


def status(state: State, req: m.Request) -> dict:
    eng, art = state.engine, state.artifact
    return {
        "protocol": m.PROTOCOL_VERSION, "run_uid": state.run_uid,
        "uptime_s": round(time.time() - state.started_s, 3),
        "model": {**state.model_ref(), "path": str(art.path), "members": list(art.member_ids),
                  "classes": list(art.class_names), "pixel_size_pm": art.pixel_size_pm,
                  "provider": eng.provider, "precision": eng.precision,
                  "fallback_reason": eng.fallback_reason},
        **_active_dict(state.active), "delivery": state.delivery, "counts": dict(state.counts),
        "queue_depth": state.queue_depth, "params": params_dict(state.params),
        "maps": {"mode": state.maps_mode, "downsample": state.maps_downsample},
        "loading": state.loader is not None, "auth": dict(state.auth),
        "in_flight": _frame_ref(state.in_flight), "limits": dict(state.limits),
        "ood": state.policy.ood.status(),
    }


def _frame_ref(key: tuple | None) -> dict | None:
    return None if key is None else {"acquisition": key[0], "frame_id": key[1]}


def members(state: State, req: m.Request) -> dict:
    stats = state.policy.member_stats()
    rows = []
    for i, (mid, seed) in enumerate(zip(state.artifact.member_ids, state.artifact.member_seeds)):
        row = {"id": mid, "seed": seed, "active": mid in state.active.active}
        s = stats.get(mid, {}) if isinstance(stats, dict) else (stats[i] if i < len(stats) else {})
        row.update({k: v for k, v in dict(s).items() if k not in row})
        rows.append(row)
    return {"members": rows, **_active_dict(state.active)}


def _change_active(state: State, new: Callable[[], ActiveSet], detail: str) -> dict:
    try:
        active = new()
    except SelectionError as exc:
        text = str(exc)
        raise Refused("empty_set" if "empty" in text.lower() else "unknown_member",
                      text) from None
    if active.active != state.active.active:
        state.active = active
        state.outbox.append(("subset_changed", {**_active_dict(active), "cause": "command",
                                                "detail": detail}))
    return _active_dict(state.active)


def _check_ids(state: State, ids: list[int]) -> None:
    unknown = sorted(set(ids) - set(state.artifact.member_ids))
    if unknown:
        raise Refused("unknown_member", f"unknown member id(s) {unknown}; this model has "
                      f"{list(state.artifact.member_ids)}")


def set_active(state: State, req: m.SetActiveRequest) -> dict:
    _check_ids(state, req.members)
    if not req.members:
        raise Refused("empty_set", "set_active needs at least one member")
    return _change_active(state, lambda: state.active.set_active(req.members),
                          f"set_active {req.members}")


def deselect(state: State, req: m.DeselectRequest) -> dict:
    _check_ids(state, req.members)
    if not set(state.active.active) - set(req.members):
        raise Refused("empty_set", f"deselecting {req.members} would leave no active member")
    return _change_active(state, lambda: state.active.deselect(req.members),
                          f"deselect {req.members}")


def select(state: State, req: m.SelectRequest) -> dict:
    _check_ids(state, req.members)
    return _change_active(state, lambda: state.active.select(req.members),
                          f"select {req.members}")


def reset(state: State, req: m.Request) -> dict:
    return _change_active(state, state.active.reset, "reset")


def set_params(state: State, req: m.SetParamsRequest) -> dict:
    changes = req.model_dump(exclude={"cmd", "id"}, exclude_none=True)
    if not changes:
        raise Refused("bad_args", "set_params needs at least one of "
                      + ", ".join(m.SetParamsRequest.model_fields.keys() - {"cmd", "id"}))
    try:
        params = state.params.replace(**changes)
    except (ValueError, TypeError) as exc:
        raise Refused("bad_params", str(exc)) from None
    state.params = params
    state.outbox.append(("params_changed", {"params": params_dict(params)}))
    return {"params": params_dict(params)}


def set_maps(state: State, req: m.SetMapsRequest) -> dict:
    if req.mode is not None:
        state.maps_mode = req.mode
    if req.downsample is not None:
        state.maps_downsample = req.downsample
    return {"maps": {"mode": state.maps_mode, "downsample": state.maps_downsample}}


def load_model(state: State, req: m.LoadModelRequest) -> Deferred:
    if state.loader is not None:
        raise Refused("busy", f"still loading {state.loader.path}; try again when it is done")
    path = resolve_model_path(req.path, state.allowed_dirs)
    state.loader = ModelLoader(path, state.allowed_dirs, state.engine.options, state.warm_shape)
    state.loader.start()
    return Deferred(state.loader, "load_model", req.id)


def shutdown(state: State, req: m.Request) -> dict:
    state.stop_reason = "shutdown command"
    return {"stopping": True}


HANDLERS: dict[str, Callable[[State, Any], Any]] = {
    "ping": ping, "status": status, "members": members, "set_active": set_active,
    "deselect": deselect, "select": select, "reset": reset, "set_params": set_params,
    "set_maps": set_maps, "load_model": load_model, "shutdown": shutdown,
}
assert set(HANDLERS) == set(m.REQUESTS)
CHANGES = frozenset({"set_active", "deselect", "select", "reset", "set_params", "set_maps"})
"""Commands that change what the next frames get (their reply has `from_frame_seq`)."""


def _active_dict(active: ActiveSet) -> dict:
    return {"active": list(active.active), "active_version": active.version}


def params_dict(params: Params) -> dict:
    if dataclasses.is_dataclass(params):
        return dataclasses.asdict(params)
    return dict(vars(params))


# --------------------------------------------------------------------------- model loading
def resolve_model_path(path: str, allowed_dirs: list[Path]) -> Path:
    """An artifact folder for load_model, checked before any file is opened: absolute paths as
    given, relative ones inside the first allowed folder that has them (else Refused, listing
    the folders); the folder and every file in it must resolve inside an allowed folder and be
    a regular file (a FIFO would block the loader for ever). Refused('model_error') otherwise."""
    p = Path(path).expanduser()
    roots = [Path(d).resolve() for d in allowed_dirs]
    if not p.is_absolute():
        found = [Path(d) / p for d in allowed_dirs if (Path(d) / p).is_dir()]
        if not found:
            raise Refused("model_error", f"no artifact folder {path!r} in the allowed model "
                          f"folders {[str(r) for r in roots]} (relative paths are looked up "
                          "there; give an absolute path or add the folder to "
                          "model.allowed_dirs)")
        p = found[0]
    _check_confined(p, roots)
    if not p.is_dir():
        raise Refused("model_error", f"{p}: not a folder")
    for entry in p.iterdir():
        _check_confined(entry, roots)
        if entry.is_dir():
            continue
        try:
            mode = entry.stat().st_mode
        except OSError as exc:
            raise Refused("model_error", f"{entry}: cannot stat ({exc.strerror})") from None
        if not stat.S_ISREG(mode):
            raise Refused("model_error", f"{entry}: not a regular file (a FIFO, socket or "
                          "device); refusing to read it")
    return p


def _check_confined(p: Path, roots: list[Path]) -> None:
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise Refused("model_error", f"{p}: not found ({exc})") from None
    if not any(real.is_relative_to(r) for r in roots):
        raise Refused("model_error", f"{p} resolves to {real}, outside the allowed model "
                      f"folders {[str(r) for r in roots]}")


class ModelLoader(threading.Thread):
    """Verifies an artifact, builds its Engine and warms it up, off the hot path.

    The new engine is opened with the running one's options (device, threads, precision...).
    The service polls `done` between frames and swaps the engine in at a frame boundary."""

    def __init__(self, path: Path, allowed_dirs: list[Path], engine_options: dict,
                 warm_shape: tuple):
        super().__init__(name="elit-model-loader", daemon=True)
        self.path, self.allowed_dirs = path, allowed_dirs
        self.engine_options, self.warm_shape = dict(engine_options), tuple(warm_shape)
        self.engine: Engine | None = None
        self.error: str | None = None
        self.seconds = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            artifact = load_artifact(self.path, allowed_dirs=self.allowed_dirs)
            engine = Engine(artifact, **self.engine_options)
            engine.warm_up(self.warm_shape)
            self.engine = engine
        except Exception as exc:  # ArtifactError, EngineError, or anything else: report it
            self.error = f"{type(exc).__name__}: {exc}"
        self.seconds = time.perf_counter() - t0
        self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._done.wait(timeout_s)


def new_policy(cfg: PolicyConfig, artifact: Artifact) -> SelectionPolicy:
    return SelectionPolicy(cfg, list(artifact.member_ids), artifact.ood_reference,
                           artifact.manifest["pixel_size_range_pm"])


def swap_in(state: State, loader: ModelLoader, next_seq: int) -> dict:
    """Apply a finished load (at a frame boundary); returns the deferred reply."""
    state.loader = None
    if loader.error is not None:
        state.outbox.append(("error", {"code": "model_error",
                                       "message": f"load_model {loader.path}: {loader.error}"}))
        return m.error_reply("model_error", loader.error, "load_model")
    state.engine = engine = loader.engine
    art = engine.artifact
    state.active = _fresh_active(art, state.active.version)
    state.policy = new_policy(state.policy_cfg, art)
    state.outbox.append(("model_loaded", {"model": state.model_ref(), "path": str(art.path),
                                          "provider": engine.provider,
                                          "precision": engine.precision,
                                          "members": list(art.member_ids),
                                          "classes": list(art.class_names),
                                          "from_frame_seq": next_seq}))
    state.outbox.append(("subset_changed", {**_active_dict(state.active),
                                            "cause": "model_loaded", "detail": art.name}))
    return {"ok": True, "cmd": "load_model", "model": state.model_ref(), "path": str(art.path),
            "provider": engine.provider, "precision": engine.precision,
            "members": list(art.member_ids), "load_s": round(loader.seconds, 3), "from_frame_seq": next_seq,
            **_active_dict(state.active)}


def _fresh_active(art: Artifact, old_version: int) -> ActiveSet:
    """All members of a new model active; the version keeps counting up across models."""
    return ActiveSet(tuple(art.member_ids), tuple(art.member_ids), old_version + 1)
