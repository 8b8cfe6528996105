"""An asyncio "toxiproxy" on 127.0.0.1 for link-fault tests (docs/reliability.md section 3).

:class:`FaultProxy` forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``. Toxics can be
switched on and off at runtime, per direction where that matters (``UP`` is client ->
target, ``DOWN`` is target -> client, ``BOTH`` the default):

- ``latency(ms, jitter)``: every chunk is held back that long (order is kept);
- ``bandwidth(bytes_per_s)``: a token bucket per connection and direction;
- ``slicer(avg, var, delay)``: data is written in small segments of avg +- var bytes;
- ``limit_data(n)``: a connection is closed once n bytes went that way;
- ``reset_peer()``: every open connection is closed with SO_LINGER 0 on both sides (RST);
- ``blackhole()``: open connections stop forwarding but keep their sockets, which is what a
  dead NAT mapping or a pulled cable looks like to both ends (frp's ``halfopen.go``);
  connections made afterwards are forwarded normally, so a client that reconnects gets in;
- ``idle_kill(seconds)``: connections that carried nothing for that long are reset, like a
  middlebox with an idle timeout;
- ``record`` / ``replay``: the client -> target bytes of every connection are kept
  (:attr:`Connection.recorded`, bounded); :meth:`FaultProxy.replay` sends them again on a
  new connection. TLS interception stays in ``tlsproxy.TlsMitm``.

No root needed; every socket and task is ended by :meth:`FaultProxy.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["BOTH", "DOWN", "UP", "Connection", "FaultProxy", "Toxics"]

UP = "up"
DOWN = "down"
BOTH = "both"
CHUNK = 64 * 1024
QUEUE_DEPTH = 16  # chunks held per direction while latency applies (keeps backpressure)
MAX_READS = 1 << 22  # per direction and connection: far beyond any test's traffic
RECORD_LIMIT = 16 * 1024 * 1024  # client -> target bytes kept per connection
LINK_CHUNK = 16 * 1024  # read size while a bandwidth toxic is on: a shallow "router" queue
LINK_BUFFER = 64 * 1024  # SO_RCVBUF of the proxy's sockets while a bandwidth toxic is on
IDLE_CHECK = 0.05  # how often idle connections are looked for (seconds)
REPLAY_READ_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass
class Toxics:
    """The toxics of one direction; read at every chunk, so changes apply at once."""

    latency: float = 0.0  # seconds
    jitter: float = 0.0  # seconds, uniform in [-jitter, +jitter]
    rate: float | None = None  # bytes per second
    slice_avg: int = 0  # 0: no slicing
    slice_var: int = 0
    slice_delay: float = 0.0  # seconds between segments
    limit: int | None = None  # bytes, then the connection closes

    def delay(self) -> float:
        if not self.latency and not self.jitter:
            return 0.0
        return max(0.0, self.latency + random.uniform(-self.jitter, self.jitter))

    def slices(self, data: bytes) -> Iterator[bytes]:
        if self.slice_avg <= 0:
            yield data
            return
        view = memoryview(data)
        for _ in range(len(data)):  # bounded: every segment is at least one byte
            if not view:
                return
            size = max(1, self.slice_avg + random.randint(-self.slice_var, self.slice_var))
            yield bytes(view[:size])
            view = view[size:]


class _Bucket:
    """A token bucket: ``take(n)`` returns once n bytes may pass at ``rate`` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1024.0, rate / 50)  # 20 ms worth of bytes
        self.tokens = self.burst
        self.stamp = asyncio.get_running_loop().time()

    async def take(self, size: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(1 << 20):  # bounded; each pass waits for the missing tokens
            now = loop.time()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= size:
                self.tokens -= size
                return
            await asyncio.sleep((size - self.tokens) / self.rate)

    def pieces(self, data: bytes) -> Iterator[bytes]:
        step = int(self.burst)
        for start in range(0, len(data), step):
            yield data[start:start + step]


@dataclass
class Connection:
    """One proxied connection: its two sockets, counters and the recorded upstream bytes."""

    index: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    last_activity: float
    frozen: bool = False
    closed: bool = False
    killed: bool = False  # by a toxic (idle_kill, reset_peer, limit_data)
    sent: dict[str, int] = field(default_factory=lambda: {UP: 0, DOWN: 0})
    recorded: bytearray = field(default_factory=bytearray)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def touch(self) -> None:
        self.last_activity = asyncio.get_running_loop().time()

    def reset(self) -> None:
        """Close both sockets with an RST."""
        self.killed = True
        for writer in (self.client, self.upstream):
            _abort_with_reset(writer)
        self.closed = True


def _abort_with_reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; see the module docstring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # accepted from clients
        self.idle_kills = 0
        self.toxics = {UP: Toxics(), DOWN: Toxics()}
        self.conns: list[Connection] = []
        self._idle_after: float | None = None
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._watcher = asyncio.create_task(self._watch_idle())
        return self.port

    # ------------------------------------------------------------ toxics

    def _directions(self, direction: str) -> list[Toxics]:
        if direction == BOTH:
            return [self.toxics[UP], self.toxics[DOWN]]
        return [self.toxics[direction]]

    def latency(self, ms: float, jitter: float = 0.0, direction: str = BOTH) -> None:
        for toxics in self._directions(direction):
            toxics.latency, toxics.jitter = ms / 1000, jitter / 1000

    def bandwidth(self, bytes_per_s: float | None, direction: str = BOTH) -> None:
        """Throttle like a slow link: a token bucket, and shallow buffers in front of it
        (small reads and receive buffers), so the proxy itself is not a deep queue that
        would add seconds of latency a real 20 Mbit/s hop does not have."""
        for toxics in self._directions(direction):
            toxics.rate = bytes_per_s
        for conn in self.conns:
            self._shallow(conn)

    def _shallow(self, conn: Connection) -> None:
        for direction, writer in ((UP, conn.client), (DOWN, conn.upstream)):
            sock = writer.get_extra_info("socket")
            if self.toxics[direction].rate is not None and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LINK_BUFFER)

    def slicer(self, avg: int, var: int = 0, delay: float = 0.0,
               direction: str = BOTH) -> None:
        for toxics in self._directions(direction):
            toxics.slice_avg, toxics.slice_var, toxics.slice_delay = avg, var, delay

    def limit_data(self, n: int | None, direction: str = BOTH) -> None:
        for toxics in self._directions(direction):
            toxics.limit = n

    def reset_peer(self) -> None:
        """Reset every open connection now (both ends get an RST)."""
        for conn in self.conns:
            if not conn.closed:
                conn.reset()

    def blackhole(self) -> None:
        """Freeze every connection open now; they stay open but carry nothing."""
        for conn in self.conns:
            conn.frozen = True

    def idle_kill(self, seconds: float | None) -> None:
        """Reset connections that carried nothing for ``seconds`` (None: off)."""
        self._idle_after = seconds

    def clear(self) -> None:
        """Remove every toxic (frozen connections stay frozen)."""
        self.toxics = {UP: Toxics(), DOWN: Toxics()}
        self._idle_after = None

    async def replay(self, index: int = 0, read_for: float = 1.0) -> bytes:
        """Send connection ``index``'s recorded upstream bytes on a new connection to the
        target; return what came back within ``read_for`` seconds (or until EOF)."""
        data = bytes(self.conns[index].recorded)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        received = bytearray()
        try:
            writer.write(data)
            await writer.drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + read_for
            with contextlib.suppress(TimeoutError, OSError):
                for _ in range(MAX_READS):
                    chunk = await asyncio.wait_for(reader.read(CHUNK),
                                                   max(0.0, deadline - loop.time()))
                    if not chunk:
                        break
                    received += chunk
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return bytes(received)

    # ------------------------------------------------------------ forwarding

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            await self._forward(reader, writer)
        finally:
            if handler is not None:
                self._handlers.discard(handler)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            _abort_with_reset(writer)
            return
        loop = asyncio.get_running_loop()
        conn = Connection(len(self.conns), writer, up_writer, loop.time())
        self.conns.append(conn)
        self._shallow(conn)
        conn.tasks = [asyncio.create_task(self._pump(conn, UP, reader, up_writer)),
                      asyncio.create_task(self._pump(conn, DOWN, up_reader, writer))]
        await asyncio.gather(*conn.tasks, return_exceptions=True)
        if not conn.frozen:
            conn.closed = True
            for end in (writer, up_writer):
                end.close()

    async def _pump(self, conn: Connection, direction: str, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Read one direction into a queue that :meth:`_deliver` writes out with toxics."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_DEPTH)
        deliver = asyncio.create_task(self._deliver(conn, direction, queue, writer))
        loop = asyncio.get_running_loop()
        due = 0.0
        try:
            with contextlib.suppress(OSError):
                for _ in range(MAX_READS):
                    if conn.frozen or deliver.done():
                        break
                    limited = self.toxics[direction].rate is not None
                    data = await reader.read(LINK_CHUNK if limited else CHUNK)
                    if conn.frozen or not data:
                        break
                    conn.touch()
                    if direction == UP and len(conn.recorded) < RECORD_LIMIT:
                        conn.recorded += data[:RECORD_LIMIT - len(conn.recorded)]
                    due = max(due, loop.time() + self.toxics[direction].delay())
                    await queue.put((due, data))
            if conn.frozen:
                await asyncio.Event().wait()  # keep the socket open, forward nothing
            await queue.put(None)
            await deliver
        finally:
            deliver.cancel()

    async def _deliver(self, conn: Connection, direction: str,
                       queue: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            for _ in range(MAX_READS):
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()  # pass a half-close on
                    return
                due, data = item
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not await self._write(conn, direction, data, writer):
                    return

    async def _write(self, conn: Connection, direction: str, data: bytes,
                     writer: asyncio.StreamWriter) -> bool:
        """Write ``data`` through the bandwidth, slicer and limit toxics; False: stop."""
        toxics = self.toxics[direction]
        for segment in toxics.slices(data):
            for piece in self._paced(conn, direction, toxics, segment):
                bucket = conn.buckets.get(direction)
                if bucket is not None:
                    await bucket.take(len(piece))
                if toxics.limit is not None:
                    piece = piece[:max(0, toxics.limit - conn.sent[direction])]
                if conn.frozen:
                    return False
                if piece:
                    writer.write(piece)
                    await writer.drain()
                    conn.sent[direction] += len(piece)
                    conn.touch()
                if toxics.limit is not None and conn.sent[direction] >= toxics.limit:
                    conn.killed = conn.closed = True
                    conn.client.close()
                    conn.upstream.close()
                    return False
            if toxics.slice_delay:
                await asyncio.sleep(toxics.slice_delay)
        return True

    @staticmethod
    def _paced(conn: Connection, direction: str, toxics: Toxics,
               data: bytes) -> Iterator[bytes]:
        """Split ``data`` into bucket-sized pieces when a bandwidth toxic is on."""
        if toxics.rate is None:
            conn.buckets.pop(direction, None)
            yield data
            return
        bucket = conn.buckets.get(direction)
        if bucket is None or bucket.rate != toxics.rate:
            bucket = conn.buckets[direction] = _Bucket(toxics.rate)
        yield from bucket.pieces(data)

    async def _watch_idle(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(IDLE_CHECK)
            limit = self._idle_after
            if limit is None:
                continue
            now = loop.time()
            for conn in self.conns:
                if not conn.closed and now - conn.last_activity >= limit:
                    self.idle_kills += 1
                    conn.reset()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._watcher is not None:
            self._watcher.cancel()
        for conn in self.conns:
            for task in conn.tasks:
                task.cancel()
            for writer in (conn.client, conn.upstream):
                writer.transport.abort()
        tasks = [t for conn in self.conns for t in conn.tasks]
        if self._watcher is not None:
            tasks.append(self._watcher)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._handlers:  # they end once their pumps did (cancelling them makes asyncio
            await asyncio.wait(list(self._handlers), timeout=5)  # log an error)
        if self._server is not None:
            await self._server.wait_closed()
