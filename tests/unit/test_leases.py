"""Lease allocation and storage: ports stay with their owner, across reconnects and restarts."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator, Callable
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
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeaseStore]:
    """Every book scenario runs over both stores: the SQLite one must behave the same."""
    s: LeaseStore
    s = MemoryLeaseStore() if request.param == "memory" else SqliteLeaseStore(tmp_path / "l.db")
    yield s
    await s.close()


@pytest.fixture
async def book(store: LeaseStore, clock: FakeClock) -> LeaseBook:
    return await LeaseBook.open(store, RELAY, grant(), clock=clock)


# -- fixed claims ---------------------------------------------------------------------------


async def test_fixed_claim_records_a_lease(book: LeaseBook, store: LeaseStore) -> None:
    lease, created = await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert created
    assert lease == Lease(6002, "alice", "fixed", "127.0.0.1:8888", T0, T0)
    assert book.get(6002) == lease
    assert book.owner(6002) == "alice"
    assert await store.load() == [lease]


async def test_same_client_reclaims_its_fixed_port(book: LeaseBook, clock: FakeClock) -> None:
    await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    clock.advance(30 * DAY)
    again, created = await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert not created
    assert (again.port, again.created, again.last_seen) == (6002, T0, T0 + 30 * DAY)


async def test_fixed_reclaim_with_a_new_target_updates_the_target(book: LeaseBook) -> None:
    await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    lease, created = await book.claim_fixed("alice", 6002, "127.0.0.1:22")
    assert not created
    assert book.get(6002) == lease
    assert lease.target == "127.0.0.1:22"


@pytest.mark.parametrize(
    ("owner_online", "wait"),
    [(True, 0.0), (False, 0.0), (False, 1000 * AUTO_LEASE_TTL)],
    ids=["owner-online", "owner-offline", "owner-gone-for-ages"],
)
async def test_fixed_lease_is_never_taken_by_another_client(
    book: LeaseBook, clock: FakeClock, owner_online: bool, wait: float
) -> None:
    await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    await book.mark_online("alice")
    if not owner_online:
        await book.mark_offline("alice")
    clock.advance(wait)
    with pytest.raises(ClaimRefused) as info:
        await book.claim_fixed("bob", 6002, "127.0.0.1:9999")
    assert info.value.port == 6002
    assert info.value.reason == "port 6002 is leased to another client"
    assert "alice" not in str(info.value)
    assert book.owner(6002) == "alice"


@pytest.mark.parametrize(
    ("port", "reason"),
    [
        (5999, "port 5999 is not in the relay's allowed ports (this client may use: 6000-6004)"),
        (7000, "port 7000 is not in the relay's allowed ports (this client may use: 6000-6004)"),
        (6005, "port 6005 is not allowed for this client (allowed: 6000-6004)"),
    ],
)
async def test_fixed_claim_outside_the_grant_is_refused(
    book: LeaseBook, store: LeaseStore, port: int, reason: str
) -> None:
    with pytest.raises(ClaimRefused) as info:
        await book.claim_fixed("alice", port, "127.0.0.1:8888")
    assert (info.value.port, info.value.reason) == (port, reason)
    assert book.leases() == [] and await store.load() == []


async def test_fixed_claim_by_a_client_with_no_ports_says_none(clock: FakeClock) -> None:
    book = await LeaseBook.open(MemoryLeaseStore(), RELAY, grant(mallory=PortSet()), clock=clock)
    with pytest.raises(ClaimRefused, match=r"allowed: none\)"):
        await book.claim_fixed("mallory", 6000, "127.0.0.1:1")


async def test_fixed_claim_converts_the_clients_own_auto_lease(book: LeaseBook) -> None:
    auto, _ = await book.claim_auto("alice", "127.0.0.1:8888")
    fixed, created = await book.claim_fixed("alice", auto.port, "127.0.0.1:6006")
    assert not created
    assert (fixed.kind, fixed.target, fixed.created) == ("fixed", "127.0.0.1:6006", auto.created)
    assert book.leases() == [fixed]


# -- auto claims ----------------------------------------------------------------------------


async def test_auto_gives_the_lowest_free_port_and_the_same_one_again(
    book: LeaseBook, clock: FakeClock
) -> None:
    first, created = await book.claim_auto("alice", "127.0.0.1:8888")
    assert (first.port, first.kind, created) == (6000, "auto", True)
    clock.advance(DAY)
    again, created = await book.claim_auto("alice", "127.0.0.1:8888")
    assert (again.port, created, again.last_seen) == (6000, False, T0 + DAY)


async def test_two_targets_get_two_ports(book: LeaseBook) -> None:
    jupyter, _ = await book.claim_auto("alice", "127.0.0.1:8888")
    ssh, _ = await book.claim_auto("alice", "127.0.0.1:22")
    assert (jupyter.port, ssh.port) == (6000, 6001)
    assert (await book.claim_auto("alice", "127.0.0.1:22"))[0].port == 6001
    assert [lease.port for lease in book.leases_of("alice")] == [6000, 6001]


async def test_auto_skips_ports_leased_by_others_and_unusable_ports(book: LeaseBook) -> None:
    await book.claim_fixed("bob", 6000, "127.0.0.1:1")
    await book.claim_auto("carol", "127.0.0.1:2")  # takes 6001
    lease, _ = await book.claim_auto("alice", "127.0.0.1:8888", usable=lambda p: p != 6002)
    assert lease.port == 6003


async def test_auto_does_not_reuse_a_fixed_lease_with_the_same_target(book: LeaseBook) -> None:
    await book.claim_fixed("alice", 6000, "127.0.0.1:8888")
    lease, created = await book.claim_auto("alice", "127.0.0.1:8888")
    assert (lease.port, created) == (6001, True)


async def test_usable_is_not_asked_about_the_clients_own_lease(book: LeaseBook) -> None:
    await book.claim_auto("alice", "127.0.0.1:8888")
    asked: list[int] = []

    def usable(port: int) -> bool:
        asked.append(port)
        return True

    lease, _ = await book.claim_auto("alice", "127.0.0.1:8888", usable=usable)
    assert (lease.port, asked) == (6000, [])


async def test_auto_pool_exhaustion_is_refused(book: LeaseBook, store: LeaseStore) -> None:
    for i in range(len(POOL)):
        await book.claim_auto("alice", f"127.0.0.1:{8000 + i}")
    with pytest.raises(ClaimRefused) as info:
        await book.claim_auto("bob", "127.0.0.1:8888")
    assert info.value.port is None
    assert info.value.reason == "no free port left in this client's allowed ports (6000-6004)"
    assert len(await store.load()) == len(POOL)


async def test_auto_with_every_free_port_unusable_is_refused(book: LeaseBook) -> None:
    with pytest.raises(ClaimRefused, match="no free port left"):
        await book.claim_auto("alice", "127.0.0.1:8888", usable=lambda p: False)
    assert book.leases() == []


# -- expiry of auto leases -------------------------------------------------------------------


@pytest.fixture
async def tiny(store: LeaseStore, clock: FakeClock) -> LeaseBook:
    """A one-port pool, so any second auto claim must reclaim or fail."""
    return await LeaseBook.open(store, RELAY, grant(PortSet.of(6000)), clock=clock)


async def test_expired_auto_lease_is_reclaimed_only_after_the_ttl(
    tiny: LeaseBook, clock: FakeClock, store: LeaseStore
) -> None:
    await tiny.mark_online("alice")
    await tiny.claim_auto("alice", "127.0.0.1:8888")
    await tiny.mark_offline("alice")
    clock.advance(AUTO_LEASE_TTL)  # exactly the TTL: not yet "older than"
    with pytest.raises(ClaimRefused):
        await tiny.claim_auto("bob", "127.0.0.1:9999")
    clock.advance(1.0)
    lease, created = await tiny.claim_auto("bob", "127.0.0.1:9999")
    assert (lease.port, lease.client, created) == (6000, "bob", True)
    assert await store.load() == [lease]
    with pytest.raises(ClaimRefused):  # alice is back, but her port is gone
        await tiny.claim_auto("alice", "127.0.0.1:8888")


async def test_auto_lease_of_an_online_owner_is_never_reclaimed(
    tiny: LeaseBook, clock: FakeClock
) -> None:
    await tiny.claim_auto("alice", "127.0.0.1:8888")
    await tiny.mark_online("alice")
    clock.advance(100 * AUTO_LEASE_TTL)
    assert not tiny.is_reclaimable(tiny.leases()[0])
    with pytest.raises(ClaimRefused):
        await tiny.claim_auto("bob", "127.0.0.1:9999")
    with pytest.raises(ClaimRefused, match="leased to another client"):
        await tiny.claim_fixed("bob", 6000, "127.0.0.1:9999")


async def test_owner_with_two_sessions_stays_online_until_both_end(
    tiny: LeaseBook, clock: FakeClock
) -> None:
    await tiny.claim_auto("alice", "127.0.0.1:8888")
    await tiny.mark_online("alice")  # old session
    await tiny.mark_online("alice")  # reconnect registered before the old teardown
    await tiny.mark_offline("alice")
    assert tiny.is_online("alice")
    clock.advance(2 * AUTO_LEASE_TTL)
    with pytest.raises(ClaimRefused):
        await tiny.claim_auto("bob", "127.0.0.1:9999")
    await tiny.mark_offline("alice")
    assert not tiny.is_online("alice")


async def test_presence_refreshes_last_seen_in_the_store(
    book: LeaseBook, clock: FakeClock, store: LeaseStore
) -> None:
    await book.claim_auto("alice", "127.0.0.1:8888")
    clock.advance(DAY)
    await book.mark_online("alice")
    assert [lease.last_seen for lease in await store.load()] == [T0 + DAY]
    clock.advance(DAY)
    await book.mark_offline("alice")
    assert [lease.last_seen for lease in await store.load()] == [T0 + 2 * DAY]


async def test_fixed_claim_takes_over_an_expired_auto_lease(
    tiny: LeaseBook, clock: FakeClock
) -> None:
    await tiny.claim_auto("alice", "127.0.0.1:8888")
    clock.advance(AUTO_LEASE_TTL + 1)
    lease, created = await tiny.claim_fixed("bob", 6000, "127.0.0.1:9999")
    assert (lease.client, lease.kind, created) == ("bob", "fixed", True)


async def test_unleased_ports_are_preferred_over_expired_leases(
    book: LeaseBook, clock: FakeClock
) -> None:
    await book.claim_auto("alice", "127.0.0.1:8888")  # 6000
    clock.advance(AUTO_LEASE_TTL + 1)
    lease, _ = await book.claim_auto("bob", "127.0.0.1:9999")
    assert lease.port == 6001
    assert book.owner(6000) == "alice"


# -- release and config changes ---------------------------------------------------------------


async def test_release_removes_the_lease_from_book_and_store(
    book: LeaseBook, store: LeaseStore
) -> None:
    lease, created = await book.claim_fixed("alice", 6002, "127.0.0.1:8888")
    assert created
    assert await book.release(6002) == lease  # e.g. the bind failed: roll back
    assert book.get(6002) is None and book.owner(6002) is None
    assert await store.load() == []
    assert await book.release(6002) is None
    assert (await book.claim_fixed("bob", 6002, "127.0.0.1:1"))[1]


async def test_leases_outside_a_shrunk_grant_are_kept_but_not_handed_out(clock: FakeClock) -> None:
    store = MemoryLeaseStore()
    first = await LeaseBook.open(store, RELAY, grant(), clock=clock)
    await first.claim_auto("alice", "127.0.0.1:8888")  # 6000
    shrunk = await LeaseBook.open(store, RELAY, grant(PortSet([(6001, 6004)])), clock=clock)
    lease, created = await shrunk.claim_auto("alice", "127.0.0.1:8888")
    assert (lease.port, created) == (6001, True)
    assert [lease.port for lease in shrunk.leases()] == [6000, 6001]
    with pytest.raises(ClaimRefused, match="port 6000 is not allowed for this client"):
        await shrunk.claim_fixed("alice", 6000, "127.0.0.1:8888")


async def test_allowed_outside_relay_ports_is_clamped(clock: FakeClock) -> None:
    wide = await LeaseBook.open(MemoryLeaseStore(), PortSet.of(6003), grant(POOL), clock=clock)
    assert (await wide.claim_auto("alice", "127.0.0.1:8888"))[0].port == 6003


# -- atomic claims: the store decides, so relays sharing one could never both win a port ------

ALICE_OLD = Lease(6000, "alice", "auto", "127.0.0.1:8888", T0, T0)


async def test_store_claims_a_free_port_and_keeps_it_from_others(store: LeaseStore) -> None:
    assert await store.claim(ALICE_OLD, None)
    bob = Lease(6000, "bob", "fixed", "127.0.0.1:22", T0 + 1, T0 + 1)
    assert not await store.claim(bob, None)
    assert await store.load() == [ALICE_OLD]


async def test_store_lets_the_owner_claim_its_own_port_again(store: LeaseStore) -> None:
    assert await store.claim(ALICE_OLD, None)
    renewed = Lease(6000, "alice", "fixed", "127.0.0.1:22", T0, T0 + DAY)
    assert await store.claim(renewed, None)
    assert await store.load() == [renewed]


async def test_store_takes_over_only_the_exact_lease_being_replaced(store: LeaseStore) -> None:
    assert await store.claim(ALICE_OLD, None)
    await store.touch("alice", T0 + DAY)  # alice came back: the copy the claimer read is stale
    bob = Lease(6000, "bob", "auto", "127.0.0.1:22", T0 + DAY, T0 + DAY)
    assert not await store.claim(bob, ALICE_OLD)
    fresh = Lease(6000, "alice", "auto", "127.0.0.1:8888", T0, T0 + DAY)
    assert await store.load() == [fresh]
    assert await store.claim(bob, fresh)
    assert await store.load() == [bob]


@pytest.fixture
async def two_relays(tmp_path: Path) -> AsyncIterator[tuple[SqliteLeaseStore, SqliteLeaseStore]]:
    """Two connections to one SQLite file, as two relays sharing a lease store would have."""
    path = tmp_path / "shared.db"
    async with SqliteLeaseStore(path) as first, SqliteLeaseStore(path) as second:
        yield first, second


async def test_two_relays_racing_for_a_fixed_port_cannot_both_win(
    two_relays: tuple[SqliteLeaseStore, SqliteLeaseStore], clock: FakeClock
) -> None:
    # Both books are loaded before either claims: each believes the port is free.
    books = [await LeaseBook.open(s, RELAY, grant(), clock=clock) for s in two_relays]
    results = await asyncio.gather(
        books[0].claim_fixed("alice", 6000, "127.0.0.1:8888"),
        books[1].claim_fixed("bob", 6000, "127.0.0.1:22"),
        return_exceptions=True,
    )
    assert isinstance(results[0], tuple) and results[0][0].client == "alice"
    assert isinstance(results[1], ClaimRefused)
    assert results[1].reason == "port 6000 is leased to another client"
    assert [book.owner(6000) for book in books] == ["alice", "alice"]  # the loser re-read


async def test_a_relay_that_loses_an_auto_race_takes_the_next_port(
    two_relays: tuple[SqliteLeaseStore, SqliteLeaseStore], clock: FakeClock
) -> None:
    books = [await LeaseBook.open(s, RELAY, grant(), clock=clock) for s in two_relays]
    first, _ = await books[0].claim_auto("alice", "127.0.0.1:8888")
    second, created = await books[1].claim_auto("bob", "127.0.0.1:22")
    assert (first.port, second.port, created) == (6000, 6001, True)
    assert [lease.client for lease in await two_relays[0].load()] == ["alice", "bob"]


async def test_two_relays_taking_over_one_expired_lease_cannot_both_win(
    two_relays: tuple[SqliteLeaseStore, SqliteLeaseStore], clock: FakeClock
) -> None:
    assert await two_relays[0].claim(ALICE_OLD, None)
    clock.advance(AUTO_LEASE_TTL + 1)
    tiny = grant(PortSet.of(6000))
    books = [await LeaseBook.open(s, RELAY, tiny, clock=clock) for s in two_relays]
    bob, created = await books[0].claim_auto("bob", "127.0.0.1:22")
    assert (bob.port, created) == (6000, True)
    with pytest.raises(ClaimRefused, match="no free port left"):
        await books[1].claim_auto("carol", "127.0.0.1:1")
    assert await two_relays[1].load() == [bob]


async def test_a_lease_refreshed_elsewhere_is_not_taken_over(
    two_relays: tuple[SqliteLeaseStore, SqliteLeaseStore], clock: FakeClock
) -> None:
    assert await two_relays[0].claim(ALICE_OLD, None)
    clock.advance(AUTO_LEASE_TTL + 1)
    books = [await LeaseBook.open(s, RELAY, grant(), clock=clock) for s in two_relays]
    await books[0].mark_online("alice")  # alice logs in at relay 0; relay 1's copy is stale
    with pytest.raises(ClaimRefused, match="leased to another client"):
        await books[1].claim_fixed("bob", 6000, "127.0.0.1:22")
    assert [(lease.client, lease.last_seen) for lease in await two_relays[1].load()] == [
        ("alice", clock.now)
    ]


def test_concurrent_claims_from_two_connections_have_one_winner_per_port(tmp_path: Path) -> None:
    """Threads, each with its own connection, claim the same ports at once: SQLite's locking,
    not the event loop's turn-taking, is what keeps the claim atomic here."""
    path = tmp_path / "shared.db"
    ports = range(6000, 6040)
    start = threading.Barrier(2)
    won: dict[str, list[int]] = {}

    def relay(client: str) -> None:
        async def claim_all() -> list[int]:
            async with SqliteLeaseStore(path) as store:
                start.wait()
                return [port for port in ports
                        if await store.claim(Lease(port, client, "fixed", "x:1", T0, T0), None)]
        won[client] = asyncio.run(claim_all())

    asyncio.run(SqliteLeaseStore(path).close())  # create the schema before the race
    threads = [threading.Thread(target=relay, args=(name,)) for name in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won["alice"] + won["bob"]) == list(ports)
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute("SELECT port, client FROM leases").fetchall())
    conn.close()
    assert rows == {port: name for name in won for port in won[name]}


