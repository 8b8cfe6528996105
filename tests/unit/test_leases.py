"""Lease allocation and storage: ports stay with their owner, across reconnects and restarts."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunnel.common.errors import ClaimRefused
from tunnel.common.proto.portset import PortSet
from tunnel.server.leases import (
    AUTO_LEASE_TTL,
    SCHEMA_VERSION,
    Lease,
    LeaseBook,
    LeaseStore,
    LeaseStoreError,
    MemoryLeaseStore,
    SqliteLeaseStore,
)

RELAY = PortSet([(6000, 6999)])
POOL = PortSet([(6000, 6004)])
T0 = 1_700_000_000.0
DAY = 24 * 3600.0


class FakeClock:
    """Wall clock the test moves by hand; the book never sleeps, so neither do the tests."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def grant(ports: PortSet = POOL, **per_client: PortSet) -> Callable[[str], PortSet]:
    """allowed(): ``ports`` for every client unless one is named with its own set."""
    return lambda client: per_client.get(client, ports)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    """Every book scenario runs over both stores: the SQLite one must behave the same."""
    s: LeaseStore
    s = MemoryLeaseStore() if request.param == "memory" else SqliteLeaseStore(tmp_path / "l.db")
    yield s
    s.close()


@pytest.fixture
def book(store: LeaseStore, clock: FakeClock) -> LeaseBook:
    return LeaseBook(store, RELAY, grant(), clock=clock)


# -- fixed claims ---------------------------------------------------------------------------


def test_fixed_claim_records_a_lease(book: LeaseBook, store: LeaseStore) -> None:
    lease, created = book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert created
    assert lease == Lease(6002, "alice", "fixed", "127.0.0.1:8888", T0, T0)
    assert book.get(6002) == lease
    assert book.owner(6002) == "alice"
    assert store.load() == [lease]


def test_same_client_reclaims_its_fixed_port(book: LeaseBook, clock: FakeClock) -> None:
    book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    clock.advance(30 * DAY)
    again, created = book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert not created
    assert (again.port, again.created, again.last_seen) == (6002, T0, T0 + 30 * DAY)


def test_fixed_reclaim_with_a_new_target_updates_the_target(book: LeaseBook) -> None:
    book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    lease, created = book.claim_fixed("alice", 6002, "127.0.0.1:22")
    assert not created
    assert book.get(6002) == lease
    assert lease.target == "127.0.0.1:22"


@pytest.mark.parametrize(
    ("owner_online", "wait"),
    [(True, 0.0), (False, 0.0), (False, 1000 * AUTO_LEASE_TTL)],
    ids=["owner-online", "owner-offline", "owner-gone-for-ages"],
)
def test_fixed_lease_is_never_taken_by_another_client(
    book: LeaseBook, clock: FakeClock, owner_online: bool, wait: float
) -> None:
    book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    book.mark_online("alice")
    if not owner_online:
        book.mark_offline("alice")
    clock.advance(wait)
    with pytest.raises(ClaimRefused) as info:
        book.claim_fixed("bob", 6002, "127.0.0.1:9999")
    assert info.value.port == 6002
    assert info.value.reason == "port 6002 is leased to another client"
    assert "alice" not in str(info.value)
    assert book.owner(6002) == "alice"


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        (5999, "port 5999 is not in the relay's allowed ports (6000-6999)"),
        (7000, "port 7000 is not in the relay's allowed ports (6000-6999)"),
        (6005, "port 6005 is not allowed for this client (allowed: 6000-6004)"),
    ],
)
def test_fixed_claim_outside_the_grant_is_refused(
    book: LeaseBook, store: LeaseStore, port: int, reason: str
) -> None:
    with pytest.raises(ClaimRefused) as info:
        book.claim_fixed("alice", port, "127.0.0.1:8888")
    assert (info.value.port, info.value.reason) == (port, reason)
    assert book.leases() == [] and store.load() == []


