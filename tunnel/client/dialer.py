"""On a new stream: connect to the local target, or reset the stream.

The dial has a deadline (a target that swallows SYNs must not hold a stream forever), and a
target that is down is reported at most once per ``DIAL_ERROR_LOG_INTERVAL`` per target so a
burst of visitors cannot flood the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from ..common.link import Link, StreamSocket
from ..common.mux import ResetCode, StreamOpened
from .expose import ExposeSpec

__all__ = ["DIAL_ERROR_LOG_INTERVAL", "DIAL_TIMEOUT", "MAX_PENDING_DIALS", "Dialer"]

DIAL_TIMEOUT = 10.0
DIAL_ERROR_LOG_INTERVAL = 10.0
#: Local connects in flight at once; beyond this new streams are refused at once, so an
#: open/reset flood at the relay cannot turn into a connect flood at the local service.
MAX_PENDING_DIALS = 64

log = logging.getLogger("tunnel.client.dialer")


class Dialer:
    """Turns OPEN events into local connections for the tunnels of one client."""

    def __init__(self, tunnels: Mapping[int, ExposeSpec], *,
                 timeout: float = DIAL_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tunnels = tunnels
        self.timeout = timeout
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_error: dict[str, float] = {}

    def on_open(self, link: Link, event: StreamOpened) -> None:
        spec = self.tunnels.get(event.tunnel_id)
        if spec is None:
            link.log.warning("stream %d: unknown tunnel id %d", event.stream_id,
                             event.tunnel_id)
            link.mux.reset(event.stream_id, ResetCode.REFUSED)
            link.kick()
            return
        if len(self._tasks) >= MAX_PENDING_DIALS:
            link.mux.reset(event.stream_id, ResetCode.REFUSED)
            link.kick()
            self._report(link, event.stream_id, spec, event.peer,
                         OSError(f"{MAX_PENDING_DIALS} connects already pending"))
            return
        sock = StreamSocket()
        sock.attach(link, event.stream_id)
        task = asyncio.create_task(self._dial(link, sock, spec, event.peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dial(self, link: Link, sock: StreamSocket, spec: ExposeSpec, peer: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                await loop.create_connection(lambda: sock, spec.local_host, spec.local_port)
        except (OSError, TimeoutError) as exc:
            self._report(link, sock.stream_id, spec, peer, exc)
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
        for task in self._tasks:
            task.cancel()
