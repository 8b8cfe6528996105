"""Control connections before login: a capped pre-auth slot from TCP accept, then TLS.

The slot is taken in ``connection_made`` of the plain TCP connection, before any TLS work,
which is what caps a slowloris (B-8, OpenSSH ``MaxStartups``): the excess is reset at once,
and a flood from one address costs the relay no TLS handshakes beyond its 32 slots. Letting
the event loop do TLS (``create_server(ssl=...)``) would run every handshake first: asyncio
and uvloop only call the protocol after it, so 2000 connections from one address meant 2000
handshakes before a single one could be refused. Here a connection that holds a slot is
given to ``loop.connect_accepted_socket`` with the TLS context, and websockets sees the TLS
transport, as it would have.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from typing import cast

from websockets.asyncio.server import ServerConnection

from ..common.link import abort_with_reset
from .guard import SourceSlots
from .listeners import limited_log

__all__ = ["PreAuthConnection", "preauth_connection"]

log = logging.getLogger("tunnel.server.preauth")

_TLS_TASKS: set[asyncio.Task[None]] = set()
"""Handshakes under way (a task must be referenced until it ends)."""


class PreAuthConnection(ServerConnection):
    """A control connection that holds a pre-auth slot from TCP accept until login ends.

    :func:`preauth_connection` binds ``slots`` and, with TLS on, the context and deadline.
    """

    slots: SourceSlots = SourceSlots()
    tls: ssl.SSLContext | None = None
    tls_timeout: float = 5.0
    preauth_source: str | None = None
    _accepted = False  # the plain TCP connection was seen (and counted)
    _handed_over = False  # its first transport was dropped for the TLS one
    _made = False  # websockets has seen connection_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._accepted:  # the TLS transport of a connection admitted below
            self._made_with(transport)
            return
        self._accepted = True
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.slots.acquire(source):
            limited_log.warning("control port: too many unauthenticated connections; "
                                "refusing %s", source)
            self._made_with(transport)
            abort_with_reset(transport)
            return
        self.preauth_source = source
        if self.tls is None:
            self._made_with(transport)
            return
        self._hand_over_to_tls(transport, self.tls)

    def _hand_over_to_tls(self, transport: asyncio.BaseTransport,
                          context: ssl.SSLContext) -> None:
        """Move the connection to a TLS transport of its own, before reading a byte.

        Pausing this transport and calling ``loop.start_tls`` is not enough: uvloop starts
        reading right after ``connection_made`` whatever the protocol asked, so the
        ClientHello could reach websockets instead of TLS. A duplicate of the socket, given to
        ``connect_accepted_socket``, keeps the connection while this transport is closed
        unread (closing one descriptor of a socket does not end the connection).
        """
        sock = transport.get_extra_info("socket")
        try:
            raw = socket.socket(fileno=os.dup(sock.fileno()))
        except (OSError, AttributeError, ValueError) as exc:
            log.warning("control port: cannot start TLS for %s: %s", self.preauth_source, exc)
            self.release_preauth()
            abort_with_reset(transport)
            return
        self._handed_over = True
        cast(asyncio.Transport, transport).abort()
        task = asyncio.get_running_loop().create_task(self._start_tls(raw, context))
        _TLS_TASKS.add(task)
        task.add_done_callback(_TLS_TASKS.discard)

    async def _start_tls(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        done = False
        try:
            await loop.connect_accepted_socket(lambda: self, raw, ssl=context,
                                               ssl_handshake_timeout=self.tls_timeout)
            done = True
        except OSError as exc:  # the TLS errors, resets and the handshake deadline
            log.debug("control port: TLS handshake with %s failed: %s", self.preauth_source,
                      exc)
        finally:
            if not done:
                self.release_preauth()
                raw.close()

    def _made_with(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_over and not self._made:
            return  # the plain transport, closed on purpose: the TLS one carries on
        self.release_preauth()
        if self._made:
            super().connection_lost(exc)

    def release_preauth(self) -> None:
        """Give the slot back (idempotent): on login success or failure, or on close."""
        if self.preauth_source is not None:
            self.slots.release(self.preauth_source)
            self.preauth_source = None


def preauth_connection(slots: SourceSlots, tls: ssl.SSLContext | None = None,
                       tls_timeout: float = 5.0) -> type[PreAuthConnection]:
    """A :class:`PreAuthConnection` class for ``serve(create_connection=...)``.

    With ``tls``, pass ``ssl=None`` to ``serve``: the class does the TLS handshake itself,
    after the slot is taken, within ``tls_timeout`` seconds.
    """
    return type("RelayConnection", (PreAuthConnection,),
                {"slots": slots, "tls": tls, "tls_timeout": tls_timeout})
