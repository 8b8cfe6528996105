"""Port leases: the relay's durable record that a public port belongs to a client identity.

The promise of the tunnel is "ports that stay yours": a client that reconnects next week must
get the same public port for the same local target, even if the relay restarted in between.
That needs allocation state that outlives connections and processes, so it lives here, apart
from sockets and the event loop:

* :class:`LeaseBook` is the pure allocation logic (which port goes to whom, and when an
  abandoned port may be given to someone else). It is single-threaded and does no I/O except
  through its store, so it is cheap to test with a fake clock.
* :class:`LeaseStore` is where leases are kept: :class:`MemoryLeaseStore` for tests,
  :class:`SqliteLeaseStore` for the relay (one commit per write, so a lease granted just
  before ``kill -9`` is still there after the restart).

Two kinds of lease exist. A *fixed* lease comes from an explicit ``port: N`` claim and is
never handed to another client; only an admin ``release()`` frees it. An *auto* lease comes
from "give me any port for this target" and is keyed by ``(client, target)``; once its owner
has been offline longer than ``auto_ttl`` another client may reclaim it, so a pool is not
drained forever by boxes that were decommissioned.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol, TypeGuard, get_args

from tunnel.common.config.statefiles import prepare_sqlite_file
from tunnel.common.errors import ClaimRefused, TunnelError
from tunnel.common.proto.portset import MAX_PORT, MIN_PORT, PortSet

__all__ = [
    "AUTO_LEASE_TTL",
    "SCHEMA_VERSION",
    "Clock",
    "Lease",
    "LeaseBook",
    "LeaseKind",
    "LeaseStore",
    "LeaseStoreError",
    "MemoryLeaseStore",
    "SqliteLeaseStore",
]

#: An auto lease whose owner has been offline this long may be reclaimed by another client.
#: A week covers a long weekend plus a holiday: a box that is merely switched off keeps its port.
AUTO_LEASE_TTL = 7 * 24 * 3600.0

#: Version of the SQLite layout; a file with a higher number was written by newer code.
SCHEMA_VERSION = 1

#: How long a write waits for another connection's lock. Short on purpose: the book is called
#: from the event loop, and only admin tools should ever hold a second connection.
SQLITE_BUSY_TIMEOUT_S = 1.0

Clock = Callable[[], float]
LeaseKind = Literal["fixed", "auto"]

_LEASE_KINDS: frozenset[str] = frozenset(get_args(LeaseKind))


class LeaseStoreError(TunnelError):
    """The lease database cannot be used (corrupt, newer schema, I/O failure).

    The message names the file, because the operator's fix is almost always about that file:
    restore it, move it away, or upgrade the relay.
    """


def _is_kind(value: object) -> TypeGuard[LeaseKind]:
    return isinstance(value, str) and value in _LEASE_KINDS


@dataclass(frozen=True, slots=True)
class Lease:
    """One port's owner.

    Frozen, so a caller holding a lease cannot change the book behind its back; the book
    replaces leases instead of mutating them.
    """

    port: int
    client: str
    kind: LeaseKind
    #: The client's local target ``"host:port"`` the port was claimed for.
    target: str
    created: float
    #: Last time the owner was online with this lease (drives auto-lease expiry).
    last_seen: float

    def __post_init__(self) -> None:
        # Leases come back from disk; reject rows no code path could have written.
        if isinstance(self.port, bool) or not MIN_PORT <= self.port <= MAX_PORT:
            raise ValueError(f"lease port out of range: {self.port!r}")
        if not _is_kind(self.kind):
            raise ValueError(f"unknown lease kind: {self.kind!r}")
        if not self.client:
            raise ValueError("lease client must not be empty")


class LeaseStore(Protocol):
    """Where leases are kept; the book holds the working copy and writes through."""

    def load(self) -> list[Lease]: ...

    def put(self, lease: Lease) -> None:
        """Insert or replace the lease for ``lease.port``."""
        ...

    def delete(self, port: int) -> None: ...

    def close(self) -> None: ...


class MemoryLeaseStore:
    """A store in a dict, for tests; it survives rebuilding a :class:`LeaseBook` over it."""

    def __init__(self, leases: list[Lease] | None = None) -> None:
        self._rows: dict[int, Lease] = {lease.port: lease for lease in leases or []}

    def load(self) -> list[Lease]:
        return [self._rows[port] for port in sorted(self._rows)]

    def put(self, lease: Lease) -> None:
        self._rows[lease.port] = lease

    def delete(self, port: int) -> None:
        self._rows.pop(port, None)

    def close(self) -> None:
        """Nothing to release."""


_CREATE_LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    port INTEGER PRIMARY KEY,
    client TEXT NOT NULL,
    kind TEXT NOT NULL CHECK(kind IN ('fixed','auto')),
    target TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL
)"""
_CREATE_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
_INIT_VERSION = "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)"
_SELECT_VERSION = "SELECT value FROM meta WHERE key = 'schema_version'"
_SELECT_LEASES = "SELECT port, client, kind, target, created, last_seen FROM leases ORDER BY port"
_UPSERT_LEASE = (
    "INSERT OR REPLACE INTO leases (port, client, kind, target, created, last_seen) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_DELETE_LEASE = "DELETE FROM leases WHERE port = ?"


class SqliteLeaseStore:
    """Leases in a SQLite file, committed on every write so they survive ``kill -9``.

    Autocommit mode (``isolation_level=None``) makes each ``put``/``delete`` its own
    transaction. WAL with ``synchronous=NORMAL`` keeps that cheap: a commit survives a process
    crash; only an OS crash or power loss can lose the last few commits.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._conn: sqlite3.Connection | None = None
        try:
            prepare_sqlite_file(self._path)
        except OSError as exc:
            raise LeaseStoreError(f"lease database {self._path}: cannot create: {exc}") from exc
        try:
            self._conn = sqlite3.connect(
                self._path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S
            )
            self._setup(self._conn)
        except sqlite3.Error as exc:
            self.close()
            raise LeaseStoreError(f"lease database {self._path}: cannot open: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    def _setup(self, conn: sqlite3.Connection) -> None:
        """Check the file is ours and intact before the relay trusts a single row of it."""
        row = conn.execute("PRAGMA quick_check").fetchone()
        if row is None or row[0] != "ok":
            detail = row[0] if row else "no result"
            raise LeaseStoreError(f"lease database {self._path} is corrupt: {detail}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_META)
            conn.execute(_INIT_VERSION, (str(SCHEMA_VERSION),))
            self._check_version(conn)
            conn.execute(_CREATE_LEASES)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = conn.execute(_SELECT_VERSION).fetchone()
        try:
            version = int(row[0])
        except (TypeError, ValueError):
            raise LeaseStoreError(
                f"lease database {self._path} has an unreadable schema_version: {row!r}"
            ) from None
        if version > SCHEMA_VERSION:
            raise LeaseStoreError(
                f"lease database {self._path} has schema version {version}, newer than this "
                f"relay understands ({SCHEMA_VERSION}); upgrade the relay"
            )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LeaseStoreError(f"lease database {self._path} is closed")
        return self._conn

    def load(self) -> list[Lease]:
        try:
            rows = self._connection().execute(_SELECT_LEASES).fetchall()
        except sqlite3.Error as exc:
            raise LeaseStoreError(f"lease database {self._path}: cannot read: {exc}") from exc
        return [self._row_to_lease(row) for row in rows]

    def _row_to_lease(self, row: tuple[object, ...]) -> Lease:
        """Rebuild a lease, refusing rows whose types SQLite's loose typing let through."""
        port, client, kind, target, created, last_seen = row
        if (
            isinstance(port, int)
            and isinstance(client, str)
            and _is_kind(kind)
            and isinstance(target, str)
            and isinstance(created, int | float)
            and isinstance(last_seen, int | float)
        ):
            try:
                return Lease(port, client, kind, target, float(created), float(last_seen))
            except ValueError:
                pass
        raise LeaseStoreError(f"lease database {self._path} holds an invalid row: {row!r}")

    def put(self, lease: Lease) -> None:
        row = (lease.port, lease.client, lease.kind, lease.target, lease.created, lease.last_seen)
        self._write(_UPSERT_LEASE, row)

    def delete(self, port: int) -> None:
        self._write(_DELETE_LEASE, (port,))

    def _write(self, sql: str, params: tuple[object, ...]) -> None:
        try:
            self._connection().execute(sql, params)
        except sqlite3.Error as exc:
            raise LeaseStoreError(f"lease database {self._path}: cannot write: {exc}") from exc

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> SqliteLeaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseBook:
    """Pure allocation logic over a store. Single-threaded (called from the event loop).

    The book keeps every lease in memory and writes each change through to the store before
    updating memory, so nothing a client is told is newer than what is on disk.
    """

    def __init__(
        self,
        store: LeaseStore,
        relay_ports: PortSet,
        allowed: Callable[[str], PortSet],
        *,
        clock: Clock = time.time,
        auto_ttl: float = AUTO_LEASE_TTL,
    ) -> None:
        self._store = store
        self._relay_ports = relay_ports
        self._allowed = allowed
        self._clock = clock
        self._auto_ttl = auto_ttl
        self._leases: dict[int, Lease] = {lease.port: lease for lease in store.load()}
        # Sessions per client rather than a flag: a reconnect may register the new session
        # before the old one's teardown calls mark_offline, which must not mark it offline.
        self._online: dict[str, int] = {}

    # -- claims -------------------------------------------------------------------------

    def claim_fixed(self, client: str, port: int, target: str) -> tuple[Lease, bool]:
        """Lease ``port`` to ``client`` for ``target``; return ``(lease, created_now)``.

        ``created_now`` is True only when a new row was written, so the caller knows it may
        roll back with :meth:`release` if binding the port then fails.
        """
        self._check_fixed_allowed(client, port)
        now = self._clock()
        current = self._leases.get(port)
        if current is not None and current.client == client:
            lease = replace(current, kind="fixed", target=target, last_seen=now)
            self._save(lease)
            return lease, False
        if current is not None and not self._reclaimable(current, now):
            raise ClaimRefused(port, f"port {port} is leased to another client")
        return self._create(port, client, "fixed", target, now), True

    def claim_auto(
        self, client: str, target: str, usable: Callable[[int], bool] = lambda p: True
    ) -> tuple[Lease, bool]:
        """Lease some port to ``client`` for ``target``: the same one as last time if possible.

        ``usable(port)`` lets the caller skip ports another program has bound; it is only
        consulted for ports this call would newly lease, never for the client's own lease.
        """
        allowed = self._allowed_for(client)
        now = self._clock()
        mine = self._auto_lease_for(client, target, allowed)
        if mine is not None:
            lease = replace(mine, last_seen=now)
            self._save(lease)
            return lease, False
        port = self._pick_free(allowed, usable, now)
        if port is None:
            raise ClaimRefused(
                None, f"no free port left in this client's allowed ports ({_describe(allowed)})"
            )
        return self._create(port, client, "auto", target, now), True

    def release(self, port: int) -> Lease | None:
        """Drop the lease on ``port`` (admin release, or rollback of a failed bind)."""
        lease = self._leases.get(port)
        if lease is not None:
            self._store.delete(port)
            del self._leases[port]
        return lease

    # -- presence -----------------------------------------------------------------------

    def mark_online(self, client: str) -> None:
        """The owner connected: its leases are fresh, and not reclaimable while it stays."""
        self._online[client] = self._online.get(client, 0) + 1
        self._touch(client)

    def mark_offline(self, client: str) -> None:
        """One session of the owner ended; the expiry clock runs once the last one has."""
        sessions = self._online.get(client, 0) - 1
        if sessions > 0:
            self._online[client] = sessions
        else:
            self._online.pop(client, None)
        self._touch(client)

    def is_online(self, client: str) -> bool:
        return client in self._online

    # -- queries ------------------------------------------------------------------------

    def owner(self, port: int) -> str | None:
        lease = self._leases.get(port)
        return lease.client if lease is not None else None

    def get(self, port: int) -> Lease | None:
        return self._leases.get(port)

    def leases(self) -> list[Lease]:
        """All leases sorted by port, including ones the current config no longer allows."""
        return [self._leases[port] for port in sorted(self._leases)]

    def leases_of(self, client: str) -> list[Lease]:
        return [lease for lease in self.leases() if lease.client == client]

    def is_reclaimable(self, lease: Lease) -> bool:
        """Whether another client could take ``lease`` over now (for admin listings)."""
        return self._reclaimable(lease, self._clock())

    # -- internals ----------------------------------------------------------------------

    def _allowed_for(self, client: str) -> PortSet:
        # The caller promises allowed() is already within relay_ports; intersecting again is
        # cheap and means a config bug can never lease a port outside the relay's range.
        return self._allowed(client).intersection(self._relay_ports)

    def _check_fixed_allowed(self, client: str, port: int) -> None:
        """Refuse ports outside the relay's range or the client's grant, before any lookup,
        so a client cannot probe who holds ports it may not use."""
        if port not in self._relay_ports:
            raise ClaimRefused(
                port,
                f"port {port} is not in the relay's allowed ports "
                f"({_describe(self._relay_ports)})",
            )
        if port not in self._allowed(client):  # already in the relay's range: no intersection
            allowed = self._allowed_for(client)
            raise ClaimRefused(
                port, f"port {port} is not allowed for this client (allowed: {_describe(allowed)})"
            )

    def _auto_lease_for(self, client: str, target: str, allowed: PortSet) -> Lease | None:
        """The client's auto lease for ``target`` on a still-allowed port (lowest if several)."""
        for lease in self.leases():
            if (
                lease.client == client
                and lease.kind == "auto"
                and lease.target == target
                and lease.port in allowed
            ):
                return lease
        return None

    def _pick_free(
        self, allowed: PortSet, usable: Callable[[int], bool], now: float
    ) -> int | None:
        """Lowest usable never-leased port; failing that, the lowest usable reclaimable one.

        Unleased ports go first so an expired lease is only taken when the pool would
        otherwise be exhausted: its owner may still come back after the TTL.
        """
        reclaimable: list[int] = []
        for port in allowed:
            current = self._leases.get(port)
            if current is None:
                if usable(port):
                    return port
            elif self._reclaimable(current, now):
                reclaimable.append(port)
        return next((port for port in reclaimable if usable(port)), None)

    def _reclaimable(self, lease: Lease, now: float) -> bool:
        """Only auto leases of clients offline for longer than the TTL may change hands."""
        return (
            lease.kind == "auto"
            and lease.client not in self._online
            and now - lease.last_seen > self._auto_ttl
        )

    def _create(self, port: int, client: str, kind: LeaseKind, target: str, now: float) -> Lease:
        """Write a new lease; on a reclaimed port this replaces (deletes) the expired one."""
        lease = Lease(
            port=port, client=client, kind=kind, target=target, created=now, last_seen=now
        )
        self._save(lease)
        return lease

    def _save(self, lease: Lease) -> None:
        # Store first: if the write fails, memory still matches what is on disk.
        self._store.put(lease)
        self._leases[lease.port] = lease

    def _touch(self, client: str) -> None:
        now = self._clock()
        for lease in self.leases_of(client):
            self._save(replace(lease, last_seen=now))


def _describe(ports: PortSet) -> str:
    return ports.describe() or "none"
