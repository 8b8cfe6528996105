"""Pre-auth connection caps and login-failure penalties, driven by a fake clock."""

from __future__ import annotations

import pytest

from tunnel.server.guard import (
    FAILURES_BEFORE_PENALTY,
    MAX_PENALTY_ENTRIES,
    MAX_PREAUTH_PER_SOURCE,
    MAX_PREAUTH_TOTAL,
    OPENS_BURST_SECONDS,
    OPENS_PER_PORT,
    OPENS_PER_SOURCE,
    PENALTY_BASE,
    PENALTY_CAP,
    OpenRate,
    Penalties,
    PreAuthSlots,
    TokenBucket,
    claim_refusal,
)


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ----------------------------------------------------------------------------- PreAuthSlots


def test_preauth_caps_per_source() -> None:
    slots = PreAuthSlots(per_source=2, total=10)
    assert slots.acquire("10.0.0.1")
    assert slots.acquire("10.0.0.1")
    assert not slots.acquire("10.0.0.1")
    assert not slots.acquire("10.0.0.1")  # a refusal holds nothing
    assert slots.acquire("10.0.0.2")  # other sources are not affected
    slots.release("10.0.0.1")
    assert slots.acquire("10.0.0.1")
    assert not slots.acquire("10.0.0.1")


def test_preauth_caps_in_total() -> None:
    slots = PreAuthSlots(per_source=5, total=3)
    assert [slots.acquire(s) for s in ("a", "b", "c")] == [True, True, True]
    assert not slots.acquire("d")
    assert not slots.acquire("a")  # under its own cap, but the total is full
    slots.release("b")
    assert slots.acquire("d")
    assert not slots.acquire("e")


def test_preauth_release_frees_everything() -> None:
    slots = PreAuthSlots(per_source=3, total=4)
    for _ in range(3):  # the same cycle works again and again: nothing leaks
        held = [s for s in ("a", "a", "a", "b", "b") if slots.acquire(s)]
        assert held == ["a", "a", "a", "b"]
        for source in held:
            slots.release(source)


