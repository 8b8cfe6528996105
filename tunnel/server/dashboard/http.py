"""A small, strict HTTP/1.1 server on asyncio streams, for the dashboard only.

Why not a framework: the dashboard needs a dozen GET routes and two POSTs, and every
dependency on the relay is attack surface. Why strict: the server may face the internet
(behind a proxy or not), so everything a peer can make it hold is capped (line, header
and body sizes, header count, time to send the head, idle keep-alive, concurrent
connections), anything ambiguous (bare LF, obs-fold, chunked bodies, two Host headers,
two different Content-Lengths) is refused with a clean 4xx, and a failing handler gives a
generic 500, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

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

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY = 64 * 1024
HEADER_TIMEOUT = 10.0  # seconds from the request line to the end of the head
BODY_TIMEOUT = 10.0
KEEPALIVE_IDLE = 15.0  # seconds a kept-alive connection may wait for its next request
WRITE_TIMEOUT = 30.0  # a reader too slow to take a response within this is dropped
MAX_CONNECTIONS = 256
MAX_QUERY_PARAMS = 32
#: After refusing a request, unread input is drained this long (and this much) before
#: closing: closing with unread data sends a RST that can destroy the error response.
LINGER_TIME = 1.0
LINGER_BYTES = 256 * 1024
#: StreamReader buffer: any line longer than this is refused without buffering it all.
_READ_LIMIT = max(MAX_REQUEST_LINE, MAX_HEADER_BYTES) + 1024
_SINGLETON_HEADERS = frozenset({"host", "content-length", "authorization", "origin",
                                "x-tunnel-request"})
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_TARGET_RE = re.compile(r"/[\x21-\x7e]*")
_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")

log = logging.getLogger("tunnel.server.dashboard")


class HttpError(Exception):
    """A request that cannot be served; the connection is closed after the answer."""

    def __init__(self, status: HTTPStatus, detail: str = "") -> None:
        super().__init__(detail or status.phrase)
        self.status = status
        self.detail = detail or status.phrase


@dataclass(frozen=True)
class Limits:
    """Every cap of the server; tests shrink the timeouts, production keeps the defaults."""

    max_request_line: int = MAX_REQUEST_LINE
    max_headers: int = MAX_HEADERS
    max_header_bytes: int = MAX_HEADER_BYTES
    max_body: int = MAX_BODY
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    keepalive_idle: float = KEEPALIVE_IDLE
    write_timeout: float = WRITE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    """Lower-case names; repeated (non-singleton) headers joined with ``", "``."""
    body: bytes = b""
    peer: str = ""
    """The peer's IP address (no port): the key for per-source throttling."""
    params: dict[str, str] = field(default_factory=dict)
    """Named groups of the matched route pattern."""

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return False  # no HTTP/1.0 keep-alive: one less state to get wrong
        return "close" not in tokens


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode("utf-8"))


Handler = Callable[[Request], Awaitable[Response]]


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


class MethodNotAllowed(HttpError):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(HTTPStatus.METHOD_NOT_ALLOWED)
        self.allowed = allowed


# ---------------------------------------------------------------- parsing


async def _read_line(reader: asyncio.StreamReader, cap: int, status: HTTPStatus) -> bytes:
    """One CRLF-terminated line without its CRLF; longer than ``cap`` -> ``status``."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HttpError(status) from None
    if len(line) > cap:
        raise HttpError(status)
    if not line.endswith(b"\r\n"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "lines must end with CRLF")
    return line[:-2]


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "non-ASCII request line") from None
    parts = text.split(" ")
    if len(parts) != 3:
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if not _METHOD_RE.fullmatch(method) or not _TARGET_RE.fullmatch(target):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed request line")
    if version not in _VERSIONS:
        raise HttpError(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    return method, target, version


def _parse_header(line: bytes, headers: dict[str, str]) -> None:
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN_RE.fullmatch(name):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed header line")
    value = value.strip(b" \t")
    if _VALUE_BAD_RE.search(value):
        raise HttpError(HTTPStatus.BAD_REQUEST, "control character in a header value")
    key = name.decode("ascii").lower()
    text = value.decode("latin-1")
    if key in headers:
        if key in _SINGLETON_HEADERS:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"repeated {key} header")
        headers[key] = f"{headers[key]}, {text}"
    else:
        headers[key] = text


async def _read_head(reader: asyncio.StreamReader, limits: Limits, line_timeout: float
                     ) -> tuple[str, str, str, dict[str, str]]:
    async with asyncio.timeout(line_timeout):
        line = await _read_line(reader, limits.max_request_line,
                                HTTPStatus.REQUEST_URI_TOO_LONG)
    method, target, version = _parse_request_line(line)
    headers: dict[str, str] = {}
    used = 0
    async with asyncio.timeout(limits.header_timeout):
        for count in range(limits.max_headers + 1):
            field_line = await _read_line(reader, limits.max_header_bytes - used,
                                          HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
            if not field_line:
                return method, target, version, headers
            if count == limits.max_headers:
                raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
            used += len(field_line) + 2
            _parse_header(field_line, headers)
    raise HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)  # unreachable: loop returns


def _content_length(headers: Mapping[str, str], limits: Limits) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(HTTPStatus.NOT_IMPLEMENTED, "chunked request bodies are not supported")
    raw = headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise HttpError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
    length = int(raw)
    if length > limits.max_body:
        raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return length


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    path, _, query = target.partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=MAX_QUERY_PARAMS, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed query string") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            raise HttpError(HTTPStatus.BAD_REQUEST, "repeated query parameter")
        params[key] = value
    return path, params


async def read_request(reader: asyncio.StreamReader, limits: Limits, peer: str,
                       line_timeout: float | None = None) -> Request:
    """Read one request; IncompleteReadError when the peer closes before a full head.

    ``line_timeout`` bounds the wait for the request line: the header timeout for a new
    connection, the keep-alive idle timeout between requests. The rest of the head then
    has ``limits.header_timeout``, the body ``limits.body_timeout``.
    """
    wait = limits.header_timeout if line_timeout is None else line_timeout
    method, target, version, headers = await _read_head(reader, limits, wait)
    if version == "HTTP/1.1" and "host" not in headers:
        raise HttpError(HTTPStatus.BAD_REQUEST, "missing Host header")
    length = _content_length(headers, limits)
    body = b""
    if length:
        async with asyncio.timeout(limits.body_timeout):
            body = await reader.readexactly(length)
    path, query = _split_target(target)
    return Request(method, target, path, query, version, headers, body, peer)


# ---------------------------------------------------------------- writing


def encode_response(response: Response, extra_headers: Iterable[tuple[str, str]],
                    keep_alive: bool) -> bytes:
    try:
        phrase = HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Unknown"
    lines = [f"HTTP/1.1 {response.status} {phrase}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}",
             f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    for name, value in (*extra_headers, *response.headers):
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} carries a line break")
        lines.append(f"{name}: {value}")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + response.body


def error_response(error: HttpError) -> Response:
    response = Response.text(error.status, f"{error.detail}\n")
    if isinstance(error, MethodNotAllowed):
        response.headers.append(("Allow", ", ".join(error.allowed)))
    return response


# ---------------------------------------------------------------- server


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
