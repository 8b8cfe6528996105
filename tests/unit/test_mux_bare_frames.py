"""Reliability B-13: every frame type, on every stream state, falls under a flood limit.

A peer that sends frames of any one kind for a stream in any one state, faster than
``MAX_BARE_FRAMES_PER_SECOND``, is cut off (RemoteProtocolError) after a bounded number of
frames; the frames a normal link makes (bulk transfers, many short streams, a full link
reset at once) never are. Time is a FakeClock moved by hand: no sockets, no sleeps.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_mux import FakeClock, MuxPair, raw_open
from tunnel.common.errors import RemoteProtocolError
from tunnel.common.proto.frames import (
    Flag,
    Frame,
    FrameType,
    encode_data,
    encode_frame,
)
from tunnel.common.proto.mux import (
    DEFAULT_MAX_STREAMS,
    INITIAL_WINDOW,
    MAX_BARE_FRAMES_BURST,
    MAX_BARE_FRAMES_PER_SECOND,
    MIN_EARNED_GRANT,
    STRAY_MEMORY,
    Mux,
    ResetCode,
    Role,
)
from tunnel.server.config import DEFAULT_OPENS_PER_PORT

#: Bytes in each flooding DATA frame that carries bytes: the window admits this many frames
#: to a live stream before it overruns, each of them charged to the window, not the budget.
FLOOD_DATA_SIZE = 1024
#: Frames per link message in a flood (the real link batches them the same way).
FLOOD_BATCH = 256


class State(enum.Enum):
    """The state of the flooded stream, seen from the receiving end."""

    OPEN = "open"
    HALF_CLOSED_BY_US = "half-closed by us"
    HALF_CLOSED_BY_PEER = "half-closed by peer"
    RESET_BY_US = "reset by us"
    RESET_BY_PEER = "reset by peer"
    NEVER_OPENED = "never opened"
    CLOSED_LONG_AGO = "closed long ago"


def _flood_frame(kind: str, sid: int) -> bytes:
    return {
        "data": lambda: encode_data(sid, bytes(FLOOD_DATA_SIZE)),
        "empty-data": lambda: encode_data(sid, b""),
        "fin": lambda: encode_data(sid, b"", fin=True),
        "window-update": lambda: encode_frame(
            Frame(FrameType.WINDOW_UPDATE, sid, value=MIN_EARNED_GRANT)),
        "reset": lambda: encode_frame(Frame(FrameType.RESET, sid, value=ResetCode.CANCEL)),
        "open": lambda: raw_open(sid),
        "ping": lambda: encode_frame(Frame(FrameType.PING, value=7)),
        "pong": lambda: encode_frame(Frame(FrameType.PING, flags=Flag.ACK, value=7)),
        "goaway": lambda: encode_frame(Frame(FrameType.GOAWAY, value=0)),
        "control": lambda: encode_frame(Frame(FrameType.CONTROL, payload=b'{"type":"x"}')),
    }[kind]()


KINDS = ["data", "empty-data", "fin", "window-update", "reset", "open", "ping", "pong",
         "goaway", "control"]


def clocked_pair() -> tuple[MuxPair, FakeClock]:
    clock = FakeClock()
    return MuxPair(Mux(Role.RELAY, clock=clock), Mux(Role.CLIENT, clock=clock)), clock


def _close_both_ways(pair: MuxPair, sid: int) -> None:
    pair.relay.send_eof(sid)
    pair.client.send_eof(sid)
    pair.settle()


def put_in_state(pair: MuxPair, clock: FakeClock, receiver: Mux, state: State) -> int:
    """Open a stream and bring it to ``state`` as ``receiver`` sees it; its id."""
    peer = pair.peer(receiver)
    sid = pair.open()
    if state is State.HALF_CLOSED_BY_US:
        receiver.send_eof(sid)
    elif state is State.HALF_CLOSED_BY_PEER:
        peer.send_eof(sid)
    elif state is State.RESET_BY_US:
        receiver.reset(sid)
    elif state is State.RESET_BY_PEER:
        peer.reset(sid)
    elif state is State.NEVER_OPENED:
        sid += 2
    elif state is State.CLOSED_LONG_AGO:
        _close_both_ways(pair, sid)
        for _ in range(STRAY_MEMORY + 1):  # enough later streams to forget it entirely
            _close_both_ways(pair, pair.open())
        clock.now += 3600.0
    pair.settle()
    return sid


def frames_until_cut_off(receiver: Mux, clock: FakeClock, frame: bytes, rate: float) -> int:
    """Feed ``frame`` at ``rate`` per second (inf: all at one instant) until the receiver
    raises; how many were fed. Fails past twice the most any limit could admit."""
    message = frame * FLOOD_BATCH
    step = 0.0 if math.isinf(rate) else FLOOD_BATCH / rate
    give_up = 2 * admitted_at_most(rate)
    fed = 0
    while fed <= give_up:
        fed += FLOOD_BATCH
        try:
            receiver.receive(message)
        except RemoteProtocolError:
            return fed
        clock.now += step
    raise AssertionError(f"{fed} frames at {rate:g}/s were never cut off")


def admitted_at_most(rate: float) -> int:
    """Frames a flood at ``rate`` (above the limit) gets through before the budget is spent:
    burst / (1 - limit / rate), plus the live window's worth of DATA, plus a batch."""
    fraction = 0.0 if math.isinf(rate) else MAX_BARE_FRAMES_PER_SECOND / rate
    budget = MAX_BARE_FRAMES_BURST / (1.0 - fraction)
    return math.ceil(budget) + INITIAL_WINDOW // FLOOD_DATA_SIZE + FLOOD_BATCH


