"""Reliability catalogue (../shared/design/reliability.md §2), section (a) data integrity, by id."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import struct
import time
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Variant,
    start_tunnel,
)
from tests.e2e.services import (
    EchoService,
    TcpService,
    close_writer,
    echo_check,
    open_visitor,
    pattern_digest,
    read_exactly_digest,
    read_to_eof,
    send_pattern,
)

MIB = 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class ResettingService(TcpService):
    """Sends ``before`` bytes of a 20 MiB reply, then resets the connection (SO_LINGER 0)."""

    def __init__(self, before: int) -> None:
        super().__init__()
        self.before = before

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_pattern(writer, 7, self.before)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.transport.abort()


async def test_I7_abort_is_not_eof(tmp_path: Path) -> None:
    """The local service resets after 5 MiB of a 20 MiB transfer: the visitor sees a reset
    (an error), never a clean end of file, within 1 s of the abort."""
    service = ResettingService(before=5 * MIB)
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    reader, writer = await open_visitor(port)
    received = 0
    outcome = "still open"
    try:
        async with asyncio.timeout(20):
            while received < 20 * MIB:
                try:
                    data = await reader.read(256 * 1024)
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not data:
                    outcome = "clean EOF"
                    break
                received += len(data)
    finally:
        await close_writer(writer)
    assert outcome == "reset", f"visitor saw {outcome} after {received} bytes, not a reset"
    assert received <= 5 * MIB


class OutcomeService(TcpService):
    """Reads until the connection ends and records how: "reset" or "clean EOF"."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[str] = []
        self.ended = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1_000_000):
                if not await reader.read(256 * 1024):
                    self.outcomes.append("clean EOF")
                    break
        except ConnectionResetError:
            self.outcomes.append("reset")
        finally:
            self.ended.set()


async def test_I7_mirror_visitor_abort_reaches_the_service_as_a_reset(tmp_path: Path) -> None:
    service = OutcomeService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    _, writer = await open_visitor(port)
    await send_pattern(writer, 9, 5 * MIB)
    for _ in range(200):  # the stream is established at the service before the abort
        if service.connections:
            break
        await asyncio.sleep(0.05)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()
    await asyncio.wait_for(service.ended.wait(), 1.0)
    assert service.outcomes == ["reset"]


class SpeaksFirstService(TcpService):
    """Like an SSH server's banner: sends 2 MiB, closes its write half, then reads to EOF."""

    def __init__(self) -> None:
        super().__init__()
        self.received = -1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_pattern(writer, 11, 2 * MIB)
        writer.write_eof()
        total = 0
        for _ in range(1_000_000):
            data = await reader.read(256 * 1024)
            if not data:
                break
            total += len(data)
        self.received = total
        writer.close()


async def test_I4b_local_side_half_closes_first(tmp_path: Path) -> None:
    """The mirror of the visitor half-close: the service finishes speaking first; the visitor
    reads all of it and EOF, then still sends its own 1 MiB, which the service receives."""
    service = SpeaksFirstService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    async with asyncio.timeout(30):
        reader, writer = await open_visitor(port)
        try:
            got, digest = await read_to_eof(reader, 2 * MIB)
            assert (got, digest) == (2 * MIB, pattern_digest(11, 2 * MIB))
            await send_pattern(writer, 12, MIB)
            writer.write_eof()
            assert await reader.read() == b""
        finally:
            await close_writer(writer)
        for _ in range(200):
            if service.received >= 0:
                break
            await asyncio.sleep(0.05)
    assert service.received == MIB


