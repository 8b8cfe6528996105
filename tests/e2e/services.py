"""TCP services and visitors that run inside the test process, on 127.0.0.1 only.

Everything that crosses a tunnel is deterministic pseudo-random data checked with SHA-256 on
both ends. Producing ~1 GiB per test must stay cheap for the test process, so a stream is a
sequence of zero-copy slices of one cached random block, each slice starting at an offset
drawn from ``random.Random(seed)``: different seeds give different streams, every chunk of
a stream differs from its neighbours, and nothing is regenerated per byte.

Services register themselves in :data:`STARTED`; the e2e conftest closes them at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import random
import struct
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "CHUNK",
    "STARTED",
    "STREAM_LIMIT",
    "DuplexDigestService",
    "DuplexResult",
    "EchoService",
    "HalfCloseService",
    "ReplyResult",
    "TcpService",
    "assert_closed_quickly",
    "both",
    "close_writer",
    "echo_check",
    "open_visitor",
    "pattern_chunks",
    "pattern_digest",
    "read_to_eof",
    "send_pattern",
]

_A = TypeVar("_A")
_B = TypeVar("_B")

MIB = 1024 * 1024
CHUNK = 256 * 1024
STREAM_LIMIT = 4 * MIB  # StreamReader buffer limit: keeps the test process off the hot path
_BASE_LEN = 4 * MIB
_HEADER = struct.Struct("!QQQ")  # connection id, bytes visitor -> service, bytes service -> visitor


@functools.cache
def _doubled_base() -> bytes:
    block = random.Random(0x7E57_DA7A).randbytes(_BASE_LEN)
    return block + block  # any slice [off, off + CHUNK) with off < _BASE_LEN is contiguous


def pattern_chunks(seed: int, size: int, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The deterministic stream ``seed`` of ``size`` bytes, as zero-copy chunks."""
    if not 0 < chunk <= _BASE_LEN:
        raise ValueError(f"chunk size {chunk} out of range")
    rng = random.Random(seed)
    view = memoryview(_doubled_base())
    remaining = size
    for _ in range(size // chunk + 1):
        if remaining <= 0:
            return
        n = min(chunk, remaining)
        off = rng.randrange(_BASE_LEN)
        yield view[off : off + n]
        remaining -= n


def pattern_digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_chunks(seed, size):
        h.update(piece)
    return h.hexdigest()


async def send_pattern(writer: asyncio.StreamWriter, seed: int, size: int) -> str:
    """Write stream ``seed`` with flow control; return the SHA-256 of what was written."""
    h = hashlib.sha256()
    for piece in pattern_chunks(seed, size):
        h.update(piece)
        writer.write(piece)
        await writer.drain()
    return h.hexdigest()


async def read_to_eof(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, str]:
    """Read until EOF (at most ``max_bytes`` + 1 bytes); return (length, SHA-256)."""
    h = hashlib.sha256()
    total = 0
    for _ in range(max_bytes // 1024 + 2):  # every read returns >= 1 byte until EOF
        data = await reader.read(CHUNK)
        if not data:
            return total, h.hexdigest()
        total += len(data)
        h.update(data)
        if total > max_bytes:
            raise AssertionError(f"received more than the {max_bytes} bytes expected")
    raise AssertionError("read loop bound exhausted before EOF")


async def read_exactly_digest(reader: asyncio.StreamReader, size: int) -> tuple[int, str]:
    """Read ``size`` bytes (fewer if EOF comes first); return (length, SHA-256)."""
    h = hashlib.sha256()
    total = 0
    for _ in range(size // 1024 + 2):
        if total >= size:
            break
        data = await reader.read(min(CHUNK, size - total))
        if not data:
            break
        total += len(data)
        h.update(data)
    return total, h.hexdigest()


async def both(first: Coroutine[Any, Any, _A], second: Coroutine[Any, Any, _B]) -> tuple[_A, _B]:
    """Run two coroutines concurrently; if one fails the other is cancelled (no strays)."""
    async with asyncio.TaskGroup() as group:
        task_a = group.create_task(first)
        task_b = group.create_task(second)
    return task_a.result(), task_b.result()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def open_visitor(
    port: int, timeout: float = 10.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, limit=STREAM_LIMIT), timeout
    )


STARTED: list[TcpService] = []


class TcpService:
    """A listener on 127.0.0.1 whose connections run :meth:`handle`; counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.errors: list[BaseException] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    @property
    def target(self) -> str:
        """``HOST:PORT`` as the client prints it for this service."""
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(
            self._on_connection, "127.0.0.1", port, limit=STREAM_LIMIT
        )
        STARTED.append(self)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except Exception as exc:  # recorded; tests assert on results, not on luck
            self.errors.append(exc)
        finally:
            if task is not None:
                self._tasks.discard(task)
            await close_writer(writer)

    async def close(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()


class EchoService(TcpService):
    """Writes back every byte it reads; on EOF it half-closes and closes."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(1 << 20):  # 1 Mi reads of up to CHUNK bytes: far beyond any test
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            with contextlib.suppress(OSError):
                writer.write_eof()


@dataclass
class DuplexResult:
    received_len: int
    received_digest: str
    sent_digest: str


class DuplexDigestService(TcpService):
    """Per connection: read a header, then concurrently hash the upload and send the reply.

    The visitor sends ``_HEADER`` (connection id, upload size, reply size) followed by the
    upload. The service reads exactly the announced upload (so this service does not depend
    on half-close; that has its own test) while writing ``reply size`` bytes of stream
    ``reply_seed(id)``, records both digests, then closes the connection.
    """

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[int, DuplexResult] = {}

    @staticmethod
    def upload_seed(conn_id: int) -> int:
        return 2 * conn_id

    @staticmethod
    def reply_seed(conn_id: int) -> int:
        return 2 * conn_id + 1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id, upload, reply = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        received, sent = await both(
            read_exactly_digest(reader, upload),
            send_pattern(writer, self.reply_seed(conn_id), reply),
        )
        self.results[conn_id] = DuplexResult(received[0], received[1], sent)

    @staticmethod
    async def visit(port: int, conn_id: int, upload: int, reply: int) -> tuple[str, int, str]:
        """Run one visitor; return (sent digest, received length, received digest)."""
        reader, writer = await open_visitor(port)
        try:
            writer.write(_HEADER.pack(conn_id, upload, reply))
            sent, (got_len, got_digest) = await both(
                send_pattern(writer, DuplexDigestService.upload_seed(conn_id), upload),
                read_to_eof(reader, reply),
            )
        finally:
            await close_writer(writer)
        return sent, got_len, got_digest


@dataclass
class ReplyResult:
    received_len: int
    received_digest: str
    sent_digest: str


class HalfCloseService(TcpService):
    """Reads everything to EOF, then sends ``reply_size`` bytes of ``reply_seed`` and closes."""

    def __init__(self, reply_size: int, reply_seed: int, max_upload: int = 256 * MIB) -> None:
        super().__init__()
        self.reply_size = reply_size
        self.reply_seed = reply_seed
        self.max_upload = max_upload
        self.results: list[ReplyResult] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got_len, got_digest = await read_to_eof(reader, self.max_upload)
        sent = await send_pattern(writer, self.reply_seed, self.reply_size)
        self.results.append(ReplyResult(got_len, got_digest, sent))


async def echo_check(port: int, size: int = MIB, seed: int = 1, timeout: float = 30.0) -> None:
    """Send ``size`` bytes through ``port`` to an echo service; the echo must hash the same.

    Reads exactly ``size`` bytes back rather than relying on half-close.
    """
    async with asyncio.timeout(timeout):
        reader, writer = await open_visitor(port)
        try:
            sent, (got_len, got_digest) = await both(
                send_pattern(writer, seed, size), read_exactly_digest(reader, size)
            )
        finally:
            await close_writer(writer)
    assert got_len == size, f"echo via port {port}: got {got_len} of {size} bytes"
    assert got_digest == sent, f"echo via port {port}: SHA-256 mismatch"


async def assert_closed_quickly(port: int, within: float = 1.0) -> str:
    """A visitor to ``port`` must be refused, reset or get EOF within ``within`` seconds.

    Returns how it ended: ``"refused"``, ``"reset"`` or ``"eof"``. Receiving any byte fails.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout=within
        )
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:  # accepted and reset before the connect call returned
        return "reset"
    start = time.monotonic()
    try:
        try:
            writer.write(b"probe\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(65536), timeout=within)
        except TimeoutError:
            raise AssertionError(
                f"visitor to port {port} was neither closed nor reset within {within} s"
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            return "reset"
        elapsed = time.monotonic() - start
        assert data == b"", f"visitor to port {port} unexpectedly received {data[:64]!r}"
        assert elapsed <= within, f"visitor to port {port} closed only after {elapsed:.2f} s"
        return "eof"
    finally:
        await close_writer(writer)
