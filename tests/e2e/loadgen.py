"""Load generation for the reliability catalogue's section (f): raw asyncio TCP visitors.

Visitors speak plain TCP to an echo service behind the tunnel (no HTTP client, so the tunnel
is what gets measured) and check every byte with SHA-256. Everything here is bounded: a
visitor has a deadline, a batch has a fixed count, the churn generator a fixed rate and
duration, the memory sampler a maximum number of samples.

Source addresses: the relay caps open visitors per source IP at 256 (reliability B-9), so a
load of more than that spreads its visitors over 127.0.0.2, 127.0.0.3, ... (Linux routes all
of 127.0.0.0/8 to ``lo``, no root needed). Churn rotates over 127.0.0.2 to 127.0.0.50 so
ephemeral ports and TIME-WAIT entries (per address pair) never run out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from tests.e2e.procstats import fd_count, rss_kib
from tests.e2e.services import (
    STARTED,
    STREAM_LIMIT,
    EchoService,
    both,
    close_writer,
    read_exactly_digest,
    send_pattern,
)

__all__ = [
    "ABORTS",
    "CHURN_FIRST_SOURCE",
    "CHURN_LAST_SOURCE",
    "PER_SOURCE",
    "ChurnReport",
    "LoadEchoService",
    "MemorySampler",
    "Visitor",
    "churn",
    "describe_failures",
    "fds",
    "gather_limited",
    "is_abort",
    "leaves",
    "percentile",
    "quiet_ports",
    "rss",
    "settle",
    "source_for",
]

#: Visitors put on one source address at once: below the relay's per-source cap of 256.
PER_SOURCE = 200
FIRST_SOURCE = 2  # 127.0.0.2; 127.0.0.1 stays for the programs themselves
CHURN_FIRST_SOURCE = 2
CHURN_LAST_SOURCE = 50
#: Accept queue of the load's echo service. asyncio's default of 100 overflows under a burst:
#: the client frees a dial slot as soon as the kernel completes the connect, before the busy
#: test process accepts, so the queue can hold more than the 64 dials in flight. A dropped
#: SYN costs a 1 s retransmit; real services listen with more (nginx 511, somaxconn 4096).
LOCAL_BACKLOG = 4096
VISIT_TIMEOUT = 60.0  # one visitor's connect + probe, or one bulk echo, at most
_PROBE = struct.Struct("!4sQ")  # magic, visitor id: echoed back before any bulk data
_MAGIC = b"LOAD"


class LoadEchoService(EchoService):
    """The echo service of :mod:`tests.e2e.services`, listening with a realistic backlog."""

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(
            self._on_connection, "127.0.0.1", port, limit=STREAM_LIMIT, backlog=LOCAL_BACKLOG)
        STARTED.append(self)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port


#: Public ports for many-port tests are drawn below the ephemeral range (32768-60999 here):
#: the load's own outgoing connections take ephemeral ports, and one that lands on a port
#: the relay is about to bind would make that bind fail.
QUIET_PORTS = (20000, 32767)


def quiet_ports(n: int, seed: int | None = None) -> list[int]:
    """``n`` distinct ports below the ephemeral range that were free a moment ago (each bound
    and held until all are found; never a fixed number)."""
    rng = random.Random(seed)
    candidates = rng.sample(range(QUIET_PORTS[0], QUIET_PORTS[1] + 1), min(4 * n + 64, 12768))
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            if len(ports) == n:
                break
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
    if len(ports) < n:
        raise RuntimeError(f"only {len(ports)} of {n} quiet ports free")
    return ports


def source_for(index: int, per_source: int = PER_SOURCE) -> str:
    """The source address of visitor ``index`` when ``per_source`` share each address."""
    return f"127.0.0.{FIRST_SOURCE + index // per_source}"


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile (``pct`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[rank - 1]


#: How a visit may fail visibly (reset, refused, timed out): availability, not integrity.
ABORTS: tuple[type[BaseException], ...] = (OSError, TimeoutError)


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, e.g. from a TaskGroup."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def is_abort(exc: BaseException) -> bool:
    """Whether a failed visit ended in a visible abort only (no wrong or missing bytes that
    looked like success: a clean EOF mid-stream is a truncation, not an abort)."""
    return all(isinstance(leaf, ABORTS) for leaf in leaves(exc))


@dataclass
class Visitor:
    """One public connection through the tunnel to an echo service."""

    ident: int
    source: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    connect_s: float  # from the connect() call to the echoed probe (see :meth:`open`)

    @classmethod
    async def open(cls, port: int, ident: int, source: str,
                   timeout: float = VISIT_TIMEOUT) -> Visitor:
        """Connect from ``source`` and wait for the echo of a 12-byte probe.

        ``connect_s`` runs to the first echoed byte, not to the return of connect(): the
        relay's kernel completes the TCP handshake before the tunnel has done anything, so
        only an echo proves the stream was opened, dialed at the client and answered.
        """
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0), limit=STREAM_LIMIT)
            try:
                probe = _PROBE.pack(_MAGIC, ident)
                writer.write(probe)
                echoed = await reader.readexactly(len(probe))
            except BaseException:
                await close_writer(writer)
                raise
        if echoed != probe:
            await close_writer(writer)
            raise AssertionError(f"visitor {ident}: probe echoed as {echoed!r}")
        return cls(ident, source, reader, writer, time.monotonic() - started)

    async def echo(self, size: int, seed: int, timeout: float = VISIT_TIMEOUT) -> None:
        """Send ``size`` bytes of pattern ``seed`` while reading the echo; digests must match."""
        try:
            async with asyncio.timeout(timeout):
                sent, (got_len, got) = await both(send_pattern(self.writer, seed, size),
                                                  read_exactly_digest(self.reader, size))
        except BaseExceptionGroup as group:  # from both()'s TaskGroup: raise the cause
            raise leaves(group)[0] from group
        if got_len != size or got != sent:
            raise AssertionError(f"visitor {self.ident}: echo of {got_len}/{size} bytes "
                                 f"{'matches' if got == sent else 'differs'}")

    async def close(self) -> None:
        await close_writer(self.writer)


async def gather_limited(factories: Sequence[Callable[[], Awaitable[object]]],
                         limit: int) -> list[object]:
    """Run every factory's awaitable, ``limit`` at a time; exceptions become results."""
    gate = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[object]]) -> object:
        async with gate:
            return await factory()

    return list(await asyncio.gather(*(one(f) for f in factories), return_exceptions=True))


