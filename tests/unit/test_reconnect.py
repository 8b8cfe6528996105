"""The client's reconnect schedule: plain backoff, and a wide spread when the relay went
away (reliability R-8: a relay that comes back must not get all its clients in one second).

The connector's loop runs for real with its ``_session`` replaced by a script of outcomes,
so only the scheduling is under test; the delays it chooses are read from its log.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable

import pytest

from tunnel.client.connector import (
    BACKOFF_INITIAL,
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


async def test_refused_right_after_a_lost_link_spreads_once(
        caplog: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError()
    delays = await _delays([True, refused, refused, True], caplog)
    # lost link -> quick first retry; refused now means the relay is gone -> spread; a
    # second refusal -> the ordinary backoff, where it had got to; then a live link.
    assert delays[:3] == [BACKOFF_INITIAL, RESTART_SPREAD, 4 * BACKOFF_INITIAL]


async def test_relay_shutdown_spreads_at_once(caplog: pytest.LogCaptureFixture) -> None:
    delays = await _delays(["shutdown"], caplog)
    assert delays[0] == RESTART_SPREAD


async def test_client_started_before_the_relay_is_not_spread(
        caplog: pytest.LogCaptureFixture) -> None:
    refused = ConnectionRefusedError()
    delays = await _delays([refused, refused], caplog)
    assert delays[:2] == [BACKOFF_INITIAL, 2 * BACKOFF_INITIAL]
