"""The byte layout of every ELIT-stream message: the only module that knows multipart order.

Ingest (PUSH -> PULL):      [header (msgpack map), pixels (raw little-endian, C order)]
Results (PUB, XPUB here):   [b"result", header, col_0, col_1, ...]   columns as named in header
                            [b"maps", header, mean, std]             float16 [C, h, w]
                            [b"member_maps", header, image, atom]    float16 [hi, wi], [M, h, w]
                            [b"event.<name>", document]
Control (DEALER/REQ -> ROUTER): [envelope..., b"", request]  ->  [envelope..., b"", reply]

Decoding a frame does not copy pixels: the array is a read-only view of the zmq frame buffer.
Everything that goes wrong while decoding raises one `ProtocolError(code, message)`; codes
are listed in `messages.ERROR_CODES`. See docs/protocol.md.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from elit_stream.protocol.messages import FRAME_DTYPES, PROTOCOL_VERSION

TOPIC_RESULT = b"result"
TOPIC_MAPS = b"maps"
TOPIC_MEMBER_MAPS = b"member_maps"      # opt-in, for the live view (docs/protocol.md 2.2b)
TOPIC_EVENT = b"event."

MAX_HEADER_BYTES = 65536
MAX_FRAME_ID = 2**63 - 1           # frame ids are 0 .. 2^63 - 1 (fits int64; id + 1 still packs)
MAX_ACQUISITION_CHARS = 256

_REQUIRED = ("protocol", "frame_id", "acquisition", "shape", "dtype")
_OPTIONAL = ("pixel_size_pm", "acquired_at", "complete", "meta", "fast_scan")
FAST_SCAN = ("x", "-x", "y", "-y")  # the fast scan's direction in the stored frame (x: the usual)
_KNOWN = frozenset(_REQUIRED + _OPTIONAL)
_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in FRAME_DTYPES}


class ProtocolError(Exception):
    """A message that does not follow the protocol. `code` is one of messages.ERROR_CODES."""

    def __init__(self, code: str, message: str, acquisition: Any = None, frame_id: Any = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.acquisition = acquisition if isinstance(acquisition, str) \
            and len(acquisition) <= MAX_ACQUISITION_CHARS else None
        # named as sent (also an id above MAX_FRAME_ID) when msgpack can carry it back
        self.frame_id = frame_id if _is_int(frame_id) and 0 <= frame_id < 2**64 else None


@dataclass(slots=True)
class Frame:
    """A decoded ingest frame. `pixels` is a read-only view of the received buffer."""

    frame_id: int
    acquisition: str
    pixels: np.ndarray
    pixel_size_pm: float | None
    acquired_at: float | None
    complete: bool
    fast_scan: str = "x"          # the fast scan's direction in the frame (docs/protocol.md)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _buffer(part: Any) -> memoryview:
    buf = getattr(part, "buffer", None)  # zmq.Frame (recv with copy=False)
    return buf if buf is not None else memoryview(part)


def _np_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack(doc: Any) -> bytes:
    """msgpack with numpy scalars/arrays turned into Python values."""
    return msgpack.packb(doc, default=_np_default, use_bin_type=True)


def unpack_map(part: Any, what: str = "header") -> dict:
    """Decode one msgpack map; ProtocolError('bad_msgpack' | 'bad_header') otherwise."""
    buf = _buffer(part)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("bad_header", f"{what} is {buf.nbytes} bytes (max {MAX_HEADER_BYTES})")
    try:
        doc = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises many types (ValueError, ExtraData, ...)
        raise ProtocolError("bad_msgpack", f"{what} is not valid msgpack ({exc})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("bad_header", f"{what} is a msgpack {type(doc).__name__}, not a map")
    return doc


# --------------------------------------------------------------------------- ingest
def encode_frame(pixels: np.ndarray, frame_id: int, acquisition: str, *,
                 pixel_size_pm: float | None = None, acquired_at: float | None = None,
                 complete: bool = True, meta: dict | None = None,
                 fast_scan: str | None = None) -> list:
    """Parts of an ingest message. The pixel part is the array itself (sent zero-copy)."""
    arr = np.asarray(pixels)
    if arr.dtype.byteorder == ">" or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    header: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "frame_id": int(frame_id),
                              "acquisition": str(acquisition), "shape": list(arr.shape),
                              "dtype": arr.dtype.name}
    if pixel_size_pm is not None:
        header["pixel_size_pm"] = float(pixel_size_pm)
    if acquired_at is not None:
        header["acquired_at"] = float(acquired_at)
    if not complete:
        header["complete"] = False
    if meta:
        header["meta"] = meta
    if fast_scan is not None:
        header["fast_scan"] = fast_scan
    return [pack(header), arr]


def check_frame_header(h: dict) -> None:
    """Hand check of a frame header (cheap; equivalent to messages.FrameHeader)."""
    acq, fid = h.get("acquisition"), h.get("frame_id")
    if "protocol" not in h:
        raise ProtocolError("missing_field", "header has no 'protocol'", acq, fid)
    if h["protocol"] != PROTOCOL_VERSION or not _is_int(h["protocol"]):
        raise ProtocolError("bad_version", f"protocol {h['protocol']!r} is not supported "
                            f"(this service speaks {PROTOCOL_VERSION})", acq, fid)
    unknown = [k for k in h if k not in _KNOWN]
    if unknown:
        raise ProtocolError("unknown_field", f"unknown header field(s) {sorted(map(str, unknown))}; "
                            "put free-form data under 'meta'", acq, fid)
    missing = [k for k in _REQUIRED if k not in h]
    if missing:
        raise ProtocolError("missing_field", f"header lacks {missing}", acq, fid)
    if not _is_int(fid) or not 0 <= fid <= MAX_FRAME_ID:
        raise ProtocolError("bad_header", f"frame_id must be an integer 0..{MAX_FRAME_ID} "
                            f"(2^63 - 1), got {fid!r}", acq, fid)
    if not isinstance(acq, str) or len(acq) > MAX_ACQUISITION_CHARS:
        raise ProtocolError("bad_header", f"acquisition must be a string of at most "
                            f"{MAX_ACQUISITION_CHARS} characters, got {str(acq)[:80]!r}", None, fid)
    if not isinstance(h["dtype"], str) or h["dtype"] not in _DTYPES:
        raise ProtocolError("bad_dtype", f"dtype {h['dtype']!r} is not one of "
                            f"{list(FRAME_DTYPES)}", acq, fid)
    shape = h["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(_is_int(n) and n > 0 for n in shape)):
        raise ProtocolError("bad_shape", f"shape must be [rows, columns] of positive integers, "
                            f"got {shape!r}", acq, fid)
    _check_optional(h, acq, fid)


def _check_optional(h: dict, acq: Any, fid: Any) -> None:
    ps = h.get("pixel_size_pm")
    if ps is not None and not (_is_number(ps) and ps > 0):
        raise ProtocolError("bad_header", f"pixel_size_pm must be a finite number > 0, got {ps!r}",
                            acq, fid)
    at = h.get("acquired_at")
    if at is not None and not _is_number(at):
        raise ProtocolError("bad_header", f"acquired_at must be a finite number, got {at!r}",
                            acq, fid)
    if not isinstance(h.get("complete", True), bool):
        raise ProtocolError("bad_header", f"complete must be true/false, got {h['complete']!r}",
                            acq, fid)
    if not isinstance(h.get("meta", {}), (dict, type(None))):
        raise ProtocolError("bad_header", "meta must be a map", acq, fid)
    fast = h.get("fast_scan")
    if fast is not None and (not isinstance(fast, str) or fast not in FAST_SCAN):
        raise ProtocolError("bad_header", "fast_scan must be one of \"x\" (left to right along "
                            "the rows, the usual), \"-x\", \"y\" (top to bottom down the columns), "
                            f"\"-y\"; got {h['fast_scan']!r}", acq, fid)


def decode_frame(parts: Sequence[Any], max_frame_px: int, check_finite: bool = True) -> Frame:
    """Decode an ingest message [header, pixels] without copying the pixels.

    `check_finite=False` skips the NaN/Inf pass over float pixels (call `ensure_finite` later,
    only for frames that will be processed)."""
    if len(parts) != 2:
        h = _try_header(parts[0]) if parts else {}
        raise ProtocolError("bad_parts", f"a frame is 2 parts [header, pixels], got {len(parts)}",
                            h.get("acquisition"), h.get("frame_id"))
    h = unpack_map(parts[0], "frame header")
    check_frame_header(h)
    acq, fid, (rows, cols) = h["acquisition"], h["frame_id"], h["shape"]
    n_px = rows * cols
    if n_px > max_frame_px:
        raise ProtocolError("too_large", f"frame {rows}x{cols} has {n_px} pixels, more than "
                            f"the limit {max_frame_px}", acq, fid)
    dtype = _DTYPES[h["dtype"]]
    buf = _buffer(parts[1])
    if buf.nbytes != n_px * dtype.itemsize:
        raise ProtocolError("size_mismatch", f"pixel part is {buf.nbytes} bytes; shape "
                            f"{rows}x{cols} of {dtype.name} needs {n_px * dtype.itemsize}", acq, fid)
    pixels = np.frombuffer(buf, dtype=dtype).reshape(rows, cols)
    pixels.flags.writeable = False  # a view of the message: never modify in place
    frame = Frame(fid, acq, pixels, h.get("pixel_size_pm"), h.get("acquired_at"),
                  h.get("complete", True), h.get("fast_scan") or "x")
    if check_finite:
        ensure_finite(frame)
    return frame


def ensure_finite(frame: Frame) -> None:
    """ProtocolError('non_finite') if a float frame has NaN or Inf."""
    if frame.pixels.dtype.kind == "f" and not _all_finite(frame.pixels):
        raise ProtocolError("non_finite", "float frame contains NaN or Inf", frame.acquisition,
                            frame.frame_id)


def _all_finite(a: np.ndarray) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(a, axis=None, dtype=np.float64)
    return bool(np.isfinite(total)) or bool(np.isfinite(a).all())


def _try_header(part: Any) -> dict:
    try:
        return unpack_map(part)
    except ProtocolError:
        return {}


ZERO_COPY_MIN_BYTES = 65536


def send(socket: Any, parts: list, flags: int = 0) -> None:
    """Send a multipart message: zero-copy when a part is large, copied otherwise (for small
    messages a copy is cheaper than the bookkeeping of a zero-copy send)."""
    big = any(getattr(p, "nbytes", 0) >= ZERO_COPY_MIN_BYTES for p in parts)
    socket.send_multipart(parts, flags=flags, copy=not big)


# --------------------------------------------------------------------------- results / events
def encode_result(header: dict, columns: dict[str, np.ndarray]) -> list:
    """[b"result", header, col...]; header["columns"] is set from `columns` (insertion order)."""
    cols = [np.ascontiguousarray(a) for a in columns.values()]
    header["columns"] = [[name, a.dtype.name] for name, a in zip(columns, cols)]
    return [TOPIC_RESULT, pack(header), *cols]


def encode_maps(header: dict, mean: np.ndarray, std: np.ndarray) -> list:
    return [TOPIC_MAPS, pack(header), np.ascontiguousarray(mean, np.float16),
            np.ascontiguousarray(std, np.float16)]


def encode_member_maps(header: dict, image: np.ndarray, atom: np.ndarray) -> list:
    """[b"member_maps", header, image [hi, wi], atom [M, h, w]], both float16."""
    return [TOPIC_MEMBER_MAPS, pack(header), np.ascontiguousarray(image, np.float16),
            np.ascontiguousarray(atom, np.float16)]


def encode_event(doc: dict) -> list:
    return [TOPIC_EVENT + doc["event"].encode(), pack(doc)]


def decode_published(parts: Sequence[Any]) -> dict:
    """Decode any message of the results socket into a dict with numpy columns.

    result -> header fields + "atoms": {column: ndarray}; maps -> header + "mean", "std";
    member_maps -> header + "image", "atom"; event -> the document. Every dict also has "topic" (str).
    """
    if len(parts) < 2:
        raise ProtocolError("bad_parts", f"published message has {len(parts)} parts (min 2)")
    topic = bytes(_buffer(parts[0])).decode("utf-8", "replace")
    doc = unpack_map(parts[1], topic)
    doc["topic"] = topic
    if topic == "result":
        spec = doc.get("columns", [])
        if len(parts) != 2 + len(spec):
            raise ProtocolError("bad_parts", f"result names {len(spec)} columns, has "
                                f"{len(parts) - 2} buffers")
        doc["atoms"] = {name: np.frombuffer(_buffer(p), np.dtype(dt).newbyteorder("<"))
                        for (name, dt), p in zip(spec, parts[2:])}
    elif topic == "maps":
        if len(parts) != 4:
            raise ProtocolError("bad_parts", f"maps message has {len(parts)} parts, not 4")
        shape = doc["shape"]
        doc["mean"], doc["std"] = (np.frombuffer(_buffer(p), "<f2").reshape(shape)
                                   for p in parts[2:])
    elif topic == "member_maps":
        if len(parts) != 4:
            raise ProtocolError("bad_parts", f"member_maps message has {len(parts)} parts, not 4")
        shape = doc["shape"]
        doc["image"] = np.frombuffer(_buffer(parts[2]), "<f2").reshape(
            doc.get("image_shape", shape[1:]))
        doc["atom"] = np.frombuffer(_buffer(parts[3]), "<f2").reshape(shape)
    return doc


# --------------------------------------------------------------------------- control
def split_envelope(parts: Sequence[Any]) -> tuple[list, list]:
    """ROUTER message -> (routing envelope incl. the empty delimiter, body parts)."""
    raw = [bytes(_buffer(p)) for p in parts]
    if b"" in raw:
        i = raw.index(b"")
        return raw[: i + 1], raw[i + 1:]
    return raw[:1], raw[1:]


def decode_request(body: Sequence[Any]) -> dict:
    """Body of a control message -> request map (not yet validated against the command)."""
    if len(body) != 1:
        raise ProtocolError("bad_parts", f"a control request is 1 msgpack part, got {len(body)}")
    return unpack_map(body[0], "request")


def encode_reply(envelope: list, reply: dict) -> list:
    return [*envelope, pack(reply)]


def encode_request(request: dict) -> list:
    """Parts a DEALER client sends (empty delimiter, as REQ would)."""
    return [b"", pack(request)]


def decode_reply(parts: Sequence[Any]) -> dict:
    """Parts a DEALER client receives -> reply map (leading empty delimiter dropped)."""
    body = [bytes(_buffer(p)) for p in parts]
    while len(body) > 1 and body[0] == b"":
        body.pop(0)
    if len(body) != 1:
        raise ProtocolError("bad_parts", f"a control reply is 1 msgpack part, got {len(body)}")
    return unpack_map(body[0], "reply")
