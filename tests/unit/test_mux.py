"""Sans-I/O multiplexer: two Mux ends wired back to back, no sockets, no loop, no clock.

``MuxPair`` is h11's ConnectionPair idea: whatever one end's :meth:`Mux.next_message` yields
is fed to the other end's :meth:`Mux.receive`, and the events that come out are returned.
Hostile input is crafted as raw frames with the codec and fed straight to ``receive``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tunnel.client.settings import MAX_EXPOSES
from tunnel.common.errors import LocalProtocolError, RemoteProtocolError
from tunnel.common.proto.frames import (
    HEADER,
    HEADER_SIZE,
    MAX_DATA_PAYLOAD,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW,
    SEND_MESSAGE_SIZE,
    Flag,
    Frame,
    FrameType,
    decode_frames,
    encode_data,
    encode_frame,
)
from tunnel.common.proto.mux import (
    DEFAULT_MAX_STREAMS,
    INITIAL_WINDOW,
    MAX_CONTROL_BURST,
    MAX_CONTROL_FRAMES_PER_SECOND,
    MAX_EMPTY_DATA_PER_SECOND,
    MAX_STRAY_DATA_PER_MINUTE,
    MIN_EARNED_GRANT,
    ControlReceived,
    DataReceived,
    Event,
    GoAwayCode,
    GoAwayReceived,
    Mux,
    PingReceived,
    PongReceived,
    RateLimit,
    ResetCode,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
)

HALF = INITIAL_WINDOW // 2


# ----------------------------------------------------------------------------- harness


@dataclass
class MuxPair:
    """A relay-role and a client-role Mux joined by an in-memory link."""

    relay: Mux = field(default_factory=lambda: Mux(Role.RELAY))
    client: Mux = field(default_factory=lambda: Mux(Role.CLIENT))
    #: Every message each end put on the wire, for size and framing checks.
    sent: dict[Role, list[bytes]] = field(
        default_factory=lambda: {Role.RELAY: [], Role.CLIENT: []})

    def peer(self, mux: Mux) -> Mux:
        return self.client if mux is self.relay else self.relay

    def deliver_one(self, sender: Mux) -> list[Event] | None:
        """Move one message from ``sender`` to its peer; None when nothing was queued."""
        message = sender.next_message()
        if message is None:
            return None
        assert 0 < len(message) <= MAX_MESSAGE_SIZE
        self.sent[sender.role].append(bytes(message))
        return self.peer(sender).receive(message)

    def deliver(self, sender: Mux) -> list[Event]:
        """Move everything ``sender`` has queued; return the events its peer saw."""
        events: list[Event] = []
        while (batch := self.deliver_one(sender)) is not None:
            events += batch
        return events

    def to_client(self) -> list[Event]:
        return self.deliver(self.relay)

    def to_relay(self) -> list[Event]:
        return self.deliver(self.client)

    def settle(self) -> tuple[list[Event], list[Event]]:
        """Pump both ways until quiet (replies may trigger replies): (at relay, at client)."""
        at_relay: list[Event] = []
        at_client: list[Event] = []
        while self.relay.has_output() or self.client.has_output():
            at_client += self.to_client()
            at_relay += self.to_relay()
        return at_relay, at_client

    def open(self, tunnel_id: int = 1, peer: str = "198.51.100.7:50000") -> int:
        sid = self.relay.open_stream(tunnel_id, peer)
        assert self.to_client() == [StreamOpened(sid, tunnel_id, peer)]
        return sid


def data_of(events: list[Event], stream_id: int) -> bytes:
    return b"".join(bytes(e.data) for e in events
                    if isinstance(e, DataReceived) and e.stream_id == stream_id)


def plain(events: list[Event]) -> list[Event]:
    """Events with received data copied out of the message buffer (comparable, printable)."""
    return [DataReceived(e.stream_id, bytes(e.data)) if isinstance(e, DataReceived) else e
            for e in events]


def frames_of(message: bytes | memoryview | None) -> list[tuple[FrameType, int, Flag, bytes, int]]:
    assert message is not None
    return [(f.type, f.stream_id, f.flags, bytes(f.payload), f.value)
            for f in decode_frames(message)]


_NOISE_SPAN = 1 << 20
_NOISE = random.Random(20240601).randbytes(_NOISE_SPAN + MAX_DATA_PAYLOAD)


def take(mux: Mux) -> bytes:
    """The next message, which must exist."""
    message = mux.next_message()
    assert message is not None
    return bytes(message)


def pattern(size: int, seed: int = 0) -> bytes:
    """Fixed pseudo-random bytes; ``seed`` = stream offset makes each chunk position-unique."""
    assert size <= MAX_DATA_PAYLOAD
    start = seed % _NOISE_SPAN
    return _NOISE[start:start + size]


def fill_window(mux: Mux, stream_id: int) -> bytes:
    sent = b""
    while (room := mux.send_window(stream_id)) > 0:
        chunk = pattern(min(room, MAX_DATA_PAYLOAD), seed=len(sent))
        mux.send_data(stream_id, chunk)
        sent += chunk
    return sent


def raw_open(stream_id: int, tunnel_id: int = 1, peer: bytes = b"x") -> bytes:
    return encode_frame(Frame(FrameType.OPEN, stream_id,
                              payload=tunnel_id.to_bytes(4, "big") + peer))


@pytest.fixture
def pair() -> MuxPair:
    return MuxPair()


# ----------------------------------------------------------------------------- opening


def test_open_stream(pair: MuxPair) -> None:
    assert pair.relay.next_message() is None
    sid = pair.relay.open_stream(7, "203.0.113.5:40000")
    assert sid == 1
    assert sid in pair.relay and sid not in pair.client
    assert pair.to_client() == [StreamOpened(1, 7, "203.0.113.5:40000")]
    assert sid in pair.client
    assert len(pair.relay) == len(pair.client) == 1
    assert pair.relay.send_window(sid) == pair.client.send_window(sid) == INITIAL_WINDOW


def test_open_payload_golden(pair: MuxPair) -> None:
    pair.relay.open_stream(0x01020304, "[2001:db8::1]:22")
    message = pair.relay.next_message()
    assert message == bytes.fromhex("01 02 0000 00000001 00000014 01020304") + b"[2001:db8::1]:22"


def test_open_peer_is_truncated_to_the_open_payload_cap(pair: MuxPair) -> None:
    sid = pair.relay.open_stream(1, "p" * 1000)
    (event,) = pair.to_client()
    assert event == StreamOpened(sid, 1, "p" * 508)


def test_open_peer_with_invalid_utf8_is_replaced() -> None:
    client = Mux(Role.CLIENT)
    assert client.receive(raw_open(1, 9, b"a\xffb")) == [StreamOpened(1, 9, "a\ufffdb")]


def test_stream_ids_are_odd_and_increasing(pair: MuxPair) -> None:
    ids = [pair.relay.open_stream(1, "v") for _ in range(5)]
    assert ids == [1, 3, 5, 7, 9]
    events = pair.to_client()
    assert [e.stream_id for e in events if isinstance(e, StreamOpened)] == ids
    pair.relay.reset(3)
    pair.to_client()
    assert pair.relay.open_stream(1, "v") == 11  # ids are never reused


def test_only_the_relay_opens_streams() -> None:
    with pytest.raises(LocalProtocolError):
        Mux(Role.CLIENT).open_stream(1, "v")


def test_open_from_the_client_is_a_protocol_error() -> None:
    relay = Mux(Role.RELAY)
    with pytest.raises(RemoteProtocolError):
        relay.receive(raw_open(1))


@pytest.mark.parametrize("ids", [[2], [0x10], [1, 1], [3, 1], [5, 3], [1, 3, 3], [1, 4]],
                         ids=lambda ids: "-".join(map(str, ids)))
def test_even_reused_or_decreasing_open_id_is_a_protocol_error(ids: list[int]) -> None:
    client = Mux(Role.CLIENT)
    *good, bad = ids
    for sid in good:
        assert client.receive(raw_open(sid)) == [StreamOpened(sid, 1, "x")]
    with pytest.raises(RemoteProtocolError):
        client.receive(raw_open(bad))


def test_ids_may_skip() -> None:
    client = Mux(Role.CLIENT)
    assert client.receive(raw_open(1)) == [StreamOpened(1, 1, "x")]
    assert client.receive(raw_open(9)) == [StreamOpened(9, 1, "x")]


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x00\x01"])
def test_open_payload_too_short_is_a_protocol_error(payload: bytes) -> None:
    client = Mux(Role.CLIENT)
    with pytest.raises(RemoteProtocolError):
        client.receive(encode_frame(Frame(FrameType.OPEN, 1, payload=payload)))


def test_open_with_empty_peer() -> None:
    client = Mux(Role.CLIENT)
    assert client.receive(raw_open(1, 5, b"")) == [StreamOpened(1, 5, "")]


def test_client_refuses_open_beyond_max_streams() -> None:
    pair = MuxPair(client=Mux(Role.CLIENT, max_streams=2))
    first, second, third = (pair.relay.open_stream(1, f"v{i}") for i in range(3))
    at_client = pair.to_client()
    assert at_client == [StreamOpened(first, 1, "v0"), StreamOpened(second, 1, "v1")]
    assert third not in pair.client
    reply = take(pair.client)
    assert frames_of(reply) == [(FrameType.RESET, third, Flag.NONE, b"", ResetCode.REFUSED)]
    assert pair.relay.receive(reply) == [StreamReset(third, ResetCode.REFUSED)]
    assert third not in pair.relay
    # Data the relay sent on the refused stream before the RESET arrived is drained quietly.
    assert pair.client.receive(encode_data(third, b"early")) == []
    assert pair.client.stray_frames == 1
    # Once a stream ends, there is room again.
    pair.relay.reset(first)
    pair.to_client()
    fourth = pair.relay.open_stream(1, "v3")
    assert pair.to_client() == [StreamOpened(fourth, 1, "v3")]


def test_relay_open_beyond_max_streams_is_local_error() -> None:
    relay = Mux(Role.RELAY, max_streams=3)
    ids = [relay.open_stream(1, "v") for _ in range(3)]
    with pytest.raises(LocalProtocolError):
        relay.open_stream(1, "v")
    relay.reset(ids[0])
    assert relay.open_stream(1, "v") == 7


def test_default_max_streams() -> None:
    relay = Mux(Role.RELAY)
    for _ in range(DEFAULT_MAX_STREAMS):
        relay.open_stream(1, "v")
    with pytest.raises(LocalProtocolError):
        relay.open_stream(1, "v")


# ----------------------------------------------------------------------------- data


def test_data_both_ways_is_byte_exact_and_ordered(pair: MuxPair) -> None:
    sid = pair.open()
    down = [b"hello", b"", pattern(1000), b"\x00\xff" * 10, pattern(MAX_DATA_PAYLOAD, 3)]
    up = [b"world", pattern(MAX_DATA_PAYLOAD, 99), b"!"]
    for chunk in down:
        pair.relay.send_data(sid, chunk)
    for chunk in up:
        pair.client.send_data(sid, bytearray(chunk))
    at_relay, at_client = pair.settle()
    assert data_of(at_client, sid) == b"".join(down)
    assert data_of(at_relay, sid) == b"".join(up)
    assert pair.relay.pending_data_bytes == pair.client.pending_data_bytes == 0


def test_data_accepts_memoryview(pair: MuxPair) -> None:
    sid = pair.open()
    buffer = bytearray(b"abcdef")
    pair.relay.send_data(sid, memoryview(buffer)[1:4])
    buffer[:] = b"XXXXXX"  # the mux copied what it queued
    assert data_of(pair.to_client(), sid) == b"bcd"


def test_empty_send_queues_nothing(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.send_data(sid, b"")
    assert pair.relay.next_message() is None
    assert pair.relay.send_window(sid) == INITIAL_WINDOW


def test_send_data_checks_stream_and_frame_cap(pair: MuxPair) -> None:
    sid = pair.open()
    with pytest.raises(LocalProtocolError):
        pair.relay.send_data(sid, bytes(MAX_DATA_PAYLOAD + 1))
    with pytest.raises(LocalProtocolError):
        pair.relay.send_data(sid + 2, b"x")
    assert pair.relay.send_window(sid + 2) == 0


def test_interleaved_streams_keep_their_own_order(pair: MuxPair) -> None:
    a, b = pair.open(1), pair.open(2)
    for i in range(20):
        pair.relay.send_data(a, f"a{i};".encode())
        pair.relay.send_data(b, f"b{i};".encode())
    events = pair.to_client()
    assert data_of(events, a) == b"".join(f"a{i};".encode() for i in range(20))
    assert data_of(events, b) == b"".join(f"b{i};".encode() for i in range(20))


# ----------------------------------------------------------------------------- flow control


def test_window_exhaustion(pair: MuxPair) -> None:
    sid = pair.open()
    sent = fill_window(pair.relay, sid)
    assert len(sent) == INITIAL_WINDOW
    assert pair.relay.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        pair.relay.send_data(sid, b"x")
    assert data_of(pair.to_client(), sid) == sent
    # Delivering does not give credit back: only consumption does.
    assert pair.to_relay() == []
    assert pair.relay.send_window(sid) == 0


def test_credit_is_granted_in_batches_on_consumption(pair: MuxPair) -> None:
    sid = pair.open()
    fill_window(pair.relay, sid)
    pair.to_client()
    pair.client.consumed(sid, HALF - 1)
    assert pair.client.next_message() is None
    pair.client.consumed(sid, 1)
    update = take(pair.client)
    assert frames_of(update) == [(FrameType.WINDOW_UPDATE, sid, Flag.NONE, b"", HALF)]
    assert pair.client.next_message() is None
    assert pair.relay.receive(update) == [WindowOpened(sid)]
    assert pair.relay.send_window(sid) == HALF
    pair.client.consumed(sid, HALF)
    assert pair.to_relay() == [WindowOpened(sid)]
    assert pair.relay.send_window(sid) == INITIAL_WINDOW


def test_small_consumptions_accumulate(pair: MuxPair) -> None:
    sid = pair.open()
    fill_window(pair.relay, sid)
    pair.to_client()
    for _ in range(HALF // 1000):
        pair.client.consumed(sid, 1000)
    assert pair.client.next_message() is None
    pair.client.consumed(sid, 1000)
    assert frames_of(pair.client.next_message()) == [
        (FrameType.WINDOW_UPDATE, sid, Flag.NONE, b"", (HALF // 1000 + 1) * 1000)]


def test_slow_reader_stalls_only_its_own_stream(pair: MuxPair) -> None:
    slow, fast = pair.open(1), pair.open(2)
    fill_window(pair.relay, slow)
    pair.to_client()  # the slow stream's bytes sit unconsumed at the client
    for _ in range(4):
        sent = fill_window(pair.relay, fast)
        assert len(sent) == INITIAL_WINDOW
        assert data_of(pair.to_client(), fast) == sent
        pair.client.consumed(fast, len(sent))
        assert pair.to_relay() == [WindowOpened(fast)]
        assert pair.relay.send_window(fast) == INITIAL_WINDOW
        assert pair.relay.send_window(slow) == 0
    # The other direction of the slow stream is unaffected too.
    assert pair.client.send_window(slow) == INITIAL_WINDOW


def test_consumed_on_unknown_stream_is_ignored(pair: MuxPair) -> None:
    pair.client.consumed(99, INITIAL_WINDOW)
    assert pair.client.next_message() is None


def test_overrunning_the_window_resets_only_that_stream(pair: MuxPair) -> None:
    victim, bystander = pair.open(1), pair.open(2)
    sent = fill_window(pair.relay, victim)
    pair.to_client()
    assert len(sent) == INITIAL_WINDOW
    # A peer that ignores the window: one more byte than the credit left (0).
    events = pair.client.receive(encode_data(victim, b"!"))
    assert events == [StreamReset(victim, ResetCode.FLOW_CONTROL)]
    assert victim not in pair.client
    assert frames_of(pair.client.next_message()) == [
        (FrameType.RESET, victim, Flag.NONE, b"", ResetCode.FLOW_CONTROL)]
    # The link itself is fine: the other stream still carries data.
    pair.relay.send_data(bystander, b"still here")
    assert data_of(pair.to_client(), bystander) == b"still here"


def test_overrun_with_remaining_credit() -> None:
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    for _ in range(INITIAL_WINDOW // MAX_DATA_PAYLOAD - 1):
        client.receive(encode_data(1, bytes(MAX_DATA_PAYLOAD)))
    client.receive(encode_data(1, bytes(MAX_DATA_PAYLOAD - 10)))  # 10 bytes of credit left
    assert client.receive(encode_data(1, bytes(11))) == [StreamReset(1, ResetCode.FLOW_CONTROL)]
    # Later frames for the reset stream are drained, not fatal.
    assert client.receive(encode_data(1, bytes(5))) == []
    assert client.stray_frames == 1


def test_window_update_above_max_window_is_a_protocol_error(pair: MuxPair) -> None:
    sid = pair.open()
    limit = MAX_WINDOW - INITIAL_WINDOW
    with pytest.raises(RemoteProtocolError):
        pair.relay.receive(encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=limit + 1)))


def test_window_update_up_to_max_window_is_fine(pair: MuxPair) -> None:
    sid = pair.open()
    limit = MAX_WINDOW - INITIAL_WINDOW
    update = encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=limit))
    assert pair.relay.receive(update) == [WindowOpened(sid)]
    assert pair.relay.send_window(sid) == MAX_WINDOW
    with pytest.raises(RemoteProtocolError):
        pair.relay.receive(encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=1)))


def test_window_update_after_fin_opens_nothing(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.send_eof(sid)
    update = encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=10))
    assert pair.relay.receive(update) == []
    assert pair.relay.send_window(sid) == 0


# ----------------------------------------------------------------------------- half-close


@pytest.mark.parametrize("first", ["relay", "client"])
def test_half_close_each_direction(pair: MuxPair, first: str) -> None:
    sid = pair.open()
    closer = pair.relay if first == "relay" else pair.client
    other = pair.peer(closer)
    closer.send_data(sid, b"last words")
    closer.send_eof(sid)
    assert closer.send_window(sid) == 0
    with pytest.raises(LocalProtocolError):
        closer.send_data(sid, b"more")
    events = plain(pair.deliver(closer))
    assert events == [DataReceived(sid, b"last words"), StreamEnded(sid)]
    assert sid in closer and sid in other  # the other direction is still open
    # The other direction still flows, both ways of delivery.
    other.send_data(sid, b"reply")
    assert data_of(pair.deliver(other), sid) == b"reply"
    # Consuming after the peer's FIN grants nothing (no more data can come).
    other.consumed(sid, INITIAL_WINDOW)
    assert other.next_message() is None
    other.send_eof(sid)
    assert sid not in other  # both FINs seen there: freed
    assert pair.deliver(other) == [StreamEnded(sid)]
    assert sid not in closer
    assert len(pair.relay) == len(pair.client) == 0


def test_send_eof_twice_or_on_unknown_stream_is_a_no_op(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.send_eof(sid)
    pair.relay.send_eof(sid)
    pair.relay.send_eof(12345)
    assert frames_of(pair.relay.next_message()) == [(FrameType.DATA, sid, Flag.FIN, b"", 0)]
    assert pair.relay.next_message() is None


def test_data_and_fin_in_one_frame() -> None:
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    events = client.receive(encode_data(1, b"abc", fin=True))
    assert plain(events) == [DataReceived(1, b"abc"), StreamEnded(1)]
    assert 1 in client


def test_data_after_fin_is_a_protocol_error() -> None:
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    client.receive(encode_data(1, b"", fin=True))
    with pytest.raises(RemoteProtocolError):
        client.receive(encode_data(1, b"x"))


def test_empty_data_without_fin_creates_no_event() -> None:
    """Reliability I-5: an empty DATA frame is legal but meaningless; it is only counted."""
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    assert client.receive(encode_data(1, b"") * 10) == []
    assert client.send_window(1) == INITIAL_WINDOW


def test_fin_is_delivered_after_queued_data(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.send_data(sid, b"1")
    pair.relay.send_data(sid, b"2")
    pair.relay.send_eof(sid)
    assert frames_of(pair.relay.next_message()) == [
        (FrameType.DATA, sid, Flag.NONE, b"1", 0),
        (FrameType.DATA, sid, Flag.NONE, b"2", 0),
        (FrameType.DATA, sid, Flag.FIN, b"", 0),
    ]


# ----------------------------------------------------------------------------- reset


@pytest.mark.parametrize("code", list(ResetCode))
def test_reset_from_relay(pair: MuxPair, code: ResetCode) -> None:
    sid = pair.open()
    pair.relay.reset(sid, code)
    assert sid not in pair.relay
    assert pair.to_client() == [StreamReset(sid, code)]
    assert sid not in pair.client
    # Data the client sends later for that id is drained and counted, nothing more.
    assert pair.relay.receive(encode_data(sid, b"late")) == []
    assert pair.relay.stray_frames == 1


def test_reset_from_client(pair: MuxPair) -> None:
    sid = pair.open()
    pair.client.reset(sid, ResetCode.REFUSED)
    assert pair.to_relay() == [StreamReset(sid, ResetCode.REFUSED)]
    assert sid not in pair.relay and sid not in pair.client
    assert pair.client.receive(encode_data(sid, b"late")) == []
    assert pair.client.receive(encode_data(sid, b"", fin=True)) == []
    assert pair.client.stray_frames == 2


def test_reset_default_code_is_aborted(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.reset(sid)
    assert pair.to_client() == [StreamReset(sid, ResetCode.ABORTED)]


def test_reset_races_with_data_in_flight(pair: MuxPair) -> None:
    sid = pair.open()
    pair.client.send_data(sid, b"in flight")
    pair.client.send_eof(sid)
    pair.relay.send_data(sid, b"also in flight")
    pair.relay.reset(sid)  # crosses the client's data on the wire
    assert pair.to_relay() == []  # the client's data and FIN arrive for a gone stream
    assert pair.relay.stray_frames == 2
    # The RESET would go ahead of the relay's queued data: that data is dropped instead.
    assert pair.relay.pending_data_bytes == 0
    assert pair.to_client() == [StreamReset(sid, ResetCode.ABORTED)]
    assert pair.client.stray_frames == 0


def test_F5_a_reset_drops_only_its_streams_queued_data(pair: MuxPair) -> None:
    """RESET is sent ahead of DATA, so DATA queued behind it would reach a peer that already
    forgot the stream. 256 visitors leaving at once made that over 100 stray frames, and
    the client closed the whole link (F-5 under uvloop with TLS): the reset stream's queued
    frames are dropped, the other streams' keep their order."""
    kept, gone = pair.open(), pair.open()
    for i in range(3):
        pair.relay.send_data(kept, b"k%d" % i)
        pair.relay.send_data(gone, b"g%d" % i)
    pair.relay.send_eof(gone)
    before = pair.relay.pending_data_bytes
    pair.relay.reset(gone)
    assert pair.relay.pending_data_bytes == before - 3 * (HEADER_SIZE + 2) - HEADER_SIZE
    events = pair.to_client()
    assert events[0] == StreamReset(gone, ResetCode.ABORTED)
    assert plain(events[1:]) == [DataReceived(kept, b"k%d" % i) for i in range(3)]
    assert pair.client.stray_frames == 0
    assert pair.relay.pending_data_bytes == 0 and not pair.relay.has_output()


