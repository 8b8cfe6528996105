"""Bounded work before authentication: connection caps and login-failure penalties.

Everything an unauthenticated peer can make the relay hold is capped: concurrent pre-auth
connections per source and in total (OpenSSH ``MaxStartups``/``PerSourceMaxStartups``), and
a penalty table of failing sources that is itself bounded (LRU), so a flood of addresses
cannot grow it without limit. Time comes from an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from tunnel.common.proto.mux import TokenBucket
from tunnel.server.config import DEFAULT_OPENS_PER_PORT, DEFAULT_OPENS_PER_SOURCE

__all__ = [
    "FAILURES_BEFORE_PENALTY",
    "MAX_PENALTY_ENTRIES",
    "MAX_PREAUTH_PER_SOURCE",
    "MAX_PREAUTH_TOTAL",
    "MAX_RATE_SOURCES",
    "MAX_VISITORS_PER_SOURCE",
    "OPENS_BURST_SECONDS",
    "OPENS_PER_PORT",
    "OPENS_PER_SOURCE",
    "PENALTY_BASE",
    "PENALTY_CAP",
    "PRIVILEGED_BELOW",
    "OpenRate",
    "Penalties",
    "PreAuthSlots",
    "SourceSlots",
    "TokenBucket",
    "claim_refusal",
]

MAX_PREAUTH_PER_SOURCE = 32
MAX_PREAUTH_TOTAL = 512
#: Visitor connections one source address may hold open across all public ports (B-9).
MAX_VISITORS_PER_SOURCE = 256
MAX_VISITORS_TOTAL = 1_000_000
FAILURES_BEFORE_PENALTY = 5
PENALTY_BASE = 1.0  # seconds, doubling per further failure
PENALTY_CAP = 600.0
MAX_PENALTY_ENTRIES = 10_000
#: Visitor connections one source address may open per second, over all public ports, and
#: one public port accepts from all sources together (config ``open_rate``).
OPENS_PER_SOURCE = DEFAULT_OPENS_PER_SOURCE
OPENS_PER_PORT = DEFAULT_OPENS_PER_PORT
#: Opens allowed at once after a quiet spell, in seconds' worth of the rate: one second, so
#: a source may open its 200 at once (a load test, a browser's burst) but not sustain it.
OPENS_BURST_SECONDS = 1.0
#: Sources whose open rate is tracked at once; the least recently seen are forgotten first.
MAX_RATE_SOURCES = 10_000
_MAX_DOUBLINGS = 64
#: Ports below this are privileged (system services: 22, 80, 443...). A client may claim one
#: only where the relay's ``ports`` list it in a range of privileged ports alone, e.g. ``80``
#: or ``"80-443"``; a wide range such as ``"1-65535"`` grants only its unprivileged part.
PRIVILEGED_BELOW = 1024
_MAX_PORT = 65535


class SourceSlots:
    """Counts connections per source address, with a cap per source and in total.

    Used for links that have not authenticated yet and for visitors of public ports.
    """

    def __init__(self, per_source: int = MAX_PREAUTH_PER_SOURCE,
                 total: int = MAX_PREAUTH_TOTAL) -> None:
        self.per_source = per_source
        self.total = total
        self._by_source: dict[str, int] = {}
        self._count = 0

    def acquire(self, source: str) -> bool:
        held = self._by_source.get(source, 0)
        if held >= self.per_source or self._count >= self.total:
            return False
        self._by_source[source] = held + 1
        self._count += 1
        return True

    def release(self, source: str) -> None:
        held = self._by_source.get(source, 0)
        if held == 0:
            return  # never acquired: must not lower the total
        if held == 1:
            self._by_source.pop(source, None)
        else:
            self._by_source[source] = held - 1
        self._count = max(0, self._count - 1)


PreAuthSlots = SourceSlots  # the name the login path uses


class OpenRate:
    """Caps how fast visitors may open connections: per source address and per public port.

    A source over its rate is refused without spending the port's budget, so one flooding
    address costs other visitors of that port at most ``per_source`` opens per second. The
    table of sources is bounded (LRU) so a flood from many addresses cannot grow it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 per_source: float = OPENS_PER_SOURCE, per_port: float = OPENS_PER_PORT,
                 burst_seconds: float = OPENS_BURST_SECONDS,
                 max_sources: int = MAX_RATE_SOURCES) -> None:
        self._clock = clock
        self._per_source = per_source
        self._per_port = per_port
        self._burst_seconds = burst_seconds
        self._max_sources = max_sources
        self._sources: OrderedDict[str, TokenBucket] = OrderedDict()
        self._ports: dict[int, TokenBucket] = {}
        #: Opens refused so far, by port (reported in the refusal log line).
        self.refused: dict[int, int] = {}

    def allow(self, port: int, source: str) -> bool:
        """Whether a visitor from ``source`` may open a connection on ``port`` now."""
        now = self._clock()
        bucket = self._sources.pop(source, None)
        if bucket is None:
            bucket = TokenBucket(self._per_source, self._burst(self._per_source), now)
        self._sources[source] = bucket
        while len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)
        port_bucket = self._ports.get(port)
        if port_bucket is None:
            port_bucket = self._ports[port] = TokenBucket(self._per_port,
                                                          self._burst(self._per_port), now)
        if bucket.take(now) and port_bucket.take(now):
            return True
        self.refused[port] = self.refused.get(port, 0) + 1
        return False

    def _burst(self, rate: float) -> float:
        return max(1.0, rate * self._burst_seconds)


