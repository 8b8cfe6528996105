"""A webhook receiver for the alert tests: an asyncio HTTP server on 127.0.0.1:0.

It accepts ``POST`` requests with a JSON body (Content-Length only), records the parsed
bodies in order, and answers ``200``. Tests await :meth:`WebhookReceiver.wait_for`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

MAX_BODY = 64 * 1024
MAX_HEADER_LINES = 100


class WebhookReceiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.port = 0
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/SECRET-PATH"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()  # request line
            length = 0
            for _ in range(MAX_HEADER_LINES):
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = min(int(value.strip()), MAX_BODY)
            body = await reader.readexactly(length)
            self.events.append(json.loads(body))
            self._changed.set()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until at least ``count`` events arrived; return them all."""
        async with asyncio.timeout(timeout):
            for _ in range(10_000):
                if len(self.events) >= count:
                    break
                self._changed.clear()
                await self._changed.wait()
        return list(self.events)
