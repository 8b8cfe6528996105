"""Our RFC 6455 framing (tunnel/common/aio/wsframing.py).

Most tests drive a :class:`WsFraming` through a recording transport (bytes in with
``data_received``, bytes out as written), with golden frames from RFC 6455 section 5.7. The
tests over real loopback sockets against the websockets library, including the take-over
right after a real opening handshake, are in tests/integration/test_wsframing_handshake.py.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.uri import parse_uri

from tests.recording_transport import RecordingTransport
from tunnel.common.aio.wsframing import (
    CLOSE_GOING_AWAY,
    CLOSE_INVALID_DATA,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    RECV_HIGH_WATER,
    WsFraming,
    apply_mask,
    encode_frame,
)
from tunnel.common.proto.sizeclass import size_class

MASK = bytes([0x37, 0xFA, 0x21, 0x3D])  # the key of RFC 6455 5.7's masked examples
# RFC 6455 5.7, byte for byte
HELLO_UNMASKED = bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
HELLO_MASKED = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
HEL_LO_FRAGMENTS = bytes([0x01, 0x03, 0x48, 0x65, 0x6C, 0x80, 0x02, 0x6C, 0x6F])
PING_HELLO_UNMASKED = bytes([0x89, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
PONG_HELLO_MASKED = bytes([0x8A, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])
BINARY_256_HEADER = bytes([0x82, 0x7E, 0x01, 0x00])
BINARY_64K_HEADER = bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])


def make(client: bool = False, max_size: int | None = 1 << 20,
         ) -> tuple[WsFraming, RecordingTransport]:
    framing = WsFraming(client=client, max_message_size=max_size, close_timeout=0.5,
                        mask_key=lambda n: MASK)
    transport = RecordingTransport()
    framing.attach(transport)
    return framing, transport


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame as the peer would send it to our server side."""
    return b"".join(bytes(b) for b in encode_frame(opcode, payload, fin=fin, mask=MASK))


def unmasked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return b"".join(bytes(b) for b in encode_frame(opcode, payload, fin=fin))


