"""A minimal HTTP client for the dashboard tests: raw sockets, so nothing is normalized.

Every request is ``Connection: close`` unless the caller sends its own headers, and the
answer is read to EOF, so each call opens and closes exactly one socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

READ_TIMEOUT = 15.0
MAX_RESPONSE = 64 * 1024 * 1024


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json; charset=utf-8", self
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def parse_reply(raw: bytes) -> Reply:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    assert len(body) >= length, f"short body: {len(body)} < {length}"
    return Reply(status, headers, body[:length])


async def send_raw(port: int, data: bytes, *, source: str | None = None,
                   host: str = "127.0.0.1") -> bytes:
    """Send ``data`` and read until the server closes; return everything received."""
    local = (source, 0) if source is not None else None
    reader, writer = await asyncio.open_connection(host, port, local_addr=local)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(READ_TIMEOUT):
            return await _read_all(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for _ in range(MAX_RESPONSE // 1024 + 2):
        try:
            data = await reader.read(256 * 1024)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
        assert total <= MAX_RESPONSE
    return b"".join(chunks)


async def request(port: int, method: str, path: str, *, auth: str | None = None,
                  headers: Mapping[str, str] | None = None, body: bytes = b"",
                  host: str | None = None, source: str | None = None) -> Reply:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}",
             "Connection: close"]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return parse_reply(await send_raw(port, raw, source=source))