def test_F5_a_peers_reset_drops_our_queued_data_for_the_stream(pair: MuxPair) -> None:
    sid = pair.open()
    pair.client.send_data(sid, b"reply")
    assert pair.client.has_output()
    pair.relay.reset(sid)
    assert pair.to_client() == [StreamReset(sid, ResetCode.ABORTED)]
    assert pair.client.pending_data_bytes == 0 and not pair.client.has_output()
    assert pair.relay.stray_frames == 0


def test_F5_data_racing_a_peers_reset_is_drained_within_the_window() -> None:
    """A peer that sends its queued DATA behind its RESET (ours did, before the above) may
    send what its window allowed, on every stream at once, without a protocol error;
    beyond that window the stray limit applies as before."""
    client, _ = clocked(Role.CLIENT)
    streams = range(1, 2 * 256, 2)
    for sid in streams:
        client.receive(raw_open(sid))
        client.receive(encode_frame(Frame(FrameType.RESET, sid, value=ResetCode.ABORTED)))
    for sid in streams:  # 256 x 8 frames: far over the per-minute limit, all in flight
        assert client.receive(encode_data(sid, bytes(MAX_DATA_PAYLOAD)) * 8) == []
    assert client.stray_frames == 256 * 8
    with pytest.raises(RemoteProtocolError, match="closed streams"):
        client.receive(encode_data(1, b"!") * (MAX_STRAY_DATA_PER_MINUTE + 1))


