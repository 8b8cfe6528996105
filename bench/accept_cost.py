"""CPU the relay spends on a visitor it refuses at once, by how the public port accepts.

``python -m bench.accept_cost [--count N] [--loop asyncio|uvloop|both]``

A second process connects to a loopback port ``N`` times and resets each connection (RST,
as B-6's Rapid Reset flood does); this process refuses every one with RST, either through
``loop.create_server`` (a transport and its callbacks for each, then ``abort``) or through
``tunnel.server.acceptor.Acceptor`` (``accept()``, ``SO_LINGER`` 0, ``close()``). It prints
this process's CPU time (user + system) per refused connection for each, and their ratio.
Everything stays on 127.0.0.1; the flood is bounded by ``--count`` and by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from tunnel.common.aio.link import abort_with_reset, reset_on_close
from tunnel.server.acceptor import Acceptor, bind_listening

DEFAULT_COUNT = 20_000
TIMEOUT = 120.0
#: Seconds without a new connection, after the flooder ended, that end a measurement.
QUIET_END = 1.0
LOCAL = "127.0.0.1"

_FLOODER = r"""
import socket, struct, sys
linger = struct.pack("ii", 1, 0)
for _ in range(int(sys.argv[2])):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    try:
        sock.connect(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        pass
    sock.close()
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _flood(port: int, count: int, refused: Callable[[], int]) -> tuple[float, int]:
    """Run the flooder until ``count`` were refused (or it ended): CPU seconds this process
    spent per refused connection, and how many it refused."""
    flooder = subprocess.Popen([sys.executable, "-c", _FLOODER, str(port), str(count)])
    start = _cpu()
    deadline = time.monotonic() + TIMEOUT
    try:
        seen, still = refused(), time.monotonic()
        while refused() < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            if refused() != seen:
                seen, still = refused(), time.monotonic()
            elif flooder.poll() is not None and time.monotonic() - still > QUIET_END:
                break  # the flooder is done and nothing more is queued
        spent = _cpu() - start
    finally:
        if flooder.poll() is None:
            flooder.kill()  # only the flooder started here, by its own handle
        flooder.wait()
    return spent / max(refused(), 1), refused()


async def via_create_server(count: int) -> tuple[float, int]:
    refused = 0

    class Refuse(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal refused
            refused += 1
            transport.get_extra_info("peername")  # what the old gate looked at
            abort_with_reset(transport)

    server = await asyncio.get_running_loop().create_server(Refuse, LOCAL, 0, backlog=512)
    try:
        return await _flood(server.sockets[0].getsockname()[1], count, lambda: refused)
    finally:
        server.close()


async def via_acceptor(count: int) -> tuple[float, int]:
    refused = 0

    def refuse(conn: socket.socket, peer: tuple[str, int]) -> None:
        nonlocal refused
        refused += 1
        with contextlib.suppress(OSError):  # ENOTCONN: reset while it was queued
            conn.getpeername()  # what the gate looks at
        reset_on_close(conn)
        conn.close()

    acceptor = Acceptor(await bind_listening(LOCAL, 0, 512), refuse)
    try:
        return await _flood(acceptor.sockets[0].getsockname()[1], count, lambda: refused)
    finally:
        acceptor.close()


async def _measure(count: int) -> tuple[tuple[float, int], tuple[float, int]]:
    return await via_create_server(count), await via_acceptor(count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accept_cost", description=__doc__)
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT)
    parser.add_argument("--loop", choices=("asyncio", "uvloop", "both"), default="both")
    args = parser.parse_args(argv)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    for name in loops:
        factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if name == "uvloop":
            try:
                import uvloop
            except ImportError:
                print("uvloop: not installed, skipped")
                continue
            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            (server, by_server), (acceptor, by_acceptor) = runner.run(_measure(args.count))
        print(f"{name}: create_server {server * 1e6:.1f} us, Acceptor {acceptor * 1e6:.1f} us "
              f"of CPU per refused connection ({server / acceptor:.1f}x), refused "
              f"{by_server} and {by_acceptor} of {args.count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
