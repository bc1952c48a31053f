"""The documents of the ELIT-stream wire protocol, as strict pydantic models.

This module owns *what* travels (field names, types, the protocol version and the error
codes); `wire` owns *how* it travels (multipart order, msgpack, raw buffers). The spec in
docs/protocol.md is written from these models.

The hot path does not validate through these models: `wire` hand-checks the few fields of
a frame header and builds result dicts directly. The models are used at the control
boundary, for events, and in tests that check `wire` against them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1
"""Major protocol version. A peer refuses messages with another major version."""

FRAME_DTYPES = ("uint8", "uint16", "uint32", "float32", "float64")
"""Pixel dtypes accepted on ingest (always little-endian, C order)."""

RESULT_COLUMNS = (
    ("x", "float32"),            # input-frame pixels, column; origin at the top-left pixel centre
    ("y", "float32"),            # input-frame pixels, row
    ("cls", "uint8"),            # class index (manifest `classes` order)
    ("prob", "float32"),         # consensus (active-member mean) probability at the atom
    ("uncertainty", "float32"),  # total predictive std that the atom is there, at its peak
    ("det_frac", "float32"),     # fraction of active members that detect the atom
    ("cls_prob", "float32"),     # consensus probability of the atom's class (1/C..1)
    ("cls_agree", "float32"),    # fraction of active members voting for the atom's class
    ("z_contrast", "float32"),   # height over the local background / neighbours' median; NaN
    ("spread", "float32"),       # active-member standard deviation at the atom (ELIT's spread)
)
"""Per-atom columns of a result, in wire order, with their dtypes."""

# Error codes: frames (ingest) and control share one namespace.
ERROR_CODES = {
    "bad_msgpack": "a part that should be msgpack could not be decoded",
    "bad_header": "the header is not a map or a field has the wrong type or value",
    "missing_field": "a required header/request field is absent",
    "unknown_field": "a header/request field is not part of the protocol",
    "bad_version": "unsupported protocol major version",
    "bad_parts": "wrong number of message parts",
    "bad_dtype": "pixel dtype not one of " + ", ".join(FRAME_DTYPES),
    "bad_shape": "shape is not two positive integers",
    "size_mismatch": "pixel buffer size does not equal shape x itemsize",
    "too_large": "frame has more pixels than the service accepts (delivery.max_frame_px), or "
                 "would become a network input above limits.max_input_px",
    "bad_pixel_size": "pixel_size_pm outside the model's range widened by "
                      "limits.pixel_size_factor",
    "shutting_down": "the service stopped before processing this frame; send it again to the "
                     "next run (the client library and replay do)",
    "non_finite": "a float frame contains NaN or Inf",
    "bad_frame": "the model cannot take this frame (e.g. too small after rescaling)",
    "unknown_command": "control command not known",
    "bad_args": "control arguments missing, unknown or of the wrong type",
    "empty_set": "the request would leave no active member",
    "unknown_member": "a member id is not in the loaded model",
    "bad_params": "a post-processing parameter is out of range",
    "model_error": "the artifact could not be loaded or verified",
    "busy": "another load_model is still in progress",
    "internal": "unexpected error inside the service (a bug); the service keeps going",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- ingest
class FrameHeader(Strict):
    """Part 0 of an ingest message (msgpack map). Part 1 is the raw pixel buffer."""

    model_config = ConfigDict(extra="forbid", strict=True)
    protocol: Annotated[int, Field(ge=1, le=1)]  # strict int: true is not 1
    frame_id: Annotated[int, Field(ge=0, le=2**63 - 1)]
    acquisition: Annotated[str, Field(max_length=256)]
    shape: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=2, max_length=2)]
    dtype: Literal["uint8", "uint16", "uint32", "float32", "float64"]
    pixel_size_pm: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    acquired_at: Annotated[float, Field(allow_inf_nan=False)] | None = None  # UNIX seconds at the microscope
    complete: bool = True                # False for a partial scan
    meta: dict[str, Any] | None = None  # free-form, not interpreted, not echoed
    fast_scan: Literal["x", "-x", "y", "-y"] | None = None  # the fast scan's direction


# --------------------------------------------------------------------------- results
class ModelRef(Strict):
    name: str
    sha256: str          # manifest sha256 (hex)


class ResultHeader(Strict):
    """Part 1 of a result message; parts 2.. are the columns named in `columns`."""

    protocol: Literal[1]
    kind: Literal["result"]
    frame_id: int
    acquisition: str
    complete: bool
    seq: int                              # processed-frame counter of this run
    model: ModelRef
    active: list[int]
    active_version: int
    frame_shape: list[int]
    pixel_size_pm: float | None
    acquired_at: float | None
    fast_scan: Literal["x", "-x", "y", "-y"] = "x"   # echoed from the frame
    n_atoms: int
    unconfirmed: int = 0                  # consensus atoms left out (peak below min_peak)
    columns: list[tuple[str, str]]        # (name, dtype) of each following part
    classes: list[str]
    count_per_member: list[int]           # all members, manifest order
    disagreement_per_member: list[float]  # all members, manifest order
    mean_uncertainty: float
    timings_ms: dict[str, float]          # decode, prepare, infer, analyse, total
    repeat: bool = False                  # present (true) only when this run already published
    #                                       a result for this acquisition + frame id (a resend)
    figures: dict[str, float] | None = None   # frame figures (docs/ood.md)
    ood: float | None = None              # out-of-distribution score; None: model has no reference
    ood_flag: bool = False                # ood > the reference's flag_above


class MapsHeader(Strict):
    """Part 1 of a `maps` message; parts 2 and 3 are mean and std, float16 [C, h, w]."""

    protocol: Literal[1]
    kind: Literal["maps"]
    frame_id: int
    acquisition: str
    active_version: int
    shape: list[int]                      # [C, h, w]
    dtype: Literal["float16"]
    classes: list[str]
    frame_px_per_map_px: float            # multiply map indices by this for frame pixels


# --------------------------------------------------------------------------- events
class FrameRef(Strict):
    acquisition: str | None
    frame_id: int | None


class EventBase(Strict):
    protocol: Literal[1] = PROTOCOL_VERSION
    kind: Literal["event"] = "event"
    run_uid: str
    seq: int
    time: float


class Counts(Strict):
    received: int
    processed: int
    dropped: int
    rejected: int


class StartEvent(EventBase):
    event: Literal["start"] = "start"
    model: ModelRef
    provider: str
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # what the engine computes in
    delivery: Literal["lossless", "latest"]
    endpoints: dict[str, str]


class StopEvent(EventBase):
    event: Literal["stop"] = "stop"
    exit_status: Literal["success", "abort", "fail"]
    reason: str
    counts: Counts
    # the frame being inferred when the stop came, and whether it was "finished" (its result
    # or rejection was published before this event) or "abandoned" (no answer: resend it)
    frame_in_hand: FrameRef | None = None
    frame_in_hand_outcome: Literal["finished", "abandoned"] | None = None


class ModelLoadedEvent(EventBase):
    event: Literal["model_loaded"] = "model_loaded"
    model: ModelRef
    path: str
    provider: str
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    members: list[int]
    classes: list[str]
    from_frame_seq: int  # first processed-frame seq that uses the model


class SubsetChangedEvent(EventBase):
    event: Literal["subset_changed"] = "subset_changed"
    active: list[int]
    active_version: int
    cause: Literal["command", "policy", "model_loaded"]
    detail: str = ""


class DriftAdvisoryEvent(EventBase):
    event: Literal["drift_advisory"] = "drift_advisory"
    advisory: str               # the policy's kind: "drift", "outlier", "ood", "ood_cleared"
    members: list[int]
    message: str
    figures: dict[str, Any]
    frame_id: int
    acquisition: str


class FrameDroppedEvent(EventBase):
    event: Literal["frame_dropped"] = "frame_dropped"
    reason: str                 # "stale": a newer frame was waiting (latest mode)
    frames: list[FrameRef]
    kept: FrameRef              # the frame processed instead


class FrameRejectedEvent(EventBase):
    event: Literal["frame_rejected"] = "frame_rejected"
    frame: FrameRef             # fields None when the header was not decodable
    code: str
    message: str


class FrameGapEvent(EventBase):
    event: Literal["frame_gap"] = "frame_gap"
    acquisition: str
    expected: int
    got: int


class WarningEvent(EventBase):
    event: Literal["warning"] = "warning"
    code: str                   # e.g. "no_pixel_size"
    message: str
    frame: FrameRef | None = None


class ErrorEvent(EventBase):
    event: Literal["error"] = "error"
    code: str
    message: str


class PingEvent(EventBase):
    event: Literal["ping"] = "ping"
    token: str


class ParamsChangedEvent(EventBase):
    event: Literal["params_changed"] = "params_changed"
    params: dict[str, float]


EVENTS: dict[str, type[EventBase]] = {
    "start": StartEvent, "stop": StopEvent, "model_loaded": ModelLoadedEvent,
    "subset_changed": SubsetChangedEvent, "drift_advisory": DriftAdvisoryEvent,
    "frame_dropped": FrameDroppedEvent, "frame_rejected": FrameRejectedEvent,
    "frame_gap": FrameGapEvent, "error": ErrorEvent, "warning": WarningEvent, "ping": PingEvent,
    "params_changed": ParamsChangedEvent,
}
"""Event name -> document model (topic `event.<name>`)."""


# --------------------------------------------------------------------------- control
class Request(Strict):
    model_config = ConfigDict(extra="forbid", strict=True)   # "0.5" is not a number here
    cmd: str
    id: int | str | None = None  # echoed in the reply


class PingRequest(Request):
    cmd: Literal["ping"]
    token: str | None = None  # if given, also published as a `ping` event (subscriber sync)


class StatusRequest(Request):
    cmd: Literal["status"]


class MembersRequest(Request):
    cmd: Literal["members"]


class SetActiveRequest(Request):
    cmd: Literal["set_active"]
    members: list[int]


class DeselectRequest(Request):
    cmd: Literal["deselect"]
    members: list[int]


class SelectRequest(Request):
    cmd: Literal["select"]
    members: list[int]


class ResetRequest(Request):
    cmd: Literal["reset"]


class SetParamsRequest(Request):
    cmd: Literal["set_params"]
    threshold: float | None = None
    min_blob_px: int | None = None
    max_blob_px: int | None = None
    detect_threshold: float | None = None
    split_dip: float | None = None
    min_peak_distance_px: int | None = None
    min_peak: float | None = None
    lattice_crystallinity: float | None = None
    heavy_contrast: float | None = None
    contrast_radius_px: float | None = None


class SetMapsRequest(Request):
    cmd: Literal["set_maps"]
    mode: Literal["subscribe", "always", "never"] | None = None
    downsample: Annotated[int, Field(ge=1, le=64)] | None = None


class LoadModelRequest(Request):
    cmd: Literal["load_model"]
    path: str


class ShutdownRequest(Request):
    cmd: Literal["shutdown"]


REQUESTS: dict[str, type[Request]] = {
    "ping": PingRequest, "status": StatusRequest, "members": MembersRequest,
    "set_active": SetActiveRequest, "deselect": DeselectRequest, "select": SelectRequest,
    "reset": ResetRequest, "set_params": SetParamsRequest, "set_maps": SetMapsRequest,
    "load_model": LoadModelRequest, "shutdown": ShutdownRequest,
}
"""Command name -> request model."""


class ErrorInfo(Strict):
    code: str
    message: str


class ErrorReply(Strict):
    ok: Literal[False] = False
    cmd: str | None = None
    id: int | str | None = None
    error: ErrorInfo


class OkReply(BaseModel):
    """Successful reply: `ok`, `cmd`, `id` plus the command's own fields (docs/protocol.md)."""

    model_config = ConfigDict(extra="allow")
    ok: Literal[True] = True
    cmd: str
    id: int | str | None = None


def error_reply(code: str, message: str, cmd: str | None = None, id: Any = None) -> dict:
    """Build the reply dict of a refused request."""
    if not isinstance(id, (int, str)) or isinstance(id, bool):
        id = None
    return ErrorReply(cmd=cmd, id=id, error=ErrorInfo(code=code, message=message)).model_dump()
