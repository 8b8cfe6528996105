"""What the flow-control and integrity catalogue tests observe about the running programs.

- :class:`Dashboard`: the relay's JSON API and /metrics (open streams per tunnel, link RTT,
  refused streams), through the raw HTTP client of the dashboard tests.
- :func:`tcp_queues`: the kernel's send and receive queues of loopback sockets, from
  ``/proc/net/tcp``, so a test can subtract what the kernel holds from what was sent and
  see what the tunnel's processes themselves hold.
- :class:`PeakRss`: the highest RSS of some processes, sampled while a scenario runs.
- :func:`start_tunnels`: a relay with its dashboard on, and client alpha exposing targets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tests.dashboard.client import basic, request
from tests.e2e.harness import (
    ALPHA_TOKEN,
    Proc,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.procstats import fd_count, rss_kib

__all__ = [
    "Dashboard",
    "PeakRss",
    "Setup",
    "abort",
    "raw_connect",
    "start_tunnels",
    "tcp_queues",
]

DASHBOARD_RE = r"^tunnel-server: dashboard on (?P<url>http://\S+)$"
POLL_INTERVAL = 0.1
CLEAN_WITHIN = 5.0  # "clean" in the catalogue: back to baseline within 5 s
FD_SLACK = 2


@dataclass
class Dashboard:
    port: int
    password: str

    async def json(self, path: str) -> Any:
        reply = await request(self.port, "GET", path, auth=basic("admin", self.password))
        assert reply.status == 200, (path, reply)
        return reply.json()

    async def client(self, name: str = "alpha") -> dict[str, Any]:
        clients: list[dict[str, Any]] = await self.json("/api/clients")
        return next(c for c in clients if c["name"] == name)

    async def open_streams(self, name: str = "alpha") -> int:
        """Visitor streams the relay holds open for ``name``, all its tunnels together."""
        client = await self.client(name)
        return sum(int(t["connections"]) for t in client["tunnels"])

    async def metrics(self) -> str:
        reply = await request(self.port, "GET", "/metrics", auth=basic("admin", self.password))
        assert reply.status == 200, reply
        return reply.text

    async def wait_open_streams(self, expected: int, timeout: float = CLEAN_WITHIN) -> None:
        deadline = time.monotonic() + timeout
        seen = await self.open_streams()
        for _ in range(int(timeout / POLL_INTERVAL) + 10):
            if seen == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)
            seen = await self.open_streams()
        assert seen == expected, f"relay holds {seen} open streams, expected {expected}"


@dataclass
class Setup:
    relay: Proc
    client: Proc
    ports: list[int]
    dashboard: Dashboard
    fds: dict[int, int] = field(default_factory=dict)

    @property
    def pids(self) -> tuple[int, int]:
        return self.relay.pid, self.client.pid

    async def record_baseline(self) -> None:
        """Once warm-up streams are gone (a slot still held would skew limits and fds),
        note the fd counts that "clean" returns to."""
        await self.dashboard.wait_open_streams(0)
        self.fds = {pid: fd_count(pid) for pid in self.pids}

    async def assert_clean(self, within: float = CLEAN_WITHIN) -> None:
        """The catalogue's "clean": 0 open streams and fds back to baseline +-2 within 5 s
        (``within``: a test that documents why it needs longer)."""
        await self.dashboard.wait_open_streams(0, timeout=within)
        deadline = time.monotonic() + within
        now = {pid: fd_count(pid) for pid in self.pids}
        for _ in range(int(within / POLL_INTERVAL) + 10):
            if all(abs(now[pid] - self.fds[pid]) <= FD_SLACK for pid in self.pids):
                return
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_INTERVAL)
            now = {pid: fd_count(pid) for pid in self.pids}
        raise AssertionError(f"fd counts {now} not back to baseline {self.fds} +-{FD_SLACK}; "
                             f"client sockets: {describe_sockets(self.client.pid)[:20]}")


async def start_tunnels(tmp_path: Path, targets: Sequence[str], **overrides: Any) -> Setup:
    """A relay (dashboard on) and client alpha exposing each target on a fixed port, live."""
    ports = free_ports(len(targets))
    password = secrets.token_urlsafe(15)
    dashboard = {"listen": "127.0.0.1:0", "username": "admin", "password": password}
    config = server_config(tmp_path, ports, dashboard=dashboard, **overrides)
    relay, url = await start_server(tmp_path, config)
    dash_url = (await relay.wait_for_line(DASHBOARD_RE))["url"]
    dash_port = urlsplit(dash_url).port
    assert dash_port is not None
    client = await start_client(
        url, ALPHA_TOKEN, [f"{t}:fixed-{p}" for t, p in zip(targets, ports, strict=True)])
    for target, port in zip(targets, ports, strict=True):
        assert await wait_tunnel(client, target, mode="fixed") == port
    return Setup(relay, client, ports, Dashboard(dash_port, password))


# ----------------------------------------------------------------------------- kernel queues


def _addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)[::-1]  # /proc/net/tcp prints IPv4 in host (little-endian) order
    return socket.inet_ntoa(raw), int(port, 16)


def tcp_queues(pairs: Sequence[tuple[int, int]]) -> int:
    """Bytes the kernel holds (send + receive queues) on 127.0.0.1 sockets between the
    given port pairs, both ends of each (``(a, b)`` matches local a/remote b and b/a)."""
    wanted = set()
    for a, b in pairs:
        wanted.add((a, b))
        wanted.add((b, a))
    total = 0
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote = _addr(fields[1]), _addr(fields[2])
        if (local[1], remote[1]) in wanted and local[0] == remote[0] == "127.0.0.1":
            tx, rx = (int(x, 16) for x in fields[4].split(":"))
            total += tx + rx
    return total


def describe_sockets(pid: int) -> list[str]:
    """The TCP sockets a process holds, as "local -> remote state tx:rx" (for failures)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            rows.append(f"{_addr(fields[1])} -> {_addr(fields[2])} st={fields[3]} "
                        f"q={fields[4]}")
    return rows


