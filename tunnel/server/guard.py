"""Bounded work before authentication: connection caps and login-failure penalties.

Everything an unauthenticated peer can make the relay hold is capped: concurrent pre-auth
connections per source and in total (OpenSSH ``MaxStartups``/``PerSourceMaxStartups``), and
a penalty table of failing sources that is itself bounded (LRU), so a flood of addresses
cannot grow it without limit. Time comes from an injected clock.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "FAILURES_BEFORE_PENALTY",
    "MAX_PENALTY_ENTRIES",
    "MAX_PREAUTH_PER_SOURCE",
    "MAX_PREAUTH_TOTAL",
    "MAX_VISITORS_PER_SOURCE",
    "PENALTY_BASE",
    "PENALTY_CAP",
    "Penalties",
    "PreAuthSlots",
    "SourceSlots",
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
_MAX_DOUBLINGS = 64


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
