"""The client's dialer: a burst beyond the 64 connects in flight is queued, not refused.

A real link runs in-process: two :class:`Link` ends over a websockets connection on
127.0.0.1, the relay end opening one stream per visitor of a small listener (as the relay's
public ports do), the client end handing OPENs to the :class:`Dialer` under test, which
connects to real local services. No part of the dialer or the link is faked; only the
dialer's clock is injected where a test must move time past a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tunnel.client.dialer import DIAL_TIMEOUT, MAX_PENDING_DIALS, Dialer
from tunnel.client.expose import ExposeSpec
from tunnel.common.aio.link import Link, StreamSocket
from tunnel.common.proto.mux import Mux, Role

BOUND = 200  # iterations of any polling loop (x 20 ms)


class _Visitor(StreamSocket):
    """Relay side of a visitor: opens a stream on the relay's link as it connects."""

    def __init__(self, link: Link, tunnel_id: int) -> None:
        super().__init__()
        self._relay_link = link
        self._tunnel_id = tunnel_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        link = self._relay_link
        stream_id = link.mux.open_stream(self._tunnel_id, "127.0.0.1:1")
        self.attach(link, stream_id)
        link.kick()
        super().connection_made(transport)


@dataclass
class _Pair:
    relay: Link
    client: Link
    dialer: Dialer
    ports: dict[int, int] = field(default_factory=dict)  # tunnel id -> public port
    max_in_flight_seen: int = 0


