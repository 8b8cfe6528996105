"""Webhook alerts when a client goes offline (debounced) and when it comes back.

A flapping Wi-Fi link should not page anyone, so an offline alert is sent only when the
client is still offline ``debounce`` seconds later, and the matching online alert only if
the offline one went out. Sending is in the background with a bounded queue: the relay's
presence hook only records a timer or enqueues a message and returns, never blocks, never
raises; a dead webhook costs at most ``MAX_QUEUED`` pending alerts (then they are dropped
and logged). The webhook URL may embed a secret (Slack/Discord style), so only its scheme
and host are ever logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from tunnel import __version__
from tunnel.server.config_dashboard import AlertSettings
from tunnel.server.dashboard.relayview import PresenceListener, RelayView

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MAX_QUEUED",
    "SEND_TIMEOUT",
    "Alerts",
    "post_json",
    "start_alerts",
]

SEND_TIMEOUT = 5.0
MAX_QUEUED = 100
BACKOFF_BASE = 0.5  # seconds before the first retry, doubling
BACKOFF_CAP = 30.0
MAX_RESPONSE_BYTES = 4096  # read (and ignore) at most this much of the webhook's answer

log = logging.getLogger("tunnel.server.alerts")

Sender = Callable[[str, bytes, float], Awaitable[None]]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would become a GET without a body; treat it as a failure."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _post_blocking(url: str, body: bytes, timeout: float) -> None:
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"tunnel-server/{__version__}"})
    with opener.open(request, timeout=timeout) as response:  # raises for 4xx/5xx
        response.read(MAX_RESPONSE_BYTES)
        if not 200 <= response.status < 300:
            raise OSError(f"webhook answered {response.status}")


async def post_json(url: str, body: bytes, timeout: float) -> None:
    """POST ``body`` in a worker thread, so DNS and TLS never stall the event loop."""
    await asyncio.to_thread(_post_blocking, url, body, timeout)


def describe_url(url: str) -> str:
    """Scheme and host only: the path or query of a webhook URL is often its secret."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


@dataclass(frozen=True)
class Alert:
    event: str
    client: str
    at: float

    def body(self) -> bytes:
        return json.dumps({"event": self.event, "client": self.client, "at": self.at,
                           "relay": __version__}).encode("utf-8")


class Alerts:
    """Debounces presence changes into alerts and sends them, in order, one at a time."""

    def __init__(self, settings: AlertSettings, *, clock: Callable[[], float] = time.time,
                 sender: Sender = post_json, sleep: Callable[[float], Awaitable[None]]
                 = asyncio.sleep, timeout: float = SEND_TIMEOUT,
                 max_queued: int = MAX_QUEUED) -> None:
        self.settings = settings
        self._clock = clock
        self._sender = sender
        self._sleep = sleep
        self._timeout = timeout
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(max_queued)
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._alerted: set[str] = set()  # clients whose offline alert went out
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="alerts")
        self._detach: Callable[[], None] = lambda: None
        self.sent: int = 0
        self.dropped: int = 0

    def attach(self, listeners: list[PresenceListener]) -> None:
        listeners.append(self.on_presence)
        self._detach = lambda: _remove(listeners, self.on_presence)

    def on_presence(self, name: str, online: bool) -> None:
        """The relay's hook: cheap, synchronous and never raising."""
        try:
            if online:
                self._came_online(name)
            else:
                self._went_offline(name)
        except Exception:
            log.exception("alerts: presence change of %s not handled", name)

    def _went_offline(self, name: str) -> None:
        self._cancel_timer(name)
        since = self._clock()  # the alert says when it went offline, not when it was sent
        if self.settings.debounce <= 0:
            self._offline_confirmed(name, since)
            return
        loop = asyncio.get_running_loop()
        self._timers[name] = loop.call_later(self.settings.debounce,
                                             self._offline_confirmed, name, since)

    def _offline_confirmed(self, name: str, since: float) -> None:
        self._timers.pop(name, None)
        self._alerted.add(name)
        self._enqueue(Alert("offline", name, since))

    def _came_online(self, name: str) -> None:
        self._cancel_timer(name)  # back within the debounce: nobody hears of it
        if name in self._alerted or self.settings.debounce <= 0:
            self._alerted.discard(name)
            self._enqueue(Alert("online", name, self._clock()))

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _enqueue(self, alert: Alert) -> None:
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alerts: queue full, dropped the %s alert for %s", alert.event,
                        alert.client)

    async def _run(self) -> None:
        while True:
            alert = await self._queue.get()
            await self._deliver(alert)

    async def _deliver(self, alert: Alert) -> None:
        body = alert.body()
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                await self._sender(self.settings.webhook, body, self._timeout)
            except Exception as exc:  # any failure is retried, none reaches the relay
                if attempt + 1 == attempts:
                    log.warning("alerts: %s alert for %s not delivered to %s: %s",
                                alert.event, alert.client,
                                describe_url(self.settings.webhook), _reason(exc))
                    return
                await self._sleep(min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** attempt))
            else:
                self.sent += 1
                log.info("alerts: %s alert for %s sent", alert.event, alert.client)
                return

    async def stop(self) -> None:
        """Forget pending timers and queued alerts; stop the sender."""
        self._detach()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker


def _reason(exc: BaseException) -> str:
    """A short reason that cannot contain the URL (urllib puts it in some messages)."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return type(exc.reason).__name__ if isinstance(exc.reason, BaseException) \
            else "unreachable"
    return type(exc).__name__


def _remove(listeners: list[PresenceListener], listener: PresenceListener) -> None:
    with contextlib.suppress(ValueError):
        listeners.remove(listener)


def start_alerts(relay: RelayView) -> Alerts | None:
    """Subscribe to presence changes when server.yaml has an ``alerts:`` section.

    Needs a running event loop (call it from the relay's start-up coroutine).
    """
    settings = relay.config.alerts
    if settings is None:
        return None
    alerts = Alerts(settings)
    alerts.attach(relay.presence_listeners)
    log.info("alerts: sending presence changes to %s", describe_url(settings.webhook))
    return alerts