def test_fixed_claim_by_a_client_with_no_ports_says_none(clock: FakeClock) -> None:
    book = LeaseBook(MemoryLeaseStore(), RELAY, grant(mallory=PortSet()), clock=clock)
    with pytest.raises(ClaimRefused, match=r"allowed: none\)"):
        book.claim_fixed("mallory", 6000, "127.0.0.1:1")


def test_fixed_claim_converts_the_clients_own_auto_lease(book: LeaseBook) -> None:
    auto, _ = book.claim_auto("alice", "127.0.0.1:8888")
    fixed, created = book.claim_fixed("alice", auto.port, "127.0.0.1:6006")
    assert not created
    assert (fixed.kind, fixed.target, fixed.created) == ("fixed", "127.0.0.1:6006", auto.created)
    assert book.leases() == [fixed]


# -- auto claims ----------------------------------------------------------------------------


def test_auto_gives_the_lowest_free_port_and_the_same_one_again(
    book: LeaseBook, clock: FakeClock
) -> None:
    first, created = book.claim_auto("alice", "127.0.0.1:8888")
    assert (first.port, first.kind, created) == (6000, "auto", True)
    clock.advance(DAY)
    again, created = book.claim_auto("alice", "127.0.0.1:8888")
    assert (again.port, created, again.last_seen) == (6000, False, T0 + DAY)


def test_two_targets_get_two_ports(book: LeaseBook) -> None:
    jupyter, _ = book.claim_auto("alice", "127.0.0.1:8888")
    ssh, _ = book.claim_auto("alice", "127.0.0.1:22")
    assert (jupyter.port, ssh.port) == (6000, 6001)
    assert book.claim_auto("alice", "127.0.0.1:22")[0].port == 6001
    assert [lease.port for lease in book.leases_of("alice")] == [6000, 6001]


def test_auto_skips_ports_leased_by_others_and_unusable_ports(book: LeaseBook) -> None:
    book.claim_fixed("bob", 6000, "127.0.0.1:1")
    book.claim_auto("carol", "127.0.0.1:2")  # takes 6001
    lease, _ = book.claim_auto("alice", "127.0.0.1:8888", usable=lambda p: p != 6002)
    assert lease.port == 6003


def test_auto_does_not_reuse_a_fixed_lease_with_the_same_target(book: LeaseBook) -> None:
    book.claim_fixed("alice", 6000, "127.0.0.1:8888")
    lease, created = book.claim_auto("alice", "127.0.0.1:8888")
    assert (lease.port, created) == (6001, True)


def test_usable_is_not_asked_about_the_clients_own_lease(book: LeaseBook) -> None:
    book.claim_auto("alice", "127.0.0.1:8888")
    asked: list[int] = []

    def usable(port: int) -> bool:
        asked.append(port)
        return True

    lease, _ = book.claim_auto("alice", "127.0.0.1:8888", usable=usable)
    assert (lease.port, asked) == (6000, [])


def test_auto_pool_exhaustion_is_refused(book: LeaseBook, store: LeaseStore) -> None:
    for i in range(len(POOL)):
        book.claim_auto("alice", f"127.0.0.1:{8000 + i}")
    with pytest.raises(ClaimRefused) as info:
        book.claim_auto("bob", "127.0.0.1:8888")
    assert info.value.port is None
    assert info.value.reason == "no free port left in this client's allowed ports (6000-6004)"
    assert len(store.load()) == len(POOL)


def test_auto_with_every_free_port_unusable_is_refused(book: LeaseBook) -> None:
    with pytest.raises(ClaimRefused, match="no free port left"):
        book.claim_auto("alice", "127.0.0.1:8888", usable=lambda p: False)
    assert book.leases() == []


# -- expiry of auto leases -------------------------------------------------------------------


@pytest.fixture
def tiny(store: LeaseStore, clock: FakeClock) -> LeaseBook:
    """A one-port pool, so any second auto claim must reclaim or fail."""
    return LeaseBook(store, RELAY, grant(PortSet.of(6000)), clock=clock)


