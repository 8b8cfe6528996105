"""Streams share a full link in turns (reliability F-4).

A stream paused because the link is full waits for the link to drain, even when its own
credit comes back meanwhile, and a stream still reading pauses as soon as the queue is above
the mark at which the others resume: otherwise the streams that happen to be reading keep
the queue between the two marks, the link never drains, and the paused ones starve.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from tunnel.common.aio.link import (
    LINK_CEILING,
    LINK_HIGH_WATER,
    LINK_LOW_WATER,
    Link,
    StreamSocket,
)
from tunnel.common.proto.frames import MAX_DATA_PAYLOAD, Frame, FrameType, encode_frame
from tunnel.common.proto.mux import HEADER_OPEN, INITIAL_WINDOW, Mux, Role


class FakeTransport:
    """Records pause/resume; the socket under test never touches the network."""

    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def _open(mux: Mux, stream_id: int) -> None:
    payload = HEADER_OPEN.pack(0) + b"peer"
    mux.receive(encode_frame(Frame(FrameType.OPEN, stream_id, payload=payload)))


def _socket(link: Link, stream_id: int) -> tuple[StreamSocket, FakeTransport]:
    _open(link.mux, stream_id)
    sock = StreamSocket()
    sock.attach(link, stream_id)
    transport = FakeTransport()
    sock.connection_made(cast(Any, transport))
    return sock, transport


def _link() -> Link:
    return Link(cast(Any, object()), Mux(Role.CLIENT), name="t",
                logger=logging.getLogger("test"), heartbeat_interval=1.0,
                heartbeat_timeout=3.0, clock=lambda: 0.0)


def test_a_reading_stream_pauses_once_the_others_wait_for_the_drain() -> None:
    link = _link()
    waiting, waiting_transport = _socket(link, 1)
    reading, reading_transport = _socket(link, 3)
    waiting.data_received(b"w" * (LINK_HIGH_WATER + 1))  # the link is full: it pauses
    assert not waiting_transport.reading
    for _ in range(100):  # the writer drains to between the two marks
        if link.mux.pending_data_bytes <= LINK_HIGH_WATER:
            break
        link.mux.next_message()
    assert LINK_LOW_WATER < link.mux.pending_data_bytes <= LINK_HIGH_WATER
    reading.data_received(b"r" * 1024)
    assert not reading_transport.reading  # its turn is over until the link drains


def test_credit_does_not_resume_a_stream_before_the_link_drains() -> None:
    link = _link()
    sock, transport = _socket(link, 1)
    for stream_id in (3, 5, 7):  # other streams fill the link past its high-water mark
        other, _ = _socket(link, stream_id)
        other.data_received(b"x" * (LINK_HIGH_WATER // 2))
    sock.data_received(b"y" * MAX_DATA_PAYLOAD)
    assert not transport.reading and sock in link.paused
    for _ in range(100):  # the writer sends until the queue is between the two marks
        if link.mux.pending_data_bytes <= LINK_HIGH_WATER:
            break
        link.mux.next_message()
    assert LINK_LOW_WATER < link.mux.pending_data_bytes <= LINK_HIGH_WATER
    sock.window_opened()  # credit back for this stream alone
    assert not transport.reading  # still waits, like every other paused stream
    for _ in range(100):
        if link.mux.pending_data_bytes <= LINK_LOW_WATER:
            break
        link.mux.next_message()
    for paused in list(link.paused):  # what the link's writer does at the low-water mark
        paused.link_drained()
    assert transport.reading


TO_CEILING = LINK_CEILING // INITIAL_WINDOW
"""Streams that each queue a full window (frame headers included) to pass the ceiling."""


def _drain_to_low_water(link: Link) -> None:
    for _ in range(10_000):  # what the writer does, bounded
        if link.mux.pending_data_bytes <= LINK_LOW_WATER:
            return
        link.mux.next_message()
    raise AssertionError("the link did not drain")


def test_a_link_past_its_ceiling_pauses_every_stream_not_only_the_one_that_read() -> None:
    """Many sockets readable in one loop turn (reliability L-1): once the queue passes the
    ceiling, every stream stops reading, so the relay holds ~the ceiling plus one read, not
    one read per visitor; all resume together when the link drains."""
    link = _link()
    socks = [_socket(link, stream_id) for stream_id in range(1, 200, 2)]
    for sock, _ in socks[:TO_CEILING - 1]:
        sock.data_received(b"x" * INITIAL_WINDOW)
    assert any(transport.reading for _, transport in socks)  # below the ceiling: own turns
    socks[TO_CEILING - 1][0].data_received(b"x" * INITIAL_WINDOW)
    assert link.mux.pending_data_bytes > LINK_CEILING
    assert all(not transport.reading for _, transport in socks)
    assert set(link.paused) == {sock for sock, _ in socks}
    _drain_to_low_water(link)
    link.resume_paused()
    assert all(transport.reading for _, transport in socks)
    assert not link.paused


def test_streams_that_lost_their_turn_resume_first() -> None:
    """The event loop serves resumed sockets in resume order, so the order of ``paused`` is
    the order of the next turn: streams paused at the ceiling before they read go first,
    those that read go last."""
    link = _link()
    socks = [_socket(link, stream_id)[0] for stream_id in range(1, 100, 2)]
    readers, starved = socks[:TO_CEILING], socks[TO_CEILING:]
    for sock in readers:  # the last one takes the link past its ceiling: all pause
        sock.data_received(b"r" * INITIAL_WINDOW)
    order = list(link.paused)
    assert set(order[:len(starved)]) == set(starved)
    assert set(order[len(starved):]) == set(readers)
    _drain_to_low_water(link)
    turn = link.read_cycle
    link.resume_paused()
    assert link.read_cycle == turn + 1
    now_reading = starved[:TO_CEILING]
    for sock in now_reading:  # the first resumed read first, and fill the link again
        sock.data_received(b"s" * INITIAL_WINDOW)
    order = list(link.paused)
    assert set(order[-len(now_reading):]) == set(now_reading)  # behind all who did not read
