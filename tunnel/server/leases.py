"""Port leases: the relay's durable record that a public port belongs to a client identity.

The promise of the tunnel is "ports that stay yours": a client that reconnects next week must
get the same public port for the same local target, even if the relay restarted in between.
That needs allocation state that outlives connections and processes, so it lives here, apart
from sockets and the event loop:

* :class:`LeaseBook` is the pure allocation logic (which port goes to whom, and when an
  abandoned port may be given to someone else). It is single-threaded and does no I/O except
  through its store, so it is cheap to test with a fake clock.
* :class:`LeaseStore` is where leases are kept, behind an asynchronous interface whose claim
  is one atomic step judged by the store: :class:`MemoryLeaseStore` for tests,
  :class:`SqliteLeaseStore` for the relay (one commit per write, so a lease granted just
  before ``kill -9`` is still there after the restart). Because the store, not the book,
  has the last word on who holds a port, several relays may one day share one store.

Two kinds of lease exist. A *fixed* lease comes from an explicit ``port: N`` claim and is
never handed to another client; only an admin ``release()`` frees it. An *auto* lease comes
from "give me any port for this target" and is keyed by ``(client, target)``; once its owner
has been offline longer than ``auto_ttl`` another client may reclaim it, so a pool is not
drained forever by boxes that were decommissioned.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
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
    """Where leases are kept; the book holds a working copy and writes through.

    Every operation is awaited, so an implementation may talk to a database server. The
    store, not its caller, decides who holds a port: :meth:`claim` checks and writes in one
    atomic step, so callers sharing a store (relays of one fleet) can never both win a port,
    however stale their working copies are.
    """

    async def load(self) -> list[Lease]:
        """Every lease, sorted by port."""
        ...

    async def claim(self, lease: Lease, replacing: Lease | None) -> bool:
        """Write ``lease`` for ``lease.port`` if the port is free, already held by
        ``lease.client``, or still held by exactly ``replacing`` (an expired lease the caller
        judged reclaimable); otherwise change nothing. Returns whether it was written."""
        ...

    async def touch(self, client: str, last_seen: float) -> None:
        """Set ``last_seen`` on every lease ``client`` holds, and change nothing else."""
        ...

    async def delete(self, port: int) -> None: ...

    async def close(self) -> None: ...


def _may_claim(current: Lease | None, lease: Lease, replacing: Lease | None) -> bool:
    """The claim rule of :meth:`LeaseStore.claim` for a row ``current`` (None: no row)."""
    return current is None or current.client == lease.client or current == replacing


class MemoryLeaseStore:
    """A store in a dict, for tests; it survives rebuilding a :class:`LeaseBook` over it.

    A claim is atomic because nothing in it awaits.
    """

    def __init__(self, leases: list[Lease] | None = None) -> None:
        self._rows: dict[int, Lease] = {lease.port: lease for lease in leases or []}

    async def load(self) -> list[Lease]:
        return [self._rows[port] for port in sorted(self._rows)]

    async def claim(self, lease: Lease, replacing: Lease | None) -> bool:
        if not _may_claim(self._rows.get(lease.port), lease, replacing):
            return False
        self._rows[lease.port] = lease
        return True

    async def touch(self, client: str, last_seen: float) -> None:
        for port, lease in self._rows.items():
            if lease.client == client:
                self._rows[port] = replace(lease, last_seen=last_seen)

    async def delete(self, port: int) -> None:
        self._rows.pop(port, None)

    async def close(self) -> None:
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
# The claim rule in one statement: insert if the port is free; otherwise update only if the
# row is the claimant's own or is still exactly the lease being replaced. With no
# ``replacing`` its five parameters are NULL, and a comparison with NULL is never true.
# ``rowcount`` is 1 if the row was written and 0 if the WHERE refused it.
_CLAIM_LEASE = """
INSERT INTO leases (port, client, kind, target, created, last_seen) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(port) DO UPDATE SET
    client = excluded.client, kind = excluded.kind, target = excluded.target,
    created = excluded.created, last_seen = excluded.last_seen
