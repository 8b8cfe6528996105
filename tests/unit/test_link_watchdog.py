"""Link's send-buffer watchdog (reliability B-7): a peer that never reads is dropped as soon
as the WebSocket library's own writes (pongs) push the buffer over the limit, not at the
next timer tick. The connection is a stand-in exposing only what the watchdog touches."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from tunnel.common.aio.link import LINK_WRITE_BUFFER_LIMIT, Link
from tunnel.common.proto.mux import Mux, Role


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.aborted = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.aborted > 0

    def abort(self) -> None:
        self.aborted += 1


class FakeConnection:
    """What websockets' Connection offers the watchdog: a transport, and send_data(), which
    the library calls after every read to write its automatic replies."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.sent = 0

    def send_data(self) -> None:
        self.sent += 1


def make_link() -> tuple[Link, FakeConnection]:
    ws = FakeConnection()
    link = Link(cast(Any, ws), Mux(Role.RELAY), name="peer", logger=logging.getLogger("t"),
                heartbeat_interval=1, heartbeat_timeout=3)
    return link, ws


async def test_B7_library_writes_over_the_limit_drop_the_link_at_once() -> None:
    link, ws = make_link()
    watchdog = asyncio.create_task(link.watchdog())
    await asyncio.sleep(0)  # the watchdog hooks the connection
    ws.send_data()  # a read that queued a few pongs: under the limit, nothing happens
    assert ws.sent == 1 and ws.transport.aborted == 0
    ws.transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1
    ws.send_data()  # the same call, now over the limit: dropped right here, no timer
    assert ws.sent == 2 and ws.transport.aborted == 1
    assert link.close_reason == "peer does not read"
    await asyncio.wait_for(watchdog, 2)  # the timer loop sees it too and ends
    assert ws.transport.aborted == 1  # once
    ws.send_data()
    assert ws.sent == 3  # the hook is gone with the watchdog


async def test_B7_watchdog_cancelled_restores_the_connection() -> None:
    link, ws = make_link()
    watchdog = asyncio.create_task(link.watchdog())
    await asyncio.sleep(0)
    watchdog.cancel()
    await asyncio.gather(watchdog, return_exceptions=True)
    ws.transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1
    ws.send_data()
    assert ws.transport.aborted == 0


async def test_B7_overlapping_watchdogs_leave_the_connection_clean() -> None:
    """The login's watchdog is cancelled as the session's starts: whichever ends last, the
    connection is left with its own send_data and no stale hook."""
    link, ws = make_link()
    login = asyncio.create_task(link.watchdog())
    await asyncio.sleep(0)
    login.cancel()
    session = asyncio.create_task(link.watchdog())
    await asyncio.gather(login, return_exceptions=True)
    await asyncio.sleep(0)
    ws.transport.buffered = LINK_WRITE_BUFFER_LIMIT + 1
    ws.send_data()  # the session's hook is still in place
    assert ws.transport.aborted == 1
    await asyncio.wait_for(session, 2)
    assert "send_data" not in vars(ws)
