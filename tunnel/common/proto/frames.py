"""Binary frame codec of the link (see docs/protocol.md for the wire spec).

Every frame starts with a 12-byte header, yamux style::

    version:u8  type:u8  flags:u16  stream_id:u32  length:u32      (network byte order)

For DATA, OPEN and CONTROL, ``length`` is the size of the payload that follows. For the other
types no payload follows and ``length`` carries a value: the credit of a WINDOW_UPDATE, the
error code of a RESET or GOAWAY, the opaque token of a PING. One WebSocket binary message
carries one or more whole frames, so small frames can share a message.

The decoder checks every length against the cap of its type *before* slicing, so a header
that claims 4 GiB costs nothing, and it raises only :class:`FrameError` on bad input.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from tunnel.common.errors import FrameError
from tunnel.common.proto.sizeclass import classed_join

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_PAYLOAD",
    "MAX_MESSAGE_SIZE",
    "MAX_OPEN_PAYLOAD",
    "MAX_WINDOW",
    "PROTOCOL_VERSION",
    "SEND_MESSAGE_SIZE",
    "Flag",
    "Frame",
    "FrameType",
    "data_frame",
    "decode_frames",
    "encode_data",
    "encode_frame",
    "iter_frames",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12

#: Largest DATA payload; pumps never read more than this per frame.
MAX_DATA_PAYLOAD = 128 * 1024
#: Largest OPEN payload (tunnel id and visitor address).
MAX_OPEN_PAYLOAD = 512
#: Largest CONTROL payload (a JSON message).
MAX_CONTROL_PAYLOAD = 16 * 1024
#: Largest WebSocket message on the link: several frames may share one message.
MAX_MESSAGE_SIZE = 4 * (MAX_DATA_PAYLOAD + HEADER_SIZE)
#: Largest message we build (we accept up to ``MAX_MESSAGE_SIZE``, as earlier versions
#: sent): one full DATA frame, or several smaller frames together. A receiver holds a
#: message's whole buffer from its first byte until its last, so on a relay with 200 busy
#: links (L-3) four full frames per message multiply the peak memory of messages in flight,
#: while batching full frames saves no measurable CPU (``python -m bench.profile``; figures
#: in docs/benchmarks.md).
SEND_MESSAGE_SIZE = MAX_DATA_PAYLOAD + HEADER_SIZE
#: Most concurrent streams a link may be configured for (either side caps what it is told).
MAX_STREAMS_LIMIT = 65_536
#: Largest send window a peer may grant (RFC 9113 section 6.9.1).
MAX_WINDOW = 2**31 - 1


class FrameType(enum.IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    OPEN = 2
    RESET = 3
    PING = 4
    GOAWAY = 5
    CONTROL = 6


class Flag(enum.IntFlag):
    NONE = 0
    FIN = 0x1  # DATA only: the sender will send no more on this stream (half-close)
    ACK = 0x2  # PING only: this is the reply


_PAYLOAD_CAP = {
    FrameType.DATA: MAX_DATA_PAYLOAD,
    FrameType.OPEN: MAX_OPEN_PAYLOAD,
    FrameType.CONTROL: MAX_CONTROL_PAYLOAD,
}
_ALLOWED_FLAGS = {
    FrameType.DATA: Flag.FIN,
    FrameType.PING: Flag.ACK,
}
_SESSION_TYPES = frozenset({FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL})
_TYPES = {t.value: t for t in FrameType}


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame. ``payload`` is set for DATA/OPEN/CONTROL, ``value`` for the rest."""

    type: FrameType
    stream_id: int = 0
    flags: Flag = Flag.NONE
    payload: bytes | memoryview = b""
    value: int = 0

    def check(self) -> None:
        """Raise FrameError unless the frame obeys the spec; shared by encoder and decoder."""
        if not 0 <= self.stream_id <= 0xFFFFFFFF:
            raise FrameError(f"stream id {self.stream_id} out of range")
        if self.type in _SESSION_TYPES:
            if self.stream_id != 0:
                raise FrameError(f"{self.type.name} frame must use stream 0")
        elif self.stream_id == 0:
            raise FrameError(f"{self.type.name} frame must not use stream 0")
        # Plain ints: ``~`` on an IntFlag only inverts the *defined* members.
        if int(self.flags) & ~int(_ALLOWED_FLAGS.get(self.type, Flag.NONE)):
            raise FrameError(f"flags {int(self.flags):#x} not allowed on {self.type.name}")
        cap = _PAYLOAD_CAP.get(self.type)
        if cap is not None:
            if len(self.payload) > cap:
                raise FrameError(f"{self.type.name} payload of {len(self.payload)} bytes > {cap}")
        elif not 0 <= self.value <= 0xFFFFFFFF:
            raise FrameError(f"{self.type.name} value out of range")
        if self.type is FrameType.WINDOW_UPDATE and not 0 < self.value <= MAX_WINDOW:
            raise FrameError(f"window increment {self.value} not in 1..{MAX_WINDOW}")