@dataclass(slots=True)
class _Entry:
    failures: int = 0
    blocked_until: float = 0.0


class Penalties:
    """Per-source login failures with an exponential lock-out after a few attempts.

    The first ``free_failures - 1`` failures cost nothing; the ``free_failures``-th locks the
    source out for ``base`` seconds, and each further one doubles that, up to ``cap``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 free_failures: int = FAILURES_BEFORE_PENALTY, base: float = PENALTY_BASE,
                 cap: float = PENALTY_CAP, max_entries: int = MAX_PENALTY_ENTRIES) -> None:
        self._clock = clock
        self._free = free_failures
        self._base = base
        self._cap = cap
        self._max = max_entries
        self._table: OrderedDict[str, _Entry] = OrderedDict()

    def retry_after(self, source: str) -> float:
        """Seconds this source must wait before another login attempt (0: go ahead)."""
        entry = self._table.get(source)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - self._clock())

    def failed(self, source: str) -> None:
        entry = self._table.pop(source, None) or _Entry()
        entry.failures += 1
        # The 5th failure already costs 1 s: "after 5 failures, a penalty" (reliability S-5),
        # so a source gets 5 quick guesses and then at most one per penalty period.
        extra = entry.failures - max(self._free, 1) + 1
        if extra > 0:
            # Cap the exponent first: 2.0 ** 1030 overflows a float and would wipe the entry.
            penalty = min(self._cap, self._base * 2.0 ** min(extra - 1, _MAX_DOUBLINGS))
            entry.blocked_until = self._clock() + penalty
        self._table[source] = entry
        while len(self._table) > self._max:
            self._table.popitem(last=False)

    def succeeded(self, source: str) -> None:
        self._table.pop(source, None)

    def __len__(self) -> int:
        return len(self._table)


def claim_refusal(port: int, relay_ranges: Iterable[tuple[int, int]],
                  reserved: Mapping[int, str]) -> str | None:
    """Why the relay must not publish ``port`` whatever the leases say (B-12), or None.

    ``reserved`` maps the relay's own ports (control, dashboard) to their role: publishing
    one would hijack or shadow it. The client's grant is checked later by the lease book.
    """
    if isinstance(port, bool) or not 1 <= port <= _MAX_PORT:
        return f"{port!r} is not a port number 1-{_MAX_PORT}"
    role = reserved.get(port)
    if role is not None:
        return f"port {port} is the relay's {role} port"
    if port < PRIVILEGED_BELOW and not any(lo <= port <= hi < PRIVILEGED_BELOW
                                           for lo, hi in relay_ranges):
        return (f"port {port} is privileged (below {PRIVILEGED_BELOW}) and the relay's ports "
                f"do not list it explicitly")
    return None