def describe_failures(results: Sequence[object]) -> Counter[str]:
    """Exception results counted by type and message (bounded text), for assertions."""
    return Counter(f"{type(r).__name__}: {str(r)[:120]}" for r in results
                   if isinstance(r, BaseException))


@dataclass
class ChurnReport:
    attempted: int = 0
    succeeded: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    late_starts: int = 0  # visits the generator could not start on schedule (> 1 s late)
    #: Visits whose bytes came back wrong or cut short by a clean EOF: a truncated stream
    #: must never look like a clean end (guarantee 1), so these are integrity failures;
    #: resets, refusals and timeouts are only availability failures.
    integrity_failures: int = 0

    @property
    def success_ratio(self) -> float:
        return self.succeeded / self.attempted if self.attempted else 0.0


async def _churn_visit(port: int, ident: int, source: str, size: int,
                       report: ChurnReport) -> None:
    started = time.monotonic()
    try:
        visitor = await Visitor.open(port, ident, source, timeout=30.0)
        try:
            await visitor.echo(size, seed=ident, timeout=30.0)
        finally:
            await visitor.close()
    except (OSError, TimeoutError, AssertionError, asyncio.IncompleteReadError) as exc:
        report.failures[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
        if not is_abort(exc):
            report.integrity_failures += 1
        return
    report.succeeded += 1
    report.latencies.append(time.monotonic() - started)


async def churn(port: int, *, rate: float, duration: float, size: int,
                first_source: int = CHURN_FIRST_SOURCE, last_source: int = CHURN_LAST_SOURCE,
                on_tick: Callable[[float], None] | None = None,
                ident_base: int = 0, stop: asyncio.Event | None = None) -> ChurnReport:
    """Open ``rate`` new visitors per second for ``duration`` seconds, each a ``size``-byte
    echo from the next source address in ``first_source..last_source``; wait for all.

    Visits are scheduled at fixed times (not back to back), so a slow tunnel shows up as
    failures or latency, never as a lower rate; ``on_tick(elapsed)`` runs about once a second
    (e.g. to sample memory). Setting ``stop`` ends the schedule early.
    """
    report = ChurnReport()
    total = int(rate * duration)
    sources = [f"127.0.0.{i}" for i in range(first_source, last_source + 1)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: set[asyncio.Task[None]] = set()
    next_tick = 0.0
    for i in range(total):
        if stop is not None and stop.is_set():
            break
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:
            report.late_starts += 1
        elapsed = loop.time() - start
        if on_tick is not None and elapsed >= next_tick:
            on_tick(elapsed)
            next_tick += 1.0
        report.attempted += 1
        task = asyncio.create_task(
            _churn_visit(port, ident_base + i, sources[i % len(sources)], size, report))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=60.0)
    for task in list(tasks):  # only if a visit overran its own deadlines
        task.cancel()
    return report


class MemorySampler:
    """Samples the RSS of some processes at an interval (peak and series), in the background."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25,
                 max_samples: int = 100_000) -> None:
        self.pids = pids
        self.interval = interval
        self.max_samples = max_samples
        self.peak: dict[str, int] = {name: 0 for name in pids}
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._task: asyncio.Task[None] | None = None
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, int]:
        now = time.monotonic() - self.t0
        values = {name: rss_kib(pid) for name, pid in self.pids.items()}
        for name, value in values.items():
            self.peak[name] = max(self.peak[name], value)
            if len(self.series[name]) < self.max_samples:
                self.series[name].append((now, value))
        return values

    async def _run(self) -> None:
        for _ in range(self.max_samples):
            self.sample()
            await asyncio.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):
            self.sample()


def fds(pids: dict[str, int]) -> dict[str, int]:
    return {name: fd_count(pid) for name, pid in pids.items()}


def rss(pids: dict[str, int]) -> dict[str, int]:
    gc.collect()  # the test process's own garbage does not matter, but keep samples calm
    return {name: rss_kib(pid) for name, pid in pids.items()}


async def settle(check: Callable[[], Awaitable[bool]], timeout: float,
                 interval: float = 0.1) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes (bounded); return the last answer."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if await check():
            return True
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    return await check()