def test_expired_auto_lease_is_reclaimed_only_after_the_ttl(
    tiny: LeaseBook, clock: FakeClock, store: LeaseStore
) -> None:
    tiny.mark_online("alice")
    tiny.claim_auto("alice", "127.0.0.1:8888")
    tiny.mark_offline("alice")
    clock.advance(AUTO_LEASE_TTL)  # exactly the TTL: not yet "older than"
    with pytest.raises(ClaimRefused):
        tiny.claim_auto("bob", "127.0.0.1:9999")
    clock.advance(1.0)
    lease, created = tiny.claim_auto("bob", "127.0.0.1:9999")
    assert (lease.port, lease.client, created) == (6000, "bob", True)
    assert store.load() == [lease]
    with pytest.raises(ClaimRefused):  # alice is back, but her port is gone
        tiny.claim_auto("alice", "127.0.0.1:8888")


def test_auto_lease_of_an_online_owner_is_never_reclaimed(
    tiny: LeaseBook, clock: FakeClock
) -> None:
    tiny.claim_auto("alice", "127.0.0.1:8888")
    tiny.mark_online("alice")
    clock.advance(100 * AUTO_LEASE_TTL)
    assert not tiny.is_reclaimable(tiny.leases()[0])
    with pytest.raises(ClaimRefused):
        tiny.claim_auto("bob", "127.0.0.1:9999")
    with pytest.raises(ClaimRefused, match="leased to another client"):
        tiny.claim_fixed("bob", 6000, "127.0.0.1:9999")


def test_owner_with_two_sessions_stays_online_until_both_end(
    tiny: LeaseBook, clock: FakeClock
) -> None:
    tiny.claim_auto("alice", "127.0.0.1:8888")
    tiny.mark_online("alice")  # old session
    tiny.mark_online("alice")  # reconnect registered before the old teardown
    tiny.mark_offline("alice")
    assert tiny.is_online("alice")
    clock.advance(2 * AUTO_LEASE_TTL)
    with pytest.raises(ClaimRefused):
        tiny.claim_auto("bob", "127.0.0.1:9999")
    tiny.mark_offline("alice")
    assert not tiny.is_online("alice")


def test_presence_refreshes_last_seen_in_the_store(
    book: LeaseBook, clock: FakeClock, store: LeaseStore
) -> None:
    book.claim_auto("alice", "127.0.0.1:8888")
    clock.advance(DAY)
    book.mark_online("alice")
    assert [lease.last_seen for lease in store.load()] == [T0 + DAY]
    clock.advance(DAY)
    book.mark_offline("alice")
    assert [lease.last_seen for lease in store.load()] == [T0 + 2 * DAY]


def test_fixed_claim_takes_over_an_expired_auto_lease(tiny: LeaseBook, clock: FakeClock) -> None:
    tiny.claim_auto("alice", "127.0.0.1:8888")
    clock.advance(AUTO_LEASE_TTL + 1)
    lease, created = tiny.claim_fixed("bob", 6000, "127.0.0.1:9999")
    assert (lease.client, lease.kind, created) == ("bob", "fixed", True)


def test_unleased_ports_are_preferred_over_expired_leases(
    book: LeaseBook, clock: FakeClock
) -> None:
    book.claim_auto("alice", "127.0.0.1:8888")  # 6000
    clock.advance(AUTO_LEASE_TTL + 1)
    lease, _ = book.claim_auto("bob", "127.0.0.1:9999")
    assert lease.port == 6001
    assert book.owner(6000) == "alice"


# -- release and config changes ---------------------------------------------------------------


def test_release_removes_the_lease_from_book_and_store(book: LeaseBook, store: LeaseStore) -> None:
    lease, created = book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert created
    assert book.release(6002) == lease  # e.g. the bind failed: roll back
    assert book.get(6002) is None and book.owner(6002) is None
    assert store.load() == []
    assert book.release(6002) is None
    assert book.claim_fixed("bob", 6002, "127.0.0.1:1")[1]