def test_simultaneous_resets(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.reset(sid)
    pair.client.reset(sid)
    assert pair.settle() == ([], [])
    assert len(pair.relay) == len(pair.client) == 0


def test_reset_of_unknown_stream_sends_nothing(pair: MuxPair) -> None:
    pair.relay.reset(1)
    assert pair.relay.next_message() is None


def test_late_window_update_for_gone_stream_is_ignored(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.reset(sid)
    update = encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=100))
    assert pair.relay.receive(update) == []
    assert pair.relay.receive(encode_frame(Frame(FrameType.RESET, sid))) == []


def test_reset_all(pair: MuxPair) -> None:
    ids = [pair.open(i) for i in range(3)]
    assert sorted(pair.relay.reset_all()) == ids
    assert len(pair.relay) == 0


@pytest.mark.parametrize("frame", [
    encode_data(1, b"x"),
    encode_data(1, b"", fin=True),
    encode_frame(Frame(FrameType.WINDOW_UPDATE, 1, value=1)),
    encode_frame(Frame(FrameType.RESET, 1)),
], ids=["data", "fin", "window", "reset"])
@pytest.mark.parametrize("role", list(Role))
def test_frames_for_a_never_opened_stream_are_protocol_errors(frame: bytes, role: Role) -> None:
    with pytest.raises(RemoteProtocolError):
        Mux(role).receive(frame)


