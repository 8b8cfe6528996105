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

A slot is held past the connect, until the visitor sends its first byte, the local socket is
closed, or ``SILENT_HOLD`` seconds pass, whichever comes first. An open/reset flood's visitors
never send a byte, so each of their local connections keeps its slot until the socket is
really closed: the local service sees at most ``MAX_PENDING_DIALS`` of them at once, however
long the reset takes to cross the relay and the link (B-6), where releasing the slot at the
connect would bound them only by the admitted open rate times that turnaround. The hold is
short so that silent visitors cannot lock the port: a browser's
speculative connection or a protocol in which the server speaks first (SSH's banner is not
enough: its client sends its own at once) holds a slot for 0.25 s at most, and 64 slots per
0.25 s is 256 silent opens a second, above one source's admitted rate (200/s).

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
from functools import partial

from tunnel.client.expose import ExposeSpec
from tunnel.common.aio.link import Link, StreamSocket
from tunnel.common.proto.mux import ResetCode, StreamOpened

__all__ = ["DIAL_ERROR_LOG_INTERVAL", "DIAL_TIMEOUT", "MAX_PENDING_DIALS", "SILENT_HOLD",
           "Dialer"]

#: Seconds from a stream's OPEN to its local connection, queue wait included.
DIAL_TIMEOUT = 10.0
DIAL_ERROR_LOG_INTERVAL = 10.0
#: Dial slots: local connects in flight, plus connected streams whose visitor has not yet sent
#: a byte (for at most ``SILENT_HOLD``); further streams wait in the queue for a free slot.
MAX_PENDING_DIALS = 64
#: Seconds a connected but silent stream keeps its dial slot (see the module docstring).
SILENT_HOLD = 0.25

log = logging.getLogger("tunnel.client.dialer")


class _DialedSocket(StreamSocket):
    """A stream's local connection that tells the dialer when it no longer needs its slot:
    at the visitor's first byte, or once the socket is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.on_settled: Callable[[], None] | None = None

    def _settle(self) -> None:
        callback, self.on_settled = self.on_settled, None
        if callback is not None:
            callback()

    def deliver(self, data: bytes | memoryview) -> None:
        # Bytes that come before the connect is made count when connection_made delivers
        # them: until then the slot is a connect in flight.
        if self.on_settled is not None and self.transport is not None:
            self._settle()
        super().deliver(data)

    def connection_lost(self, exc: Exception | None) -> None:
        # asyncio calls this just before it closes the socket, in the same callback: a dial
        # the released slot starts cannot connect before this socket is gone.
        super().connection_lost(exc)
        self._settle()


@dataclass(slots=True, eq=False)
class _Pending:
    """A stream waiting for (or in) its local connect, or holding its slot past it."""

    link: Link
    sock: _DialedSocket
    spec: ExposeSpec
    peer: str
    deadline: float  # on the dialer's clock
    hold_timer: asyncio.TimerHandle | None = None


class Dialer:
    """Turns OPEN events into local connections for the tunnels of one client."""

    def __init__(self, tunnels: Mapping[int, ExposeSpec], *,
                 timeout: float = DIAL_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 max_in_flight: int = MAX_PENDING_DIALS,
                 silent_hold: float = SILENT_HOLD) -> None:
        self.tunnels = tunnels
        self.timeout = timeout
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.silent_hold = silent_hold
        self._holders: set[_Pending] = set()  # the streams holding a slot
        self._tasks: set[asyncio.Task[None]] = set()
        self._queue: deque[_Pending] = deque()
        self._last_error: dict[str, float] = {}

    @property
    def in_flight(self) -> int:
        """Slots taken now (never above ``max_in_flight``): connects under way, and
        connected streams whose visitor has not sent a byte yet."""
        return len(self._holders)

    @property
    def queued(self) -> int:
        """Streams waiting for a connect slot (some may have been reset meanwhile)."""
        return len(self._queue)

    def on_open(self, link: Link, event: StreamOpened) -> None:
        spec = self.tunnels.get(event.tunnel_id)
        if spec is None:
            link.log.warning("client %s stream %d: unknown tunnel id %d", link.name,
                             event.stream_id, event.tunnel_id)
            link.reset_stream(event.stream_id, ResetCode.REFUSED)
            return
        sock = _DialedSocket()
        sock.attach(link, event.stream_id)
        pending = _Pending(link, sock, spec, event.peer, self.clock() + self.timeout)
        if len(self._holders) < self.max_in_flight:
            self._start(pending)
            return
        self._enqueue(pending)

    def _enqueue(self, pending: _Pending) -> None:
        """Queue a stream; entries of streams already reset (or of a dead link) go first."""
        if len(self._queue) >= pending.link.max_streams:
            self._queue = deque(p for p in self._queue if not p.sock.closed)
        self._queue.append(pending)

    def _start(self, pending: _Pending) -> None:
        self._holders.add(pending)
        pending.sock.on_settled = partial(self._release, pending)
        task = asyncio.create_task(self._dial(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _release(self, pending: _Pending) -> None:
        """Give a stream's slot back (once) and fill free slots from the queue."""
        if pending not in self._holders:
            return
        self._forget(pending)
        self._start_queued()

    def _forget(self, pending: _Pending) -> None:
        self._holders.discard(pending)
        pending.sock.on_settled = None
        if pending.hold_timer is not None:
            pending.hold_timer.cancel()
            pending.hold_timer = None

    def _start_queued(self) -> None:
        """Fill free slots from the queue, oldest first."""
        queue = self._queue
        while queue and len(self._holders) < self.max_in_flight:
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
            self._release(pending)
            return
        except asyncio.CancelledError:
            self._release(pending)
            raise
        if pending in self._holders:  # still silent, still open: keep the slot for a while
            pending.hold_timer = loop.call_later(self.silent_hold, self._release, pending)

    def _refuse(self, pending: _Pending, exc: BaseException) -> None:
        """The local target could not be reached in time: reset the stream."""
        sock, link = pending.sock, pending.link
        self._report(link, sock.stream_id, pending.spec, pending.peer, exc)
        if not sock.closed:
            sock.closed = True
            link.forget(sock)
            link.reset_stream(sock.stream_id, ResetCode.REFUSED)

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
        """The client is stopping: drop the queue and the held slots, then abandon the
        dials under way."""
        self._queue.clear()
        for pending in list(self._holders):
            self._forget(pending)
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        """:meth:`cancel`, then wait until every abandoned connect has closed its socket."""
        self.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
