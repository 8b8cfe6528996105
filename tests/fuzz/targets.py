"""Fuzz targets for the parsers that read untrusted bytes off the link (reliability B-1).

``one_input(data)`` is the whole contract: it must return for any ``data``, and raise only
``AssertionError`` (a broken invariant, which the fuzzer reports with the input). Each
target returns what it read (frames, mux events, delivered messages), so that a test can
check that a valid input is read and not just survived. Atheris
drives it coverage-guided (``fuzz_link.py``, 10 min at night); CI runs it on seeds and on
random bytes, so the harness itself cannot rot. The first byte picks the target:

- frame codec: ``decode_frames`` returns frames or raises ``FrameError``, nothing else;
  what decodes, re-encodes to the same bytes.
- multiplexer: a sequence of link messages into ``Mux.receive`` (either role) raises only
  ``RemoteProtocolError``; whatever the mux queues in reply decodes cleanly, and its byte
  counters never go negative.
- WebSocket framing: bytes into our RFC 6455 parser (``WsFraming``, either side) in the
  read sizes a transport would use; nothing escapes it, no delivered message is above the
  size cap, and after it failed the connection nothing more is delivered.
"""

from __future__ import annotations

import asyncio
import struct

from tests.recording_transport import RecordingTransport
from tunnel.common.aio.wsframing import Message, WsFraming
from tunnel.common.errors import FrameError, RemoteProtocolError
from tunnel.common.proto.frames import Frame, decode_frames, encode_frame
from tunnel.common.proto.mux import Event, Mux, Role

__all__ = ["SEEDS", "TARGETS", "one_input"]

MAX_CHUNKS = 64
"""Link messages (or reads) per input: enough for any state, bounded per run."""
WS_MAX_MESSAGE = 1 << 16
_CHUNK_LEN = struct.Struct("!H")


def _chunks(data: bytes) -> list[bytes]:
    """Split ``data`` into length-prefixed pieces (2-byte big-endian lengths)."""
    pieces: list[bytes] = []
    pos = 0
    while pos + _CHUNK_LEN.size <= len(data) and len(pieces) < MAX_CHUNKS:
        (size,) = _CHUNK_LEN.unpack_from(data, pos)
        pos += _CHUNK_LEN.size
        pieces.append(data[pos:pos + size])
        pos += size
    if pos < len(data) and len(pieces) < MAX_CHUNKS:
        pieces.append(data[pos:])
    return pieces


def fuzz_frames(data: bytes) -> list[Frame]:
    """The frames ``data`` decodes to; none if the codec refused it."""
    try:
        frames = decode_frames(data)
    except FrameError:
        return []
    assert b"".join(encode_frame(frame) for frame in frames) == data
    return frames


def fuzz_mux(data: bytes) -> list[Event]:
    """The events the mux reported, up to the first protocol error."""
    events: list[Event] = []
    if not data:
        return events
    mux = Mux(Role.RELAY if data[0] & 1 else Role.CLIENT)
    for message in _chunks(data[1:]):
        try:
            events += mux.receive(message)
        except RemoteProtocolError:
            return events
        finally:
            assert mux.pending_data_bytes >= 0 and mux.urgent_bytes() >= 0
        while (out := mux.next_message()) is not None:
            decode_frames(out)  # our own replies are always well-formed
    return events


async def _feed_ws(data: bytes) -> list[Message]:
    framing = WsFraming(client=bool(data[0] & 1), max_message_size=WS_MAX_MESSAGE,
                        close_timeout=0.01, mask_key=lambda n: b"\x01\x02\x03\x04")
    transport = RecordingTransport()
    framing.attach(transport)
    buffered = bool(data[0] & 2)
    for piece in _chunks(data[1:]):
        if transport.closing:
            break
        if buffered:  # as a transport drives a BufferedProtocol (TLS off, uvloop)
            pos = 0
            while pos < len(piece) and not transport.closing:
                buf = framing.get_buffer(-1)
                size = min(len(buf), len(piece) - pos)
                buf[:size] = piece[pos:pos + size]
                del buf  # a transport lets go of the view before calling back
                framing.buffer_updated(size)
                pos += size
        else:  # as a transport that hands over bytes (asyncio's TLS)
            framing.data_received(piece)
    delivered = framing._queued
    messages = list(framing._queue)
    for message in messages:
        assert len(message) <= WS_MAX_MESSAGE
    if transport.closing:
        framing.data_received(b"\x82\x01x")  # a frame after the failure: ignored
        assert framing._queued == delivered
        await asyncio.sleep(0)  # the transport's close ends the protocol on the next turn
    else:
        framing.connection_lost(None)
    return messages


_LOOP: asyncio.AbstractEventLoop | None = None


def fuzz_wsframing(data: bytes) -> list[Message]:
    """The messages the framing delivered (before it failed the connection, if it did)."""
    if not data:
        return []
    global _LOOP
    if _LOOP is None:
        _LOOP = asyncio.new_event_loop()
    return _LOOP.run_until_complete(_feed_ws(data))


TARGETS = (fuzz_frames, fuzz_mux, fuzz_wsframing)


def one_input(data: bytes) -> None:
    if data:
        TARGETS[data[0] % len(TARGETS)](data[1:])


SEEDS = [
    b"\x00" + bytes.fromhex("01 00 00 00 01 00 00 00 03") + b"abc",
    b"\x01\x00" + _CHUNK_LEN.pack(9) + bytes.fromhex("01 00 00 00 01 00 00 00 00"),
    b"\x02\x00" + _CHUNK_LEN.pack(11) + bytes.fromhex("82 85 01 02 03 04") + b"hello",
    b"\x02\x03" + _CHUNK_LEN.pack(7) + bytes.fromhex("82 05") + b"hello",
]
"""A start for the fuzzer per target (not necessarily valid frames: it mutates them)."""