def encode_frame(frame: Frame) -> bytes:
    """Serialize a frame after checking it (used for everything but the DATA hot path)."""
    frame.check()
    if frame.type in _PAYLOAD_CAP:
        header = HEADER.pack(PROTOCOL_VERSION, frame.type, frame.flags, frame.stream_id,
                             len(frame.payload))
        return header + bytes(frame.payload)
    return HEADER.pack(PROTOCOL_VERSION, frame.type, frame.flags, frame.stream_id, frame.value)


def encode_data(stream_id: int, data: bytes | bytearray | memoryview, fin: bool = False) -> bytes:
    """A DATA frame as plain ``bytes`` (tests and tools; the send path uses :func:`data_frame`)."""
    return bytes(data_frame(stream_id, data, fin))


def data_frame(stream_id: int, data: bytes | bytearray | memoryview,
               fin: bool = False) -> bytes | memoryview:
    """Hot-path DATA encoder: the caller guarantees ``0 < stream_id`` and the payload cap.

    The frame is a copy (the caller may reuse ``data`` at once: stream sockets pass a view
    of the shared read buffer), large ones in a block of their size class, since a frame
    stays queued for a while (see sizeclass).
    """
    header = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, Flag.FIN if fin else 0, stream_id,
                         len(data))
    return classed_join((header, data)) if data else header


def decode_frames(message: bytes | bytearray | memoryview) -> list[Frame]:
    """Split one link message into frames; raise FrameError on any malformed byte."""
    return list(iter_frames(message))


def iter_frames(message: bytes | bytearray | memoryview) -> Iterator[Frame]:
    """Decode one link message frame by frame, raising FrameError at the first bad byte.

    Lazy, so a receiver that rejects a frame (a flood limit, a protocol error) stops there:
    a 512 KiB message of 43,000 pings costs 101 frame objects, not 43,000 (reliability B-7).
    """
    view = memoryview(message)
    total = len(view)
    if total == 0:
        raise FrameError("empty message")
    offset = 0
    while offset < total:
        if total - offset < HEADER_SIZE:
            raise FrameError(f"truncated header: {total - offset} bytes")
        version, type_value, flags, stream_id, length = HEADER.unpack_from(view, offset)
        offset += HEADER_SIZE
        if version != PROTOCOL_VERSION:
            raise FrameError(f"unsupported protocol version {version}")
        ftype = _TYPES.get(type_value)
        if ftype is None:
            raise FrameError(f"unknown frame type {type_value}")
        if ftype in _PAYLOAD_CAP:
            if length > _PAYLOAD_CAP[ftype]:
                raise FrameError(f"{ftype.name} length {length} > {_PAYLOAD_CAP[ftype]}")
            if total - offset < length:
                raise FrameError(f"truncated {ftype.name} payload")
            frame = Frame(ftype, stream_id, Flag(flags), view[offset:offset + length])
            offset += length
        else:
            frame = Frame(ftype, stream_id, Flag(flags), b"", length)
        frame.check()
        yield frame
