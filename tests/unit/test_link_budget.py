"""The budget the links of one relay share (tunnel/common/aio/budget.py, catalogue L-3).

Each link bounds its own queues; with hundreds of links those bounds multiply. While the
group's sum is over its ceiling, a link over its fair share stops reading, and it starts
again by its own rule only, so a slow link never keeps the others paused.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import Any, cast

from tests.recording_transport import RecordingTransport
from tests.unit.test_link_fairness import _drain_to_low_water, _link, _socket
from tunnel.common.aio.budget import LinkGroup
from tunnel.common.aio.link import STREAM_READ_LIMIT, STREAM_READ_SQUEEZED, Link, StreamSocket
from tunnel.common.aio.wsframing import WsFraming, encode_frame
from tunnel.common.proto.frames import Frame, FrameType, decode_frames
from tunnel.common.proto.frames import encode_frame as encode_mux_frame
from tunnel.common.proto.mux import INITIAL_WINDOW, Mux, Role
from tunnel.server.guard import SourceSlots
from tunnel.server.preauth import preauth_connection

MIB = 1024 * 1024


def grouped_link(group: LinkGroup) -> Link:
    link = Link(cast(Any, object()), Mux(Role.CLIENT), name="t", logger=logging.getLogger("t"),
                heartbeat_interval=1.0, heartbeat_timeout=3.0, clock=lambda: 0.0, group=group)
    link.join_group()  # what run() does first
    return link


def test_fair_share_arithmetic() -> None:
    group = LinkGroup(ceiling=8 * MIB, recv_ceiling=8 * MIB)
    group.links = 4
    group.queued = 8 * MIB  # at the ceiling, not over it: nobody is to blame yet
    assert not group.over_share(3 * MIB)
    group.queued += 1
    assert group.over_share(2 * MIB + 1) and not group.over_share(2 * MIB)
    group.received = 9 * MIB
    assert group.over_recv_share(3 * MIB) and not group.over_recv_share(MIB)


def test_a_link_over_its_share_pauses_while_one_under_it_reads_on() -> None:
    group = LinkGroup(ceiling=4 * MIB)
    big, small = grouped_link(group), grouped_link(group)
    assert group.links == 2
    heavy = [_socket(big, sid) for sid in range(1, 12, 2)]
    light, light_transport = _socket(small, 1)
    for sock, _ in heavy[:4]:  # 4 x 1 MiB: the group passes its ceiling on the last read
        sock.data_received(b"x" * INITIAL_WINDOW)
    assert group.queued == big.mux.pending_data_bytes > group.ceiling
    assert all(not transport.reading for _, transport in heavy)  # every stream of the link
    light.data_received(b"y" * 1024)  # far under its share: its stream's own rule only
    assert light_transport.reading
    assert group.queued == big.mux.pending_data_bytes + small.mux.pending_data_bytes


def test_a_paused_link_resumes_on_its_own_drain_even_if_the_group_stays_full() -> None:
    group = LinkGroup(ceiling=4 * MIB)
    slow, fast = grouped_link(group), grouped_link(group)
    slow_socks = [_socket(slow, sid) for sid in range(1, 8, 2)]
    for sock, _ in slow_socks:
        sock.data_received(b"s" * INITIAL_WINDOW)  # its peer reads nothing: it stays queued
    fast_socks = [_socket(fast, sid) for sid in range(1, 8, 2)]
    for sock, _ in fast_socks:
        sock.data_received(b"f" * INITIAL_WINDOW)
    assert all(not t.reading for _, t in fast_socks) and group.queued > group.ceiling
    _drain_to_low_water(fast)
    fast.note_queue()  # the writer reports as it sends
    fast.resume_paused()
    assert all(t.reading for _, t in fast_socks)  # the slow link's queue did not matter
    assert group.queued > group.ceiling // 2  # the slow link still holds its 4 MiB


def test_leaving_takes_the_link_and_what_it_held_out_of_the_sums() -> None:
    group = LinkGroup(ceiling=4 * MIB)
    link, other = grouped_link(group), grouped_link(group)
    sock, _ = _socket(link, 1)
    sock.data_received(b"x" * 300_000)
    assert group.queued == link.mux.pending_data_bytes > 0
    link.leave_group()
    link.leave_group()  # idempotent, as run()'s finally may meet an already-left link
    assert (group.links, group.queued) == (1, 0)
    assert other.note_queue() == 0 and group.queued == 0


def frames(count: int, size: int) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return b"".join(bytes(piece) for _ in range(count)
                    for piece in encode_frame(0x2, b"m" * size, mask=mask))


async def test_received_messages_over_the_share_pause_that_link_only() -> None:
    group = LinkGroup(recv_ceiling=256 * 1024)
    group.links = 2
    links = []
    for _ in range(2):
        framing = WsFraming(client=False, max_message_size=1 << 20, close_timeout=0.5)
        transport = RecordingTransport()
        framing.attach(transport)
        framing.join(group)
        links.append((framing, transport))
    (busy, busy_transport), (quiet, quiet_transport) = links
    busy.data_received(frames(5, 64 * 1024))  # 320 KiB unread: over the group's ceiling
    assert group.received == 5 * 64 * 1024 and not busy_transport.reading
    quiet.data_received(frames(1, 1024))  # under its share of the ceiling
    assert quiet_transport.reading and group.received == 5 * 64 * 1024 + 1024
    for _ in range(5):
        await busy.recv()
    assert busy_transport.reading and group.received == 1024
    quiet.leave()
    assert group.received == 0


def test_stream_sockets_read_small_bites_while_the_group_is_squeezed() -> None:
    """2000 visitors sending at once: each ready socket would be read in full within one
    loop turn before any pause applies (L-3); past half the budget a read takes 16 KiB."""
    group = LinkGroup(ceiling=8 * MIB)
    link = grouped_link(group)
    sock = StreamSocket(link, 1)
    assert len(sock.get_buffer(-1)) == STREAM_READ_LIMIT
    group.queued = 4 * MIB
    assert not group.squeezed()
    group.queued = 4 * MIB + 1
    assert group.squeezed()
    assert len(sock.get_buffer(-1)) == STREAM_READ_SQUEEZED
    assert len(StreamSocket().get_buffer(-1)) == STREAM_READ_LIMIT  # no link yet: no group


def test_tls_links_are_squeezed_past_half_the_received_budget() -> None:
    """The relay hands ``recv_squeezed`` to every TLS layer it starts (tlslayer.py)."""
    group = LinkGroup(recv_ceiling=8 * MIB)
    group.received = 4 * MIB
    assert not group.recv_squeezed()
    group.received = 4 * MIB + 1
    assert group.recv_squeezed() and not group.squeezed()


def test_the_preauth_class_keeps_the_budget_predicate_unbound() -> None:
    """Stored on the class preauth_connection builds, the group's bound method must not be
    bound again to the connection (a plain function attribute would be)."""
    group = LinkGroup(recv_ceiling=8 * MIB)
    cls = preauth_connection(SourceSlots(4, 4), ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH), 5.0, group.recv_squeezed)
    squeezed = cls.__new__(cls).tls_squeezed  # as _hand_over_to_tls reads it
    assert squeezed is not None
    group.received = 8 * MIB
    assert squeezed()
    group.received = 0
    assert not squeezed()


def test_a_buffered_read_is_copied_before_the_read_buffer_is_reused() -> None:
    """A stream socket is given a view of the thread's shared read buffer, which the next
    read anywhere overwrites: the DATA frames it queues, and the backlog it keeps past the
    send window, must be copies of the bytes read, not views."""
    link = _link()
    sock, _ = _socket(link, 1)
    sent = os.urandom(INITIAL_WINDOW + 100_000)  # past the window: the rest waits
    pos = 0
    while pos < len(sent):
        buf = sock.get_buffer(-1)
        size = min(len(buf), len(sent) - pos)
        buf[:size] = sent[pos:pos + size]
        sock.buffer_updated(size)
        buf[:size] = bytes(size)  # the next read, by any socket of this thread
        pos += size
    assert link.mux.send_window(1) == 0
    link.mux.receive(encode_mux_frame(Frame(FrameType.WINDOW_UPDATE, 1, value=INITIAL_WINDOW)))
    sock.window_opened()  # the backlog goes out now
    got = bytearray()
    while (message := link.mux.next_message()) is not None:
        got += b"".join(bytes(f.payload) for f in decode_frames(message)
                        if f.type is FrameType.DATA)
    assert got == sent
