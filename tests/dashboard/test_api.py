"""End-to-end tests of the dashboard: the real relay and client programs on 127.0.0.1.

The relay runs with ``dashboard: {listen: 127.0.0.1:0, ...}``; its printed
``tunnel-server: dashboard on http://...`` line gives the address. Every request is a raw
HTTP/1.1 exchange (:mod:`tests.dashboard.client`), so headers are seen exactly as sent.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tests.dashboard.client import Reply, basic, request
from tests.dashboard.webhook import WebhookReceiver
from tests.e2e.harness import (
    ALPHA_TOKEN,
    LISTENING_RE,
    SERVER_MODULE,
    Proc,
    free_ports,
    server_config,
    start_client,
    start_proc,
    wait_tunnel,
    write_config,
)
from tests.e2e.services import (
    EchoService,
    close_writer,
    echo_check,
    open_visitor,
    read_exactly_digest,
    send_pattern,
)

T = TypeVar("T")
MIB = 1024 * 1024
DASHBOARD_RE = r"^tunnel-server: dashboard on (?P<url>http://\S+)$"
POLL_INTERVAL = 0.1
API_TIMEOUT = 10.0  # how long the API may take to reflect a change
HEARTBEAT_TIMEOUT = 3  # server_config's heartbeat_timeout
TRAFFIC_SLACK = 1024  # bytes the counters may differ from what the test moved
CSRF = {"X-Tunnel-Request": "1"}
ROUTES = [("GET", "/"), ("GET", "/static/js/main.js"), ("GET", "/metrics"),
          ("GET", "/api/status"), ("GET", "/api/clients"), ("GET", "/api/clients/alpha"),
          ("GET", "/api/leases"), ("GET", "/api/connections"),
          ("GET", "/api/history?client=alpha"), ("POST", "/api/clients/alpha/disconnect"),
          ("POST", "/api/leases/6000/release"), ("GET", "/no/such/page")]


@dataclass
class Relay:
    proc: Proc
    url: str  # the link's ws:// URL, for clients
    port: int  # the dashboard's port
    password: str

    @property
    def auth(self) -> str:
        return basic("admin", self.password)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await request(self.port, "GET", path, auth=self.auth, **kwargs)

    async def post(self, path: str, headers: Mapping[str, str] | None = CSRF,
                   **kwargs: Any) -> Reply:
        return await request(self.port, "POST", path, auth=self.auth, headers=headers,
                             **kwargs)

    async def json(self, path: str) -> Any:
        reply = await self.get(path)
        assert reply.status == 200, (path, reply)
        return reply.json()

    async def client(self, name: str) -> dict[str, Any]:
        clients: list[dict[str, Any]] = await self.json("/api/clients")
        return next(c for c in clients if c["name"] == name)


def new_password() -> str:
    return secrets.token_urlsafe(15)  # 20 characters


def dashboard_config(tmp_path: Path, ports: list[int], password: str,
                     **overrides: Any) -> dict[str, Any]:
    dashboard = {"listen": "127.0.0.1:0", "username": "admin", "password": password}
    return server_config(tmp_path, ports, dashboard=dashboard, **overrides)


async def launch(tmp_path: Path, config: Mapping[str, Any],
                 env: Mapping[str, str] | None = None) -> Relay:
    """Start the relay with ``config`` and wait for its link and dashboard lines."""
    path = write_config(tmp_path, config)
    proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)], env=env,
                            cwd=tmp_path)
    link = await proc.wait_for_line(LISTENING_RE)
    dash = await proc.wait_for_line(DASHBOARD_RE)
    port = urlsplit(dash["url"]).port
    assert port is not None
    return Relay(proc, link["url"], port, config["dashboard"]["password"])


async def poll(fetch: Callable[[], Awaitable[T]], ok: Callable[[T], bool], what: str,
               timeout: float = API_TIMEOUT) -> T:
    """Fetch until ``ok`` holds (deadline-bounded); fail with the last value."""
    deadline = time.monotonic() + timeout
    value = await fetch()
    for _ in range(int(timeout / POLL_INTERVAL) + 100):
        if ok(value):
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL_INTERVAL)
        value = await fetch()
    raise AssertionError(f"{what} not seen within {timeout} s; last: {value!r}")


def metric(text: str, name: str, labels: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", re.M)
    match = pattern.search(text)
    assert match is not None, f"no {name}{{{labels}}} in /metrics:\n{text}"
    return float(match.group(1))


async def start_alpha(relay: Relay, port: int) -> tuple[Proc, EchoService]:
    service = EchoService()
    await service.start()
    client = await start_client(relay.url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"])
    assert await wait_tunnel(client, service.target, mode="fixed") == port
    await poll(lambda: relay.client("alpha"), lambda c: c["online"] and bool(c["tunnels"])
               and c["tunnels"][0]["online"], "alpha online with its tunnel")
    return client, service


# ---------------------------------------------------------------- access control


async def test_auth_host_check_and_headers(tmp_path: Path) -> None:
    relay = await launch(tmp_path, dashboard_config(tmp_path, free_ports(1), new_password()))
    health = await request(relay.port, "GET", "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    replies = [health]
    wrong = basic("admin", new_password())
    for i, (method, path) in enumerate(ROUTES):
        anonymous = await request(relay.port, method, path, headers=CSRF)
        # A distinct loopback source per wrong guess stays below the lock-out threshold.
        guessed = await request(relay.port, method, path, auth=wrong, headers=CSRF,
                                source=f"127.0.0.{10 + i}")
        for reply in (anonymous, guessed):
            assert reply.status == 401, (method, path, reply)
            assert reply.headers["www-authenticate"].startswith('Basic realm="tunnel"')
        replies += [anonymous, guessed]
    misdirected = await relay.get("/api/status", host="attacker.example")
    assert misdirected.status == 421
    rebinding = await relay.get("/api/status", host=f"attacker.example:{relay.port}")
    assert rebinding.status == 421
    ok = await relay.get("/api/status")
    assert ok.status == 200 and ok.headers["cache-control"] == "no-store"
    replies += [misdirected, ok]
    for reply in replies:
        assert reply.headers["content-security-policy"] == (
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["referrer-policy"] == "no-referrer"
        assert relay.password.encode() not in reply.body
    assert relay.password not in relay.proc.stdout + relay.proc.stderr


async def test_password_hash_login(tmp_path: Path) -> None:
    password = new_password()
    salt = secrets.token_bytes(16)
    iterations = 1000  # the config's minimum: fast for a test, the format is what matters
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    encoded = (f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}$"
               f"{base64.b64encode(digest).decode()}")
    dashboard = {"listen": "127.0.0.1:0", "password_hash": encoded}
    config = server_config(tmp_path, free_ports(1), dashboard=dashboard)
    path = write_config(tmp_path, config)
    proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)],
                            cwd=tmp_path)
    port = urlsplit((await proc.wait_for_line(DASHBOARD_RE))["url"]).port
    assert port is not None
    for _ in range(3):  # verified once, then served from the cached digest
        reply = await request(port, "GET", "/api/status", auth=basic("admin", password))
        assert reply.status == 200
    wrong = await request(port, "GET", "/api/status", auth=basic("admin", password + "x"))
    assert wrong.status == 401
    assert encoded.encode() not in reply.body + wrong.body


# ---------------------------------------------------------------- views and counters


async def test_clients_traffic_and_metrics_move_while_bytes_flow(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    _, service = await start_alpha(relay, port)

    status = await relay.json("/api/status")
    assert status["clients"] == {"online": 1, "offline": 1, "total": 2}
    assert status["tunnels"] == 1 and status["version"]
    alpha = await relay.client("alpha")
    assert alpha["tunnels"][0]["port"] == port and alpha["tunnels"][0]["mode"] == "fixed"
    assert alpha["tunnels"][0]["target"] == service.target
    assert alpha["address"] and alpha["connected_since"] and alpha["logins"] == 1
    beta = await relay.client("beta")
    assert not beta["online"] and beta["tunnels"] == []

    half = 2 * MIB
    reader, writer = await open_visitor(port)
    try:
        await send_pattern(writer, 7, half)
        got, _ = await read_exactly_digest(reader, half)
        assert got == half
        host, local_port = writer.get_extra_info("sockname")[:2]
        local = f"{host}:{local_port}"

        def moved(c: dict[str, Any]) -> bool:
            return bool(c["traffic"]["in"] >= half and c["traffic"]["out"] >= half)

        alpha = await poll(lambda: relay.client("alpha"), moved, "2 MiB in alpha's traffic")
        assert alpha["traffic"]["in"] - half <= TRAFFIC_SLACK
        assert alpha["tunnels"][0]["connections"] == 1
        text = (await relay.get("/metrics")).text
        labels = f'client="alpha",port="{port}"'
        assert half <= metric(text, "tunnel_tunnel_bytes_in_total", labels) <= half + TRAFFIC_SLACK
        assert half <= metric(text, "tunnel_tunnel_bytes_out_total", labels) \
            <= half + TRAFFIC_SLACK
        assert metric(text, "tunnel_tunnel_connections", labels) == 1
        assert metric(text, "tunnel_client_bytes_in_total", 'client="alpha"') >= half
        assert metric(text, "tunnel_client_online", 'client="alpha"') == 1
        assert metric(text, "tunnel_client_online", 'client="beta"') == 0
        assert re.search(r"^tunnel_clients_online 1\.0$", text, re.M), text
        conns = await relay.json("/api/connections")
        assert [(c["client"], c["port"], c["peer"]) for c in conns] == [("alpha", port, local)]
        assert conns[0]["in"] >= half and conns[0]["duration"] >= 0
        detail = await relay.json("/api/clients/alpha")
        assert [c["peer"] for c in detail["connections"]] == [local]
        assert isinstance(detail["series"], list)

        await send_pattern(writer, 8, half)
        got, _ = await read_exactly_digest(reader, half)
        assert got == half
    finally:
        await close_writer(writer)
    alpha = await poll(lambda: relay.client("alpha"),
                       lambda c: c["traffic"]["in"] >= 2 * half
                       and c["tunnels"][0]["connections"] == 0, "4 MiB and no connection")
    assert alpha["traffic"]["in"] - 2 * half <= TRAFFIC_SLACK
    assert alpha["traffic"]["out"] - 2 * half <= TRAFFIC_SLACK
    leases = await relay.json("/api/leases")
    assert [(x["port"], x["client"], x["kind"], x["online"]) for x in leases] == [
        (port, "alpha", "fixed", True)]
    missing = await relay.get("/api/clients/nobody")
    assert missing.status == 404 and "error" in missing.json()
    for path in ("/api/status", "/api/clients", "/api/clients/alpha", "/api/leases",
                 "/api/connections", "/api/history?client=alpha", "/metrics", "/"):
        reply = await relay.get(path)
        assert relay.password.encode() not in reply.body, path
        assert ALPHA_TOKEN.encode() not in reply.body, path


async def test_telemetry_is_cleaned_and_exported(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    telemetry = {
        "hostname": "<img src=x onerror=alert(1)>", "os": "Linux", "cpu_percent": 37.5,
        "memory_used": 3 * MIB, "memory_total": 8 * MIB, "gpu_status": "ok",
        "gpus": [{"index": 0, "name": "<b>A6000</b>", "utilization": 97,
                  "memory_used": MIB, "memory_total": 2 * MIB, "temperature": 78,
                  "power_watts": 287.5}]}
    path = tmp_path / "telemetry.json"
    path.write_text(json.dumps(telemetry), encoding="utf-8")
    env = {"TUNNEL_TELEMETRY_FILE": str(path), "TUNNEL_TELEMETRY_INTERVAL": "0.5"}
    await start_client(relay.url, ALPHA_TOKEN, [f"127.0.0.1:9:fixed-{port}"], env=env)
    alpha = await poll(lambda: relay.client("alpha"),
                       lambda c: c["telemetry"] is not None and bool(c["telemetry"]["gpus"]),
                       "alpha's telemetry")
    assert alpha["hostname"] == telemetry["hostname"]  # kept as data, escaped on the wire
    assert alpha["telemetry"]["gpus"][0]["name"] == "<b>A6000</b>"
    raw = (await relay.get("/api/clients")).body
    assert b"<" not in raw and b">" not in raw
    text = (await relay.get("/metrics")).text
    gpu = 'client="alpha",gpu="0"'
    assert metric(text, "tunnel_client_gpu_utilization_percent", gpu) == 97
    assert metric(text, "tunnel_client_gpu_temperature_celsius", gpu) == 78
    assert metric(text, "tunnel_client_gpu_power_watts", gpu) == 287.5
    assert metric(text, "tunnel_client_gpu_memory_total_bytes", gpu) == 2 * MIB
    assert metric(text, "tunnel_client_cpu_percent", 'client="alpha"') == 37.5
    assert metric(text, "tunnel_client_memory_used_bytes", 'client="alpha"') == 3 * MIB


# ---------------------------------------------------------------- admin actions


async def test_disconnect_needs_csrf_header_and_same_origin(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    await start_alpha(relay, port)
    before = await relay.client("alpha")
    path = "/api/clients/alpha/disconnect"
    assert (await relay.get(path)).status == 405
    assert (await relay.post(path, headers={})).status == 403
    foreign = {**CSRF, "Origin": "http://attacker.example"}
    assert (await relay.post(path, headers=foreign)).status == 403
    still = await relay.client("alpha")
    assert still["online"] and still["connected_since"] == before["connected_since"]

    same = {**CSRF, "Origin": f"http://127.0.0.1:{relay.port}"}
    done = await relay.post(path, headers=same)
    assert done.status == 200 and done.json() == {"ok": True}
    after = await poll(lambda: relay.client("alpha"),
                       lambda c: c["online"] and c["logins"] > before["logins"],
                       "alpha logged in again")
    assert after["connected_since"] > before["connected_since"]
    assert (await relay.post("/api/clients/nobody/disconnect")).status == 404
    await echo_check(port, 64 * 1024)  # the tunnel works again after the reconnect


async def test_release_lease(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    client, _ = await start_alpha(relay, port)
    await client.terminate()
    await poll(lambda: relay.json("/api/leases"),
               lambda rows: [(x["port"], x["online"]) for x in rows] == [(port, False)],
               "the lease of an offline client")
    assert (await relay.get(f"/api/leases/{port}/release")).status == 405
    assert (await relay.post(f"/api/leases/{port}/release", headers={})).status == 403
    done = await relay.post(f"/api/leases/{port}/release")
    assert done.status == 200 and done.json() == {"ok": True}
    assert await relay.json("/api/leases") == []
    assert (await relay.client("alpha"))["tunnels"] == []
    assert (await relay.post(f"/api/leases/{port}/release")).status == 404


# ---------------------------------------------------------------- presence and alerts


async def test_kill9_goes_offline_and_webhook_fires(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        (port,) = free_ports(1)
        alerts = {"webhook": receiver.url, "debounce": 0.5, "retries": 2}
        relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password(),
                                                        alerts=alerts))
        client, service = await start_alpha(relay, port)
        await client.kill9()
        killed = time.monotonic()
        await poll(lambda: relay.client("alpha"), lambda c: not c["online"],
                   "alpha offline", timeout=HEARTBEAT_TIMEOUT + 2)
        assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT + 2
        offline = await relay.client("alpha")
        assert offline["offline_since"] is not None and not offline["tunnels"][0]["online"]
        events = await receiver.wait_for(1, timeout=HEARTBEAT_TIMEOUT + 5)
        assert [(e["event"], e["client"]) for e in events] == [("offline", "alpha")]

        await start_client(relay.url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"])
        events = await receiver.wait_for(2, timeout=API_TIMEOUT)
        assert [(e["event"], e["client"]) for e in events] == [("offline", "alpha"),
                                                                ("online", "alpha")]
        assert all(isinstance(e["at"], float) and e["relay"] for e in events)
        assert "SECRET-PATH" not in relay.proc.stdout + relay.proc.stderr
    finally:
        await receiver.close()


# ---------------------------------------------------------------- history


async def test_history_survives_a_relay_restart(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    config = dashboard_config(tmp_path, [port], new_password())
    env = {"TUNNEL_HISTORY_FLUSH_INTERVAL": "1"}
    relay = await launch(tmp_path, config, env)
    client, _ = await start_alpha(relay, port)
    size = MIB
    await echo_check(port, size)

    def flushed() -> int:
        """Bytes in the history file itself, not the relay's memory (read-only open)."""
        path = tmp_path / "state" / "history.sqlite3"
        if not path.exists():
            return 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT COALESCE(SUM(bytes_in), 0) FROM traffic "
                             "WHERE client = 'alpha'").fetchone()
        except sqlite3.OperationalError:
            return 0
        finally:
            db.close()
        return int(row[0])

    async def read_flushed() -> int:
        return await asyncio.to_thread(flushed)

    await poll(read_flushed, lambda n: n >= size, "alpha's bytes written to history")
    await client.kill9()
    await relay.proc.kill9()  # no graceful flush: what survives was written on the minute

    relay = await launch(tmp_path, config, env)
    points = (await relay.json("/api/history?client=alpha&hours=1"))["points"]
    assert sum(p[1] for p in points) >= size and sum(p[2] for p in points) >= size
    assert all(len(p) == 3 and p[0] % 60 == 0 for p in points)
    by_port = (await relay.json(f"/api/history?client=alpha&port={port}&hours=168"))["points"]
    assert sum(p[1] for p in by_port) >= size
    assert (await relay.json("/api/history?client=beta"))["points"] == []
    assert (await relay.get("/api/history?hours=169")).status == 400
