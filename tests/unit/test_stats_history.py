"""Rates and per-minute history, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import itertools
import tracemalloc
from pathlib import Path

from tunnel.server.history import RETENTION, HistoryStore, flush_interval
from tunnel.server.stats import SERIES_POINTS, RateTracker


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rate_is_growth_per_second_and_series_is_bounded() -> None:
    clock = Clock()
    tracker = RateTracker(clock, points=3)
    key = ("tunnel", 6000)
    assert tracker.rate(key) == (0.0, 0.0)
    tracker.sample(key, 0, 0)
    for step in range(1, 6):
        clock.now += 5
        tracker.sample(key, step * 5000, step * 500)
    assert tracker.rate(key) == (1000.0, 100.0)
    series = tracker.series(key)
    assert len(series) == 3  # bounded
    assert [round(p[0] - series[0][0]) for p in series] == [0, 5, 10]


def test_a_series_takes_its_whole_memory_at_its_first_point() -> None:
    """A relay's memory must not creep up for the first hour while series fill (the soak,
    reliability L-5, reads that as a leak): later points reuse the ring's slots."""
    clock = Clock()
    tracker = RateTracker(clock)
    keys = [("tunnel", port) for port in range(6000, 6010)]
    for step in range(2):
        clock.now += 5
        for key in keys:
            tracker.sample(key, step, step)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(2, 2 + SERIES_POINTS + 100):  # wraps around each ring
            clock.now += 5
            for key in keys:
                tracker.sample(key, step * 1000, step)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4096, f"{grown} bytes more after {SERIES_POINTS + 100} points per key"
    series = tracker.series(keys[0])
    assert len(series) == SERIES_POINTS
    assert series[-1][0] == clock.now and series[-1][1] == 200.0  # 1000 bytes per 5 s
    assert [b[0] - a[0] for a, b in itertools.pairwise(series)] == [5.0] * (SERIES_POINTS - 1)


def test_counter_reset_does_not_give_negative_rates() -> None:
    clock = Clock()
    tracker = RateTracker(clock)
    tracker.sample(("client", "a"), 10_000, 10_000)
    clock.now += 1
    tracker.sample(("client", "a"), 5, 5)
    assert tracker.rate(("client", "a")) == (0.0, 0.0)


def test_history_sums_minutes_and_survives_reopen(tmp_path: Path) -> None:
    clock = Clock(60 * 100_000.0)
    path = tmp_path / "history.sqlite3"
    store = HistoryStore(path, clock)
    store.add("alpha", 6000, 100, 10)
    store.add("alpha", 6000, 50, 5)
    store.add("alpha", 6001, 1, 1)
    store.add("beta", 6002, 7, 7)
    pending = store.query("alpha", None, clock.now - 3600)
    assert pending == [(60 * 100_000.0, 151, 16)]  # pending bytes are visible before a flush
    store.flush()
    clock.now += 60
    store.add("alpha", 6000, 9, 9)
    store.flush()
    store.close()

    reopened = HistoryStore(path, clock)
    assert reopened.query("alpha", 6000, clock.now - 3600) == [
        (60 * 100_000.0, 150, 15), (60 * 100_001.0, 9, 9)]
    assert reopened.query(None, None, clock.now - 3600)[0][1] == 158
    reopened.close()


def test_history_forgets_rows_older_than_retention(tmp_path: Path) -> None:
    clock = Clock(60 * 100_000.0)
    store = HistoryStore(tmp_path / "h.sqlite3", clock)
    store.add("alpha", 6000, 1, 1)
    store.flush()
    clock.now += RETENTION + 120
    store.add("alpha", 6000, 2, 2)
    store.flush()
    points = store.query("alpha", 6000, 0)
    assert [p[1] for p in points] == [2]
    store.close()


def test_flush_interval_env() -> None:
    assert flush_interval({}) == 60.0
    assert flush_interval({"TUNNEL_HISTORY_FLUSH_INTERVAL": "1"}) == 1.0
    assert flush_interval({"TUNNEL_HISTORY_FLUSH_INTERVAL": "0"}) == 0.1
    assert flush_interval({"TUNNEL_HISTORY_FLUSH_INTERVAL": "nope"}) == 60.0
