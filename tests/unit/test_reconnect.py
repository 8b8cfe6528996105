"""The client's reconnect schedule: plain backoff, and a wide spread when the relay went
away (reliability R-8: a relay that comes back must not get all its clients in one second).

The connector's loop runs for real with its ``_session`` replaced by a script of outcomes,
so only the scheduling is under test; the delays it chooses are read from its log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable

import pytest

from tunnel.client.connector import (
    BACKOFF_CAP,
    BACKOFF_INITIAL,
    HANDSHAKE_TIMEOUT,
    RESTART_RECONNECT_BOUND,
    RESTART_SPREAD,
    Connector,
    reconnect_delay,
)
from tunnel.client.settings import ClientSettings
from tunnel.common.proto.secret import Secret


def test_reconnect_delay_spreads_only_when_the_relay_went_away() -> None:
    assert reconnect_delay(0.4, relay_gone=False, rand=lambda: 1.0) == 0.4
    assert reconnect_delay(0.4, relay_gone=True, rand=lambda: 0.5) == RESTART_SPREAD / 2
    assert reconnect_delay(0.4, relay_gone=True, rand=lambda: 0.0) == 0.4  # never shorter
    assert reconnect_delay(25.0, relay_gone=True, rand=lambda: 0.0) == RESTART_SPREAD
    assert reconnect_delay(25.0, relay_gone=False, rand=lambda: 0.0) == 25.0
    assert reconnect_delay(25.0, relay_gone=False, had_link=True) == RESTART_SPREAD


class ScriptedConnector(Connector):
    """Each ``_session`` call plays the next outcome: True (a live link that ended),
    "shutdown" (a live link the relay ended with its shutdown GOAWAY) or an exception."""

    def __init__(self, script: list[object], stop: asyncio.Event) -> None:
        settings = ClientSettings(server_url="ws://127.0.0.1:9/tunnel", server_host="127.0.0.1",
                                  token=Secret("unit-test-token-000000001"), exposes=())
        super().__init__(settings, announce=lambda _line: None)
        self.script = script
        self.stop = stop
        self.rand = lambda: 1.0  # the top of every range: spread draws are RESTART_SPREAD

    async def _session(self, stop: asyncio.Event) -> bool:
        if not self.script:
            self.stop.set()
            return False
        outcome = self.script.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        self.relay_shutdown = outcome == "shutdown"
        return True


async def _delays(script: list[object], caplog: pytest.LogCaptureFixture) -> list[float]:
    stop = asyncio.Event()
    connector = ScriptedConnector(script, stop)
    caplog.set_level(logging.INFO, logger="tunnel.client")
    real_wait_for = asyncio.wait_for

    async def no_wait(awaitable: Awaitable[object], timeout: float | None) -> None:  # no sleeps
        task = asyncio.ensure_future(awaitable)
        await asyncio.sleep(0)
        if not task.done():
            task.cancel()
            raise TimeoutError

    asyncio.wait_for = no_wait  # type: ignore[assignment]
    try:
        await real_wait_for(connector.run(stop), 5)
    finally:
        asyncio.wait_for = real_wait_for
    return [float(m.group(1)) for r in caplog.records
            if (m := re.match(r"reconnecting in ([\d.]+)s", r.getMessage()))]


async def test_refused_right_after_a_lost_link_spreads_until_a_link_is_live(
        caplog: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError()
    delays = await _delays([True, refused, refused, True, refused], caplog)
    # lost link -> quick first retry; refused now means the relay is gone -> spread; a
    # second refusal -> still gone, still spread (never the backoff grown past it); a live
    # link ends the episode: the next loss gets the quick retry again.
    assert delays == [BACKOFF_INITIAL, RESTART_SPREAD, RESTART_SPREAD, BACKOFF_INITIAL,
                      RESTART_SPREAD]


async def test_after_a_live_link_no_wait_exceeds_the_spread(
        caplog: pytest.LogCaptureFixture) -> None:
    """Attempts that time out (not refused: nothing says the relay went away) back off as
    usual, but a client that had a live link caps them at RESTART_SPREAD, not BACKOFF_CAP."""
    timeouts: list[object] = [TimeoutError() for _ in range(9)]
    delays = await _delays([True, *timeouts], caplog)
    assert max(delays) == RESTART_SPREAD < BACKOFF_CAP
    assert delays[:4] == [BACKOFF_INITIAL, 2 * BACKOFF_INITIAL, 4 * BACKOFF_INITIAL,
                          8 * BACKOFF_INITIAL]


async def test_relay_shutdown_spreads_at_once(caplog: pytest.LogCaptureFixture) -> None:
    delays = await _delays(["shutdown"], caplog)
    assert delays[0] == RESTART_SPREAD


async def test_client_started_before_the_relay_is_not_spread(
        caplog: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError()
    delays = await _delays([refused] * 9, caplog)
    assert delays[:2] == [BACKOFF_INITIAL, 2 * BACKOFF_INITIAL]
    assert max(delays) == BACKOFF_CAP  # never got in: the full backoff, not capped


# ------------------------------------------- the stated bound after a relay restart


class SimulatedRelay(Connector):
    """A client on a simulated clock whose relay goes away at 0 and answers again at
    ``back``: every attempt before that fails, instantly (refused: the relay restarts on a
    live host) or after HANDSHAKE_TIMEOUT (hung: its host drops packets while it reboots,
    the failure ending just before the relay answers, the worst case); the first attempt
    that starts once the relay answers logs in. ``rand`` is the injected random source."""

    def __init__(self, back: float, how: str, rand: Callable[[], float],
                 stop: asyncio.Event) -> None:
        settings = ClientSettings(server_url="ws://127.0.0.1:9/tunnel", server_host="127.0.0.1",
                                  token=Secret("unit-test-token-000000001"), exposes=())
        super().__init__(settings, announce=lambda _line: None)
        self.rand = rand
        self.back, self.how, self.stop = back, how, stop
        self.now = 0.0
        self.live: float | None = None  # when the first attempt after the restart got in
        self.calls = 0

    async def _session(self, stop: asyncio.Event) -> bool:
        self.calls += 1
        if self.calls == 1:  # the live link the relay's going away ends, at 0
            self.relay_shutdown = self.how == "shutdown"
            return True
        if self.now >= self.back:
            self.live = self.now
            self.stop.set()
            return True
        if self.how == "hung":
            self.now = max(self.now + HANDSHAKE_TIMEOUT, self.back - 1e-9)
            raise TimeoutError
        raise ConnectionRefusedError

    async def _pause(self, stop: asyncio.Event, delay: float) -> None:
        self.now += delay


async def _back_after(back: float, how: str, rand: Callable[[], float]) -> float:
    stop = asyncio.Event()
    client = SimulatedRelay(back, how, rand, stop)
    await asyncio.wait_for(client.run(stop), 5)
    assert client.live is not None
    return client.live - back


def _draws(seed: int) -> Callable[[], float]:
    """Extremes mixed with uniform draws: the top of the range grows every backoff and
    spread to its maximum, the bottom leaves a client refused early and often."""
    rng = random.Random(seed)
    return lambda: rng.choice((0.0, 1.0, 0.999999, rng.random()))


@pytest.mark.parametrize("how", ["refused", "shutdown", "hung"])
async def test_back_within_the_stated_bound_of_the_relay_answering_again(how: str) -> None:
    """Whatever the relay's downtime and the random draws, a client that had a live link
    starts a successful attempt at most RESTART_RECONNECT_BOUND after the relay answers
    again: an attempt in flight then fails within HANDSHAKE_TIMEOUT, and no wait after a
    lost link exceeds RESTART_SPREAD (before, a refusal early in the spread grew the
    ordinary backoff, and a relay down 12 s got some clients back only 8-16 s later)."""
    sources: list[Callable[[], float]] = [lambda: 1.0, lambda: 0.0, lambda: 0.999999]
    sources += [_draws(seed) for seed in range(8)]
    worst = 0.0
    downtimes = [i * 0.37 for i in range(200)] + [100.0, 300.0, 3600.0, 86400.0]
    for back in downtimes:
        for rand in sources:
            worst = max(worst, await _back_after(back, how, rand))
    assert worst <= RESTART_RECONNECT_BOUND
    if how != "hung":  # attempts fail at once: the spread alone bounds the wait
        assert worst <= RESTART_SPREAD
    assert RESTART_RECONNECT_BOUND == RESTART_SPREAD + HANDSHAKE_TIMEOUT
