"""Unit tests of the webhook alerts: debounce, ordering, retries, the bounded queue."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.dashboard.fakes import FakeConfig, FakeRelay
from tunnel.server.config_dashboard import AlertSettings
from tunnel.server.dashboard.alerts import BACKOFF_BASE, Alerts, start_alerts

SECRET_URL = "https://hooks.example.com/services/T000/SECRETPATH"
WAIT = 5.0


class Recorder:
    """A sender that records bodies, failing the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.bodies: list[dict[str, object]] = []
        self.changed = asyncio.Event()

    async def __call__(self, url: str, body: bytes, timeout: float) -> None:
        self.calls += 1
        self.changed.set()
        if self.calls <= self.failures:
            raise OSError("connection refused")
        self.bodies.append(json.loads(body))

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.bodies) < count:
                self.changed.clear()
                await self.changed.wait()


def _alerts(recorder: Recorder, debounce: float, retries: int = 2,
            sleeps: list[float] | None = None, max_queued: int = 100) -> Alerts:
    async def fake_sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)

    return Alerts(AlertSettings(SECRET_URL, debounce, retries), clock=lambda: 42.0,
                  sender=recorder, sleep=fake_sleep, max_queued=max_queued)


async def test_offline_after_debounce_then_online() -> None:
    recorder = Recorder()
    alerts = _alerts(recorder, debounce=0.05)
    try:
        alerts.on_presence("alpha", False)
        await recorder.wait_for(1)
        alerts.on_presence("alpha", True)
        await recorder.wait_for(2)
    finally:
        await alerts.stop()
    assert [b["event"] for b in recorder.bodies] == ["offline", "online"]
    assert recorder.bodies[0] == {"event": "offline", "client": "alpha", "at": 42.0,
                                  "relay": recorder.bodies[0]["relay"]}


async def test_flap_within_debounce_sends_nothing() -> None:
    recorder = Recorder()
    alerts = _alerts(recorder, debounce=30.0)
    try:
        alerts.on_presence("alpha", False)
        alerts.on_presence("alpha", True)
        assert alerts._timers == {}  # the pending offline alert was cancelled
        assert alerts._queue.empty()
    finally:
        await alerts.stop()
    assert recorder.calls == 0


async def test_online_without_offline_alert_is_quiet_unless_debounce_zero() -> None:
    quiet, loud = Recorder(), Recorder()
    a, b = _alerts(quiet, debounce=5.0), _alerts(loud, debounce=0.0)
    try:
        a.on_presence("alpha", True)
        b.on_presence("alpha", True)
        await loud.wait_for(1)
        assert a._queue.empty() and quiet.calls == 0
    finally:
        await a.stop()
        await b.stop()
    assert loud.bodies[0]["event"] == "online"


async def test_retries_with_backoff_then_success() -> None:
    recorder, sleeps = Recorder(failures=2), list[float]()
    alerts = _alerts(recorder, debounce=0.0, retries=3, sleeps=sleeps)
    try:
        alerts.on_presence("alpha", False)
        await recorder.wait_for(1)
    finally:
        await alerts.stop()
    assert recorder.calls == 3
    assert sleeps == [BACKOFF_BASE, BACKOFF_BASE * 2]
    assert alerts.sent == 1


async def test_gives_up_without_logging_the_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunnel.server.alerts")
    recorder = Recorder(failures=100)
    alerts = _alerts(recorder, debounce=0.0, retries=2)
    try:
        alerts.on_presence("alpha", False)
        alerts.on_presence("beta", False)
        async with asyncio.timeout(WAIT):
            while recorder.calls < 6:
                recorder.changed.clear()
                await recorder.changed.wait()
        await asyncio.sleep(0)  # the worker logs in the same step as its last attempt
    finally:
        await alerts.stop()
    assert recorder.calls == 6 and alerts.sent == 0
    assert caplog.text.count("not delivered") == 2
    assert "SECRETPATH" not in caplog.text and "hooks.example.com" in caplog.text


async def test_full_queue_drops_and_never_raises() -> None:
    recorder = Recorder()
    alerts = _alerts(recorder, debounce=0.0, max_queued=2)
    try:
        for i in range(5):  # the worker cannot run in between: nothing awaits here
            alerts.on_presence(f"c{i}", False)
        assert alerts.dropped == 3
        await recorder.wait_for(2)
    finally:
        await alerts.stop()


async def test_start_alerts_subscribes_and_stop_unsubscribes() -> None:
    relay = FakeRelay(config=FakeConfig(alerts=AlertSettings(SECRET_URL, 1.0, 0)))
    assert start_alerts(FakeRelay()) is None
    alerts = start_alerts(relay)
    assert alerts is not None
    assert relay.presence_listeners == [alerts.on_presence]
    await alerts.stop()
    assert relay.presence_listeners == []
