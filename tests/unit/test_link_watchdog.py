"""Link's send-buffer watchdog (reliability B-7): a peer that never reads is dropped as soon
as the framing's own writes (pongs) push the buffer over the limit, not at the next timer
tick. The framing is our real WsFraming over a transport that records writes and reports a
send buffer of the size the test sets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tests.recording_transport import RecordingTransport
from tunnel.common.aio.link import LINK_WRITE_BUFFER_LIMIT, Link
from tunnel.common.aio.wsframing import OP_PING, WsFraming, encode_frame
from tunnel.common.proto.mux import Mux, Role

MASK = b"\x01\x02\x03\x04"


class BufferedTransport(RecordingTransport):
    """A recording transport whose send buffer holds ``buffered`` bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.buffered = 0
        self.aborts = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborts += 1
        super().abort()


def make_link() -> tuple[Link, WsFraming, BufferedTransport]:
    """A relay-side link on our framing."""
    framing = WsFraming(client=False, max_message_size=1 << 20, close_timeout=0.5)
    transport = BufferedTransport()
    framing.attach(transport)
    link = Link(framing, Mux(Role.RELAY), name="peer", logger=logging.getLogger("t"),
                heartbeat_interval=1, heartbeat_timeout=3)
    return link, framing, transport


def ping() -> bytes:
    """A client's ping, masked as every client frame is."""
    return b"".join(bytes(b) for b in encode_frame(OP_PING, b"p", mask=MASK))


async def test_B7_pongs_over_the_limit_drop_the_link_at_once() -> None:
    link, framing, transport = make_link()
    framing.data_received(ping())  # a read that queued a pong: under the limit, nothing
    assert transport.written and transport.aborts == 0
    transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1
    framing.data_received(ping())  # the same, now over the limit: dropped right here
    assert transport.aborts == 1
    assert link.close_reason == "peer does not read"


async def test_B7_the_timer_catches_what_no_pong_reported() -> None:
    link, _, transport = make_link()
    transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1  # filled by our own writer, say
    await asyncio.wait_for(link.watchdog(), 2)
    assert transport.aborts == 1 and link.close_reason == "peer does not read"


async def test_B7_the_check_holds_without_a_watchdog_task() -> None:
    """Between the login's watchdog and the session's, the framing still reports."""
    link, framing, transport = make_link()
    watchdog = asyncio.create_task(link.watchdog())
    await asyncio.sleep(0)
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1
    framing.data_received(ping())
    assert transport.aborts == 1


async def test_the_hook_is_the_framings_own_attribute() -> None:
    """No patching of the connection object: the framing offers the hook, the link sets it."""
    link, framing, _ = make_link()
    hook: Any = framing.on_reply_written
    assert hook is not None and hook.__self__ is link