@pytest.mark.parametrize("sid", [2, 4, 7])
def test_data_for_an_even_or_future_id_is_a_protocol_error(pair: MuxPair, sid: int) -> None:
    pair.open()
    pair.open()  # ids 1 and 3 exist
    with pytest.raises(RemoteProtocolError):
        pair.relay.receive(encode_data(sid, b"x"))
    with pytest.raises(RemoteProtocolError):
        pair.client.receive(encode_data(sid, b"x"))


# ----------------------------------------------------------------------------- session frames


def test_ping_is_answered_automatically(pair: MuxPair) -> None:
    pair.relay.send_ping(42)
    assert pair.to_client() == [PingReceived(42)]
    reply = take(pair.client)
    assert frames_of(reply) == [(FrameType.PING, 0, Flag.ACK, b"", 42)]
    assert pair.relay.receive(reply) == [PongReceived(42)]
    assert pair.relay.next_message() is None  # a pong is not answered


def test_ping_from_client_and_value_wraps(pair: MuxPair) -> None:
    pair.client.send_ping(2**32 + 5)
    at_relay, at_client = pair.settle()
    assert at_relay == [PingReceived(5)]
    assert at_client == [PongReceived(5)]


def test_goaway(pair: MuxPair) -> None:
    pair.relay.send_goaway(GoAwayCode.SHUTDOWN)
    assert pair.to_client() == [GoAwayReceived(GoAwayCode.SHUTDOWN)]
    pair.client.send_goaway(GoAwayCode.REPLACED)
    assert pair.to_relay() == [GoAwayReceived(3)]


