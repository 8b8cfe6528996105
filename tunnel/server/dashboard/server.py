"""The dashboard as a running thing: checks in a fixed order, then the route's handler.

The order matters and is the same for every request: Host (421, before anything else is
looked at), then credentials (401/429; only ``/healthz`` is open, so an unauthenticated
peer cannot even learn which paths exist), then the route (404/405), then for state
changes the CSRF rule (403). Handlers never see a request that failed a check.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from tunnel.server.config_dashboard import DashboardSettings
from tunnel.server.dashboard.api import HEALTH_PATH, Api, json_response
from tunnel.server.dashboard.http import HttpServer, Limits, Request, Response
from tunnel.server.dashboard.relayview import RelayView
from tunnel.server.dashboard.security import (
    SECURITY_HEADERS,
    Authenticator,
    AuthResult,
    HostPolicy,
    csrf_problem,
    unauthorized,
)
from tunnel.server.dashboard.static import StaticFiles
from tunnel.server.guard import Penalties

__all__ = ["STATE_CHANGING_METHODS", "Dashboard", "start_dashboard"]

STATE_CHANGING_METHODS = frozenset({"POST"})

log = logging.getLogger("tunnel.server.dashboard")


class Dashboard:
    """The HTTP server plus the relay it shows; :meth:`start` binds, :meth:`stop` ends."""

    def __init__(self, relay: RelayView, settings: DashboardSettings, *,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 limits: Limits | None = None, static: StaticFiles | None = None) -> None:
        self.settings = settings
        self.auth = Authenticator(settings, Penalties(monotonic))
        self.api = Api(relay, clock, static)
        self.router = self.api.routes()
        self.http = HttpServer(self.handle, default_headers=SECURITY_HEADERS, limits=limits)
        self.hosts = HostPolicy.for_listener(settings.listen_host, settings.listen_port,
                                             settings.hosts)

    async def start(self) -> None:
        await self.http.start(self.settings.listen_host, self.settings.listen_port)
        host, port = self.http.address
        self.hosts = HostPolicy.for_listener(host, port, self.settings.hosts)

    def apply(self, settings: DashboardSettings) -> None:
        """Take over new credentials and Host names (a reload); the listener stays bound.

        Failed-login penalties carry over, so a reload cannot reset a guesser's back-off.
        """
        self.settings = dataclasses.replace(settings, listen_host=self.settings.listen_host,
                                            listen_port=self.settings.listen_port)
        self.auth = Authenticator(self.settings, self.auth.penalties)
        host, port = self.http.address
        self.hosts = HostPolicy.for_listener(host, port, self.settings.hosts)
        log.info("dashboard: credentials and host names reloaded")

    @property
    def url(self) -> str:
        host, port = self.http.address
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    async def stop(self) -> None:
        await self.http.stop()

    async def handle(self, request: Request) -> Response:
        if not self.hosts.allows(request.headers.get("host")):
            return Response.text(421, "misdirected request: unknown Host\n")
        if request.path != HEALTH_PATH:
            result = await self.auth.check(request.headers.get("authorization"), request.peer)
            if result is not AuthResult.OK:
                if result is AuthResult.DENIED:
                    log.warning("dashboard: failed login from %s", request.peer)
                return unauthorized(result, self.auth.retry_after(request.peer))
        handler, params = self.router.resolve(request.method, request.path)
        if request.method in STATE_CHANGING_METHODS:
            problem = csrf_problem(request)
            if problem is not None:
                return json_response(403, {"error": problem})
        request.params = params
        return await handler(request)


async def start_dashboard(relay: RelayView) -> Dashboard | None:
    """Bind the dashboard when server.yaml has a ``dashboard:`` section; None otherwise.

    Raises OSError when the address cannot be bound, like the relay's own listeners.
    """
    settings = relay.config.dashboard
    if settings is None:
        return None
    dashboard = Dashboard(relay, settings)
    await dashboard.start()
    log.info("dashboard listening on %s", dashboard.url)
    return dashboard
