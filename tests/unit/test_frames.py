"""Frame codec: golden bytes both ways, every rejection rule, and properties of the decoder."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.common.errors import FrameError, RemoteProtocolError
from tunnel.common.proto.frames import (
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    MAX_OPEN_PAYLOAD,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    Flag,
    Frame,
    FrameType,
    data_frame,
    decode_frames,
    encode_data,
    encode_frame,
)
from tunnel.common.proto.sizeclass import size_class


def h(text: str) -> bytes:
    """Hex literal with free spacing: ``h("01 00 0000 ...")``."""
    return bytes.fromhex(text)


def plain(frame: Frame) -> tuple[FrameType, int, Flag, bytes, int]:
    """A decoded frame's fields with the payload view copied out, for exact comparisons."""
    return frame.type, frame.stream_id, frame.flags, bytes(frame.payload), frame.value


# ----------------------------------------------------------------------------- constants


def test_wire_constants() -> None:
    assert PROTOCOL_VERSION == 1
    assert HEADER_SIZE == 12
    assert MAX_DATA_PAYLOAD == 131072
    assert MAX_OPEN_PAYLOAD == 512
    assert MAX_CONTROL_PAYLOAD == 16384
    assert MAX_WINDOW == 0x7FFFFFFF
    assert [t.value for t in FrameType] == [0, 1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- golden bytes

#           ver type flags  stream    length/value  payload
GOLDEN: list[tuple[str, Frame, bytes]] = [
    ("data",
     Frame(FrameType.DATA, 1, payload=b"hi"),
     h("01 00 0000 00000001 00000002 6869")),
    ("data-fin-empty",
     Frame(FrameType.DATA, 3, Flag.FIN),
     h("01 00 0001 00000003 00000000")),
    ("data-fin-payload",
     Frame(FrameType.DATA, 0xFFFFFFFF, Flag.FIN, payload=b"x"),
     h("01 00 0001 ffffffff 00000001 78")),
    ("window-update",
     Frame(FrameType.WINDOW_UPDATE, 5, value=0x20000),
     h("01 01 0000 00000005 00020000")),
    ("window-update-max",
     Frame(FrameType.WINDOW_UPDATE, 5, value=MAX_WINDOW),
     h("01 01 0000 00000005 7fffffff")),
    ("open",
     Frame(FrameType.OPEN, 1, payload=h("00000007") + b"1.2.3.4:5"),
     h("01 02 0000 00000001 0000000d 00000007 312e322e332e343a35")),
    ("reset",
     Frame(FrameType.RESET, 7, value=1),
     h("01 03 0000 00000007 00000001")),
    ("ping",
     Frame(FrameType.PING, value=0xDEADBEEF),
     h("01 04 0000 00000000 deadbeef")),
    ("ping-ack",
     Frame(FrameType.PING, flags=Flag.ACK, value=0xDEADBEEF),
     h("01 04 0002 00000000 deadbeef")),
    ("goaway",
     Frame(FrameType.GOAWAY, value=4),
     h("01 05 0000 00000000 00000004")),
    ("control",
     Frame(FrameType.CONTROL, payload=b'{"type":"x"}'),
     h("01 06 0000 00000000 0000000c 7b2274797065223a2278227d")),
]


@pytest.mark.parametrize(("frame", "wire"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_encode_golden(frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame) == wire


@pytest.mark.parametrize(("frame", "wire"), [g[1:] for g in GOLDEN], ids=[g[0] for g in GOLDEN])
def test_decode_golden(frame: Frame, wire: bytes) -> None:
    (decoded,) = decode_frames(wire)
    assert plain(decoded) == plain(frame)
    assert decoded == frame


@pytest.mark.parametrize("as_type", [bytes, bytearray, memoryview])
def test_decode_accepts_any_buffer(as_type: type[bytes | bytearray | memoryview]) -> None:
    (decoded,) = decode_frames(as_type(h("01 00 0000 00000001 00000002 6869")))
    assert plain(decoded) == (FrameType.DATA, 1, Flag.NONE, b"hi", 0)


def test_encode_data_golden() -> None:
    assert encode_data(1, b"hi") == h("01 00 0000 00000001 00000002 6869")
    assert encode_data(3, b"", fin=True) == h("01 00 0001 00000003 00000000")
    assert encode_data(9, bytearray(b"ab"), fin=True) == h("01 00 0001 00000009 00000002 6162")
    assert encode_data(9, memoryview(b"ab")) == h("01 00 0000 00000009 00000002 6162")


def test_data_frame_copies_a_large_payload_into_a_size_class_block() -> None:
    """Stream sockets pass a view of the shared read buffer, reused at the next read: the
    frame must be a copy, and (staying queued a while) in a block of its size class."""
    source = bytearray(os.urandom(100_000))
    frame = data_frame(5, memoryview(source))
    expected = h("01 00 0000 00000005 000186a0") + bytes(source)
    source[:] = bytes(len(source))
    assert bytes(frame) == expected
    assert isinstance(frame, memoryview) and isinstance(frame.obj, bytearray)
    assert len(frame.obj) == size_class(len(expected))


def test_encode_ignores_value_of_payload_types_and_payload_of_value_types() -> None:
    # The length field of DATA/OPEN/CONTROL is always the payload size, never ``value``.
    assert encode_frame(Frame(FrameType.DATA, 1, payload=b"a", value=99)) == h(
        "01 00 0000 00000001 00000001 61")
    assert encode_frame(Frame(FrameType.RESET, 1, payload=b"zz", value=2)) == h(
        "01 03 0000 00000001 00000002")


def test_several_frames_in_one_message() -> None:
    wire = h(
        "01 02 0000 00000001 00000006 00000002 6162"  # OPEN 1: tunnel 2, peer "ab"
        "01 00 0000 00000001 00000003 78797a"  # DATA 1 "xyz"
        "01 00 0001 00000001 00000000"  # DATA 1 FIN
        "01 04 0002 00000000 0000002a"  # PING ACK 42
        "01 01 0000 00000003 00000010"  # WINDOW_UPDATE 3 +16
    )
    assert [plain(f) for f in decode_frames(wire)] == [
        (FrameType.OPEN, 1, Flag.NONE, h("00000002") + b"ab", 0),
        (FrameType.DATA, 1, Flag.NONE, b"xyz", 0),
        (FrameType.DATA, 1, Flag.FIN, b"", 0),
        (FrameType.PING, 0, Flag.ACK, b"", 42),
        (FrameType.WINDOW_UPDATE, 3, Flag.NONE, b"", 16),
    ]


def test_payload_caps_are_inclusive() -> None:
    data = decode_frames(h("01 00 0000 00000001 00020000") + bytes(MAX_DATA_PAYLOAD))
    assert len(data[0].payload) == MAX_DATA_PAYLOAD
    opened = decode_frames(h("01 02 0000 00000001 00000200") + bytes(MAX_OPEN_PAYLOAD))
    assert len(opened[0].payload) == MAX_OPEN_PAYLOAD
    control = decode_frames(h("01 06 0000 00000000 00004000") + bytes(MAX_CONTROL_PAYLOAD))
    assert len(control[0].payload) == MAX_CONTROL_PAYLOAD


# ----------------------------------------------------------------------------- rejections

BAD: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("truncated-header", h("01 00 0000 00000001 000000")),
    ("one-byte", h("01")),
    ("truncated-payload", h("01 00 0000 00000001 00000002 68")),
    ("truncated-second-header", h("01 04 0000 00000000 00000001 01 04")),
    ("truncated-second-payload", h("01 04 0000 00000000 00000001 01 06 0000 00000000 00000002 7b")),
    ("version-0", h("00 00 0000 00000001 00000000")),
    ("version-2", h("02 04 0000 00000000 00000000")),
    ("version-255", h("ff 04 0000 00000000 00000000")),
    ("type-7", h("01 07 0000 00000000 00000000")),
    ("type-255", h("01 ff 0000 00000001 00000000")),
    ("fin-on-window", h("01 01 0001 00000001 00000001")),
    ("fin-on-open", h("01 02 0001 00000001 00000004 00000001")),
    ("fin-on-reset", h("01 03 0001 00000001 00000000")),
    ("fin-on-ping", h("01 04 0001 00000000 00000000")),
    ("fin-on-goaway", h("01 05 0001 00000000 00000000")),
    ("fin-on-control", h("01 06 0001 00000000 00000002 7b7d")),
    ("ack-on-data", h("01 00 0002 00000001 00000001 78")),
    ("ack-on-window", h("01 01 0002 00000001 00000001")),
    ("ack-on-open", h("01 02 0002 00000001 00000004 00000001")),
    ("ack-on-reset", h("01 03 0002 00000001 00000000")),
    ("ack-on-goaway", h("01 05 0002 00000000 00000000")),
    ("ack-on-control", h("01 06 0002 00000000 00000002 7b7d")),
    ("data-stream-0", h("01 00 0000 00000000 00000001 78")),
    ("data-fin-stream-0", h("01 00 0001 00000000 00000000")),
    ("window-stream-0", h("01 01 0000 00000000 00000001")),
    ("open-stream-0", h("01 02 0000 00000000 00000004 00000001")),
    ("reset-stream-0", h("01 03 0000 00000000 00000000")),
    ("ping-stream-1", h("01 04 0000 00000001 00000000")),
    ("goaway-stream-1", h("01 05 0000 00000001 00000000")),
    ("control-stream-1", h("01 06 0000 00000001 00000002 7b7d")),
    ("control-stream-max", h("01 06 0000 ffffffff 00000002 7b7d")),
    ("data-claims-4gib", h("01 00 0000 00000001 ffffffff")),
    ("data-claims-cap-plus-1", h("01 00 0000 00000001 00020001")),
    ("data-cap-plus-1-present", h("01 00 0000 00000001 00020001") + bytes(MAX_DATA_PAYLOAD + 1)),
    ("open-claims-4gib", h("01 02 0000 00000001 ffffffff")),
    ("open-cap-plus-1-present", h("01 02 0000 00000001 00000201") + bytes(MAX_OPEN_PAYLOAD + 1)),
    ("control-claims-4gib", h("01 06 0000 00000000 ffffffff")),
    ("control-cap-plus-1-present",
     h("01 06 0000 00000000 00004001") + bytes(MAX_CONTROL_PAYLOAD + 1)),
    ("window-0", h("01 01 0000 00000001 00000000")),
    ("window-max-plus-1", h("01 01 0000 00000001 80000000")),
    ("window-u32-max", h("01 01 0000 00000001 ffffffff")),
    ("valid-then-bad", h("01 04 0000 00000000 00000001 01 01 0000 00000001 00000000")),
]


@pytest.mark.parametrize("wire", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_decode_rejects(wire: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frames(wire)


UNKNOWN_FLAG_BITS: list[tuple[str, bytes]] = [
    ("data-flag-4", h("01 00 0004 00000001 00000001 78")),
    ("data-fin-and-4", h("01 00 0005 00000001 00000001 78")),
    ("data-flag-8000", h("01 00 8000 00000001 00000001 78")),
    ("window-flag-4", h("01 01 0004 00000001 00000001")),
    ("reset-flag-fff8", h("01 03 fff8 00000001 00000000")),
    ("ping-flag-4", h("01 04 0004 00000000 00000000")),
    ("goaway-flag-8000", h("01 05 8000 00000000 00000000")),
    ("control-flag-10", h("01 06 0010 00000000 00000002 7b7d")),
]


@pytest.mark.parametrize("wire", [b[1] for b in UNKNOWN_FLAG_BITS],
                         ids=[b[0] for b in UNKNOWN_FLAG_BITS])
def test_decode_rejects_unknown_flag_bits(wire: bytes) -> None:
    # Regression: ``~`` on an IntFlag only inverts the defined members, so bits 0x4 and up
    # used to pass Frame.check on every type.
    with pytest.raises(FrameError):
        decode_frames(wire)


@pytest.mark.parametrize("flags", [0x4, 0x5, 0x8000, 0xFFFF])
def test_encode_rejects_unknown_flag_bits(flags: int) -> None:
    with pytest.raises(FrameError):
        encode_frame(Frame(FrameType.DATA, 1, Flag(flags), payload=b"x"))


def test_frame_error_is_a_remote_protocol_error() -> None:
    # The I/O layer catches RemoteProtocolError to close the link; FrameError must be one.
    assert issubclass(FrameError, RemoteProtocolError)


INVALID_FRAMES: list[tuple[str, Frame]] = [
    ("data-stream-0", Frame(FrameType.DATA, 0, payload=b"x")),
    ("window-stream-0", Frame(FrameType.WINDOW_UPDATE, 0, value=1)),
    ("open-stream-0", Frame(FrameType.OPEN, 0, payload=bytes(4))),
    ("reset-stream-0", Frame(FrameType.RESET, 0)),
    ("ping-stream-1", Frame(FrameType.PING, 1)),
    ("goaway-stream-1", Frame(FrameType.GOAWAY, 1)),
    ("control-stream-1", Frame(FrameType.CONTROL, 1, payload=b"{}")),
    ("stream-id-too-big", Frame(FrameType.DATA, 2**32, payload=b"x")),
    ("stream-id-negative", Frame(FrameType.DATA, -1, payload=b"x")),
    ("fin-on-ping", Frame(FrameType.PING, flags=Flag.FIN)),
    ("ack-on-data", Frame(FrameType.DATA, 1, Flag.ACK, payload=b"x")),
    ("data-too-big", Frame(FrameType.DATA, 1, payload=bytes(MAX_DATA_PAYLOAD + 1))),
    ("open-too-big", Frame(FrameType.OPEN, 1, payload=bytes(MAX_OPEN_PAYLOAD + 1))),
    ("control-too-big", Frame(FrameType.CONTROL, payload=bytes(MAX_CONTROL_PAYLOAD + 1))),
    ("window-0", Frame(FrameType.WINDOW_UPDATE, 1, value=0)),
    ("window-too-big", Frame(FrameType.WINDOW_UPDATE, 1, value=MAX_WINDOW + 1)),
    ("ping-value-negative", Frame(FrameType.PING, value=-1)),
    ("reset-value-too-big", Frame(FrameType.RESET, 1, value=2**32)),
]


@pytest.mark.parametrize("frame", [f[1] for f in INVALID_FRAMES],
                         ids=[f[0] for f in INVALID_FRAMES])
def test_encode_rejects(frame: Frame) -> None:
    with pytest.raises(FrameError):
        encode_frame(frame)


# ----------------------------------------------------------------------------- properties

U32 = st.integers(0, 0xFFFFFFFF)
STREAM = st.integers(1, 0xFFFFFFFF)
SMALL_OR_MAX_DATA = st.one_of(st.binary(max_size=64), st.just(b"\x5a" * MAX_DATA_PAYLOAD))


def valid_frames(*, small: bool = False) -> st.SearchStrategy[Frame]:
    data = st.binary(max_size=16) if small else SMALL_OR_MAX_DATA
    open_payload = st.binary(max_size=16 if small else MAX_OPEN_PAYLOAD)
    return st.one_of(
        st.builds(Frame, st.just(FrameType.DATA), STREAM, st.sampled_from([Flag.NONE, Flag.FIN]),
                  data),
        st.builds(Frame, st.just(FrameType.WINDOW_UPDATE), STREAM,
                  value=st.integers(1, MAX_WINDOW)),
        st.builds(Frame, st.just(FrameType.OPEN), STREAM, payload=open_payload),
        st.builds(Frame, st.just(FrameType.RESET), STREAM, value=U32),
        st.builds(Frame, st.just(FrameType.PING), flags=st.sampled_from([Flag.NONE, Flag.ACK]),
                  value=U32),
        st.builds(Frame, st.just(FrameType.GOAWAY), value=U32),
        st.builds(Frame, st.just(FrameType.CONTROL),
                  payload=st.binary(max_size=16 if small else 128)),
    )


@settings(max_examples=500, deadline=None)
@given(valid_frames())
def test_round_trip(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert len(wire) == HEADER_SIZE + len(frame.payload)
    (decoded,) = decode_frames(wire)
    assert plain(decoded) == plain(frame)
    if frame.type is FrameType.DATA:
        assert encode_data(frame.stream_id, frame.payload, bool(frame.flags & Flag.FIN)) == wire


@settings(max_examples=300, deadline=None)
@given(st.lists(valid_frames(), min_size=1, max_size=8))
def test_multi_frame_message_round_trip(frames: list[Frame]) -> None:
    message = b"".join(encode_frame(f) for f in frames)
    decoded = decode_frames(message)
    assert [plain(f) for f in decoded] == [plain(f) for f in frames]
    assert b"".join(encode_frame(f) for f in decoded) == message


RANDOM_BYTES = st.binary(max_size=96)
CUT = st.integers(0, 4095)
TAIL = st.binary(max_size=16)
SMALL_FRAME_LISTS = st.lists(valid_frames(small=True), min_size=1, max_size=3)
EDITS = st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=3)


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid message with a few bytes changed, cut and appended."""
    if draw(st.booleans()):
        return draw(RANDOM_BYTES)
    frames = draw(SMALL_FRAME_LISTS)
    message = bytearray(b"".join(encode_frame(f) for f in frames))
    for index, byte in draw(EDITS):
        message[index % len(message)] = byte
    cut = draw(CUT) % (len(message) + 1)
    return bytes(message[:cut]) + draw(TAIL)


@settings(max_examples=2000, deadline=None)
@given(hostile_messages())
def test_arbitrary_bytes_decode_or_raise_frame_error(message: bytes) -> None:
    try:
        frames = decode_frames(message)
    except FrameError:
        return
    # Whatever decodes is a message of valid frames that re-encodes to the same bytes.
    assert frames
    assert b"".join(encode_frame(f) for f in frames) == message