def test_control_round_trip(pair: MuxPair) -> None:
    message = {"type": "expose", "id": 1, "target": "127.0.0.1:22", "port": None,
               "nested": {"list": [1, 2.5, True]}, "text": "grüße ✓"}
    pair.client.send_control(message)
    assert pair.to_relay() == [ControlReceived(message)]
    pair.relay.send_control({"type": "exposed", "id": 1, "port": 6001})
    assert pair.to_client() == [ControlReceived({"type": "exposed", "id": 1, "port": 6001})]


def test_control_is_compact_json(pair: MuxPair) -> None:
    pair.relay.send_control({"type": "x", "a": [1, 2]})
    assert frames_of(pair.relay.next_message()) == [
        (FrameType.CONTROL, 0, Flag.NONE, b'{"type":"x","a":[1,2]}', 0)]


BAD_CONTROL: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("not-json", b"hello"),
    ("truncated", b'{"type":'),
    ("invalid-utf8", b'{"type":"\xff"}'),
    ("utf16-garbage", b"\xff\xfe{"),
    ("nul", b"\x00"),
    ("list", b'["type"]'),
    ("string", b'"type"'),
    ("number", b"1"),
    ("null", b"null"),
    ("no-type", b"{}"),
    ("type-int", b'{"type":1}'),
    ("type-null", b'{"type":null}'),
    ("type-list", b'{"type":["x"]}'),
    ("type-object", b'{"type":{}}'),
]


@pytest.mark.parametrize("payload", [b[1] for b in BAD_CONTROL], ids=[b[0] for b in BAD_CONTROL])
def test_bad_control_payload_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Mux(Role.RELAY).receive(encode_frame(Frame(FrameType.CONTROL, payload=payload)))


HOSTILE_JSON: list[tuple[str, bytes]] = [
    # 16 KiB of "[" fits the CONTROL cap; json.loads raises RecursionError on it.
    ("deep-nesting", b"[" * 10_000),
    ("deep-nesting-in-object", b'{"type":"x","a":' + b"[" * 10_000),
    # An integer over sys.get_int_max_str_digits() (4300) raises a plain ValueError.
    ("huge-integer", b'{"type":"x","n":' + b"1" * 5000 + b"}"),
]


@pytest.mark.parametrize("payload", [b[1] for b in HOSTILE_JSON],
                         ids=[b[0] for b in HOSTILE_JSON])
def test_hostile_json_is_a_protocol_error(payload: bytes) -> None:
    assert len(payload) <= 16 * 1024
    with pytest.raises(RemoteProtocolError):
        Mux(Role.RELAY).receive(encode_frame(Frame(FrameType.CONTROL, payload=payload)))


def test_oversized_control_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Mux(Role.RELAY).send_control({"type": "x", "text": "y" * 20_000})


def test_error_in_a_later_frame_of_the_message_raises() -> None:
    client = Mux(Role.CLIENT)
    message = raw_open(1) + encode_data(1, b"ok") + encode_data(2, b"bad")
    with pytest.raises(RemoteProtocolError):
        client.receive(message)


def test_several_frames_in_one_message_give_events_in_order() -> None:
    client = Mux(Role.CLIENT)
    message = (raw_open(1, 4, b"v") + encode_data(1, b"ab")
               + encode_frame(Frame(FrameType.PING, value=1))
               + encode_data(1, b"c", fin=True))
    assert plain(client.receive(message)) == [
        StreamOpened(1, 4, "v"), DataReceived(1, b"ab"), PingReceived(1),
        DataReceived(1, b"c"), StreamEnded(1)]


# ----------------------------------------------------------------------------- output queue


def test_control_frames_go_before_queued_data(pair: MuxPair) -> None:
    sid = pair.open()
    pair.relay.send_data(sid, b"bulk-1")
    pair.relay.send_data(sid, b"bulk-2")
    pair.relay.send_ping(1)
    pair.relay.send_control({"type": "hello"})
    pair.relay.reset(sid + 2)  # unknown: nothing
    first = frames_of(pair.relay.next_message())
    assert [f[0] for f in first] == [FrameType.PING, FrameType.CONTROL]
    second = frames_of(pair.relay.next_message())
    assert second == [(FrameType.DATA, sid, Flag.NONE, b"bulk-1", 0),
                      (FrameType.DATA, sid, Flag.NONE, b"bulk-2", 0)]
    assert pair.relay.next_message() is None
    assert not pair.relay.has_output()


def test_open_goes_before_data_of_the_same_stream(pair: MuxPair) -> None:
    sid = pair.relay.open_stream(1, "v")
    pair.relay.send_data(sid, b"hi")
    events = plain(pair.to_client())
    assert events == [StreamOpened(sid, 1, "v"), DataReceived(sid, b"hi")]


def test_small_data_frames_are_coalesced_and_accounted(pair: MuxPair) -> None:
    sid = pair.open()
    for i in range(100):
        pair.relay.send_data(sid, bytes([i]) * 10)
    assert pair.relay.pending_data_bytes == 100 * (HEADER_SIZE + 10)
    message = pair.relay.next_message()
    assert message is not None and len(message) == 100 * (HEADER_SIZE + 10)
    assert pair.relay.pending_data_bytes == 0
    assert len(frames_of(message)) == 100
    assert pair.relay.next_message() is None


def test_coalescing_never_exceeds_the_message_cap(pair: MuxPair) -> None:
    a, b, c = pair.open(1), pair.open(2), pair.open(3)
    expected: dict[int, bytes] = {a: b"", b: b"", c: b""}
    sizes = [MAX_DATA_PAYLOAD, 1, MAX_DATA_PAYLOAD, 100, MAX_DATA_PAYLOAD - 5, 7,
             MAX_DATA_PAYLOAD, MAX_DATA_PAYLOAD, 3, 1000]
    for i, size in enumerate(sizes):
        sid = (a, b, c)[i % 3]
        chunk = pattern(size, seed=i)
        pair.relay.send_data(sid, chunk)
        expected[sid] += chunk
    total = sum(sizes) + HEADER_SIZE * len(sizes)
    assert pair.relay.pending_data_bytes == total
    events = pair.to_client()
    messages = pair.sent[Role.RELAY][3:]  # after the three OPENs
    assert all(len(m) <= SEND_MESSAGE_SIZE for m in messages)
    assert sum(len(m) for m in messages) == total
    assert 1 < len(messages) < len(sizes)  # coalesced, but split at the cap
    assert pair.relay.pending_data_bytes == 0
    for sid, data in expected.items():
        assert data_of(events, sid) == data