WHERE leases.client = excluded.client
    OR (leases.client = ? AND leases.kind = ? AND leases.target = ?
        AND leases.created = ? AND leases.last_seen = ?)"""
_TOUCH_LEASES = "UPDATE leases SET last_seen = ? WHERE client = ?"
_DELETE_LEASE = "DELETE FROM leases WHERE port = ?"


class SqliteLeaseStore:
    """Leases in a SQLite file, committed on every write so they survive ``kill -9``.

    Autocommit mode (``isolation_level=None``) makes each write one statement and its own
    transaction, so a claim is atomic also against another process on the same file. WAL
    with ``synchronous=NORMAL`` keeps that cheap: a commit survives a process crash; only an
    OS crash or power loss can lose the last few commits.

    The statements run inline on the caller's thread, although the methods are ``async``:
    each is one indexed statement with no fsync, far cheaper than handing it to a thread and
    back, and one connection then needs no lock. The event loop waits on storage only as
    long as a write waits for another connection's lock (:data:`SQLITE_BUSY_TIMEOUT_S`).
    Opening the file (integrity check, schema) is synchronous too: it happens once, before
    the relay accepts anyone.
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
            self._disconnect()
            raise LeaseStoreError(f"lease database {self._path}: cannot open: {exc}") from exc
        except BaseException:
            self._disconnect()
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

    async def load(self) -> list[Lease]:
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

    async def claim(self, lease: Lease, replacing: Lease | None) -> bool:
        row = (lease.port, lease.client, lease.kind, lease.target, lease.created, lease.last_seen)
        old = (
            (replacing.client, replacing.kind, replacing.target, replacing.created,
             replacing.last_seen)
            if replacing is not None else (None,) * 5
        )
        return self._write(_CLAIM_LEASE, row + old) == 1

    async def touch(self, client: str, last_seen: float) -> None:
        self._write(_TOUCH_LEASES, (last_seen, client))

    async def delete(self, port: int) -> None:
        self._write(_DELETE_LEASE, (port,))

    def _write(self, sql: str, params: tuple[object, ...]) -> int:
        """Run one write statement; return how many rows it changed."""
        try:
            return self._connection().execute(sql, params).rowcount
        except sqlite3.Error as exc:
            raise LeaseStoreError(f"lease database {self._path}: cannot write: {exc}") from exc

    async def close(self) -> None:
        """Close the connection; safe to call twice."""
        self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def __aenter__(self) -> SqliteLeaseStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class LeaseBook:
    """Allocation logic over a store. Single-threaded (called from the event loop).

    The book keeps every lease in memory (filled by :meth:`load`, which the owner awaits
    before the first claim) and writes each change through to the store before updating
    memory, so nothing a client is told is newer than what is stored. The book proposes and
    the store decides: a claim the store refuses means the working copy was stale, so the
    book reloads it and treats the port as taken.
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
        self._leases: dict[int, Lease] = {}
        # Sessions per client rather than a flag: a reconnect may register the new session
        # before the old one's teardown calls mark_offline, which must not mark it offline.
        self._online: dict[str, int] = {}

    @classmethod
    async def open(
        cls,
        store: LeaseStore,
        relay_ports: PortSet,
        allowed: Callable[[str], PortSet],
        *,
        clock: Clock = time.time,
        auto_ttl: float = AUTO_LEASE_TTL,
    ) -> LeaseBook:
        """A book over ``store``, already loaded."""
        book = cls(store, relay_ports, allowed, clock=clock, auto_ttl=auto_ttl)
        await book.load()
        return book

    async def load(self) -> None:
        """Replace the working copy with what the store holds."""
        self._leases = {lease.port: lease for lease in await self._store.load()}

    # -- claims -------------------------------------------------------------------------

    async def claim_fixed(self, client: str, port: int, target: str) -> tuple[Lease, bool]:
        """Lease ``port`` to ``client`` for ``target``; return ``(lease, created_now)``.

        ``created_now`` is True only when a new row was written, so the caller knows it may
        roll back with :meth:`release` if binding the port then fails.
        """
        self._check_fixed_allowed(client, port)
        now = self._clock()
        current = self._leases.get(port)
        if current is not None and current.client == client:
            lease = replace(current, kind="fixed", target=target, last_seen=now)
            created = False
        elif current is None or self._reclaimable(current, now):
            lease = _new_lease(port, client, "fixed", target, now)
            created = True
        else:
            raise ClaimRefused(port, f"port {port} is leased to another client")
        if not await self._claim(lease, current):
            raise ClaimRefused(port, f"port {port} is leased to another client")
        return lease, created

    async def claim_auto(
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
            if await self._claim(lease, mine):
                return lease, False
        for port in self._free_ports(allowed, usable, now):
            lease = _new_lease(port, client, "auto", target, now)
            if await self._claim(lease, self._leases.get(port)):
                return lease, True
        raise ClaimRefused(
            None, f"no free port left in this client's allowed ports ({_describe(allowed)})"
        )

    async def release(self, port: int) -> Lease | None:
        """Drop the lease on ``port`` (admin release, or rollback of a failed bind)."""
        lease = self._leases.get(port)
        if lease is not None:
            await self._store.delete(port)
            del self._leases[port]
        return lease

    # -- presence -----------------------------------------------------------------------

    async def mark_online(self, client: str) -> None:
        """The owner connected: its leases are fresh, and not reclaimable while it stays."""
        self._online[client] = self._online.get(client, 0) + 1
        await self._touch(client)

    async def mark_offline(self, client: str) -> None:
        """One session of the owner ended; the expiry clock runs once the last one has."""
        sessions = self._online.get(client, 0) - 1
        if sessions > 0:
            self._online[client] = sessions
        else:
            self._online.pop(client, None)
        await self._touch(client)

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
        so a client cannot probe who holds ports it may not use.

        A refusal names only the ports this client may use: the relay's whole range would
        tell it which ports other clients were granted.
        """
        if port not in self._relay_ports:
            allowed = self._allowed_for(client)
            raise ClaimRefused(
                port,
                f"port {port} is not in the relay's allowed ports "
                f"(this client may use: {_describe(allowed)})",
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

    def _free_ports(
        self, allowed: PortSet, usable: Callable[[int], bool], now: float
    ) -> Iterator[int]:
        """Usable never-leased ports, lowest first; after them the usable reclaimable ones.

        Unleased ports go first so an expired lease is only taken when the pool would
        otherwise be exhausted: its owner may still come back after the TTL. Lazy, so
        ``usable`` is asked only about ports a claim is about to try.
        """
        reclaimable: list[int] = []
        for port in allowed:
            current = self._leases.get(port)
            if current is None:
                if usable(port):
                    yield port
            elif self._reclaimable(current, now):
                reclaimable.append(port)
        for port in reclaimable:
            # Read again: a claim lost meanwhile reloaded the working copy.
            current = self._leases.get(port)
            if (current is None or self._reclaimable(current, now)) and usable(port):
                yield port

    def _reclaimable(self, lease: Lease, now: float) -> bool:
        """Only auto leases of clients offline for longer than the TTL may change hands."""
        return (
            lease.kind == "auto"
            and lease.client not in self._online
            and now - lease.last_seen > self._auto_ttl
        )

    async def _claim(self, lease: Lease, current: Lease | None) -> bool:
        """Ask the store for ``lease`` over ``current`` (the working copy's row, None if free).

        Store first: if the store refuses or fails, memory still matches what is stored.
        """
        if await self._store.claim(lease, current):
            self._leases[lease.port] = lease
            return True
        await self.load()
        return False

    async def _touch(self, client: str) -> None:
        now = self._clock()
        await self._store.touch(client, now)
        for lease in self.leases_of(client):
            self._leases[lease.port] = replace(lease, last_seen=now)


def _new_lease(port: int, client: str, kind: LeaseKind, target: str, now: float) -> Lease:
    return Lease(port=port, client=client, kind=kind, target=target, created=now, last_seen=now)


def _describe(ports: PortSet) -> str:
    return ports.describe() or "none"