def test_preauth_defaults() -> None:
    assert (MAX_PREAUTH_PER_SOURCE, MAX_PREAUTH_TOTAL) == (32, 512)
    slots = PreAuthSlots()
    assert all(slots.acquire("a") for _ in range(MAX_PREAUTH_PER_SOURCE))
    assert not slots.acquire("a")
    sources = [f"198.51.100.{i}" for i in range(MAX_PREAUTH_TOTAL // MAX_PREAUTH_PER_SOURCE)]
    granted = sum(slots.acquire(s) for s in sources for _ in range(MAX_PREAUTH_PER_SOURCE))
    assert granted == MAX_PREAUTH_TOTAL - MAX_PREAUTH_PER_SOURCE
    assert not slots.acquire("203.0.113.1")


# ----------------------------------------------------------------------------- Penalties


def test_penalty_defaults() -> None:
    assert FAILURES_BEFORE_PENALTY == 5
    assert PENALTY_BASE == 1.0
    assert PENALTY_CAP == 600.0
    assert MAX_PENALTY_ENTRIES == 10_000


def test_first_failures_are_free(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    assert penalties.retry_after("a") == 0.0
    for _ in range(FAILURES_BEFORE_PENALTY - 1):
        penalties.failed("a")
        assert penalties.retry_after("a") == 0.0
    penalties.failed("a")  # the 5th failure: "after 5 failures, a 1 s penalty"
    assert penalties.retry_after("a") == 1.0
    assert len(penalties) == 1


def test_penalty_doubles_up_to_the_cap(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for _ in range(FAILURES_BEFORE_PENALTY - 1):
        penalties.failed("a")
    waits = []
    for _ in range(14):
        penalties.failed("a")
        waits.append(penalties.retry_after("a"))
        clock.advance(waits[-1])  # the client waits exactly as told
        assert penalties.retry_after("a") == 0.0
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600, 600, 600]


def test_penalty_counts_down_with_the_clock(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for _ in range(FAILURES_BEFORE_PENALTY + 2):
        penalties.failed("a")
    assert penalties.retry_after("a") == 4.0
    clock.advance(1.5)
    assert penalties.retry_after("a") == 2.5
    clock.advance(2.5)
    assert penalties.retry_after("a") == 0.0
    clock.advance(3600)
    assert penalties.retry_after("a") == 0.0  # never negative
    # Time alone does not forgive: the next failure is penalised at once, and doubles.
    penalties.failed("a")
    assert penalties.retry_after("a") == 8.0


def test_other_sources_are_unaffected(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for _ in range(FAILURES_BEFORE_PENALTY + 3):
        penalties.failed("10.0.0.1")
    assert penalties.retry_after("10.0.0.1") == 8.0
    assert penalties.retry_after("10.0.0.2") == 0.0
    for _ in range(FAILURES_BEFORE_PENALTY - 1):
        penalties.failed("10.0.0.2")
    assert penalties.retry_after("10.0.0.2") == 0.0
    penalties.failed("10.0.0.2")
    assert penalties.retry_after("10.0.0.2") == 1.0
    assert penalties.retry_after("10.0.0.1") == 8.0


def test_success_clears(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for _ in range(FAILURES_BEFORE_PENALTY + 1):
        penalties.failed("a")
    penalties.failed("b")
    assert penalties.retry_after("a") == 2.0
    penalties.succeeded("a")
    assert penalties.retry_after("a") == 0.0
    assert len(penalties) == 1
    # The count starts over: four free failures again, the fifth costs 1 s.
    for _ in range(FAILURES_BEFORE_PENALTY - 1):
        penalties.failed("a")
    assert penalties.retry_after("a") == 0.0
    penalties.failed("a")
    assert penalties.retry_after("a") == 1.0
    penalties.succeeded("never-seen")  # harmless
    assert len(penalties) == 2


def test_custom_parameters(clock: FakeClock) -> None:
    penalties = Penalties(clock, free_failures=0, base=0.25, cap=1.0)
    waits = []
    for _ in range(5):
        penalties.failed("a")
        waits.append(penalties.retry_after("a"))
    assert waits == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_table_is_bounded_lru(clock: FakeClock) -> None:
    penalties = Penalties(clock, free_failures=0, max_entries=3)
    for source in ("a", "b", "c"):
        penalties.failed(source)
    penalties.failed("a")  # "a" is now the most recent, "b" the oldest
    penalties.failed("d")
    assert len(penalties) == 3
    assert penalties.retry_after("b") == 0.0  # evicted
    assert penalties.retry_after("a") == 2.0  # kept, with its history
    assert penalties.retry_after("c") == 1.0
    assert penalties.retry_after("d") == 1.0
    penalties.failed("e")  # evicts "c"
    assert penalties.retry_after("c") == 0.0
    assert penalties.retry_after("a") == 2.0


def test_address_flood_cannot_grow_the_table(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for i in range(MAX_PENALTY_ENTRIES + 500):
        penalties.failed(f"2001:db8::{i:x}")
    assert len(penalties) == MAX_PENALTY_ENTRIES
    assert penalties.retry_after("2001:db8::0") == 0.0  # the oldest went first


def test_penalty_stays_capped_after_very_many_failures(clock: FakeClock) -> None:
    penalties = Penalties(clock)
    for _ in range(FAILURES_BEFORE_PENALTY + 1100):
        penalties.failed("persistent")
        clock.advance(PENALTY_CAP)
    penalties.failed("persistent")
    assert penalties.retry_after("persistent") == PENALTY_CAP


# ------------------------------------------------------------------ visitor open rate (B-6)


def test_token_bucket_allows_a_burst_then_the_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=10, burst=10, now=clock())
    assert sum(bucket.take(clock()) for _ in range(50)) == 10
    clock.advance(0.5)
    assert sum(bucket.take(clock()) for _ in range(50)) == 5
    clock.advance(100)  # idle time refills only up to the burst
    assert sum(bucket.take(clock()) for _ in range(50)) == 10


def test_token_bucket_ignores_a_clock_going_back(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=10, burst=1, now=clock())
    assert bucket.take(clock())
    clock.advance(-5)
    assert not bucket.take(clock())


def test_open_rate_defaults(clock: FakeClock) -> None:
    assert (OPENS_PER_SOURCE, OPENS_PER_PORT, OPENS_BURST_SECONDS) == (200, 2000, 1.0)
    rate = OpenRate(clock)
    assert sum(rate.allow(7000, "a") for _ in range(1000)) == 200  # a second's worth
    clock.advance(5.0)
    assert sum(rate.allow(7000, "a") for _ in range(1000)) == 200  # refilled up to the burst
    clock.advance(0.1)
    assert sum(rate.allow(7000, "a") for _ in range(1000)) == 20  # 200/s


def test_open_rate_caps_each_source(clock: FakeClock) -> None:
    rate = OpenRate(clock, per_source=5, per_port=100, burst_seconds=1.0)
    assert [rate.allow(7000, "a") for _ in range(7)] == [True] * 5 + [False] * 2
    assert rate.allow(7000, "b")  # another source is not affected
    assert rate.allow(7001, "a") is False  # the source's budget spans ports
    assert rate.refused == {7000: 2, 7001: 1}
    clock.advance(1.0)
    assert sum(rate.allow(7000, "a") for _ in range(10)) == 5


def test_open_rate_caps_each_port_across_sources(clock: FakeClock) -> None:
    rate = OpenRate(clock, per_source=5, per_port=8, burst_seconds=1.0)
    granted = sum(rate.allow(7000, f"10.0.0.{i}") for i in range(4) for _ in range(5))
    assert granted == 8
    assert rate.allow(7001, "10.0.0.9")  # other ports have their own budget


def test_open_rate_flooding_source_does_not_spend_the_port_budget(clock: FakeClock) -> None:
    rate = OpenRate(clock, per_source=2, per_port=4, burst_seconds=1.0)
    assert sum(rate.allow(7000, "flood") for _ in range(1000)) == 2
    assert sum(rate.allow(7000, f"v{i}") for i in range(2)) == 2


def test_open_rate_source_table_is_bounded(clock: FakeClock) -> None:
    rate = OpenRate(clock, per_source=1, per_port=10**9, max_sources=3)
    for i in range(100):
        assert rate.allow(7000, f"s{i}")
    assert len(rate._sources) == 3


# ------------------------------------------------------------------ port policy (B-12)

_RESERVED = {7000: "control", 7001: "dashboard"}


@pytest.mark.parametrize(("port", "ranges", "reason"), [
    (0, [(1, 65535)], "0 is not a port number 1-65535"),
    (65536, [(1, 65535)], "65536 is not a port number"),
    (-1, [(1, 65535)], "-1 is not a port number"),
    (True, [(1, 65535)], "True is not a port number"),
    (7000, [(1, 65535)], "port 7000 is the relay's control port"),
    (7001, [(1024, 65535)], "port 7001 is the relay's dashboard port"),
    (80, [(1, 65535)], "port 80 is privileged (below 1024)"),
    (80, [(1000, 2000)], "port 80 is privileged"),
    (1023, [(1000, 2000)], "port 1023 is privileged"),
])
def test_claim_refusal_names_the_reason(port: int, ranges: list[tuple[int, int]],
                                        reason: str) -> None:
    refusal = claim_refusal(port, ranges, _RESERVED)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize(("port", "ranges"), [
    (80, [(80, 80)]),
    (443, [(22, 22), (80, 443), (6000, 6100)]),
    (1024, [(1, 65535)]),
    (6000, [(6000, 6100)]),
])
def test_claim_refusal_lets_ordinary_and_explicit_ports_through(
        port: int, ranges: list[tuple[int, int]]) -> None:
    assert claim_refusal(port, ranges, _RESERVED) is None