CASES = [(kind, state, role) for kind in KINDS for state in State for role in Role]


@pytest.mark.parametrize(("kind", "state", "role"), CASES,
                         ids=[f"{k}-{s.name.lower()}-{r.value}" for k, s, r in CASES])
def test_B13_every_frame_type_on_every_stream_state_is_cut_off(
        kind: str, state: State, role: Role) -> None:
    """All at one instant: the link ends within the burst (or sooner, by a tighter limit
    or a protocol rule), whichever end receives and whatever the stream's state."""
    pair, clock = clocked_pair()
    receiver = pair.relay if role is Role.RELAY else pair.client
    sid = put_in_state(pair, clock, receiver, state)
    fed = frames_until_cut_off(receiver, clock, _flood_frame(kind, sid), math.inf)
    assert fed <= admitted_at_most(math.inf)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), state=st.sampled_from(State), role=st.sampled_from(Role),
       times_limit=st.floats(1.5, 50.0))
def test_B13_a_sustained_flood_of_any_pair_is_cut_off_after_the_burst(
        kind: str, state: State, role: Role, times_limit: float) -> None:
    """Spread over simulated time at any rate above the limit, the flood still ends the
    link once the burst is spent: burst / (1 - limit / rate) frames at most."""
    pair, clock = clocked_pair()
    receiver = pair.relay if role is Role.RELAY else pair.client
    sid = put_in_state(pair, clock, receiver, state)
    rate = MAX_BARE_FRAMES_PER_SECOND * times_limit
    fed = frames_until_cut_off(receiver, clock, _flood_frame(kind, sid), rate)
    assert fed <= admitted_at_most(rate)


def test_B13_the_reset_flood_on_a_finished_stream_of_issue_24() -> None:
    """The reported case: RESETs for a stream both sides finished, at the relay. Each is
    counted as a stray frame, and the link ends once the burst is spent."""
    pair, clock = clocked_pair()
    sid = put_in_state(pair, clock, pair.relay, State.CLOSED_LONG_AGO)
    fed = frames_until_cut_off(pair.relay, clock, _flood_frame("reset", sid), math.inf)
    assert MAX_BARE_FRAMES_BURST < fed <= MAX_BARE_FRAMES_BURST + FLOOD_BATCH
    assert pair.relay.stray_frames >= MAX_BARE_FRAMES_BURST


# ----------------------------------------------------------------------------- legitimate


def _run_for(clock: FakeClock, seconds: float, per_second: int,
             one: Callable[[int], None]) -> None:
    """Call ``one(i)`` ``per_second`` times each simulated second, for ``seconds``."""
    for i in range(int(seconds * per_second)):
        one(i)
        clock.now += 1.0 / per_second


def test_B13_many_short_streams_at_twice_the_open_limit_never_trip_it() -> None:
    """Streams at twice the relay's default opens per port, for 2 simulated seconds: each
    carries bytes both ways; half end with FIN both ways, half are reset by the relay while
    the client's reply and FIN are in flight (drained as stray). Neither end raises."""
    pair, clock = clocked_pair()

    def one(i: int) -> None:
        sid = pair.open()
        pair.relay.send_data(sid, b"request")
        pair.to_client()
        pair.client.send_data(sid, b"reply" * 100)
        pair.client.send_eof(sid)
        if i % 2:
            pair.relay.reset(sid, ResetCode.CANCEL)
            pair.to_relay()  # the reply and FIN cross the RESET
        else:
            pair.relay.send_eof(sid)
        pair.settle()

    _run_for(clock, 2.0, 2 * int(DEFAULT_OPENS_PER_PORT), one)
    assert len(pair.relay) == len(pair.client) == 0


def test_B13_bulk_transfers_with_earned_window_updates_never_trip_it() -> None:
    """64 MiB each way on 8 streams, consumed as it arrives: many window updates, no error."""
    pair, clock = clocked_pair()
    sids = [pair.open() for _ in range(8)]
    chunk = bytes(64 * 1024)
    for _ in range(64 * 1024 * 1024 // len(chunk) // len(sids)):
        for sid in sids:
            for sender in (pair.relay, pair.client):
                sender.send_data(sid, chunk)
        pair.settle()
        for sid in sids:
            pair.relay.consumed(sid, len(chunk))
            pair.client.consumed(sid, len(chunk))
        pair.settle()
        clock.now += 0.001


def test_B13_a_full_link_reset_at_once_with_windows_in_flight_fits_the_burst() -> None:
    """Every stream of a full link reset by the relay at one instant, the client having
    filled each window in 16 KiB frames before it saw the RESET: all drained, no error."""
    pair, _ = clocked_pair()
    sids = [pair.open() for _ in range(DEFAULT_MAX_STREAMS)]
    piece = bytes(16 * 1024)
    for sid in sids:
        for _ in range(INITIAL_WINDOW // len(piece)):
            pair.client.send_data(sid, piece)
        pair.relay.reset(sid, ResetCode.CANCEL)
    pair.to_relay()  # all the client's DATA crosses the RESETs
    pair.to_client()
    pair.settle()
    assert len(pair.relay) == 0 and pair.relay.stray_frames >= DEFAULT_MAX_STREAMS