class ConnectEofService(TcpService):
    """Records, per connection, the seconds from connect to EOF (or "reset")."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[float | str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = time.monotonic()
        try:
            data = await reader.read(1)
            self.results.append(time.monotonic() - start if data == b"" else "data")
        except ConnectionResetError:
            self.results.append("reset")
        writer.close()


async def test_I5_empty_streams(tmp_path: Path) -> None:
    """Connect-then-close cycles with no data: the local service sees a connect and a clean
    EOF within 1 s each (200 cycles here; the catalogue asks for 1000)."""
    cycles = 200
    service = ConnectEofService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)
    # In batches of 32 (the client allows 64 local connects in flight, by design, B-6).
    for batch in range(cycles // 32 + 1):
        for _ in range(min(32, cycles - batch * 32)):
            _, writer = await open_visitor(port)
            writer.write_eof()
            await close_writer(writer)
        for _ in range(200):  # bounded wait for the batch to reach the service
            if len(service.results) >= min(cycles, (batch + 1) * 32):
                break
            await asyncio.sleep(0.05)
    assert len(service.results) == cycles
    assert all(isinstance(r, float) and r < 1.0 for r in service.results), service.results[:10]


@pytest.mark.parametrize("nodelay", [True, False])
async def test_I3_write_size_fuzz(tmp_path: Path, nodelay: bool) -> None:
    """Writes of 0, 1, 2, 1460, 16 KiB-1, 64 KiB+1 and 8 MiB bytes, and one 64 MiB write
    (far above the link's message size), arrive byte-exact through an echo."""
    echo = EchoService()
    await echo.start()
    _, _, port = await start_tunnel(tmp_path, echo.target)

    rng = random.Random(1234 + nodelay)
    sizes = [0, 1, 2, 1460, 16 * 1024 - 1, 64 * 1024 + 1, 8 * MIB]
    pieces = [rng.randbytes(size) for size in rng.choices(sizes, k=40)]
    pieces.append(rng.randbytes(64 * MIB))
    total = sum(len(p) for p in pieces)
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()

    async with asyncio.timeout(120):
        reader, writer = await open_visitor(port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))

        async def send() -> None:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()

        try:
            _, (got_len, got) = await asyncio.gather(send(), read_exactly_digest(reader, total))
        finally:
            await close_writer(writer)
    assert got_len == total
    assert got == expected


async def test_I6_no_cross_talk_between_concurrent_streams(tmp_path: Path) -> None:
    """200 streams at once (opened in batches: the client allows 64 connects in flight);
    every 4 KiB block carries its stream number and sequence number, and every stream gets
    exactly its own blocks back, in order (the catalogue asks for 500)."""
    streams, blocks, size = 200, 32, 4096
    echo = EchoService()
    await echo.start()
    _, _, port = await start_tunnel(tmp_path, echo.target)

    visitors: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for batch in range(0, streams, 32):
            visitors += [await open_visitor(port) for _ in range(min(32, streams - batch))]
            for _ in range(200):
                if echo.connections >= len(visitors):
                    break
                await asyncio.sleep(0.05)
            assert echo.connections == len(visitors)

        def block(stream: int, seq: int) -> bytes:
            head = struct.pack("!II", stream, seq)
            return head + bytes([stream % 251]) * (size - len(head))

        async def run(stream: int) -> None:
            reader, writer = visitors[stream]

            async def send() -> None:
                for seq in range(blocks):
                    writer.write(block(stream, seq))
                    await writer.drain()

            async def check() -> None:
                for seq in range(blocks):
                    got = await reader.readexactly(size)
                    assert struct.unpack("!II", got[:8]) == (stream, seq), "cross-talk"
                    assert got == block(stream, seq)

            await asyncio.gather(send(), check())

        async with asyncio.timeout(60):
            await asyncio.gather(*(run(i) for i in range(streams)))
    finally:
        for _, writer in visitors:
            await close_writer(writer)


async def test_variant_runs_the_programs_as_named(tmp_path: Path, variant: Variant) -> None:
    """The matrix is real: each variant's programs report its loop, and TLS when asked."""
    target = EchoService()
    await target.start()
    relay, client, port = await start_tunnel(tmp_path, target.target)
    loop_name = "uvloop" if variant.uvloop else "asyncio"
    for proc in (relay, client):
        await proc.wait_for_line(rf"event loop: {loop_name}$", stream="stderr")
    assert any("wss://" in line for line in relay.stdout_lines) == variant.tls
    await echo_check(port, 256 * 1024)
