"""Control connections before login: a capped pre-auth slot from TCP accept, then TLS.

The slot is taken in ``connection_made`` of the plain TCP connection, before any TLS work,
which is what caps a slowloris (B-8, OpenSSH ``MaxStartups``): the excess is reset at once,
and a flood from one address costs the relay no TLS handshakes beyond its 32 slots. Letting
the event loop do TLS (``create_server(ssl=...)``) would run every handshake first: asyncio
and uvloop only call the protocol after it, so 2000 connections from one address meant 2000
handshakes before a single one could be refused. Here a connection that holds a slot gets
our TLS layer (``tunnel/common/aio/tls.py``, which also keeps a link's TLS buffers small),
and websockets sees the layer's transport once the handshake is done.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection

from tunnel.common.aio.link import abort_with_reset
from tunnel.common.aio.tls import start_tls
from tunnel.server.guard import SourceSlots
from tunnel.server.listeners import limited_log

__all__ = ["PreAuthConnection", "preauth_connection"]

class PreAuthConnection(ServerConnection):
    """A control connection that holds a pre-auth slot from TCP accept until login ends.

    :func:`preauth_connection` binds ``slots`` and, with TLS on, the context and deadline.
    """

    slots: SourceSlots = SourceSlots()
    tls: ssl.SSLContext | None = None
    tls_timeout: float = 5.0
    #: The relay's links hold over half their received budget (LinkGroup.recv_squeezed).
    tls_squeezed: Callable[[], bool] | None = None
    preauth_source: str | None = None
    _accepted = False  # the plain TCP connection was seen (and counted)
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
        """Put our TLS layer under websockets, before a byte of the connection is read.

        The layer (``tunnel/common/aio/tls.py``) becomes the TCP transport's protocol right
        here in ``connection_made``, so the ClientHello reaches TLS whatever the loop does
        next (uvloop reads right after ``connection_made``), and websockets sees the layer's
        transport once the handshake is done, within ``tls_timeout``.
        """
        layer = start_tls(transport, self, context, server_side=True,
                          handshake_timeout=self.tls_timeout, name=self.preauth_source or "?",
                          squeezed=self.tls_squeezed)
        layer.handshake_done.add_done_callback(self._tls_done)

    def _tls_done(self, done: asyncio.Future[None]) -> None:
        if done.exception() is not None:
            # The layer has logged why and aborted the connection; websockets never saw it.
            self.release_preauth()

    def _made_with(self, transport: asyncio.BaseTransport) -> None:
        self._made = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.release_preauth()
        if self._made:
            super().connection_lost(exc)

    def release_preauth(self) -> None:
        """Give the slot back (idempotent): on login success or failure, or on close."""
        if self.preauth_source is not None:
            self.slots.release(self.preauth_source)
            self.preauth_source = None


def preauth_connection(slots: SourceSlots, tls: ssl.SSLContext | None = None,
                       tls_timeout: float = 5.0,
                       squeezed: Callable[[], bool] | None = None) -> type[PreAuthConnection]:
    """A :class:`PreAuthConnection` class for ``serve(create_connection=...)``.

    With ``tls``, pass ``ssl=None`` to ``serve``: the class does the TLS handshake itself,
    after the slot is taken, within ``tls_timeout`` seconds.
    """
    return type("RelayConnection", (PreAuthConnection,),
                {"slots": slots, "tls": tls, "tls_timeout": tls_timeout,
                 "tls_squeezed": staticmethod(squeezed) if squeezed is not None else None})