def parse_frames(data: bytes, mask: bool) -> list[Frame]:
    """Decode written bytes with websockets' own parser (an independent implementation)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        gen = Frame.parse(reader.read_exact, mask=mask)
        try:
            while True:
                next(gen)
        except StopIteration as done:
            frames.append(done.value)
    return frames


async def recv_now(framing: WsFraming) -> Any:
    async with asyncio.timeout(1):
        return await framing.recv()


# ---------------------------------------------------------------- golden frames, RFC 6455 5.7

async def test_rfc_single_frame_unmasked_text_is_read_by_a_client() -> None:
    framing, _ = make(client=True)
    framing.data_received(HELLO_UNMASKED)
    assert await recv_now(framing) == "Hello"


async def test_rfc_single_frame_masked_text_is_read_by_a_server() -> None:
    framing, _ = make(client=False)
    framing.data_received(HELLO_MASKED)
    assert await recv_now(framing) == "Hello"


async def test_rfc_fragmented_text_is_joined() -> None:
    framing, _ = make(client=True)
    framing.data_received(HEL_LO_FRAGMENTS)
    assert await recv_now(framing) == "Hello"


async def test_rfc_ping_is_answered_with_a_masked_pong_by_a_client() -> None:
    framing, transport = make(client=True)
    framing.data_received(PING_HELLO_UNMASKED)
    assert transport.take() == PONG_HELLO_MASKED


async def test_rfc_256_and_64k_binary_headers() -> None:
    data = os.urandom(65536)
    assert unmasked(Opcode.BINARY, data[:256])[:4] == BINARY_256_HEADER
    assert unmasked(Opcode.BINARY, data)[:10] == BINARY_64K_HEADER
    framing, _ = make(client=True)
    framing.data_received(BINARY_256_HEADER + data[:256] + BINARY_64K_HEADER + data)
    assert bytes(await recv_now(framing)) == data[:256]
    assert bytes(await recv_now(framing)) == data


async def test_client_writes_masked_frames_that_websockets_parses() -> None:
    framing, transport = make(client=True)
    for size in (0, 1, 125, 126, 65535, 65536, 300_000):
        payload = os.urandom(size)
        await framing.send(payload)
        (frame,) = parse_frames(transport.take(), mask=True)
        assert frame.opcode is Opcode.BINARY and frame.fin and frame.data == payload


async def test_server_writes_unmasked_frames_that_websockets_parses() -> None:
    framing, transport = make(client=False)
    payload = os.urandom(200_000)
    await framing.send(memoryview(payload))
    await framing.send(b"x")
    frames = parse_frames(transport.take(), mask=False)
    assert [f.data for f in frames] == [payload, b"x"]


def test_apply_mask_is_its_own_inverse_and_matches_the_rfc() -> None:
    assert apply_mask(b"Hello", MASK) == HELLO_MASKED[6:]
    data = os.urandom(1001)
    assert apply_mask(apply_mask(data, MASK), MASK) == data


# ---------------------------------------------------------------- partial feeds

@pytest.mark.parametrize("client", [True, False])
async def test_byte_by_byte_feed_gives_the_same_messages(client: bool) -> None:
    framing, _ = make(client=client)
    frame = unmasked if client else masked
    payloads = [b"", b"a", os.urandom(125), os.urandom(126), os.urandom(70_000)]
    stream = b"".join(frame(Opcode.BINARY, p) for p in payloads)
    stream += frame(Opcode.BINARY, b"frag-", fin=False) + frame(Opcode.PING, b"p") \
        + frame(Opcode.CONT, b"ment")
    for i in range(len(stream)):
        framing.data_received(stream[i:i + 1])
    for payload in payloads:
        assert bytes(await recv_now(framing)) == payload
    assert bytes(await recv_now(framing)) == b"frag-ment"


async def test_random_chunking_of_many_frames() -> None:
    framing, _ = make(client=False)
    payloads = [os.urandom(n) for n in (3, 300, 3000, 30_000, 131_072, 7)] * 3
    stream = b"".join(masked(Opcode.BINARY, p) for p in payloads)
    rng = __import__("random").Random(5)
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 13, 14, 15, 1000, 65536, 262144))
        framing.data_received(stream[pos:pos + step])
        pos += step
    for payload in payloads:
        assert bytes(await recv_now(framing)) == payload


def feed_buffered(framing: WsFraming, stream: bytes, steps: tuple[int, ...],
                  seed: int = 1) -> None:
    """Feed ``stream`` the way a transport drives a BufferedProtocol, in random read sizes."""
    rng = __import__("random").Random(seed)
    pos = 0
    while pos < len(stream):
        buf = framing.get_buffer(-1)
        assert len(buf) > 0
        n = min(len(buf), rng.choice(steps), len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        del buf  # a transport lets go of the view before calling back
        framing.buffer_updated(n)
        pos += n


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("steps", [(1,), (1, 7, 14, 15), (100, 16384, 70000, 1 << 20)])
async def test_buffered_reads_give_the_same_messages(client: bool, steps: tuple[int, ...],
                                                     ) -> None:
    framing, transport = make(client=client, max_size=None)
    frame = unmasked if client else masked
    sizes = (0, 5, 125, 126, 16383, 16384, 65536, 131072, 300_000)
    payloads = [os.urandom(n) for n in sizes if steps != (1,) or n < 20_000]
    stream = b"".join(frame(Opcode.BINARY, p) for p in payloads)
    stream += frame(Opcode.BINARY, b"x" * 20_000, fin=False) + frame(Opcode.PING, b"p") \
        + frame(Opcode.CONT, b"y" * 30_000)
    feed_buffered(framing, stream, steps)
    for payload in payloads:
        assert bytes(await recv_now(framing)) == payload
    assert bytes(await recv_now(framing)) == b"x" * 20_000 + b"y" * 30_000
    (pong,) = parse_frames(transport.take(), mask=client)
    assert pong.opcode is Opcode.PONG and pong.data == b"p"


async def test_a_large_payload_is_read_into_its_own_buffer() -> None:
    framing, _ = make(client=True, max_size=None)
    payload = os.urandom(200_000)
    data = unmasked(Opcode.BINARY, payload)
    feed_buffered(framing, data, (1000,))
    message = await recv_now(framing)
    assert isinstance(message, memoryview) and message == payload
    # ... a buffer of the payload's size class, so freed buffers fit later ones (sizeclass)
    assert isinstance(message.obj, bytearray) and len(message.obj) == size_class(200_000)
    assert size_class(200_000) > 200_000


async def test_scratch_buffer_is_small_before_the_login_and_grows_after() -> None:
    framing, _ = make(client=False, max_size=4096)
    assert len(framing.get_buffer(-1)) == 4096 + 14
    feed_buffered(framing, masked(Opcode.BINARY, bytes(4096)), (100_000,))
    assert len(await recv_now(framing)) == 4096
    framing.max_message_size = 1 << 20
    assert len(framing.get_buffer(-1)) == 64 * 1024


async def test_buffered_reads_skip_an_oversize_payload_and_see_the_close_reply() -> None:
    framing, transport = make(client=False, max_size=4096)
    feed_buffered(framing, masked(Opcode.BINARY, bytes(100_000))
                  + masked(Opcode.CLOSE, struct.pack("!H", CLOSE_TOO_BIG)), (5000, 70000))
    await failed_with(framing, transport, CLOSE_TOO_BIG)
    with pytest.raises(ConnectionClosed):
        await recv_now(framing)
    assert transport.closing and not transport.aborted


async def test_a_frame_wholly_in_one_read_is_not_copied() -> None:
    framing, _ = make(client=True)
    data = unmasked(Opcode.BINARY, b"abc" * 1000)
    framing.data_received(data)
    message = await recv_now(framing)
    assert isinstance(message, memoryview) and message.obj is data


# ---------------------------------------------------------------- control frames and closing

async def test_pings_interleaved_in_a_fragmented_message_are_answered() -> None:
    framing, transport = make(client=False)
    framing.data_received(masked(Opcode.BINARY, b"ab", fin=False) + masked(Opcode.PING, b"1")
                          + masked(Opcode.CONT, b"cd", fin=False) + masked(Opcode.PONG, b"")
                          + masked(Opcode.CONT, b"ef"))
    assert bytes(await recv_now(framing)) == b"abcdef"
    (pong,) = parse_frames(transport.take(), mask=False)
    assert pong.opcode is Opcode.PONG and pong.data == b"1"


async def test_peer_close_is_echoed_and_the_server_closes_the_tcp() -> None:
    framing, transport = make(client=False)
    framing.data_received(masked(Opcode.BINARY, b"last") + masked(Opcode.CLOSE,
                          struct.pack("!H", CLOSE_GOING_AWAY) + b"bye"))
    assert bytes(await recv_now(framing)) == b"last"
    with pytest.raises(ConnectionClosedOK) as closed:
        await recv_now(framing)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_GOING_AWAY
    assert closed.value.rcvd.reason == "bye"
    (reply,) = parse_frames(transport.take(), mask=False)
    assert reply.opcode is Opcode.CLOSE and reply.data[:2] == struct.pack("!H", 1001)
    assert transport.closing and not transport.aborted


async def test_local_close_waits_for_the_reply_then_the_server_closes() -> None:
    framing, transport = make(client=False)
    closing = asyncio.create_task(framing.close(1002, "protocol error"))
    await asyncio.sleep(0)
    (sent,) = parse_frames(transport.take(), mask=False)
    assert sent.opcode is Opcode.CLOSE and sent.data == b"\x03\xeaprotocol error"
    assert not closing.done()
    framing.data_received(masked(Opcode.CLOSE, bytes(sent.data)))
    async with asyncio.timeout(1):
        await closing
    assert transport.closing and not transport.aborted
    with pytest.raises(ConnectionClosed):
        await framing.send(b"late")


async def test_client_close_without_reply_is_aborted_after_the_timeout() -> None:
    framing, transport = make(client=True)
    async with asyncio.timeout(2):
        await framing.close(CLOSE_GOING_AWAY, "bye")
    assert transport.aborted


async def test_client_answers_a_server_close_and_waits_for_the_tcp_end() -> None:
    framing, transport = make(client=True)
    framing.data_received(unmasked(Opcode.CLOSE, b""))  # no status code: 1005
    (reply,) = parse_frames(transport.take(), mask=True)
    assert reply.opcode is Opcode.CLOSE and reply.data == b""
    assert not transport.closing
    framing.connection_lost(None)
    with pytest.raises(ConnectionClosed):
        await recv_now(framing)


# ---------------------------------------------------------------- refusals (close codes)

async def failed_with(framing: WsFraming, transport: RecordingTransport, code: int) -> None:
    (sent,) = parse_frames(transport.take(), mask=framing.client)
    assert sent.opcode is Opcode.CLOSE
    assert struct.unpack("!H", sent.data[:2])[0] == code
    assert framing.close_sent is not None and framing.close_sent.code == code


async def test_oversize_message_fails_with_1009_and_its_payload_is_skipped() -> None:
    framing, transport = make(client=False, max_size=4096)
    framing.data_received(masked(Opcode.BINARY, bytes(4097)))
    await failed_with(framing, transport, CLOSE_TOO_BIG)
    # The peer's close reply after the skipped payload ends the link cleanly.
    framing.data_received(masked(Opcode.CLOSE, struct.pack("!H", CLOSE_TOO_BIG)))
    with pytest.raises(ConnectionClosed) as closed:
        await recv_now(framing)
    assert closed.value.sent is not None and closed.value.sent.code == CLOSE_TOO_BIG
    assert transport.closing and not transport.aborted


async def test_fragmented_message_over_the_limit_fails_with_1009() -> None:
    framing, transport = make(client=False, max_size=100)
    framing.data_received(masked(Opcode.BINARY, bytes(60), fin=False))
    framing.data_received(masked(Opcode.CONT, bytes(41)))
    await failed_with(framing, transport, CLOSE_TOO_BIG)


async def test_message_at_the_limit_is_accepted() -> None:
    framing, _ = make(client=False, max_size=100)
    framing.data_received(masked(Opcode.BINARY, bytes(60), fin=False)
                          + masked(Opcode.CONT, bytes(40)))
    assert len(await recv_now(framing)) == 100


async def test_text_is_handed_on_as_str_for_the_link_to_refuse() -> None:
    framing, _ = make(client=False)
    framing.data_received(masked(Opcode.TEXT, "héllo".encode()))
    assert await recv_now(framing) == "héllo"


async def test_text_with_bad_utf8_fails_with_1007() -> None:
    framing, transport = make(client=False)
    framing.data_received(masked(Opcode.TEXT, b"\xff\xfe"))
    await failed_with(framing, transport, CLOSE_INVALID_DATA)


@pytest.mark.parametrize(("frame", "client"), [
    (bytes([0x82, 0x01, 0x41]), False),  # unmasked client frame at the server
    (masked(Opcode.BINARY, b"A"), True),  # masked frame at the client
    (bytes([0xC2, 0x81]) + MASK + b"A", False),  # RSV1 set
    (bytes([0x83, 0x81]) + MASK + b"A", False),  # reserved opcode 3
    (masked(Opcode.CONT, b"A"), False),  # continuation with nothing to continue
    (masked(Opcode.BINARY, b"A", fin=False) + masked(Opcode.BINARY, b"B"), False),
    (masked(Opcode.PING, b"A", fin=False), False),  # fragmented control frame
    (masked(Opcode.PING, bytes(126)), False),  # control frame too long
    (masked(Opcode.CLOSE, b"\x03"), False),  # one-byte close payload
    (masked(Opcode.CLOSE, struct.pack("!H", 1005)), False),  # code that must not be sent
])
async def test_protocol_violations_fail_with_1002(frame: bytes, client: bool) -> None:
    framing, transport = make(client=client)
    framing.data_received(frame)
    await failed_with(framing, transport, CLOSE_PROTOCOL_ERROR)
    framing.data_received(masked(Opcode.BINARY, b"ignored") if not client
                          else unmasked(Opcode.BINARY, b"ignored"))
    assert not framing._queue


async def test_failed_link_without_a_reply_is_aborted_after_the_timeout() -> None:
    framing, transport = make(client=False)
    framing.data_received(bytes([0x82, 0x01, 0x41]))
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(2):
            await framing.recv()
    assert transport.aborted


# ---------------------------------------------------------------- flow control

async def test_reading_pauses_while_the_link_lags_and_resumes_when_it_catches_up() -> None:
    framing, transport = make(client=True, max_size=None)
    chunk = unmasked(Opcode.BINARY, bytes(1 << 20))
    for _ in range(RECV_HIGH_WATER // (1 << 20) + 1):
        framing.data_received(chunk)
    assert not transport.reading
    while framing._queue:
        await recv_now(framing)
    assert transport.reading


async def test_send_waits_while_the_transport_is_paused() -> None:
    framing, transport = make(client=False)
    framing.pause_writing()
    sending = asyncio.create_task(framing.send(b"x"))
    await asyncio.sleep(0)
    assert not sending.done() and parse_frames(transport.take(), mask=False)[0].data == b"x"
    framing.resume_writing()
    async with asyncio.timeout(1):
        await sending


async def test_send_waiting_on_a_lost_connection_raises() -> None:
    framing, _ = make(client=False)
    framing.pause_writing()
    sending = asyncio.create_task(framing.send(b"x"))
    await asyncio.sleep(0)
    framing.connection_lost(ConnectionResetError())
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(1):
            await sending


class RefusingCloseTransport(RecordingTransport):
    """Like asyncio's TLS transport once the peer ended TLS: ``close()`` raises."""

    def close(self) -> None:
        if not self.aborted:
            raise RuntimeError("cannot switch state from UNWRAPPED to SHUTDOWN")
        super().close()


async def test_peer_close_on_a_transport_that_refuses_close_aborts_quietly() -> None:
    framing = WsFraming(client=False, max_message_size=1 << 20, close_timeout=0.5,
                        mask_key=lambda n: MASK)
    transport = RefusingCloseTransport()
    framing.attach(transport)
    framing.data_received(masked(Opcode.CLOSE, struct.pack("!H", CLOSE_GOING_AWAY)))
    with pytest.raises(ConnectionClosedOK):
        await recv_now(framing)
    assert transport.aborted and transport.closing


@pytest.mark.parametrize("side", ["client", "server"])
def test_websockets_protocol_has_the_message_cap_the_link_sets(side: str) -> None:
    """``Link.set_max_message_size`` and ``take_over_framing`` read and set the protocol's
    ``max_message_size``; a websockets version that names it otherwise (15.x: ``max_size``)
    would take the assignment as a new, unused attribute, and the cap would silently not
    apply. CI runs this on the lowest and the highest allowed version."""
    protocol = ClientProtocol(parse_uri("ws://127.0.0.1/")) if side == "client" \
        else ServerProtocol()
    assert "max_message_size" in vars(protocol)
    protocol.max_message_size = 1234
    assert protocol.max_message_size == 1234