class _CountingServer:
    """A local service that echoes and records how many connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        with contextlib.suppress(OSError):
            for _ in range(1000):
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()


@contextlib.contextmanager
def _swallowing_listener() -> Iterator[int]:
    """A port whose accept queue is full and never drained: further SYNs are dropped, so a
    connect to it hangs (like a target behind a firewall that swallows SYNs)."""
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler.connect(("127.0.0.1", port))  # fills the one-entry accept queue
        yield port


def _spec(port: int) -> ExposeSpec:
    return ExposeSpec("127.0.0.1", port, "auto", None)


@contextlib.asynccontextmanager
async def _link_pair(targets: dict[int, int], *, max_in_flight: int = MAX_PENDING_DIALS,
                     timeout: float = DIAL_TIMEOUT, max_streams: int = 512,
                     clock: Callable[[], float] | None = None) -> AsyncIterator[_Pair]:
    """A relay link and a client link with a dialer for ``targets`` (tunnel id -> port)."""
    relay_ready: asyncio.Future[Link] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        link = Link(ws, Mux(Role.RELAY, max_streams=max_streams), name="relay",
                    logger=_logger(), heartbeat_interval=1.0, heartbeat_timeout=30.0)
        relay_ready.set_result(link)
        runner = asyncio.create_task(link.run())
        await done.wait()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner

    dialer_kwargs: dict[str, object] = {"max_in_flight": max_in_flight, "timeout": timeout}
    if clock is not None:
        dialer_kwargs["clock"] = clock
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
            client = Link(ws, Mux(Role.CLIENT, max_streams=max_streams), name="alpha",
                          logger=_logger(), heartbeat_interval=1.0, heartbeat_timeout=30.0)
            dialer = Dialer({tid: _spec(p) for tid, p in targets.items()},
                            **dialer_kwargs)  # type: ignore[arg-type]
            pair = _Pair(await relay_ready, client, dialer)
            _watch_in_flight(pair)
            client.on_open = dialer.on_open
            client_runner = asyncio.create_task(client.run())
            publics = []
            for tid in targets:
                public = await asyncio.get_running_loop().create_server(
                    functools.partial(_Visitor, pair.relay, tid), "127.0.0.1", 0)
                publics.append(public)
                pair.ports[tid] = int(public.sockets[0].getsockname()[1])
            try:
                yield pair
            finally:
                await dialer.aclose()
                for public in publics:
                    public.close()
                done.set()
                client_runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client_runner


def _logger() -> logging.Logger:
    return logging.getLogger("tests.integration.dialer")


def _watch_in_flight(pair: _Pair) -> None:
    """Record the most connects the dialer ever had in flight (checked on every start)."""
    dialer = pair.dialer
    start = dialer._start

    def recording_start(pending: object) -> None:
        start(pending)  # type: ignore[arg-type]
        pair.max_in_flight_seen = max(pair.max_in_flight_seen, dialer.in_flight)

    dialer._start = recording_start  # type: ignore[method-assign]


async def _echo_once(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        return await reader.readexactly(len(payload))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a visitor with RST (SO_LINGER 0): it leaves, rather than half-closing."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _outcome(reader: asyncio.StreamReader) -> str:
    try:
        data = await reader.read(1)
    except ConnectionResetError:
        return "reset"
    return "eof" if not data else "data"


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(BOUND):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not reached within {BOUND * 0.02:.0f} s: {what}")


# ----------------------------------------------------------------------------- tests


@pytest.fixture
async def service() -> AsyncIterator[_CountingServer]:
    server = _CountingServer()
    yield server
    await server.close()


async def test_burst_beyond_the_dial_limit_is_queued_and_served(service: _CountingServer) -> None:
    """200 visitors at once, 64 connects in flight at most: every one is echoed."""
    port = await service.start()
    async with _link_pair({0: port}) as pair:
        results = await asyncio.wait_for(asyncio.gather(
            *(_echo_once(pair.ports[0], f"visitor {i:04d}".encode()) for i in range(200))), 30)
    assert results == [f"visitor {i:04d}".encode() for i in range(200)]
    assert service.accepted == 200
    assert pair.max_in_flight_seen == MAX_PENDING_DIALS  # the limit was reached, not passed


async def test_small_limit_serves_streams_in_arrival_order(service: _CountingServer) -> None:
    port = await service.start()
    async with _link_pair({0: port}, max_in_flight=2) as pair:
        results = await asyncio.wait_for(asyncio.gather(
            *(_echo_once(pair.ports[0], bytes([i]) * 100) for i in range(20))), 30)
        assert pair.dialer.queued == 0 and pair.dialer.in_flight == 0
    assert results == [bytes([i]) * 100 for i in range(20)]
    assert pair.max_in_flight_seen == 2


async def test_deadline_counts_from_arrival_so_queued_streams_are_not_held_longer() -> None:
    """Against a target that swallows SYNs, 8 streams with 2 connects in flight are all
    reset about one timeout after they arrived, not four timeouts later."""
    timeout = 1.0
    with _swallowing_listener() as port:
        async with _link_pair({0: port}, max_in_flight=2, timeout=timeout) as pair:
            loop = asyncio.get_running_loop()
            started = loop.time()
            visitors = [await asyncio.open_connection("127.0.0.1", pair.ports[0])
                        for _ in range(8)]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(_outcome(reader) for reader, _ in visitors)), 10)
            elapsed = loop.time() - started
            for _, writer in visitors:
                _abort(writer)
            await _until(lambda: len(pair.client.mux) == 0, "all streams freed")
    assert outcomes == ["reset"] * 8
    # From the start of each dial the last pair would end near 4 s; from arrival near 1 s.
    assert elapsed < 2.5 * timeout, f"queued streams took {elapsed:.2f} s to be reset"


async def test_queued_stream_past_its_deadline_is_reset_without_dialing(
        service: _CountingServer) -> None:
    now = [0.0]
    good = await service.start()
    with _swallowing_listener() as stuck:
        async with _link_pair({0: stuck, 1: good}, max_in_flight=1, timeout=0.5,
                              clock=lambda: now[0]) as pair:
            _, blocker = await asyncio.open_connection("127.0.0.1", pair.ports[0])
            await _until(lambda: pair.dialer.in_flight == 1, "the first dial hangs")
            reader, writer = await asyncio.open_connection("127.0.0.1", pair.ports[1])
            await _until(lambda: pair.dialer.queued == 1, "the second stream is queued")
            now[0] = 10.0  # its deadline (0.5 on the dialer's clock) passes while it waits
            outcome = await asyncio.wait_for(_outcome(reader), 10)
            for w in (blocker, writer):
                _abort(w)
    assert outcome == "reset"
    assert service.accepted == 0


async def test_visitor_that_leaves_while_queued_is_never_dialed(service: _CountingServer) -> None:
    """A queued stream counts against N while it waits, and is skipped once reset."""
    good = await service.start()
    with _swallowing_listener() as stuck:
        async with _link_pair({0: stuck, 1: good}, max_in_flight=1, timeout=1.0) as pair:
            _, blocker = await asyncio.open_connection("127.0.0.1", pair.ports[0])
            await _until(lambda: pair.dialer.in_flight == 1, "the first dial hangs")
            _, leaver = await asyncio.open_connection("127.0.0.1", pair.ports[1])
            await _until(lambda: pair.dialer.queued == 1, "the second stream is queued")
            assert len(pair.client.mux) == 2  # the queued stream holds its slot against N
            _abort(leaver)
            await _until(lambda: len(pair.client.mux) == 1, "the reset reaches the client")
            await _until(lambda: pair.dialer.in_flight == 0, "the hanging dial times out")
            _abort(blocker)
            await _until(lambda: len(pair.client.mux) == 0, "all streams freed")
    assert service.accepted == 0
    assert pair.dialer.queued == 0


async def test_queue_holds_at_most_the_link_stream_limit() -> None:
    """OPENs beyond the client's N are refused by its multiplexer before they reach the
    queue: 8 visitors against N = 4 leave 1 dial in flight, 3 queued, 4 reset."""
    limit = 4
    with _swallowing_listener() as stuck:
        async with _link_pair({0: stuck}, max_in_flight=1, timeout=5.0,
                              max_streams=2 * limit) as pair:
            pair.client.mux.max_streams = limit
            visitors = [await asyncio.open_connection("127.0.0.1", pair.ports[0])
                        for _ in range(2 * limit)]
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(_outcome(reader) for reader, _ in visitors[limit:])), 10)
            assert outcomes == ["reset"] * limit
            assert (pair.dialer.in_flight, pair.dialer.queued) == (1, limit - 1)
            assert len(pair.client.mux) == limit
            for _, writer in visitors:
                _abort(writer)
            await _until(lambda: len(pair.client.mux) == 0, "all streams freed")


async def test_queue_drops_entries_of_streams_reset_while_waiting() -> None:
    """Entries of queued streams that were reset are purged once the queue reaches N, so
    visitors that come and go while the target hangs cannot grow it without bound."""
    limit = 3
    with _swallowing_listener() as stuck:
        async with _link_pair({0: stuck}, max_in_flight=1, timeout=5.0,
                              max_streams=4 * limit) as pair:
            pair.client.mux.max_streams = limit
            port = pair.ports[0]
            first = [await asyncio.open_connection("127.0.0.1", port) for _ in range(limit)]
            await _until(lambda: pair.dialer.queued == limit - 1, "N - 1 queued")
            for _, writer in first[1:]:
                _abort(writer)  # the queued visitors leave; their entries stay queued
            await _until(lambda: len(pair.client.mux) == 1, "their streams freed")
            later = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await _until(lambda: len(pair.client.mux) == limit, "two more streams open")
            assert pair.dialer.queued == 2  # only the two live ones: the rest was purged
            for _, writer in [first[0], *later]:
                _abort(writer)
            await _until(lambda: len(pair.client.mux) == 0, "all streams freed")


async def _silent_visitor(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_silent_streams_keep_their_slot_until_the_local_socket_closes(
        service: _CountingServer) -> None:
    """B-6's visitors connect and reset without a byte: each keeps its slot until its local
    socket is closed, so the service never holds more connections than there are slots."""
    port = await service.start()
    async with _link_pair({0: port}, max_in_flight=2) as pair:
        pair.dialer.silent_hold = 30.0  # longer than the test: only a close frees a slot
        visitors = [await _silent_visitor(pair.ports[0]) for _ in range(4)]
        await _until(lambda: pair.dialer.queued == 2, "two streams queued behind two slots")
        await _until(lambda: service.accepted == 2, "two connections reach the service")
        assert pair.dialer.in_flight == 2
        _abort(visitors[0][1])
        await _until(lambda: service.accepted == 3, "the freed slot dials the next stream")
        assert (pair.dialer.in_flight, pair.dialer.queued) == (2, 1)
        for _, writer in visitors[1:]:
            _abort(writer)
        await _until(lambda: len(pair.client.mux) == 0, "all streams freed")
    assert service.accepted == 3  # the last queued visitor left before it was dialed


async def test_first_byte_from_the_visitor_frees_the_slot(service: _CountingServer) -> None:
    port = await service.start()
    async with _link_pair({0: port}, max_in_flight=1) as pair:
        pair.dialer.silent_hold = 30.0
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.ports[0])
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        assert pair.dialer.in_flight == 0  # still connected, but no longer holding a slot
        silent = [await _silent_visitor(pair.ports[0]) for _ in range(2)]
        await _until(lambda: service.accepted == 2 and pair.dialer.queued == 1,
                     "the next silent stream dialed, the one after it queued")
        for _, w in [(reader, writer), *silent]:
            _abort(w)
        await _until(lambda: len(pair.client.mux) == 0, "all streams freed")


async def test_silent_stream_gives_its_slot_back_after_the_hold(
        service: _CountingServer) -> None:
    """A silent visitor (a browser's speculative connection) blocks the port for at most
    ``silent_hold``: the queued stream is dialed while the first one is still open."""
    port = await service.start()
    async with _link_pair({0: port}, max_in_flight=1) as pair:
        pair.dialer.silent_hold = 0.2
        first = await _silent_visitor(pair.ports[0])
        await _until(lambda: service.accepted == 1, "the first silent stream is dialed")
        second = await _silent_visitor(pair.ports[0])
        await _until(lambda: service.accepted == 2, "the second dialed after the hold")
        assert len(pair.client.mux) == 2  # the first is still open: only the hold ended
        for _, w in (first, second):
            _abort(w)
        await _until(lambda: len(pair.client.mux) == 0, "all streams freed")


async def test_bytes_before_the_connect_do_not_free_the_slot_early() -> None:
    """A visitor that speaks at once while its connect hangs still holds the slot: bytes
    that arrive before the connect wait in the stream and cannot start another dial."""
    with _swallowing_listener() as stuck:
        async with _link_pair({0: stuck}, max_in_flight=1, timeout=5.0) as pair:
            _, eager = await asyncio.open_connection("127.0.0.1", pair.ports[0])
            eager.write(b"GET / HTTP/1.1\r\n\r\n")
            await _until(lambda: pair.dialer.in_flight == 1, "the first dial hangs")
            _, second = await _silent_visitor(pair.ports[0])
            await _until(lambda: len(pair.client.mux) == 2, "the second stream reaches the client")
            assert (pair.dialer.in_flight, pair.dialer.queued) == (1, 1)
            for w in (eager, second):
                _abort(w)
            await _until(lambda: len(pair.client.mux) == 0, "all streams freed")
