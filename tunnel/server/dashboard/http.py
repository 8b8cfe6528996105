"""A small, strict HTTP/1.1 server on asyncio streams, for the dashboard only.

Why not a framework: the dashboard needs a dozen GET routes and two POSTs, and every
dependency on the relay is attack surface. Why strict: the server may face the internet
(behind a proxy or not), so everything a peer can make it hold is capped (line, header
and body sizes, header count, time to send the head, idle keep-alive, concurrent
connections), anything ambiguous is refused with a clean 4xx (:mod:`.httpwire`), and a
failing handler gives a generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Iterable
from http import HTTPStatus

from tunnel.server.dashboard.httpmsg import (
    BODY_TIMEOUT,
    HEADER_TIMEOUT,
    KEEPALIVE_IDLE,
    MAX_BODY,
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    Handler,
    HttpError,
    Limits,
    MethodNotAllowed,
    Request,
    Response,
    error_response,
)
from tunnel.server.dashboard.httpwire import encode_response, read_request

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "KEEPALIVE_IDLE",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_LINE",
    "Handler",
    "HttpError",
    "HttpServer",
    "Limits",
    "Request",
    "Response",
    "Router",
    "read_request",
]

#: After refusing a request, unread input is drained this long (and this much) before
#: closing: closing with unread data sends a RST that can destroy the error response.
LINGER_TIME = 1.0
LINGER_BYTES = 256 * 1024
#: StreamReader buffer: any line longer than this is refused without buffering it all.
_READ_LIMIT = max(MAX_REQUEST_LINE, MAX_HEADER_BYTES) + 1024

log = logging.getLogger("tunnel.server.dashboard")


class Router:
    """A table of (method, path pattern) -> handler; patterns are full-match regexes."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """The handler and path parameters; HttpError 404 or 405 (with the allowed set)."""
        allowed: list[str] = []
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method == method:
                return handler, match.groupdict()
            allowed.append(route_method)
        if allowed:
            raise MethodNotAllowed(sorted(set(allowed)))
        raise HttpError(HTTPStatus.NOT_FOUND)


class HttpServer:
    """Serves ``handler`` on one listening socket; every response gets ``default_headers``."""

    def __init__(self, handler: Handler, *, default_headers: Iterable[tuple[str, str]] = (),
                 limits: Limits | None = None) -> None:
        self._handler = handler
        self._default_headers = tuple(default_headers)
        self.limits = limits or Limits()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._on_connection, host, port,
                                                  limit=_READ_LIMIT, reuse_address=True)

    async def stop(self) -> None:
        """Stop listening and end every open connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            if len(self._writers) > self.limits.max_connections:
                await self._send(writer, Response.text(503, "too many connections\n"), False)
            else:
                await self._serve(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the peer went away or stalled: nothing to answer
        except Exception:  # a bug here must end one connection, not the server
            log.exception("dashboard: connection failed")
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_info = writer.get_extra_info("peername")
        peer = str(peer_info[0]) if isinstance(peer_info, tuple) else ""
        wait = self.limits.header_timeout
        for _ in range(1 << 30):  # one request per turn; ends on close, error or timeout
            try:
                request = await read_request(reader, self.limits, peer, wait)
            except HttpError as exc:
                await self._send(writer, error_response(exc), False)
                await _linger(reader, writer)
                return
            response = await self._dispatch(request)
            keep = request.keep_alive and response.status < 500
            await self._send(writer, response, keep)
            if not keep:
                return
            wait = self.limits.keepalive_idle

    async def _dispatch(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except HttpError as exc:
            return error_response(exc)
        except Exception:
            log.exception("dashboard: %s %s failed", request.method, request.path)
            return Response.text(500, "internal error\n")

    async def _send(self, writer: asyncio.StreamWriter, response: Response,
                    keep_alive: bool) -> None:
        writer.write(encode_response(response, self._default_headers, keep_alive))
        async with asyncio.timeout(self.limits.write_timeout):
            await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then discard what the peer still sends, bounded in time and bytes."""
    if writer.can_write_eof():
        writer.write_eof()
    drained = 0
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(LINGER_TIME):
            while drained < LINGER_BYTES:
                data = await reader.read(LINGER_BYTES - drained)
                if not data:
                    return
                drained += len(data)
