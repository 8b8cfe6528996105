"""The dashboard's routes: JSON views, two admin actions, metrics, health and the page.

Handlers only read the relay (GET) or call one of its admin methods (POST); the checks
that guard them (Host, auth, CSRF) run before any handler, in :mod:`.server`. JSON is
encoded strictly (no NaN) and with ``<``, ``>`` and ``&`` escaped, so even a response
sniffed as HTML could not carry markup from a client's strings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from tunnel.server.dashboard.http import Request, Response, Router
from tunnel.server.dashboard.metrics import RelayMetrics
from tunnel.server.dashboard.relayview import RelayView
from tunnel.server.dashboard.static import StaticFiles
from tunnel.server.dashboard.views import client_detail, client_summary, connections, leases, status

__all__ = ["HEALTH_PATH", "JSON_TYPE", "MAX_HISTORY_HOURS", "Api", "json_response"]

JSON_TYPE = "application/json; charset=utf-8"
HEALTH_PATH = "/healthz"
MAX_HISTORY_HOURS = 168
DEFAULT_HISTORY_HOURS = 1
NAME = r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,62})"
PORT = r"(?P<port>[1-9][0-9]{0,4})"
_NAME_RE = re.compile(NAME)
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"}
_ESCAPE_RE = re.compile("[<>&]")


def json_response(status: int, value: Any) -> Response:
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text)
    return Response(status, text.encode("ascii"), JSON_TYPE)


def _not_found(what: str) -> Response:
    return json_response(404, {"error": f"no such {what}"})


def _bad_request(reason: str) -> Response:
    return json_response(400, {"error": reason})


class Api:
    def __init__(self, relay: RelayView, clock: Callable[[], float],
                 static: StaticFiles | None = None) -> None:
        self.relay = relay
        self.clock = clock
        self.static = static or StaticFiles()
        self.metrics = RelayMetrics(relay, clock)

    def routes(self) -> Router:
        router = Router()
        router.add("GET", HEALTH_PATH, self.health)
        router.add("GET", "/", self.index)
        router.add("GET", r"/static/(?P<file>[^/]+(?:/[^/]+)*)", self.static_file)
        router.add("GET", "/metrics", self.prometheus)
        router.add("GET", "/api/status", self.status)
        router.add("GET", "/api/clients", self.clients)
        router.add("GET", rf"/api/clients/{NAME}", self.client)
        router.add("POST", rf"/api/clients/{NAME}/disconnect", self.disconnect)
        router.add("GET", "/api/leases", self.leases)
        router.add("POST", rf"/api/leases/{PORT}/release", self.release)
        router.add("GET", "/api/connections", self.connections)
        router.add("GET", "/api/history", self.history)
        return router

    async def health(self, request: Request) -> Response:
        return Response.text(200, "ok\n")

    async def index(self, request: Request) -> Response:
        return await self.static.serve("index.html")

    async def static_file(self, request: Request) -> Response:
        return await self.static.serve(request.params["file"])

    async def prometheus(self, request: Request) -> Response:
        return Response(200, self.metrics.render(), self.metrics.content_type)

    async def status(self, request: Request) -> Response:
        return json_response(200, status(self.relay, self.clock()))

    async def clients(self, request: Request) -> Response:
        records = sorted(self.relay.registry.clients.values(), key=lambda c: c.name)
        return json_response(200, [client_summary(self.relay, c, self.clock()) for c in records])

    async def client(self, request: Request) -> Response:
        record = self.relay.registry.clients.get(request.params["name"])
        if record is None:
            return _not_found("client")
        return json_response(200, client_detail(self.relay, record, self.clock()))

    async def disconnect(self, request: Request) -> Response:
        name = request.params["name"]
        if name not in self.relay.registry.clients:
            return _not_found("client")
        if not self.relay.disconnect_client(name):
            return json_response(404, {"error": "client is not connected"})
        return json_response(200, {"ok": True})

    async def leases(self, request: Request) -> Response:
        return json_response(200, leases(self.relay))

    async def release(self, request: Request) -> Response:
        if not await self.relay.release_lease(int(request.params["port"])):
            return _not_found("lease")
        return json_response(200, {"ok": True})

    async def connections(self, request: Request) -> Response:
        return json_response(200, connections(self.relay, self.clock()))

    async def history(self, request: Request) -> Response:
        try:
            client, port, hours = _history_query(request.query)
        except ValueError as exc:
            return _bad_request(str(exc))
        since = self.clock() - hours * 3600.0
        points = self.relay.history.query(client, port, since)
        return json_response(200, {"points": [[ts, rin, rout] for ts, rin, rout in points]})


def _history_query(query: dict[str, str]) -> tuple[str | None, int | None, float]:
    """(client, port, hours) from ``?client=&port=&hours=``; ValueError says what is wrong."""
    unknown = set(query) - {"client", "port", "hours"}
    if unknown:
        raise ValueError("unknown query parameter")
    client = query.get("client") or None
    if client is not None and not _NAME_RE.fullmatch(client):
        raise ValueError("invalid client name")
    port: int | None = None
    if query.get("port"):
        raw = query["port"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw[:6]) <= 65535:
            raise ValueError("port must be 1-65535")
        port = int(raw)
    hours = float(DEFAULT_HISTORY_HOURS)
    if query.get("hours"):
        try:
            hours = float(query["hours"])
        except ValueError:
            raise ValueError("hours must be a number") from None
        if not math.isfinite(hours) or not 0 < hours <= MAX_HISTORY_HOURS:
            raise ValueError(f"hours must be in (0, {MAX_HISTORY_HOURS}]")
    return client, port, hours

