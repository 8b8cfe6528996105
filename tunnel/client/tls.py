"""The client's TLS: our TLS layer under websockets' client connection, and the pin check.

websockets would let the event loop do TLS (``create_connection(ssl=...)``), whose memory BIOs
keep a busy link's high-water mark for its life and, on a link that dies by heartbeat
timeout, until the garbage collector finds it (``tunnel/common/aio/tls.py`` says more). So
websockets is given the ``ws://`` form of the relay's URL with the same host and port, and
the connection class puts :class:`~tunnel.common.aio.tls.TlsLayer` between the TCP
connection and websockets before a byte is written; websockets' HTTP upgrade starts only
after the TLS handshake and the pin check.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.uri import parse_uri

from tunnel.common.aio.tls import TlsLayer, check_pin, start_tls

__all__ = ["tls_connection", "transport_url"]


def transport_url(url: str) -> tuple[str, str]:
    """``(url for websockets, TLS server name)``: a ``wss://`` URL becomes ``ws://`` with its
    port written out (443 when implied), the name is the URL's host."""
    uri = parse_uri(url)
    host = f"[{uri.host}]" if ":" in uri.host else uri.host
    return f"ws://{host}:{uri.port}{uri.resource_name}", uri.host


def tls_connection(context: ssl.SSLContext, server_hostname: str, fingerprint: str | None,
                   handshake_timeout: float) -> type[ClientConnection]:
    """A websockets client connection class that runs TLS (and the pin check) itself.

    With a pin, the check runs right after the TLS handshake and before websockets writes its
    request, so a man in the middle with another certificate receives no application byte.
    """

    class TlsConnection(ClientConnection):
        layer: TlsLayer | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if self.layer is None:  # the TCP connection: TLS first
                self.transport = transport  # type: ignore[assignment]  # websockets aborts it on failure
                self.layer = start_tls(transport, self, context, server_side=False,
                                       server_hostname=server_hostname,
                                       handshake_timeout=handshake_timeout,
                                       name=server_hostname)
                return
            super().connection_made(transport)  # the TLS transport, handshake done

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            assert self.layer is not None
            await self.layer.handshake_done
            if fingerprint is not None:
                if self.layer.sslobj is None:
                    raise ConnectionResetError("connection lost after the TLS handshake")
                check_pin(self.layer.sslobj, fingerprint)
            await super().handshake(*args, **kwargs)

    return TlsConnection