def test_leases_outside_a_shrunk_grant_are_kept_but_not_handed_out(clock: FakeClock) -> None:
    store = MemoryLeaseStore()
    LeaseBook(store, RELAY, grant(), clock=clock).claim_auto("alice", "127.0.0.1:8888")  # 6000
    shrunk = LeaseBook(store, RELAY, grant(PortSet([(6001, 6004)])), clock=clock)
    lease, created = shrunk.claim_auto("alice", "127.0.0.1:8888")
    assert (lease.port, created) == (6001, True)
    assert [lease.port for lease in shrunk.leases()] == [6000, 6001]
    with pytest.raises(ClaimRefused, match="port 6000 is not allowed for this client"):
        shrunk.claim_fixed("alice", 6000, "127.0.0.1:8888")


def test_allowed_outside_relay_ports_is_clamped(clock: FakeClock) -> None:
    wide = LeaseBook(MemoryLeaseStore(), PortSet.of(6003), grant(POOL), clock=clock)
    assert wide.claim_auto("alice", "127.0.0.1:8888")[0].port == 6003


# -- durability -------------------------------------------------------------------------------


def test_claims_survive_a_restart_over_the_same_sqlite_file(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "state" / "leases.db"
    with SqliteLeaseStore(path) as store:
        book = LeaseBook(store, RELAY, grant(), clock=clock)
        book.claim_fixed("bob", 6000, "127.0.0.1:1")
        ports = [book.claim_auto("alice", t)[0].port for t in ("127.0.0.1:8888", "127.0.0.1:22")]
    assert ports == [6001, 6002]
    clock.advance(DAY)
    with SqliteLeaseStore(path) as store:
        book = LeaseBook(store, RELAY, grant(), clock=clock)
        again = [book.claim_auto("alice", t) for t in ("127.0.0.1:22", "127.0.0.1:8888")]
        assert [(lease.port, created) for lease, created in again] == [(6002, False), (6001, False)]
        with pytest.raises(ClaimRefused):
            book.claim_fixed("alice", 6000, "127.0.0.1:1")


def test_sqlite_store_round_trips_and_commits_each_write(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "leases.db"
    lease = Lease(6000, "alice", "auto", "127.0.0.1:8888", T0, T0 + 1.5)
    with SqliteLeaseStore(path) as store, sqlite3.connect(path) as other:
        store.put(lease)
        rows = other.execute("SELECT * FROM leases").fetchall()
        assert rows == [(6000, "alice", "auto", "127.0.0.1:8888", T0, T0 + 1.5)]
        store.put(Lease(6000, "alice", "fixed", "127.0.0.1:22", T0, T0 + 2))
        assert other.execute("SELECT kind, target FROM leases").fetchall() == [
            ("fixed", "127.0.0.1:22")
        ]
        store.delete(6000)
        assert other.execute("SELECT count(*) FROM leases").fetchone() == (0,)
        store.put(lease)
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    other.close()
    with SqliteLeaseStore(path) as reopened:
        assert reopened.load() == [lease]


def test_sqlite_store_creates_a_private_dir_and_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "leases.db"
    SqliteLeaseStore(path).close()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    conn.close()
    assert version == (str(SCHEMA_VERSION),)


def test_sqlite_store_refuses_a_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    path.write_bytes(b"this is not a database, just some bytes\n" * 100)
    with pytest.raises(LeaseStoreError, match=str(path)):
        SqliteLeaseStore(path)


def test_sqlite_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    SqliteLeaseStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(LeaseStoreError, match=rf"{path}.*newer"):
        SqliteLeaseStore(path)


def test_sqlite_store_refuses_an_invalid_row(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    SqliteLeaseStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO leases VALUES (70000, 'alice', 'auto', 'x:1', 0, 0)")
    conn.close()
    with SqliteLeaseStore(path) as store, pytest.raises(LeaseStoreError, match="invalid row"):
        store.load()


def test_closed_sqlite_store_refuses_writes(tmp_path: Path) -> None:
    store = SqliteLeaseStore(tmp_path / "leases.db")
    store.close()
    store.close()
    with pytest.raises(LeaseStoreError, match="closed"):
        store.delete(6000)
