"""Public listeners: one per leased port, accepting visitors onto the owner's link.

A listener stays bound for as long as its lease exists, also while the owner is offline:
the port keeps belonging to that client (no other program can grab it), and a visitor who
arrives meanwhile is reset at once instead of hanging.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from ..common.errors import LocalProtocolError
from ..common.link import StreamSocket, abort_with_reset
from ..common.runtime import RateLimitedLogger
from .guard import OpenRate, SourceSlots
from .registry import TunnelRecord

__all__ = ["LISTEN_BACKLOG", "VisitorSocket", "bind_public_port", "port_is_free"]

LISTEN_BACKLOG = 512
#: A flood of refused visitors is logged at most this often (seconds).
REFUSAL_LOG_INTERVAL = 10.0


log = logging.getLogger("tunnel.server.listeners")
limited_log = RateLimitedLogger(log, REFUSAL_LOG_INTERVAL)


class VisitorSocket(StreamSocket):
    """A visitor's connection: opens a stream on the owner's live link when it arrives."""

    def __init__(self, tunnel: TunnelRecord, slots: SourceSlots,
                 rate: OpenRate | None = None) -> None:
        super().__init__(traffic=tunnel.traffic)
        self.tunnel = tunnel
        self.slots = slots
        self.rate = rate
        self.peer = "?"
        self.source: str | None = None  # set while this visitor holds a per-source slot
        self.opened = time.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        link = self.tunnel.link
        if link is None:
            self.closed = True  # owner offline: refuse at once
            abort_with_reset(transport)
            return
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            # No address: the visitor reset the connection while it sat in the accept queue
            # (Rapid Reset, B-6). Opening a stream for it would only make the client dial.
            self._refuse(transport, "visitor refused: reset before it was accepted")
            return
        address = f"{peer[0]}:{peer[1]}"
        self.peer = address
        source = str(peer[0])
        if self.rate is not None and not self.rate.allow(self.tunnel.port, source):
            # Checked before a stream exists: a refused open costs the owner's link nothing.
            refused = self.rate.refused.get(self.tunnel.port, 0)
            self._refuse(transport, f"visitor {address} refused: opening connections too "
                                    f"fast ({refused} refused on this port so far)")
            return
        if not self.slots.acquire(source):
            self._refuse(transport, f"visitor {address} refused: too many connections from "
                                    f"{source}")
            return
        self.source = source
        try:
            stream_id = link.mux.open_stream(self.tunnel.tunnel_id, address)
        except LocalProtocolError as exc:
            self._refuse(transport, f"visitor {address} refused: {exc}")
            return
        self.attach(link, stream_id)
        self.tunnel.connections.add(self)
        link.kick()
        super().connection_made(transport)

    def _refuse(self, transport: asyncio.BaseTransport, why: str) -> None:
        limited_log.warning("port %d: %s", self.tunnel.port, why, key=self.tunnel.port)
        self.tunnel.streams_refused += 1
        self.closed = True
        self._release()
        abort_with_reset(transport)

    def _release(self) -> None:
        if self.source is not None:
            self.slots.release(self.source)
            self.source = None

    def detached(self) -> None:
        self.tunnel.connections.discard(self)
        self._release()


async def bind_public_port(host: str, port: int, tunnel: TunnelRecord,
                           slots: SourceSlots, rate: OpenRate | None = None) -> asyncio.Server:
    """Bind ``port``; raises OSError when another program holds it.

    ``rate`` caps how fast visitors may open connections (per source and per port).
    """
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: VisitorSocket(tunnel, slots, rate), host, port,
                                    backlog=LISTEN_BACKLOG, reuse_address=True)


def port_is_free(host: str, port: int) -> bool:
    """Whether another program holds ``port`` (a quick bind probe for auto allocation)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