# ----------------------------------------------------------------------------- memory


class PeakRss:
    """Samples the RSS (KiB) of some pids every ``interval`` while the context is open."""

    def __init__(self, pids: Sequence[int], interval: float = 0.2) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.baseline = {pid: rss_kib(pid) for pid in self.pids}
        self.peak = dict(self.baseline)

    def sample(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self.peak[pid] = max(self.peak[pid], rss_kib(pid))

    def growth_mib(self, pid: int) -> float:
        return (self.peak[pid] - self.baseline[pid]) / 1024

    @contextlib.asynccontextmanager
    async def running(self, max_seconds: float = 3600.0) -> AsyncIterator[PeakRss]:
        async def loop() -> None:
            for _ in range(int(max_seconds / self.interval) + 1):
                self.sample()
                await asyncio.sleep(self.interval)

        task = asyncio.create_task(loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.sample()


async def raw_connect(port: int, source: str = "127.0.0.1", bufsize: int = 0) -> socket.socket:
    """A non-blocking TCP socket to 127.0.0.1:``port``: nothing reads it unless asked.
    ``bufsize`` fixes its send and receive buffers (no autotuning)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if bufsize:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
        sock.bind((source, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(
            sock, ("127.0.0.1", port)), 10.0)
    except BaseException:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- raw senders


async def _writable(sock: socket.socket, timeout: float | None) -> bool:
    """Wait until ``sock`` can take more bytes; False when ``timeout`` passed first."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock.fileno())


@dataclass
class Push:
    """What :func:`push_until_blocked` achieved: bytes the kernel accepted, and whether
    the sender then made no progress for the whole stall period (it is blocked)."""

    accepted: int = 0
    blocked: bool = False


async def push_until_blocked(sock: socket.socket, limit: int, stall: float | None,
                             progress: Push | None = None, chunk: int = 64 * 1024) -> Push:
    """Send up to ``limit`` bytes on non-blocking ``sock``; stop once no byte was taken for
    ``stall`` seconds (None: keep waiting, for a sender paced by a slow reader)."""
    result = progress or Push()
    block = bytes(range(256)) * (chunk // 256)
    for _ in range(limit // 1 + 1):  # every pass sends >= 1 byte or ends the loop
        if result.accepted >= limit:
            break
        try:
            result.accepted += sock.send(block[: min(chunk, limit - result.accepted)])
        except BlockingIOError:
            if not await _writable(sock, stall):
                result.blocked = True
                break
    return result


class RawService:
    """A local service on raw non-blocking sockets that never reads what it is sent.

    An asyncio stream service would pull several MiB into its StreamReader before pausing,
    which would hide the tunnel's backpressure; here the kernel buffers are the only ones.
    With ``push`` set it also sends up to that many bytes per connection, until blocked for
    ``stall`` seconds (None: for as long as the connection lives).
    """

    def __init__(self, push: int = 0, stall: float | None = 2.0, bufsize: int = 0) -> None:
        self.push_limit = push
        self.stall = stall
        self.bufsize = bufsize
        self.port = 0
        self.conns: list[socket.socket] = []
        self.pushes: list[Push] = []
        self.peers: list[int] = []  # the client's local port of each connection
        self.changed = asyncio.Event()
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _tune(self, sock: socket.socket) -> None:
        if self.bufsize:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.bufsize)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.bufsize)

    async def start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        self._tune(sock)  # accepted sockets inherit the receive buffer
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        self._listener = sock
        self.port = int(sock.getsockname()[1])
        _RAW_STARTED.append(self)
        self._spawn(self._accept_loop())
        return self.port

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        for _ in range(1_000_000):
            conn, peer = await loop.sock_accept(self._listener)
            conn.setblocking(False)
            self._tune(conn)
            self.conns.append(conn)
            self.peers.append(int(peer[1]))
            push = Push()
            self.pushes.append(push)
            if self.push_limit:
                self._spawn(self._push(conn, push))
            self.changed.set()

    async def _push(self, conn: socket.socket, push: Push) -> None:
        with contextlib.suppress(OSError):
            await push_until_blocked(conn, self.push_limit, self.stall, push)
        self.changed.set()

    async def wait_for(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        """Wait (event-driven, bounded) until ``predicate()`` holds."""
        try:
            async with asyncio.timeout(timeout):
                for _ in range(1_000_000):
                    if predicate():
                        return
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {timeout} s ({len(self.conns)} "
                                 "connections now)") from None
        raise AssertionError(f"{what}: loop bound exhausted")

    def abort_all(self) -> None:
        """The service goes away: every connection it holds ends with an RST."""
        for conn in self.conns:
            abort(conn)
        self.conns.clear()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None


_RAW_STARTED: list[RawService] = []


async def close_raw_services() -> None:
    """Teardown for the raw services a test started (the e2e cleanup knows TcpService)."""
    started = list(_RAW_STARTED)
    _RAW_STARTED.clear()
    for service in started:
        await service.close()


def abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): a visitor that goes away, whatever is still queued.

    A plain close would queue a FIN behind bytes the stalled far side never reads, and the
    stream would rightly stay open."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
