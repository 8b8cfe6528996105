"""A TCP proxy on 127.0.0.1 that can blackhole its connections, for link-fault tests.

``blackhole()`` stops forwarding in both directions but keeps every socket open, which is
what a dead NAT mapping or a pulled cable looks like to both ends (frp's ``halfopen.go``).
New connections made after the call are forwarded normally, so a client that reconnects
gets through. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["FaultProxy"]

CHUNK = 64 * 1024


class _Pair:
    def __init__(self) -> None:
        self.frozen = False
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: list[_Pair] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def blackhole(self) -> None:
        """Freeze every connection open now; they stay open but carry nothing."""
        for pair in self._pairs:
            pair.frozen = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        pair = _Pair()
        pair.writers = [writer, up_writer]
        self._pairs.append(pair)
        pair.tasks = [asyncio.create_task(self._pump(pair, reader, up_writer)),
                      asyncio.create_task(self._pump(pair, up_reader, writer))]
        await asyncio.gather(*pair.tasks, return_exceptions=True)

    async def _pump(self, pair: _Pair, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while not pair.frozen:
                data = await reader.read(CHUNK)
                if not data or pair.frozen:
                    break
                writer.write(data)
                await writer.drain()
        if not pair.frozen:
            with contextlib.suppress(OSError):
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in self._pairs:
            for task in pair.tasks:
                task.cancel()
            for writer in pair.writers:
                writer.close()
        for pair in self._pairs:
            for task in pair.tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for writer in pair.writers:
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()
