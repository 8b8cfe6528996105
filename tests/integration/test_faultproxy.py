"""The fault-injection proxy of the e2e suite does what each toxic says (in-process, fast).

Each test runs a small echo/sink server on 127.0.0.1, puts the proxy in front of it and
checks one toxic from the outside: bytes, timing bounds that define the toxic, resets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.e2e.faultproxy import DOWN, UP, FaultProxy


class Target:
    """Echoes everything back; records the size of every read (to see segments)."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.received = bytearray()
        self.eof = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                data = await reader.read(65536)
                if not data:
                    break
                self.reads.append(len(data))
                self.received += data
                writer.write(data)
                await writer.drain()
        self.eof.set()
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Target, FaultProxy]]:
    target = Target()
    await target.start()
    proxy = FaultProxy(target.port)
    await proxy.start()
    yield target, proxy
    await proxy.close()
    await target.close()


async def _connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 10)


async def test_forwards_both_ways_and_passes_half_close(rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    reader, writer = await _connect(proxy)
    payload = bytes(range(256)) * 1024
    assert await _echo(reader, writer, payload) == payload
    writer.write_eof()
    await asyncio.wait_for(target.eof.wait(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_latency_delays_each_direction(rig: tuple[Target, FaultProxy]) -> None:
    _, proxy = rig
    reader, writer = await _connect(proxy)
    assert await _echo(reader, writer, b"warm") == b"warm"
    proxy.latency(150, direction=UP)
    proxy.latency(100, direction=DOWN)
    started = time.monotonic()
    assert await _echo(reader, writer, b"ping") == b"ping"
    assert time.monotonic() - started >= 0.25
    proxy.clear()
    writer.close()


async def test_bandwidth_is_a_token_bucket(rig: tuple[Target, FaultProxy]) -> None:
    _, proxy = rig
    proxy.bandwidth(100_000, direction=UP)
    reader, writer = await _connect(proxy)
    started = time.monotonic()
    payload = b"x" * 100_000
    assert await _echo(reader, writer, payload) == payload
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed <= 3.0, elapsed  # 100 kB at 100 kB/s, minus one 2 kB burst
    writer.close()


async def test_slicer_writes_small_segments(rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    proxy.slicer(100, 20, delay=0.005, direction=UP)
    reader, writer = await _connect(proxy)
    payload = b"y" * 3000
    assert await _echo(reader, writer, payload) == payload
    assert len(target.reads) >= 3000 // 120
    assert max(target.reads) <= 120
    writer.close()


async def test_limit_data_closes_after_n_bytes(rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    proxy.limit_data(1000, direction=UP)
    reader, writer = await _connect(proxy)
    writer.write(b"z" * 10_000)
    await writer.drain()
    await asyncio.wait_for(target.eof.wait(), 5)
    assert len(target.received) == 1000
    got = bytearray()
    with contextlib.suppress(ConnectionResetError):
        for _ in range(100):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            got += chunk
    assert len(got) <= 1000
    assert proxy.conns[0].killed
    writer.close()


async def test_reset_peer_sends_rst_to_both_ends(rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    reader, writer = await _connect(proxy)
    assert await _echo(reader, writer, b"hello") == b"hello"
    proxy.reset_peer()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    await asyncio.wait_for(target.eof.wait(), 5)
    writer.close()


async def test_blackhole_keeps_sockets_open_and_new_connections_work(
        rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    reader, writer = await _connect(proxy)
    assert await _echo(reader, writer, b"before") == b"before"
    proxy.blackhole()
    writer.write(b"lost")
    await writer.drain()
    with pytest.raises(TimeoutError):  # neither data nor EOF: the socket just goes quiet
        await asyncio.wait_for(reader.read(1), 0.5)
    assert bytes(target.received) == b"before"
    fresh_reader, fresh_writer = await _connect(proxy)
    assert await _echo(fresh_reader, fresh_writer, b"after") == b"after"
    writer.close()
    fresh_writer.close()


async def test_idle_kill_resets_only_idle_connections(rig: tuple[Target, FaultProxy]) -> None:
    _, proxy = rig
    proxy.idle_kill(0.3)
    idle_reader, idle_writer = await _connect(proxy)
    busy_reader, busy_writer = await _connect(proxy)
    assert await _echo(idle_reader, idle_writer, b"i") == b"i"
    for _ in range(8):  # 0.8 s of traffic every 0.1 s: never idle for 0.3 s
        assert await _echo(busy_reader, busy_writer, b"b") == b"b"
        await asyncio.sleep(0.1)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(idle_reader.read(1), 2)
    assert await _echo(busy_reader, busy_writer, b"still") == b"still"
    assert proxy.idle_kills == 1
    idle_writer.close()
    busy_writer.close()


async def test_record_and_replay(rig: tuple[Target, FaultProxy]) -> None:
    target, proxy = rig
    reader, writer = await _connect(proxy)
    assert await _echo(reader, writer, b"login:secret") == b"login:secret"
    writer.close()
    assert bytes(proxy.conns[0].recorded) == b"login:secret"
    assert await proxy.replay(0, read_for=1.0) == b"login:secret"
    assert bytes(target.received) == b"login:secret" * 2
