"""The target service every contender exposes, run in its own process.

``python -m bench.target`` listens on three loopback ports and prints one line
``bench-target: echo=P sink=P source=P`` once they accept:

- echo: sends back every byte it receives (asyncio, uvloop when importable);
- sink: reads a u64 size, then that many bytes (or to EOF when the size is 2**64-1), then
  replies with u64 byte count + SHA-256 of those bytes (a thread per connection, blocking
  sockets; hashlib releases the GIL);
- source: reads a 16-byte request (u64 size, u64 seed) and sends that many bytes of the
  deterministic pattern (bench/pattern.py), then closes (a thread per connection).

Runs until SIGTERM/SIGINT or until its stdin is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import sys
import threading
from typing import cast

from bench.pattern import HEADER, REPLY, REQUEST, TO_EOF, chunks

HOST = "127.0.0.1"
IO_TIMEOUT = 120.0  # seconds any single blocking socket call may take
MAX_BYTES = 64 << 30  # a sink or source connection never moves more than this
RECV_SIZE = 1 << 20


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once our writes are flushed


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(4096)
    return sock


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    for _ in range(n):
        if len(data) >= n:
            break
        part = conn.recv(n - len(data))
        if not part:
            break
        data += part
    return data


def _sink(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(IO_TIMEOUT)
        header = _recv_exact(conn, HEADER.size)
        if len(header) < HEADER.size:
            return
        (size,) = HEADER.unpack(header)
        left = min(size, MAX_BYTES)  # TO_EOF: read until EOF
        h = hashlib.sha256()
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        total = 0
        for _ in range(MAX_BYTES // 1024):  # bounded: ends at the size or EOF before this
            if left == 0:
                break
            n = conn.recv_into(view, min(left, RECV_SIZE))
            if n == 0:
                break
            h.update(view[:n])
            total += n
            left -= n
        conn.sendall(REPLY.pack(total, h.digest()))
        if size != TO_EOF:
            # Wait for the peer's close so our close never turns unread bytes into a reset.
            with contextlib.suppress(OSError):
                conn.recv(1)


def _source(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(IO_TIMEOUT)
        request = _recv_exact(conn, REQUEST.size)
        if len(request) < REQUEST.size:
            return
        size, seed = REQUEST.unpack(request)
        for view in chunks(seed, min(size, MAX_BYTES)):
            conn.sendall(view)
        conn.shutdown(socket.SHUT_WR)
        # Wait for the peer's close so our close never turns unread bytes into a reset.
        with contextlib.suppress(OSError):
            conn.recv(1)


def _serve_threads(listener: socket.socket, handler: object) -> None:
    def accept_loop() -> None:
        while True:  # ends with the process (daemon thread)
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=_guard, args=(handler, conn), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()


def _guard(handler: object, conn: socket.socket) -> None:
    try:
        handler(conn)  # type: ignore[operator]
    except OSError as exc:
        print(f"bench-target: {getattr(handler, '__name__', handler)}: {exc}",
              file=sys.stderr, flush=True)


async def _main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    echo_sock, sink_sock, source_sock = _listen(), _listen(), _listen()
    server = await loop.create_server(EchoProtocol, sock=echo_sock, backlog=4096)
    _serve_threads(sink_sock, _sink)
    _serve_threads(source_sock, _source)
    # stdin closing (the harness died) also stops us.
    stdin = sys.stdin.fileno()
    loop.add_reader(stdin, lambda: None if os.read(stdin, 4096) else stop.set())
    ports = [s.getsockname()[1] for s in (echo_sock, sink_sock, source_sock)]
    print(f"bench-target: echo={ports[0]} sink={ports[1]} source={ports[2]}", flush=True)
    await stop.wait()
    server.close()


def main() -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(_main())


if __name__ == "__main__":
    main()
