"""The public ports' own accept loop (``tunnel.server.acceptor``), on both event loops: it
polls the listening socket itself, so these check what ``create_server`` gave for free
(every connection reaches the program, close stops accepting, EMFILE pauses and resumes)
and what it did not (a bounded number of accepts per loop turn, a refusal before any
transport exists)."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import pytest

from tunnel.common.aio.runtime import RateLimitedLogger
from tunnel.server.acceptor import Acceptor, bind_listening, log

LOCAL = "127.0.0.1"


def _port(acceptor: Acceptor) -> int:
    port: int = acceptor.sockets[0].getsockname()[1]
    return port


async def _listen(on_accept: object, **kwargs: float) -> Acceptor:
    socks = await bind_listening(LOCAL, 0, 64)
    return Acceptor(socks, on_accept, **kwargs)  # type: ignore[arg-type]


def _connect(port: int) -> socket.socket:
    """A blocking connect: the kernel completes it from the backlog, without our loop."""
    return socket.create_connection((LOCAL, port), timeout=5)


async def test_each_connection_reaches_the_callback_with_its_peer() -> None:
    got: asyncio.Queue[tuple[socket.socket, tuple[str, int]]] = asyncio.Queue()
    acceptor = await _listen(lambda conn, peer: got.put_nowait((conn, peer)))
    try:
        visitor = _connect(_port(acceptor))
        conn, peer = await asyncio.wait_for(got.get(), 5)
        assert peer == visitor.getsockname()
        assert conn.getblocking() is False  # the loop's transports need it so
        conn.sendall(b"hello")
        assert visitor.recv(5) == b"hello"
        conn.close()
        visitor.close()
    finally:
        acceptor.close()


async def test_a_turn_accepts_at_most_per_turn_connections() -> None:
    """Ten queued connections, three per turn: when a callback scheduled by the first accept
    runs (the next turn, before the listener is polled again), exactly three were taken."""
    loop = asyncio.get_running_loop()
    accepted: list[socket.socket] = []
    first_turn: asyncio.Future[int] = loop.create_future()
    all_taken = asyncio.Event()

    def on_accept(conn: socket.socket, peer: tuple[str, int]) -> None:
        accepted.append(conn)
        if len(accepted) == 1:
            loop.call_soon(lambda: first_turn.set_result(len(accepted)))
        if len(accepted) == 10:
            all_taken.set()

    socks = await bind_listening(LOCAL, 0, 64)
    visitors = [socket.create_connection((LOCAL, socks[0].getsockname()[1]), timeout=5)
                for _ in range(10)]  # all queued before the loop polls the listener
    acceptor = Acceptor(socks, on_accept, per_turn=3)
    try:
        assert await asyncio.wait_for(first_turn, 5) == 3
        await asyncio.wait_for(all_taken.wait(), 5)  # and the rest in later turns
    finally:
        acceptor.close()
        for sock in accepted + visitors:
            sock.close()


async def test_after_close_the_port_refuses_and_is_free_again() -> None:
    acceptor = await _listen(lambda conn, peer: conn.close())
    port = _port(acceptor)
    acceptor.close()
    acceptor.close()  # idempotent
    assert not acceptor.is_serving()
    with pytest.raises(ConnectionRefusedError):
        _connect(port)
    again = await bind_listening(LOCAL, port, 64)  # nothing of ours holds it
    for sock in again:
        sock.close()


async def test_binding_a_taken_port_names_the_address_and_binds_nothing() -> None:
    holder = await bind_listening(LOCAL, 0, 8)
    port = holder[0].getsockname()[1]
    try:
        with pytest.raises(OSError, match=rf"127\.0\.0\.1', {port}") as caught:
            await bind_listening(LOCAL, port, 8)
        assert caught.value.errno == errno.EADDRINUSE
    finally:
        for sock in holder:
            sock.close()


class _OutOfFiles(socket.socket):
    """A listening socket whose first ``accept()`` fails as it does at RLIMIT_NOFILE."""

    failures = 0

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.failures < 2:
            self.failures += 1
            raise OSError(errno.EMFILE, "Too many open files")
        conn, peer = super().accept()
        return conn, peer


async def test_out_of_files_pauses_with_one_warning_then_resumes(
        caplog: pytest.LogCaptureFixture) -> None:
    """The queued connection is not lost: accepting pauses (polling at once would spin on
    the same readiness), warns once per interval, and takes it after the retry delay."""
    listener = _OutOfFiles(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOCAL, 0))
    listener.listen(8)
    listener.setblocking(False)
    got: asyncio.Queue[socket.socket] = asyncio.Queue()
    warn = RateLimitedLogger(log, 10.0)  # its own: the interval is per logger and key
    acceptor = Acceptor([listener], lambda conn, peer: got.put_nowait(conn), retry_delay=0.05,
                        warn=warn)
    visitor = _connect(listener.getsockname()[1])
    try:
        with caplog.at_level(logging.WARNING, logger="tunnel.server.acceptor"):
            conn = await asyncio.wait_for(got.get(), 5)
        conn.close()
        assert listener.failures == 2
        warnings = [r.getMessage() for r in caplog.records if "cannot accept" in r.getMessage()]
        assert len(warnings) == 1, warnings  # the second failure falls in the interval
        assert "Too many open files" in warnings[0]
    finally:
        acceptor.close()
        visitor.close()
