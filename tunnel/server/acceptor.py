"""A listening socket that hands each accepted connection to a callback before any transport.

``loop.create_server`` builds a transport for every connection it accepts (and schedules
its ``connection_made``) before the program can look at the peer. On a public port under
an open/reset flood (reliability B-6) nearly every connection is refused at once, and that
transport is pure cost: on the stock loop it costs several times what ``accept()`` and
``close()`` cost alone (``python -m bench.accept_cost``; figures in docs/benchmarks.md). At
B-6's open rate that adds up to a real share of a CPU, and the longer loop turns delay the
resets of the streams the relay did open, which is what decides how many connections the
client's local service sees at once.

So a public port accepts by itself: the listening socket is polled with ``add_reader``, at
most ``ACCEPTS_PER_TURN`` connections are taken per turn (other work runs in between), and
each is given to ``on_accept`` as a plain socket with its peer address. The callback either
closes it or makes it a transport (``loop.connect_accepted_socket``). Running out of file
descriptors pauses accepting for ``ACCEPT_RETRY_DELAY`` with one warning per interval, as
the stock loop's server does (reliability R-10), on uvloop too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from tunnel.common.aio.runtime import ACCEPT_ERROR_LOG_INTERVAL, RESOURCE_ERRNOS, RateLimitedLogger

__all__ = ["ACCEPTS_PER_TURN", "ACCEPT_RETRY_DELAY", "Acceptor", "bind_listening"]

#: Connections accepted from one listening socket per loop turn, so that a flood cannot make
#: one turn long (asyncio takes up to the backlog, 512, in one go).
ACCEPTS_PER_TURN = 64
#: Seconds accepting pauses after running out of file descriptors (the stock loop's value).
ACCEPT_RETRY_DELAY = 1.0

#: A connection accepted: the socket (non-blocking, owned by the callback) and its peer.
OnAccept = Callable[[socket.socket, tuple[str, int]], None]

log = logging.getLogger("tunnel.server.acceptor")
limited_log = RateLimitedLogger(log, ACCEPT_ERROR_LOG_INTERVAL,
                                note="{} more since the last report")


async def bind_listening(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to, as ``create_server`` binds
    them (``SO_REUSEADDR``; IPv6 sockets ``IPV6_V6ONLY``). Raises OSError, binding none,
    when one address cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{address!r}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Acceptor:
    """Accepts on ``socks`` until closed, handing each connection to ``on_accept``."""

    def __init__(self, socks: list[socket.socket], on_accept: OnAccept, *,
                 per_turn: int = ACCEPTS_PER_TURN,
                 retry_delay: float = ACCEPT_RETRY_DELAY,
                 warn: RateLimitedLogger = limited_log) -> None:
        """``warn`` is shared by all ports by default: running out of descriptors is the
        process's state, one line per interval says it, not one per port."""
        self.sockets = socks
        self._on_accept = on_accept
        self._per_turn = per_turn
        self._retry_delay = retry_delay
        self._warn = warn
        self._loop = asyncio.get_running_loop()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._watch()

    def is_serving(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """Stop accepting and close the listening sockets (accepted connections stay)."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self._unwatch()
        for sock in self.sockets:
            sock.close()

    def _watch(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._ready, sock)

    def _unwatch(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    def _ready(self, listener: socket.socket) -> None:
        for _ in range(self._per_turn):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # reset while queued: gone already, nothing to close
            except OSError as exc:
                self._failed(exc)
                return
            conn.setblocking(False)
            try:
                self._on_accept(conn, peer[:2])
            except Exception:
                conn.close()
                raise

    def _failed(self, exc: OSError) -> None:
        if exc.errno not in RESOURCE_ERRNOS:
            self._warn.warning("accept() failed: %s", exc.strerror or exc, key="other")
            return
        # The queued connection stays in the backlog; polling again at once would spin.
        self._warn.warning("cannot accept new connections: %s (out of file descriptors?); "
                            "retrying in %.0f s", exc.strerror or exc, self._retry_delay,
                            key="resources")
        self._unwatch()
        self._retry = self._loop.call_later(self._retry_delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._watch()
