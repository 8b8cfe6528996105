"""Samples the relay's byte counters into rates (memory) and history (SQLite).

Runs as one background task; the data path only ever increments counters. Every
``SAMPLE_INTERVAL`` the monitor reads the totals per tunnel, per client and for the relay,
feeds the rate tracker, and adds the growth per tunnel to the minute history, which it
writes to disk every ``flush_interval()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from tunnel.server.history import HistoryStore, flush_interval
from tunnel.server.registry import Registry
from tunnel.server.stats import SAMPLE_INTERVAL, RateTracker

__all__ = ["HISTORY_DB_NAME", "Monitor"]

HISTORY_DB_NAME = "history.sqlite3"
log = logging.getLogger("tunnel.server.monitor")


class Monitor:
    def __init__(self, registry: Registry, state_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.stats = RateTracker(clock)
        self.history = HistoryStore(state_dir / HISTORY_DB_NAME, clock)
        self._clock = clock
        self._seen: dict[tuple[str, int], tuple[int, int]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="monitor")

    async def _run(self) -> None:
        interval = min(SAMPLE_INTERVAL, flush_interval())
        next_flush = self._clock() + flush_interval()
        while True:
            await asyncio.sleep(interval)
            self.sample()
            if self._clock() >= next_flush:
                next_flush = self._clock() + flush_interval()
                self._flush()

    def sample(self) -> None:
        """Read every counter once (cheap: a few integer reads per tunnel)."""
        per_client: dict[str, list[int]] = {name: [0, 0] for name in self.registry.clients}
        total = [0, 0]
        for port, tunnel in self.registry.by_port.items():
            bin_, bout = tunnel.traffic.bytes_in, tunnel.traffic.bytes_out
            self.stats.sample(("tunnel", port), bin_, bout)
            key = (tunnel.client, port)
            last_in, last_out = self._seen.get(key, (0, 0))
            if bin_ < last_in or bout < last_out:
                last_in, last_out = 0, 0  # a fresh record for this port
            self.history.add(tunnel.client, port, bin_ - last_in, bout - last_out)
            self._seen[key] = (bin_, bout)
            sums = per_client.setdefault(tunnel.client, [0, 0])
            sums[0] += bin_
            sums[1] += bout
            total[0] += bin_
            total[1] += bout
        for name, (bin_, bout) in per_client.items():
            self.stats.sample(("client", name), bin_, bout)
        self.stats.sample(("relay",), total[0], total[1])

    def _flush(self) -> None:
        try:
            self.history.flush()
        except Exception:  # a full disk must not stop the relay; the next flush retries
            log.exception("could not write traffic history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()
        self._flush()
        self.history.close()
