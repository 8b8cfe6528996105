"""Traffic rates: the last hour of samples per relay, client and tunnel, in memory.

Byte counters are updated as data flows (see ``link.Traffic``); this module only samples
them every ``SAMPLE_INTERVAL`` so the status page can show a rate and an hour-long chart
without touching the data path. Memory is bounded and constant: each key's series is a ring
of ``SERIES_POINTS`` points in one array of doubles (17 KiB), allocated whole at its first
point, so a relay's memory does not grow for the first hour after start, which a soak
(reliability L-5) would read as the relay's RSS creeping up.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["SAMPLE_INTERVAL", "SERIES_POINTS", "LinkCounters", "RateTracker"]

SAMPLE_INTERVAL = 5.0
SERIES_SECONDS = 3600.0
SERIES_POINTS = int(SERIES_SECONDS / SAMPLE_INTERVAL)

Key = tuple[Hashable, ...]
Point = tuple[float, float, float]  # (time, bytes/s in, bytes/s out)
_FIELDS = 3  # doubles per point


class _Ring:
    """The last ``capacity`` points of one series, oldest overwritten first."""

    __slots__ = ("_capacity", "_count", "_next", "_values")

    def __init__(self, capacity: int) -> None:
        self._values = array("d", bytes(8 * _FIELDS * capacity))
        self._capacity = capacity
        self._next = 0  # the slot the next point goes to
        self._count = 0

    def append(self, point: Point) -> None:
        base = self._next * _FIELDS
        self._values[base:base + _FIELDS] = array("d", point)
        self._next = (self._next + 1) % self._capacity
        self._count = min(self._count + 1, self._capacity)

    def last(self) -> Point:
        base = (self._next - 1) % self._capacity * _FIELDS
        return self._point(base)

    def points(self) -> list[Point]:
        first = (self._next - self._count) % self._capacity
        return [self._point((first + i) % self._capacity * _FIELDS) for i in range(self._count)]

    def __len__(self) -> int:
        return self._count

    def _point(self, base: int) -> Point:
        values = self._values
        return values[base], values[base + 1], values[base + 2]


class RateTracker:
    """Turns monotonically growing byte totals into rates and a bounded time series."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 points: int = SERIES_POINTS) -> None:
        self._clock = clock
        self._points = points
        self._last: dict[Key, tuple[float, int, int]] = {}
        self._series: dict[Key, _Ring] = {}

    def sample(self, key: Key, total_in: int, total_out: int) -> None:
        now = self._clock()
        last = self._last.get(key)
        self._last[key] = (now, total_in, total_out)
        if last is None:
            return
        elapsed = now - last[0]
        if elapsed <= 0:
            return
        # A counter that went backwards (a port handed to a new tunnel record) restarts.
        din = max(0, total_in - last[1]) / elapsed
        dout = max(0, total_out - last[2]) / elapsed
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Ring(self._points)
        series.append((now, din, dout))

    def rate(self, key: Key) -> tuple[float, float]:
        """The rate over the last sample interval (0 before two samples exist)."""
        series = self._series.get(key)
        if not series:
            return 0.0, 0.0
        _, din, dout = series.last()
        return din, dout

    def series(self, key: Key) -> list[Point]:
        series = self._series.get(key)
        return series.points() if series is not None else []

    def forget(self, key: Key) -> None:
        self._last.pop(key, None)
        self._series.pop(key, None)

    def keys(self) -> list[Key]:
        return list(self._last)


@dataclass
class LinkCounters:
    """Relay-wide counts of hostile or broken link input (reliability B-3, B-4).

    Incremented when a link ends (or a login is abandoned), so the data path pays nothing;
    shown in the JSON status and as Prometheus counters, so an operator sees an attack or a
    buggy peer without reading the log.
    """

    #: Links (logged in or not) closed because the peer broke the wire protocol.
    protocol_errors: int = 0
    #: Frames that arrived for streams already gone: drained, not errors (up to a rate).
    stray_frames: int = 0
