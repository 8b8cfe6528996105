"""The dashboard's HTTP message types and limits (no I/O here).

Shared by the wire format (:mod:`.httpwire`), the server (:mod:`.http`) and the handlers,
so each of those can stay small. Every limit is a named constant, collected in
:class:`Limits` so tests can shrink the timeouts while production keeps the defaults.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "BODY_TIMEOUT",
    "HEADER_TIMEOUT",
    "KEEPALIVE_IDLE",
    "MAX_BODY",
    "MAX_CONNECTIONS",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_REQUEST_LINE",
    "WRITE_TIMEOUT",
    "Handler",
    "HttpError",
    "Limits",
    "MethodNotAllowed",
    "Request",
    "Response",
    "error_response",
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


class HttpError(Exception):
    """A request answered with ``status``; when raised while parsing, the connection
    closes after the answer (the stream may be out of step with the request framing)."""

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


class MethodNotAllowed(HttpError):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__(HTTPStatus.METHOD_NOT_ALLOWED)
        self.allowed = allowed


Handler = Callable[[Request], Awaitable[Response]]


def error_response(error: HttpError) -> Response:
    response = Response.text(error.status, f"{error.detail}\n")
    if isinstance(error, MethodNotAllowed):
        response.headers.append(("Allow", ", ".join(error.allowed)))
    return response