# -- durability -------------------------------------------------------------------------------


async def test_claims_survive_a_restart_over_the_same_sqlite_file(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "state" / "leases.db"
    async with SqliteLeaseStore(path) as store:
        book = await LeaseBook.open(store, RELAY, grant(), clock=clock)
        await book.claim_fixed("bob", 6000, "127.0.0.1:1")
        ports = [(await book.claim_auto("alice", t))[0].port
                 for t in ("127.0.0.1:8888", "127.0.0.1:22")]
    assert ports == [6001, 6002]
    clock.advance(DAY)
    async with SqliteLeaseStore(path) as store:
        book = await LeaseBook.open(store, RELAY, grant(), clock=clock)
        again = [await book.claim_auto("alice", t) for t in ("127.0.0.1:22", "127.0.0.1:8888")]
        assert [(lease.port, created) for lease, created in again] == [(6002, False), (6001, False)]
        with pytest.raises(ClaimRefused):
            await book.claim_fixed("alice", 6000, "127.0.0.1:1")


async def test_sqlite_store_round_trips_and_commits_each_write(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "leases.db"
    lease = Lease(6000, "alice", "auto", "127.0.0.1:8888", T0, T0 + 1.5)
    async with SqliteLeaseStore(path) as store:
        with sqlite3.connect(path) as other:
            assert await store.claim(lease, None)
            rows = other.execute("SELECT * FROM leases").fetchall()
            assert rows == [(6000, "alice", "auto", "127.0.0.1:8888", T0, T0 + 1.5)]
            changed = Lease(6000, "alice", "fixed", "127.0.0.1:22", T0, T0 + 2)
            assert await store.claim(changed, None)
            assert other.execute("SELECT kind, target FROM leases").fetchall() == [
                ("fixed", "127.0.0.1:22")
            ]
            await store.touch("alice", T0 + 3)
            assert other.execute("SELECT last_seen FROM leases").fetchall() == [(T0 + 3,)]
            await store.delete(6000)
            assert other.execute("SELECT count(*) FROM leases").fetchone() == (0,)
            assert await store.claim(lease, None)
            assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        other.close()
    async with SqliteLeaseStore(path) as reopened:
        assert await reopened.load() == [lease]


async def test_sqlite_store_creates_a_private_dir_and_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "leases.db"
    await SqliteLeaseStore(path).close()
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


async def test_sqlite_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    await SqliteLeaseStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(LeaseStoreError, match=rf"{path}.*newer"):
        SqliteLeaseStore(path)


async def test_sqlite_store_refuses_an_invalid_row(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    await SqliteLeaseStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO leases VALUES (70000, 'alice', 'auto', 'x:1', 0, 0)")
    conn.close()
    async with SqliteLeaseStore(path) as store:
        with pytest.raises(LeaseStoreError, match="invalid row"):
            await store.load()


async def test_closed_sqlite_store_refuses_writes(tmp_path: Path) -> None:
    store = SqliteLeaseStore(tmp_path / "leases.db")
    await store.close()
    await store.close()
    with pytest.raises(LeaseStoreError, match="closed"):
        await store.delete(6000)
