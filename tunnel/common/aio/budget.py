"""Memory budgets shared by all the links of one relay, and the per-thread read buffer.

Each link bounds what it holds on its own (``LINK_CEILING`` for stream data waiting to be
sent, ``RECV_HIGH_WATER`` for received messages waiting for the link's reader), and one
link alone stays far below the relay's memory. Two hundred links do not: in one event-loop
turn each of them may read up to its own bound before any reader task runs, so the sum of
their bounds, not any one of them, sets the relay's memory under the catalogue's L-3 (200
clients x 10 echo streams of 256 KiB), on both event loops (figures in docs/benchmarks.md).

A :class:`LinkGroup` sums what its links hold. While a sum is above its ceiling, a link
holding more than its fair share (ceiling / live links) stops reading; it starts again by
its own rule, when what *it* holds drains, never when the others' does, so a link whose
peer is slow can never keep the others paused.

One read buffer per thread serves the protocols that are done with a read before they
return (the TLS layer feeds each read to OpenSSL, stream sockets copy each read out, both
within ``buffer_updated``): the event loop never calls a read callback inside another one,
so they can all share it, and reads then cost no allocation.
"""

from __future__ import annotations

import threading

__all__ = ["GROUP_CEILING", "GROUP_RECV_CEILING", "READ_SIZE", "LinkGroup", "read_buffer"]

#: Bytes one read may take: what asyncio and uvloop read at once themselves.
READ_SIZE = 256 * 1024

_local = threading.local()


def read_buffer() -> memoryview:
    """This thread's read buffer (``READ_SIZE`` bytes)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_SIZE))
    return view

#: Stream data queued to be sent, summed over a relay's links (see the module docstring).
GROUP_CEILING = 16 * 1024 * 1024
#: Received messages not yet taken by the links' readers, summed over a relay's links.
GROUP_RECV_CEILING = 16 * 1024 * 1024


class LinkGroup:
    """What the live links of one relay hold, summed; each link reports its own changes."""

    __slots__ = ("ceiling", "links", "queued", "received", "recv_ceiling")

    def __init__(self, ceiling: int = GROUP_CEILING,
                 recv_ceiling: int = GROUP_RECV_CEILING) -> None:
        self.ceiling = ceiling
        self.recv_ceiling = recv_ceiling
        self.links = 0
        self.queued = 0  # stream data queued to send (Link.note_queue)
        self.received = 0  # received messages not yet read (WsFraming)

    def squeezed(self) -> bool:
        """Over half the queue budget: stream sockets read in small bites (see StreamSocket)."""
        return self.queued > self.ceiling // 2

    def recv_squeezed(self) -> bool:
        """Over half the received budget: TLS links read in small bites (see tlslayer.py)."""
        return self.received > self.recv_ceiling // 2

    def over_share(self, link_queued: int) -> bool:
        """The group queues more than its ceiling and a link queueing this much is to blame."""
        return self._to_blame(self.queued, self.ceiling, link_queued)

    def over_recv_share(self, link_received: int) -> bool:
        """As :meth:`over_share`, for received messages waiting for the links' readers."""
        return self._to_blame(self.received, self.recv_ceiling, link_received)

    def _to_blame(self, total: int, ceiling: int, own: int) -> bool:
        """The sum is over ``ceiling`` and ``own`` is more than one link's fair share of it."""
        return total > ceiling and own * max(1, self.links) > ceiling