def test_a_full_frame_is_a_message_of_its_own(pair: MuxPair) -> None:
    """Full DATA frames are not batched: a receiver holds each message whole (L-3)."""
    a, b = pair.open(1), pair.open(2)
    for sid in (a, a, b):
        pair.relay.send_data(sid, bytes(MAX_DATA_PAYLOAD))
    pair.relay.send_data(a, bytes(100))
    pair.relay.send_data(b, bytes(200))
    sizes = []
    while (message := pair.relay.next_message()) is not None:
        sizes.append(len(message))
    full = HEADER_SIZE + MAX_DATA_PAYLOAD
    assert full == SEND_MESSAGE_SIZE
    assert sizes == [full, full, full, 2 * HEADER_SIZE + 300]  # small frames still share
    assert pair.relay.pending_data_bytes == 0


def test_control_frames_never_exceed_the_message_cap() -> None:
    """Queued pings (a received flood is cut off by the rate limit, so queue them here)."""
    client = Mux(Role.CLIENT)
    count = 2 * (MAX_MESSAGE_SIZE // HEADER_SIZE)
    for value in range(count):
        client.send_ping(value)
    sizes = []
    while (message := client.next_message()) is not None:
        sizes.append(len(message))
    assert sum(sizes) == count * HEADER_SIZE
    assert max(sizes) <= SEND_MESSAGE_SIZE


def test_many_control_messages_never_exceed_the_message_cap() -> None:
    relay = Mux(Role.RELAY)
    for i in range(40):
        relay.send_control({"type": "note", "i": i, "text": "x" * 10_000})
    while (message := relay.next_message()) is not None:
        assert len(message) <= SEND_MESSAGE_SIZE


# ----------------------------------------------------------------------------- state machine

Key = tuple[int, Role]  # (stream id, sending role)


class MuxPairMachine(RuleBasedStateMachine):
    """Random traffic over a MuxPair, checked against a trivial model of byte streams."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = MuxPair()
        self.ids: list[int] = []
        self.sent: dict[Key, bytearray] = {}
        self.received: dict[Key, bytearray] = {}
        self.unconsumed: dict[Key, int] = {}  # received by the peer, not yet consumed
        self.fin_sent: set[Key] = set()
        self.fin_received: set[Key] = set()
        self.reset_ids: set[int] = set()

    # -- helpers

    def mux(self, role: Role) -> Mux:
        return self.pair.relay if role is Role.RELAY else self.pair.client

    def stream(self, index: int) -> int:
        return self.ids[index % len(self.ids)]

    def observe(self, receiver: Role, events: list[Event]) -> None:
        sender = Role.CLIENT if receiver is Role.RELAY else Role.RELAY
        for event in events:
            if isinstance(event, DataReceived):
                key = (event.stream_id, sender)
                assert event.stream_id not in self.reset_ids
                assert key not in self.fin_received
                self.received[key] += bytes(event.data)
                self.unconsumed[key] += len(event.data)
            elif isinstance(event, StreamEnded):
                key = (event.stream_id, sender)
                assert key in self.fin_sent and key not in self.fin_received
                self.fin_received.add(key)
            elif isinstance(event, StreamReset):
                assert event.stream_id in self.reset_ids
                assert event.code in (ResetCode.CANCEL, ResetCode.ABORTED)
            elif isinstance(event, StreamOpened):
                assert receiver is Role.CLIENT and event.stream_id in self.ids
            elif isinstance(event, WindowOpened):
                assert event.stream_id in self.ids
            else:
                raise AssertionError(f"unexpected event {event!r}")

    def deliver_from(self, sender: Role) -> bool:
        receiver = Role.CLIENT if sender is Role.RELAY else Role.RELAY
        events = self.pair.deliver_one(self.mux(sender))
        if events is None:
            return False
        self.observe(receiver, events)
        return True

    # -- rules

    @initialize()
    def first_stream(self) -> None:
        self.open()

    @precondition(lambda self: len(self.ids) < 4)
    @rule()
    def open(self) -> None:
        sid = self.pair.relay.open_stream(len(self.ids), f"visitor-{len(self.ids)}")
        self.ids.append(sid)
        for role in Role:
            self.sent[sid, role] = bytearray()
            self.received[sid, role] = bytearray()
            self.unconsumed[sid, role] = 0

    @rule(role=st.sampled_from(Role), index=st.integers(0, 3),
          size=st.one_of(st.integers(1, 64), st.integers(1, MAX_DATA_PAYLOAD)))
    def send(self, role: Role, index: int, size: int) -> None:
        sid = self.stream(index)
        mux = self.mux(role)
        window = mux.send_window(sid)
        if sid not in mux or (sid, role) in self.fin_sent:
            assert window == 0
            with pytest.raises(LocalProtocolError):
                mux.send_data(sid, b"x")
            return
        if size > window:
            with pytest.raises(LocalProtocolError):
                mux.send_data(sid, bytes(size))
            size = window
        seed = len(self.sent[sid, role]) + sid * 7919 + (role is Role.CLIENT) * 104729
        chunk = pattern(size, seed)
        mux.send_data(sid, chunk)
        self.sent[sid, role] += chunk
        assert mux.send_window(sid) == window - size

    @rule(role=st.sampled_from(Role), index=st.integers(0, 3))
    def send_all_it_may(self, role: Role, index: int) -> None:
        """A bulk sender: as much as the window and the frame cap allow."""
        self.send(role, index, max(1, min(MAX_DATA_PAYLOAD, self.mux(role).send_window(
            self.stream(index)))))

    @rule(role=st.sampled_from(Role), index=st.integers(0, 3), part=st.floats(0, 1))
    def consume(self, role: Role, index: int, part: float) -> None:
        """``role`` wrote some of what it received to its local socket."""
        sid = self.stream(index)
        sender = Role.CLIENT if role is Role.RELAY else Role.RELAY
        size = int(self.unconsumed[sid, sender] * part)
        self.unconsumed[sid, sender] -= size
        self.mux(role).consumed(sid, size)

    @rule(role=st.sampled_from(Role), index=st.integers(0, 3))
    def fin(self, role: Role, index: int) -> None:
        sid = self.stream(index)
        if sid in self.mux(role) and (sid, role) not in self.fin_sent:
            self.fin_sent.add((sid, role))
        self.mux(role).send_eof(sid)

    @rule(role=st.sampled_from(Role), index=st.integers(0, 3),
          code=st.sampled_from([ResetCode.CANCEL, ResetCode.ABORTED]))
    def reset(self, role: Role, index: int, code: ResetCode) -> None:
        sid = self.stream(index)
        if sid in self.mux(role):
            self.reset_ids.add(sid)
        self.mux(role).reset(sid, code)

    @rule(role=st.sampled_from(Role))
    def deliver(self, role: Role) -> None:
        self.deliver_from(role)

    @rule()
    def settle(self) -> None:
        while self.deliver_from(Role.RELAY) | self.deliver_from(Role.CLIENT):
            pass
        assert self.pair.relay.pending_data_bytes == self.pair.client.pending_data_bytes == 0
        for key in self.sent:
            sid, _ = key
            if sid not in self.reset_ids:
                assert self.received[key] == self.sent[key]
                assert (key in self.fin_received) == (key in self.fin_sent)
        for sid in self.ids:
            if sid in self.reset_ids or all((sid, r) in self.fin_sent for r in Role):
                assert sid not in self.pair.relay and sid not in self.pair.client

    @rule()
    def drain_and_check_liveness(self) -> None:
        """Once every byte is consumed and delivered, no live direction is starved."""
        self.settle()
        for key in self.unconsumed:
            sid, sender = key
            receiver = Role.CLIENT if sender is Role.RELAY else Role.RELAY
            self.mux(receiver).consumed(sid, self.unconsumed[key])
            self.unconsumed[key] = 0
        self.settle()
        for sid in self.ids:
            for role in Role:
                if sid in self.mux(role) and (sid, role) not in self.fin_sent:
                    assert self.mux(role).send_window(sid) > INITIAL_WINDOW - HALF

    # -- invariants

    @invariant()
    def windows_in_range(self) -> None:
        for sid in self.ids:
            for role in Role:
                assert 0 <= self.mux(role).send_window(sid) <= INITIAL_WINDOW

    @invariant()
    def delivered_is_a_prefix_of_sent(self) -> None:
        for key, got in self.received.items():
            assert self.sent[key].startswith(got)

    @invariant()
    def pending_bytes_are_non_negative(self) -> None:
        assert self.pair.relay.pending_data_bytes >= 0
        assert self.pair.client.pending_data_bytes >= 0
        assert self.pair.relay.stray_frames >= 0 and self.pair.client.stray_frames >= 0


MuxPairMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_mux_pair_state_machine = MuxPairMachine.TestCase



# ----------------------------------------------------------------------------- flood limits


class FakeClock:
    """An injected clock the tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def clocked(role: Role) -> tuple[Mux, FakeClock]:
    clock = FakeClock()
    return Mux(role, clock=clock), clock


def test_rate_limit_is_a_token_bucket() -> None:
    rate = RateLimit(3, 1.0)
    assert [rate.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow(0.34)  # a third of a second refills one token
    assert not rate.allow(0.34)
    assert [rate.allow(10.0) for _ in range(4)] == [True, True, True, False]  # burst capped
    bursty = RateLimit(3, 1.0, burst=6)
    assert [bursty.allow(0.0) for _ in range(7)] == [True] * 6 + [False]
    assert [bursty.allow(1.0) for _ in range(4)] == [True] * 3 + [False]  # refills at the rate


def test_B7_control_burst_holds_a_login_of_max_exposes_plus_a_second_of_traffic() -> None:
    assert MAX_CONTROL_BURST >= MAX_EXPOSES + MAX_CONTROL_FRAMES_PER_SECOND


def test_B7_a_login_with_max_exposes_is_not_a_flood() -> None:
    relay, _ = clocked(Role.RELAY)
    claim = encode_frame(Frame(FrameType.CONTROL, payload=b'{"type":"expose"}'))
    assert len(relay.receive(claim * MAX_EXPOSES)) == MAX_EXPOSES


def test_B7_ping_flood_over_the_limit_is_a_protocol_error() -> None:
    relay, _ = clocked(Role.RELAY)
    ping = encode_frame(Frame(FrameType.PING, value=1))
    assert len(relay.receive(ping * MAX_CONTROL_BURST)) == MAX_CONTROL_BURST
    with pytest.raises(RemoteProtocolError, match="more than 100 control frames per second"):
        relay.receive(ping)


@pytest.mark.parametrize("frame", [
    encode_frame(Frame(FrameType.PING, value=1)),
    encode_frame(Frame(FrameType.PING, flags=Flag.ACK, value=1)),
    encode_frame(Frame(FrameType.GOAWAY, value=0)),
    encode_frame(Frame(FrameType.CONTROL, payload=b'{"type":"x"}')),
    encode_frame(Frame(FrameType.WINDOW_UPDATE, 1, value=1)),
], ids=["ping", "pong", "goaway", "control", "tiny-window-update"])
def test_B7_each_control_frame_kind_counts(frame: bytes) -> None:
    client, clock = clocked(Role.CLIENT)
    client.receive(raw_open(1))
    client.send_data(1, b"x" * 10)  # spent credit, so a 1-byte grant stays below MAX_WINDOW
    for _ in range(3):  # the limit is a rate: a steady 100/s is fine for ever
        clock.now += 1.0
        for _ in range(MAX_CONTROL_FRAMES_PER_SECOND):
            client.receive(frame)
    with pytest.raises(RemoteProtocolError, match="control frames"):
        for _ in range(MAX_CONTROL_BURST + 1):
            client.receive(frame)


def test_B7_a_sustained_rate_over_the_limit_is_cut_off_after_the_burst() -> None:
    relay, clock = clocked(Role.RELAY)
    ping = encode_frame(Frame(FrameType.PING, value=1))
    with pytest.raises(RemoteProtocolError, match="control frames"):
        for _ in range(100):  # 200 per second: the burst is spent after about 5 s
            clock.now += 1.0
            relay.receive(ping * 2 * MAX_CONTROL_FRAMES_PER_SECOND)
    assert 4.0 <= clock.now - 1000.0 <= 6.0


def test_B7_earned_window_updates_do_not_count(pair: MuxPair) -> None:
    """Credit returned for bytes we really sent is the normal bulk path: never limited."""
    clock = FakeClock()
    pair.relay.clock = pair.client.clock = clock
    ids = [pair.open(i) for i in range(64)]
    for _ in range(4):  # 64 streams x 4 windows of bulk in one clock instant
        for sid in ids:
            sent = fill_window(pair.relay, sid)
            pair.to_client()
            pair.client.consumed(sid, len(sent))
        pair.to_relay()
    assert all(pair.relay.send_window(sid) == INITIAL_WINDOW for sid in ids)


def test_B7_unearned_large_window_updates_count() -> None:
    """A grant pushing the window above its initial size returns credit never spent."""
    client, _ = clocked(Role.CLIENT)
    client.receive(raw_open(1))
    update = encode_frame(Frame(FrameType.WINDOW_UPDATE, 1, value=MIN_EARNED_GRANT))
    with pytest.raises(RemoteProtocolError, match="control frames"):
        for _ in range(MAX_CONTROL_BURST + 1):
            client.receive(update)


def test_B5_one_byte_window_updates_are_a_rate_limited_dribble(pair: MuxPair) -> None:
    """Each 1-byte grant lets the sender emit one 1-byte frame, never a queue of them."""
    clock = FakeClock()
    pair.relay.clock = clock
    sid = pair.open()
    fill_window(pair.relay, sid)
    pair.to_client()
    frames_sent = 0
    for _ in range(50):
        clock.now += 0.02  # 50 grants per second, under the limit
        events = pair.relay.receive(encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=1)))
        assert events == [WindowOpened(sid)]
        pair.relay.send_data(sid, b"y" * pair.relay.send_window(sid))
        while (message := pair.relay.next_message()) is not None:
            frames_sent += len(decode_frames(message))
        assert pair.relay.send_window(sid) == 0
    assert frames_sent == 50
    with pytest.raises(RemoteProtocolError, match="control frames"):
        pair.relay.receive(encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=1))
                           * (MAX_CONTROL_BURST + 1))


