"""Per-minute traffic history per client and tunnel, kept in SQLite for a week.

frp's users lose their traffic history on every restart; here each minute's bytes per
(client, port) are added up in memory and written once a minute, so a restart loses at
most the current minute. Rows older than ``RETENTION`` are deleted on every flush, which
bounds the file: one row per tunnel per minute, at most a week of them.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from tunnel.common.config.statefiles import prepare_sqlite_file

__all__ = ["FLUSH_INTERVAL", "FLUSH_INTERVAL_ENV", "RETENTION", "HistoryStore",
           "flush_interval"]

RETENTION = 7 * 24 * 3600.0
MINUTE = 60
FLUSH_INTERVAL = 60.0
#: Tests shorten the flush interval with this variable (seconds); production keeps 60 s.
FLUSH_INTERVAL_ENV = "TUNNEL_HISTORY_FLUSH_INTERVAL"
MAX_QUERY_ROWS = 20_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic (
    minute INTEGER NOT NULL, client TEXT NOT NULL, port INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL,
    PRIMARY KEY (minute, client, port))
"""
_UPSERT = """
INSERT INTO traffic (minute, client, port, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (minute, client, port) DO UPDATE SET
    bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out
"""


def flush_interval(env: dict[str, str] | None = None) -> float:
    raw = (os.environ if env is None else env).get(FLUSH_INTERVAL_ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return FLUSH_INTERVAL
    return min(FLUSH_INTERVAL, max(0.1, value))


class HistoryStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        prepare_sqlite_file(path)  # 0600 in a 0700 dir, never through a link
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._pending: dict[tuple[int, str, int], list[int]] = {}

    def add(self, client: str, port: int, bytes_in: int, bytes_out: int) -> None:
        """Count bytes for the current minute (cheap: memory only until the next flush)."""
        if bytes_in <= 0 and bytes_out <= 0:
            return
        minute = int(self._clock()) // MINUTE * MINUTE
        slot = self._pending.setdefault((minute, client, port), [0, 0])
        slot[0] += max(0, bytes_in)
        slot[1] += max(0, bytes_out)

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        cutoff = int(self._clock() - RETENTION)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(_UPSERT, [(m, c, p, v[0], v[1])
                                           for (m, c, p), v in pending.items()])
            self._db.execute("DELETE FROM traffic WHERE minute < ?", (cutoff,))

    def query(self, client: str | None, port: int | None,
              since: float) -> list[tuple[float, int, int]]:
        """Bytes per minute since ``since`` (flushed and pending), summed over the filter."""
        totals: dict[int, list[int]] = {}
        sql = "SELECT minute, SUM(bytes_in), SUM(bytes_out) FROM traffic WHERE minute >= ?"
        params: list[object] = [int(since) // MINUTE * MINUTE]
        if client is not None:
            sql += " AND client = ?"
            params.append(client)
        if port is not None:
            sql += " AND port = ?"
            params.append(port)
        sql += " GROUP BY minute ORDER BY minute LIMIT ?"
        params.append(MAX_QUERY_ROWS)
        for minute, bin_, bout in self._db.execute(sql, params):
            totals[int(minute)] = [int(bin_), int(bout)]
        for (minute, c, p), (bin_, bout) in self._pending.items():
            if minute >= since - MINUTE and (client is None or c == client) \
                    and (port is None or p == port):
                slot = totals.setdefault(minute, [0, 0])
                slot[0] += bin_
                slot[1] += bout
        return [(float(m), v[0], v[1]) for m, v in sorted(totals.items())]

    def close(self) -> None:
        self._db.close()
