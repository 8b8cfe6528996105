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

from tunnel.common.aio.link import StreamSocket, abort_with_reset, reset_on_close
from tunnel.common.aio.runtime import RateLimitedLogger
from tunnel.common.errors import LocalProtocolError
from tunnel.server.acceptor import Acceptor, bind_listening
from tunnel.server.guard import OpenRate, SourceSlots
from tunnel.server.tunnels import Tunnel

__all__ = ["LISTEN_BACKLOG", "VisitorGate", "VisitorSocket", "bind_public_port", "port_is_free"]

LISTEN_BACKLOG = 512
#: A flood of refused visitors is logged at most this often (seconds).
REFUSAL_LOG_INTERVAL = 10.0


log = logging.getLogger("tunnel.server.listeners")
limited_log = RateLimitedLogger(log, REFUSAL_LOG_INTERVAL)


class VisitorSocket(StreamSocket):
    """A visitor's connection, admitted by :class:`VisitorGate`: opens a stream on the
    owner's live link once it is a transport."""

    def __init__(self, tunnel: Tunnel, slots: SourceSlots, source: str,
                 peer: str) -> None:
        super().__init__(traffic=tunnel.traffic)
        self.tunnel = tunnel
        self.slots = slots
        self.peer = peer
        self.source: str | None = source  # set while this visitor holds a per-source slot
        self.opened = time.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        link = self.tunnel.link
        if link is None:  # the owner went offline since the accept: refuse at once
            self._turn_away(transport)
            return
        try:
            stream_id = link.open_stream(self.tunnel.tunnel_id, self.peer)
        except LocalProtocolError as exc:
            self._turn_away(transport, f"visitor {self.peer} refused: {exc}")
            return
        self.attach(link, stream_id)
        self.tunnel.connections.add(self)
        super().connection_made(transport)

    def _turn_away(self, transport: asyncio.BaseTransport, why: str | None = None) -> None:
        """Refuse after all: RST, the slot back, and counted and logged when ``why`` says."""
        self.closed = True
        self.release_slot()
        if why is not None:
            refuse(self.tunnel, why)
        abort_with_reset(transport)

    def release_slot(self) -> None:
        if self.source is not None:
            self.slots.release(self.source)
            self.source = None

    def detached(self) -> None:
        self.tunnel.connections.discard(self)
        self.release_slot()


def refuse(tunnel: Tunnel, why: str) -> None:
    """Count a refused visitor and say why (one line per port and interval)."""
    limited_log.warning("port %d: %s", tunnel.port, why, key=tunnel.port)
    tunnel.streams_refused += 1


def reset_socket(conn: socket.socket) -> None:
    """Close an accepted socket with RST: the visitor sees a refusal, not a clean EOF."""
    reset_on_close(conn)
    conn.close()


class VisitorGate:
    """Judges each connection accepted on one public port by its peer address alone.

    Refused ones (owner offline, reset while queued, over the open rate, over the per-source
    cap) are closed with RST before they cost a transport; admitted ones become a
    :class:`VisitorSocket` holding a per-source slot.
    """

    def __init__(self, tunnel: Tunnel, slots: SourceSlots,
                 rate: OpenRate | None = None) -> None:
        if tunnel.port is None:
            raise ValueError(f"tunnel {tunnel.key} has no public port to guard")
        self.port = tunnel.port
        #: Whom admitted visitors reach; replaced when the port changes hands.
        self.tunnel = tunnel
        self.slots = slots
        self.rate = rate
        self._loop = asyncio.get_running_loop()
        self._joining: set[asyncio.Task[None]] = set()

    def __call__(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        tunnel = self.tunnel
        if tunnel.link is None:
            reset_socket(conn)  # owner offline: refuse at once, nothing to count
            return
        try:
            conn.getpeername()
        except OSError:
            # The visitor reset the connection while it sat in the accept queue (Rapid
            # Reset, B-6). Opening a stream for it would only make the client dial.
            self._refuse(conn, "visitor refused: reset before it was accepted")
            return
        address, source = f"{peer[0]}:{peer[1]}", str(peer[0])
        if self.rate is not None and not self.rate.allow(self.port, source):
            # Checked before a stream exists: a refused open costs the owner's link nothing.
            refused = self.rate.refused.get(self.port, 0)
            self._refuse(conn, f"visitor {address} refused: opening connections too fast "
                               f"({refused} refused on this port so far)")
            return
        if not self.slots.acquire(source):
            self._refuse(conn, f"visitor {address} refused: too many connections from "
                               f"{source}")
            return
        visitor = VisitorSocket(tunnel, self.slots, source, address)
        task = self._loop.create_task(self._join(conn, visitor))
        self._joining.add(task)
        task.add_done_callback(self._joining.discard)

    def _refuse(self, conn: socket.socket, why: str) -> None:
        refuse(self.tunnel, why)
        reset_socket(conn)

    async def _join(self, conn: socket.socket, visitor: VisitorSocket) -> None:
        """Make the admitted socket a transport; its protocol takes it from there."""
        try:
            await self._loop.connect_accepted_socket(lambda: visitor, conn)
        except OSError as exc:
            log.debug("visitor %s lost before it was joined: %s", visitor.peer, exc)
            visitor.release_slot()
            reset_socket(conn)


async def bind_public_port(host: str, gate: VisitorGate) -> Acceptor:
    """Bind ``gate.port`` for ``gate``; raises OSError when another program holds it."""
    socks = await bind_listening(host, gate.port, LISTEN_BACKLOG)
    return Acceptor(socks, gate)


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


