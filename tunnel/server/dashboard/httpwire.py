"""Reading requests from and writing responses to a stream, strictly.

Anything ambiguous (bare LF, obs-fold, chunked bodies, two Host headers, two
Content-Lengths, a repeated query parameter) is an :class:`HttpError` with a clean 4xx,
and every size is checked before it is buffered: a request line over
``MAX_REQUEST_LINE`` is 414, headers over ``MAX_HEADERS`` or ``MAX_HEADER_BYTES`` are
431, a body over ``MAX_BODY`` is 413 before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from urllib.parse import parse_qsl

from tunnel.server.dashboard.httpmsg import HttpError, Limits, Request, Response

__all__ = ["encode_response", "read_request"]

MAX_QUERY_PARAMS = 32
_SINGLETON_HEADERS = frozenset({"host", "content-length", "authorization", "origin",
                                "x-tunnel-request"})
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD_RE = re.compile(r"[A-Z]{1,16}")
_TARGET_RE = re.compile(r"/[\x21-\x7e]*")
_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


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
