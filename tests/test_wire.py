"""wire: frame decoding (zero-copy, every refusal a ProtocolError with a code), result/event
encoding, control envelopes. Property-based: no input crashes the decoder."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from elit_stream.protocol import messages, wire
from elit_stream.protocol.wire import ProtocolError

MAX_PX = 4096


def header(**kw):
    h = {"protocol": 1, "frame_id": 7, "acquisition": "a", "shape": [4, 5], "dtype": "uint16"}
    h.update(kw)
    return {k: v for k, v in h.items() if v is not Ellipsis}


def parts_of(h, pixels=None):
    """[header, pixels] with a buffer of the right size where the header allows it."""
    if pixels is None:
        dt, shape = h.get("dtype"), h.get("shape")
        size = np.dtype(dt).itemsize if isinstance(dt, str) and dt in messages.FRAME_DTYPES else 1
        if isinstance(shape, list) and all(isinstance(n, int) and 0 <= n < 100 for n in shape):
            size *= math.prod(shape)
        pixels = bytes(size)
    return [msgpack.packb(h), pixels]


def code_of(parts, max_px=MAX_PX):
    with pytest.raises(ProtocolError) as exc:
        wire.decode_frame(parts, max_px)
    return exc.value


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", messages.FRAME_DTYPES)
def test_frame_round_trip_every_dtype(dtype):
    pixels = (np.arange(12).reshape(3, 4) * 3).astype(dtype)
    parts = wire.encode_frame(pixels, 5, "acq", pixel_size_pm=12.5, acquired_at=1.5,
                              complete=False, meta={"detector": "HAADF"}, fast_scan="y")
    frame = wire.decode_frame([parts[0], memoryview(parts[1]).tobytes()], MAX_PX)
    assert (frame.frame_id, frame.acquisition, frame.pixel_size_pm) == (5, "acq", 12.5)
    assert frame.acquired_at == 1.5 and frame.complete is False and frame.fast_scan == "y"
    plain = wire.encode_frame(pixels, 5, "acq")
    assert wire.decode_frame([plain[0], memoryview(plain[1]).tobytes()], MAX_PX).fast_scan == "x"
    np.testing.assert_array_equal(frame.pixels, pixels)
    assert frame.pixels.dtype == np.dtype(dtype)


def test_big_endian_and_non_contiguous_input_is_sent_little_endian_c_order():
    a = np.arange(20, dtype=">u2").reshape(4, 5)[:, ::2]
    parts = wire.encode_frame(a, 0, "x")
    frame = wire.decode_frame([parts[0], bytes(memoryview(parts[1]))], MAX_PX)
    np.testing.assert_array_equal(frame.pixels, a)


def test_decode_does_not_copy_pixels():
    buf = bytearray(np.arange(20, dtype="<u2").tobytes())
    frame = wire.decode_frame([msgpack.packb(header()), buf], MAX_PX)
    buf[0] = 99  # the decoded array is a view of the received buffer
    assert frame.pixels[0, 0] == 99


def test_decode_over_real_zmq_frames_is_a_read_only_view():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://t")
        b.connect("inproc://t")
        pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
        a.send_multipart(wire.encode_frame(pixels, 1, "z"), copy=False)
        frame = wire.decode_frame(b.recv_multipart(copy=False), MAX_PX)
        np.testing.assert_array_equal(frame.pixels, pixels)
        assert not frame.pixels.flags.writeable
    finally:
        a.close(), b.close(), ctx.term()


# ---------------------------------------------------------------- each refusal
@pytest.mark.parametrize("parts,code", [
    ([b"\xc1", b""], "bad_msgpack"),
    ([msgpack.packb([1, 2]), b""], "bad_header"),
    ([msgpack.packb(header())], "bad_parts"),
    (parts_of(header()) + [b"x"], "bad_parts"),
    (parts_of(header(protocol=2)), "bad_version"),
    (parts_of(header(protocol=...)), "missing_field"),
    (parts_of(header(shape=...)), "missing_field"),
    (parts_of(header(colour="red")), "unknown_field"),
    (parts_of(header(dtype="int16")), "bad_dtype"),
    (parts_of(header(dtype=["uint8"])), "bad_dtype"),
    ([msgpack.packb(header(shape=[2, 3, 4])), b""], "bad_shape"),
    ([msgpack.packb(header(shape=[0, 3])), b""], "bad_shape"),
    ([msgpack.packb(header(shape=[100, 100])), b""], "too_large"),
    ([msgpack.packb(header()), b"\0" * 39], "size_mismatch"),
    (parts_of(header(frame_id=-1)), "bad_header"),
    (parts_of(header(frame_id=True)), "bad_header"),
    (parts_of(header(acquisition=3)), "bad_header"),
    (parts_of(header(pixel_size_pm=0)), "bad_header"),
    (parts_of(header(pixel_size_pm=float("nan"))), "bad_header"),
    (parts_of(header(complete="yes")), "bad_header"),
    (parts_of(header(fast_scan="z")), "bad_header"),
    (parts_of(header(fast_scan=1)), "bad_header"),
])
def test_malformed_frames_are_refused_with_their_code(parts, code):
    assert code_of(parts).code == code


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_non_finite_float_frames_are_refused(bad, dtype):
    pixels = np.ones((4, 5), dtype)
    pixels[2, 3] = bad
    err = code_of([msgpack.packb(header(dtype=dtype)), pixels.tobytes()])
    assert err.code == "non_finite" and err.frame_id == 7


def test_huge_but_finite_float64_values_are_accepted():
    pixels = np.full((4, 5), 1e308)
    wire.decode_frame([msgpack.packb(header(dtype="float64")), pixels.tobytes()], MAX_PX)


def test_refusal_names_the_frame_when_the_header_is_readable():
    err = code_of([msgpack.packb(header(frame_id=42, acquisition="s1")), b"\0" * 3])
    assert (err.acquisition, err.frame_id) == ("s1", 42)
    err = code_of([msgpack.packb(header(frame_id=43))])  # wrong part count
    assert err.frame_id == 43


# ---------------------------------------------------------------- properties
msgpack_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
                   | st.floats() | st.text(max_size=8) | st.binary(max_size=8))
msgpack_values = st.recursive(msgpack_scalars, lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                              max_leaves=8)
field_values = {
    "protocol": st.sampled_from([1, 2, 0, True, "1", 1.0]),
    "frame_id": st.integers(-3, 2**64 - 1) | msgpack_scalars,
    "acquisition": st.text(max_size=5) | msgpack_scalars,
    "shape": st.lists(st.integers(-2, 70), max_size=3) | msgpack_values,
    "dtype": st.sampled_from(list(messages.FRAME_DTYPES) + ["int8", "complex64", ""]),
    "pixel_size_pm": st.floats() | msgpack_scalars,
    "acquired_at": st.floats() | st.none(),
    "complete": st.booleans() | msgpack_scalars,
    "meta": msgpack_values,
    "fast_scan": st.sampled_from(["x", "y", "z", "", "X"]) | msgpack_scalars,
    "extra": msgpack_values,
}
VALID = {"protocol": 1, "frame_id": 3, "acquisition": "a", "shape": [2, 3], "dtype": "uint8"}
# Arbitrary headers, and valid headers with one field replaced or removed (near misses).
headers = st.fixed_dictionaries({}, optional=field_values) | st.one_of(
    *[values.map(lambda v, k=key: {**VALID, k: v}) for key, values in field_values.items()],
    st.sampled_from(list(VALID)).map(lambda k: {f: v for f, v in VALID.items() if f != k}))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_arbitrary_bytes_never_crash_the_decoder(parts):
    try:
        wire.decode_frame(parts, MAX_PX)
    except ProtocolError as exc:
        assert exc.code in messages.ERROR_CODES


@settings(max_examples=400, deadline=None)
@given(headers, st.binary(max_size=64) | st.none())
def test_arbitrary_headers_never_crash_and_agree_with_the_model(h, pixels):
    try:
        raw = msgpack.packb(h)
    except (OverflowError, ValueError):
        return
    parts = parts_of(h, pixels) if pixels is not None or isinstance(h.get("shape"), list) \
        else [raw, b""]
    try:
        frame = wire.decode_frame(parts, MAX_PX)
    except ProtocolError as exc:
        assert exc.code in messages.ERROR_CODES
        if exc.code in ("bad_header", "bad_version", "missing_field", "unknown_field",
                        "bad_dtype", "bad_shape"):  # the hand check refused the header
            with pytest.raises(ValidationError):
                messages.FrameHeader.model_validate(h)
        return
    messages.FrameHeader.model_validate(h)  # the hand check accepted: so does the model
    assert frame.pixels.shape == tuple(h["shape"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=5),
       st.binary(max_size=32))
def test_control_bodies_never_crash(envelope, body):
    """ROUTER identities are never empty; the first empty part is the delimiter."""
    env, rest = wire.split_envelope([*envelope, b"", body])
    assert env[-1] == b"" and rest == [body]
    try:
        doc = wire.decode_request(rest)
        assert isinstance(doc, dict)
    except ProtocolError as exc:
        assert exc.code in ("bad_msgpack", "bad_header", "bad_parts")


# ---------------------------------------------------------------- results, events, replies
def result_header():
    return {"protocol": 1, "kind": "result", "frame_id": 3, "acquisition": "a", "complete": True,
            "seq": 0, "model": {"name": "m", "sha256": "ab"}, "active": [0, 2],
            "active_version": 4, "frame_shape": [8, 8], "pixel_size_pm": None,
            "acquired_at": None, "n_atoms": 2, "classes": ["lattice"],
            "count_per_member": [2, 2, 1], "disagreement_per_member": [0.0, 0.1, 0.5],
            "mean_uncertainty": 0.05, "timings_ms": {"infer": 1.0}}


def test_result_round_trip_keeps_columns_and_matches_the_model():
    cols = {name: np.arange(2).astype(dt) for name, dt in messages.RESULT_COLUMNS}
    doc = wire.decode_published(wire.encode_result(result_header(), cols))
    assert doc["topic"] == "result"
    for name, dt in messages.RESULT_COLUMNS:
        assert doc["atoms"][name].dtype == np.dtype(dt)
        np.testing.assert_array_equal(doc["atoms"][name], cols[name])
    doc.pop("topic"), doc.pop("atoms")
    messages.ResultHeader.model_validate(doc)


def test_maps_and_event_round_trip():
    mean = np.random.default_rng(0).random((2, 3, 4)).astype(np.float16)
    h = {"protocol": 1, "kind": "maps", "frame_id": 1, "acquisition": "a", "active_version": 1,
         "shape": [2, 3, 4], "dtype": "float16", "classes": ["a", "b"],
         "frame_px_per_map_px": 2.0}
    doc = wire.decode_published(wire.encode_maps(h, mean, mean * 0))
    np.testing.assert_array_equal(doc["mean"], mean)
    ev = messages.PingEvent(run_uid="r", seq=1, time=0.0, token="t").model_dump()
    parts = wire.encode_event(ev)
    assert parts[0] == b"event.ping"
    assert wire.decode_published(parts)["token"] == "t"


def test_numpy_scalars_are_packed_as_plain_values():
    doc = msgpack.unpackb(wire.pack({"a": np.float32(1.5), "b": np.int64(3),
                                     "c": np.arange(2)}))
    assert doc == {"a": 1.5, "b": 3, "c": [0, 1]}
    assert not math.isnan(doc["a"])


def test_reply_decoding_drops_the_delimiter():
    assert wire.decode_reply([b"", wire.pack({"ok": True})]) == {"ok": True}
    with pytest.raises(ProtocolError):
        wire.decode_reply([b"", b"a", b"b"])