def test_I5_empty_data_frames_beyond_the_limit_are_a_protocol_error() -> None:
    client, clock = clocked(Role.CLIENT)
    client.receive(raw_open(1))
    empty = encode_data(1, b"")
    assert client.receive(empty * MAX_EMPTY_DATA_PER_SECOND) == []
    clock.now += 0.5  # refills half the bucket
    assert client.receive(empty * (MAX_EMPTY_DATA_PER_SECOND // 2)) == []
    with pytest.raises(RemoteProtocolError, match="more than 1000 empty DATA frames"):
        client.receive(empty)


def test_B4_data_in_flight_when_we_reset_is_drained_without_penalty(pair: MuxPair) -> None:
    """A whole window of small frames racing our RESET is normal, not an attack."""
    sid = pair.open()
    pair.client.send_data(sid, b"z")  # 1 byte arrived before the reset
    pair.to_relay()
    pair.relay.reset(sid)
    small = [encode_data(sid, b"q" * 4096) for _ in range((INITIAL_WINDOW - 1) // 4096)]
    for frame in small:
        assert pair.relay.receive(frame) == []
    assert pair.relay.stray_frames == len(small) > MAX_STRAY_DATA_PER_MINUTE
    assert pair.relay.receive(encode_data(sid, b"", fin=True)) == []


def test_B4_stray_data_beyond_the_in_flight_allowance_is_limited_per_minute(
        pair: MuxPair) -> None:
    clock = FakeClock()
    pair.relay.clock = clock
    sid = pair.open()
    pair.relay.reset(sid)
    pair.relay.receive(encode_data(sid, b"q" * MAX_DATA_PAYLOAD) * 8)  # the whole window
    stray = encode_data(sid, b"!")
    for _ in range(MAX_STRAY_DATA_PER_MINUTE):
        assert pair.relay.receive(stray) == []
    clock.now += 30.0  # half a minute refills half the budget
    for _ in range(MAX_STRAY_DATA_PER_MINUTE // 2):
        assert pair.relay.receive(stray) == []
    with pytest.raises(RemoteProtocolError, match="more than 100 DATA frames for closed streams "
                                                  "per 60 s"):
        pair.relay.receive(stray)
    assert pair.relay.stray_frames == 8 + 150 + 1


def test_B4_stray_data_after_the_peer_finished_is_limited() -> None:
    """A stream freed by FIN both ways expects nothing more: every stray frame counts."""
    client, _ = clocked(Role.CLIENT)
    client.receive(raw_open(1))
    client.send_eof(1)
    client.receive(encode_data(1, b"", fin=True))
    assert 1 not in client
    with pytest.raises(RemoteProtocolError, match="closed streams"):
        client.receive(encode_data(1, b"x") * (MAX_STRAY_DATA_PER_MINUTE + 1))


@pytest.mark.parametrize("frames", [
    [raw_open(3), raw_open(3)],  # a live id reused
    [raw_open(3), raw_open(1)],  # not increasing
    [raw_open(2)],  # wrong parity
], ids=["reused", "decreasing", "even"])
def test_B4_stream_id_misuse_is_a_protocol_error(frames: list[bytes]) -> None:
    client = Mux(Role.CLIENT)
    for frame in frames[:-1]:
        client.receive(frame)
    with pytest.raises(RemoteProtocolError, match="reused, not increasing or wrong parity"):
        client.receive(frames[-1])


def test_B4_open_from_the_side_not_allowed_to_open_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="client may not open"):
        Mux(Role.RELAY).receive(raw_open(1))


def test_B4_in_flight_allowance_memory_is_bounded() -> None:
    relay = Mux(Role.RELAY, max_streams=10_000)
    for _ in range(3 * DEFAULT_MAX_STREAMS):
        relay.reset(relay.open_stream(1, "v"))
    assert len(relay._in_flight_allowance) == 2 * DEFAULT_MAX_STREAMS


def test_B5_data_one_byte_past_the_window_resets_only_that_stream() -> None:
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    client.receive(raw_open(3))
    client.receive(encode_data(1, b"a" * MAX_DATA_PAYLOAD) * 8)  # exactly the window
    assert client.receive(encode_data(1, b"b")) == [StreamReset(1, ResetCode.FLOW_CONTROL)]
    assert frames_of(client.next_message()) == [
        (FrameType.RESET, 1, Flag.NONE, b"", ResetCode.FLOW_CONTROL)]
    assert client.receive(encode_data(3, b"c")) == [DataReceived(3, b"c")]


@pytest.mark.parametrize("wire", [
    HEADER.pack(1, FrameType.WINDOW_UPDATE, 0, 1, 0),  # increment 0
    HEADER.pack(1, FrameType.WINDOW_UPDATE, 0, 1, MAX_WINDOW),  # window above its maximum
], ids=["increment-0", "above-max"])
def test_B5_bad_window_updates_are_protocol_errors(wire: bytes) -> None:
    client = Mux(Role.CLIENT)
    client.receive(raw_open(1))
    with pytest.raises(RemoteProtocolError):
        client.receive(wire)


def test_B7_a_flood_in_one_message_is_cut_off_at_the_limit() -> None:
    """Frames are decoded lazily: the rest of a 512 KiB message of pings is never touched,
    and only the pongs owed before the limit are queued."""
    relay, _ = clocked(Role.RELAY)
    ping = encode_frame(Frame(FrameType.PING, value=1))
    with pytest.raises(RemoteProtocolError, match="control frames"):
        relay.receive(ping * (MAX_MESSAGE_SIZE // len(ping)))
    assert relay.urgent_bytes() == MAX_CONTROL_BURST * len(ping)


def test_B4_data_after_an_open_refused_for_max_streams_is_drained_unpenalised() -> None:
    """The relay may send a window of data right behind an OPEN the client must refuse."""
    client = Mux(Role.CLIENT, max_streams=1)
    client.receive(raw_open(1))
    client.receive(raw_open(3))  # refused: one stream at most
    assert frames_of(client.next_message()) == [
        (FrameType.RESET, 3, Flag.NONE, b"", ResetCode.REFUSED)]
    for _ in range(MAX_STRAY_DATA_PER_MINUTE + 50):
        assert client.receive(encode_data(3, b"v" * 64)) == []
