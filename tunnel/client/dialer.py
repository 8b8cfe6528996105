"""On a new stream: connect to the local target, or reset the stream.

At most ``MAX_PENDING_DIALS`` local connects are in flight at once, so an open/reset flood at
the relay cannot turn into a connect flood at the local service (reliability B-6). Streams
beyond that wait in a FIFO queue and are dialed as slots free: a burst of legitimate visitors
(reliability L-1, L-4) is served, not refused. The queue needs no limit of its own: every
queued stream is open in the link's multiplexer, which refuses OPENs beyond the link's stream
limit N, so at most N streams (and their early data, within their windows) ever wait.

Each stream has one deadline, ``timeout`` seconds from the moment its OPEN arrived, covering
both the wait in the queue and the connect itself. Counting from arrival bounds how long a
visitor (and its slot against N) can wait for an answer whatever the queue holds: counted
from the start of each dial, a target that swallows SYNs would keep the last of N queued
streams waiting ``ceil(N / 64)`` times the timeout (40 s at N = 256) before it is reset. A
stream whose deadline passes while it waits is reset without dialing at all.

A target that is down is reported at most once per ``DIAL_ERROR_LOG_INTERVAL`` per target, so
a burst of visitors cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..common.link import Link, StreamSocket
from ..common.mux import ResetCode, StreamOpened
from .expose import ExposeSpec

__all__ = ["DIAL_ERROR_LOG_INTERVAL", "DIAL_TIMEOUT", "MAX_PENDING_DIALS", "Dialer"]

#: Seconds from a stream's OPEN to its local connection, queue wait included.
DIAL_TIMEOUT = 10.0
DIAL_ERROR_LOG_INTERVAL = 10.0
#: Local connects in flight at once; further streams wait in the queue for a free slot.
MAX_PENDING_DIALS = 64

log = logging.getLogger("tunnel.client.dialer")


@dataclass(slots=True)
class _Pending:
    """A stream waiting for (or in) its local connect."""

    link: Link
    sock: StreamSocket
    spec: ExposeSpec
    peer: str
    deadline: float  # on the dialer's clock


class Dialer:
    """Turns OPEN events into local connections for the tunnels of one client."""

    def __init__(self, tunnels: Mapping[int, ExposeSpec], *,
                 timeout: float = DIAL_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = MAX_PENDING_DIALS) -> None:
        self.tunnels = tunnels
        self.timeout = timeout
        self.clock = clock
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[_Pending] = deque()
        self._last_error: dict[str, float] = {}

    @property
    def in_flight(self) -> int:
        """Local connects under way now (never above ``max_in_flight``)."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Streams waiting for a connect slot (some may have been reset meanwhile)."""
        return len(self._queue)

    def on_open(self, link: Link, event: StreamOpened) -> None:
        spec = self.tunnels.get(event.tunnel_id)
        if spec is None:
            link.log.warning("client %s stream %d: unknown tunnel id %d", link.name,
                             event.stream_id, event.tunnel_id)
            link.mux.reset(event.stream_id, ResetCode.REFUSED)
            link.kick()
            return
        sock = StreamSocket()
        sock.attach(link, event.stream_id)
        pending = _Pending(link, sock, spec, event.peer, self.clock() + self.timeout)
        if len(self._tasks) < self.max_in_flight:
            self._start(pending)
            return
        self._enqueue(pending)

    def _enqueue(self, pending: _Pending) -> None:
        """Queue a stream; entries of streams already reset (or of a dead link) go first."""
        if len(self._queue) >= pending.link.mux.max_streams:
            self._queue = deque(p for p in self._queue if not p.sock.closed)
        self._queue.append(pending)

    def _start(self, pending: _Pending) -> None:
        task = asyncio.create_task(self._dial(pending))
        self._tasks.add(task)
        task.add_done_callback(self._dial_done)

    def _dial_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_queued()

    def _start_queued(self) -> None:
        """Fill free connect slots from the queue, oldest first."""
        queue = self._queue
        while queue and len(self._tasks) < self.max_in_flight:
            pending = queue.popleft()
            if pending.sock.closed:  # the visitor left (or the link died) while it waited
                continue
            if self.clock() >= pending.deadline:
                self._refuse(pending, TimeoutError())
                continue
            self._start(pending)

    async def _dial(self, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        sock, spec = pending.sock, pending.spec
        try:
            remaining = pending.deadline - self.clock()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await loop.create_connection(lambda: sock, spec.local_host, spec.local_port)
        except (OSError, TimeoutError) as exc:
            self._refuse(pending, exc)

    def _refuse(self, pending: _Pending, exc: BaseException) -> None:
        """The local target could not be reached in time: reset the stream."""
        sock, link = pending.sock, pending.link
        self._report(link, sock.stream_id, pending.spec, pending.peer, exc)
        if not sock.closed:
            sock.closed = True
            link.forget(sock)
            link.mux.reset(sock.stream_id, ResetCode.REFUSED)
            link.kick()

    def _report(self, link: Link, stream_id: int, spec: ExposeSpec, peer: str,
                exc: BaseException) -> None:
        now = self.clock()
        last = self._last_error.get(spec.target)
        if last is not None and now - last < DIAL_ERROR_LOG_INTERVAL:
            return
        self._last_error[spec.target] = now
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        link.log.warning("client %s stream %d: local target %s unreachable for visitor %s: %s",
                         link.name, stream_id, spec.target, peer, reason)

    def cancel(self) -> None:
        """The client is stopping: drop the queue, then abandon the dials under way."""
        self._queue.clear()
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`cancel`, then wait until every abandoned connect has closed its socket."""
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
