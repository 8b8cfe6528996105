"""Unit tests of the dashboard's HTTP parser limits, security checks and views.

They run the real HTTP server on 127.0.0.1:0 in the test process against a fake relay
(:mod:`tests.dashboard.fakes`), speaking raw bytes so nothing is normalized on the way.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dashboard.client import Reply, basic, parse_reply, request, send_raw
from tests.dashboard.fakes import PASSWORD, FakeRelay, sample_relay, settings
from tunnel.server.dashboard import security
from tunnel.server.dashboard.http import (
    MAX_BODY,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    HttpServer,
    Limits,
    Request,
    Response,
)
from tunnel.server.dashboard.security import (
    Authenticator,
    AuthResult,
    HostPolicy,
    csrf_problem,
    parse_basic,
    verify_pbkdf2,
)
from tunnel.server.dashboard.server import Dashboard
from tunnel.server.dashboard.static import StaticFiles
from tunnel.server.guard import Penalties

NOW = 1200.0
AUTH = basic("admin", PASSWORD)
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_hash(password: str, iterations: int = 1000) -> str:
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return (f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


# ---------------------------------------------------------------- a bare HTTP server


async def _echo_handler(request: Request) -> Response:
    if request.path == "/boom":
        raise RuntimeError("secret internals")
    body = json.dumps({"method": request.method, "path": request.path,
                       "query": request.query, "body": request.body.decode()})
    return Response(200, body.encode(), "application/json")


@pytest.fixture
async def bare() -> AsyncIterator[HttpServer]:
    limits = Limits(header_timeout=0.3, keepalive_idle=0.3, body_timeout=0.3,
                    max_connections=4)
    server = HttpServer(_echo_handler, default_headers=[("X-Test", "1")], limits=limits)
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


def _head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _raw(server: HttpServer, data: bytes) -> Reply:
    return parse_reply(await send_raw(server.address[1], data))


async def test_plain_request_and_query(bare: HttpServer) -> None:
    reply = await _raw(bare, _head(["GET /x?a=1&b=two HTTP/1.1", "Host: h",
                                    "Connection: close"]))
    assert reply.status == 200
    assert json.loads(reply.body)["query"] == {"a": "1", "b": "two"}
    assert reply.headers["x-test"] == "1"


async def test_body_is_read_by_content_length(bare: HttpServer) -> None:
    reply = await _raw(bare, _head(["POST /x HTTP/1.1", "Host: h", "Connection: close",
                                    "Content-Length: 5"]) + b"hello")
    assert json.loads(reply.body)["body"] == "hello"


async def test_request_line_too_long_is_414(bare: HttpServer) -> None:
    path = "/" + "a" * MAX_REQUEST_LINE
    reply = await _raw(bare, _head([f"GET {path} HTTP/1.1", "Host: h"]))
    assert reply.status == 414
    assert reply.headers["x-test"] == "1"  # default headers on errors too


async def test_request_line_far_too_long_is_414_without_buffering(bare: HttpServer) -> None:
    reply = await _raw(bare, b"GET /" + b"a" * (100 * 1024))
    assert reply.status == 414


async def test_too_many_headers_is_431(bare: HttpServer) -> None:
    lines = ["GET / HTTP/1.1", "Host: h"] + [f"X-H{i}: v" for i in range(MAX_HEADERS)]
    assert (await _raw(bare, _head(lines))).status == 431


async def test_exactly_max_headers_is_fine(bare: HttpServer) -> None:
    lines = ["GET / HTTP/1.1", "Host: h", "Connection: close"] + [
        f"X-H{i}: v" for i in range(MAX_HEADERS - 2)]
    assert (await _raw(bare, _head(lines))).status == 200


async def test_header_bytes_over_cap_is_431(bare: HttpServer) -> None:
    lines = ["GET / HTTP/1.1", "Host: h"] + [f"X-H{i}: {'v' * 4000}" for i in range(5)]
    assert (await _raw(bare, _head(lines))).status == 431


async def test_body_too_large_is_413(bare: HttpServer) -> None:
    reply = await _raw(bare, _head(["POST / HTTP/1.1", "Host: h",
                                    f"Content-Length: {MAX_BODY + 1}"]))
    assert reply.status == 413


@pytest.mark.parametrize("data, status", [
    (b"GET / HTTP/1.1\nHost: h\n\n", 400),  # bare LF
    (_head(["GET / HTTP/1.1", "Host: h", " folded: x"]), 400),  # obs-fold
    (_head(["GET / HTTP/1.1", "Host: a", "Host: b"]), 400),
    (_head(["GET / HTTP/1.1"]), 400),  # no Host
    (_head(["GET http://evil/ HTTP/1.1", "Host: h"]), 400),  # absolute form
    (_head(["GET / HTTP/2.0", "Host: h"]), 505),
    (_head(["GET  / HTTP/1.1", "Host: h"]), 400),
    (_head(["get / HTTP/1.1", "Host: h"]), 400),
    (_head(["GET / HTTP/1.1", "Host: h", "Bad Name: x"]), 400),
    (_head(["GET / HTTP/1.1", "Host: h", "X: a\x00b"]), 400),
    (_head(["POST / HTTP/1.1", "Host: h", "Transfer-Encoding: chunked"]), 501),
    (_head(["POST / HTTP/1.1", "Host: h", "Content-Length: -1"]), 400),
    (_head(["POST / HTTP/1.1", "Host: h", "Content-Length: 1", "Content-Length: 1"]), 400),
    (_head(["GET /?a=1&a=2 HTTP/1.1", "Host: h"]), 400),
    (b"\xff\xfe / HTTP/1.1\r\nHost: h\r\n\r\n", 400),
])
async def test_malformed_requests_get_clean_errors(bare: HttpServer, data: bytes,
                                                   status: int) -> None:
    reply = await _raw(bare, data)
    assert reply.status == status
    assert b"Traceback" not in reply.body


async def test_handler_exception_is_a_generic_500(bare: HttpServer,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    reply = await _raw(bare, _head(["GET /boom HTTP/1.1", "Host: h", "Connection: close"]))
    assert reply.status == 500
    assert b"secret internals" not in reply.body and b"Traceback" not in reply.body


async def test_keep_alive_serves_several_requests(bare: HttpServer) -> None:
    one = _head(["GET /a HTTP/1.1", "Host: h"])
    last = _head(["GET /b HTTP/1.1", "Host: h", "Connection: close"])
    raw = await send_raw(bare.address[1], one + one + last)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert b"Connection: keep-alive" in raw


async def test_http10_closes_after_one_response(bare: HttpServer) -> None:
    raw = await send_raw(bare.address[1], b"GET /a HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in raw


async def test_idle_and_slow_heads_are_dropped(bare: HttpServer) -> None:
    """A silent connection and one that never finishes its head are closed (no answer)."""
    port = bare.address[1]
    for data in (b"", b"GET / HTTP/1.1\r\nHost: h\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            async with asyncio.timeout(5):
                assert await reader.read() == b""
        finally:
            writer.close()
            await writer.wait_closed()


async def test_connection_cap_answers_503(bare: HttpServer) -> None:
    port = bare.address[1]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    try:
        for _ in range(200):  # the server registers them as it accepts them
            if bare.connections >= 4:
                break
            await asyncio.sleep(0.01)
        reply = parse_reply(await send_raw(port, _head(["GET / HTTP/1.1", "Host: h"])))
        assert reply.status == 503
    finally:
        for _, writer in held:
            writer.close()
            await writer.wait_closed()


# ---------------------------------------------------------------- security pieces


def test_parse_basic() -> None:
    assert parse_basic(basic("admin", "p:w")) == (b"admin", b"p:w")
    assert parse_basic("basic " + base64.b64encode(b"a:b").decode()) == (b"a", b"b")
    assert parse_basic(None) is None
    assert parse_basic("Bearer x") is None
    assert parse_basic("Basic !!!") is None
    assert parse_basic("Basic " + base64.b64encode(b"nocolon").decode()) is None
    assert parse_basic("Basic " + "A" * 5000) is None


def test_verify_pbkdf2() -> None:
    encoded = make_hash("s3cret-password")
    assert verify_pbkdf2(encoded, b"s3cret-password")
    assert not verify_pbkdf2(encoded, b"wrong")
    assert not verify_pbkdf2("garbage", b"x")


async def test_hash_is_verified_once_then_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = security.verify_pbkdf2

    def counting(encoded: str, password: bytes) -> bool:
        calls.append(password)
        return real(encoded, password)

    monkeypatch.setattr(security, "verify_pbkdf2", counting)
    auth = Authenticator(settings(password=None, password_hash=make_hash(PASSWORD)),
                         Penalties(Clock()))
    for _ in range(5):
        assert await auth.check(AUTH, "10.0.0.1") is AuthResult.OK
    assert len(calls) == 1
    assert await auth.check(basic("admin", "wrong-password"), "10.0.0.1") is AuthResult.DENIED
    assert len(calls) == 2


async def test_wrong_user_is_denied_even_with_the_password() -> None:
    auth = Authenticator(settings(), Penalties(Clock()))
    assert await auth.check(basic("root", PASSWORD), "s") is AuthResult.DENIED
    assert await auth.check(None, "s") is AuthResult.MISSING


async def test_failed_logins_are_throttled_per_source() -> None:
    clock = Clock(100.0)
    auth = Authenticator(settings(), Penalties(clock))
    wrong = basic("admin", "nope-nope-nope")
    results = [await auth.check(wrong, "10.0.0.1") for _ in range(6)]
    # Five guesses are heard; the fifth failure starts the 1 s lock-out (reliability S-5).
    assert results == [AuthResult.DENIED] * 5 + [AuthResult.THROTTLED]
    # Locked out now: even the right password is not tried.
    assert await auth.check(AUTH, "10.0.0.1") is AuthResult.THROTTLED
    assert auth.retry_after("10.0.0.1") >= 1
    assert await auth.check(AUTH, "10.0.0.2") is AuthResult.OK  # other sources unaffected
    clock.now += 2.0
    assert await auth.check(AUTH, "10.0.0.1") is AuthResult.OK


def test_host_policy_on_loopback() -> None:
    policy = HostPolicy.for_listener("127.0.0.1", 7500, ("dash.example.com",))
    for good in ("127.0.0.1:7500", "localhost:7500", "LOCALHOST", "[::1]:7500",
                 "127.0.0.2", "dash.example.com", "dash.example.com:443"):
        assert policy.allows(good), good
    for bad in ("evil.example:7500", "127.0.0.1:7501", "localhost.evil.example",
                "127.0.0.1:abc", "[::1", "", None, "10.0.0.1:7500", "a@127.0.0.1"):
        assert not policy.allows(bad), bad


def test_host_policy_on_public_listener() -> None:
    open_policy = HostPolicy.for_listener("0.0.0.0", 7500, ())
    assert open_policy.allows("anything.example") and open_policy.allows("1.2.3.4:7500")
    named = HostPolicy.for_listener("0.0.0.0", 7500, ("dash.example.com",))
    assert named.allows("dash.example.com") and named.allows("203.0.113.5:7500")
    assert not named.allows("evil.example")


def _post(headers: dict[str, str]) -> Request:
    return Request("POST", "/x", "/x", {}, "HTTP/1.1", {"host": "127.0.0.1:7500", **headers})


def test_csrf_rule() -> None:
    assert csrf_problem(_post({})) is not None
    assert csrf_problem(_post({"x-tunnel-request": "0"})) is not None
    assert csrf_problem(_post({"x-tunnel-request": "1"})) is None
    assert csrf_problem(_post({"x-tunnel-request": "1",
                               "origin": "http://127.0.0.1:7500"})) is None
    assert csrf_problem(_post({"x-tunnel-request": "1",
                               "origin": "http://evil.example"})) is not None
    assert csrf_problem(_post({"x-tunnel-request": "1", "origin": "null"})) is not None


# ---------------------------------------------------------------- the dashboard


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    root = tmp_path / "static"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>t</title>")
    (root / "app.js").write_text("console.log(1)")
    (root / ".hidden.js").write_text("no")
    (tmp_path / "outside.js").write_text("secret")
    (root / "link.js").symlink_to(tmp_path / "outside.js")
    (root / "sub").mkdir()
    panels = root / "js" / "panels"
    panels.mkdir(parents=True)
    (root / "js" / "main.js").write_text("import './panels/leases.js';")
    (panels / "leases.js").write_text("export default {};")
    (root / "js" / ".hidden.js").write_text("no")
    (root / "js" / "link.js").symlink_to(tmp_path / "outside.js")
    (root / "js" / "inside.js").symlink_to(root / "app.js")  # even a link that stays inside
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.js").write_text("secret")
    (root / "linked").symlink_to(tmp_path / "elsewhere")
    deep = root / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    (deep / "e.js").write_text("secret")
    (root / "js" / "notes.sh").write_text("secret")
    return root


@pytest.fixture
async def dash(static_dir: Path) -> AsyncIterator[tuple[Dashboard, FakeRelay, int]]:
    relay = sample_relay()
    assert relay.config.dashboard is not None
    dashboard = Dashboard(relay, relay.config.dashboard, clock=lambda: NOW,
                          static=StaticFiles(static_dir))
    await dashboard.start()
    yield dashboard, relay, dashboard.http.address[1]
    await dashboard.stop()


async def test_healthz_is_open_and_says_nothing_else(
        dash: tuple[Dashboard, FakeRelay, int]) -> None:
    reply = await request(dash[2], "GET", "/healthz")
    assert reply.status == 200 and reply.body == b"ok\n"
    assert reply.headers["content-security-policy"] == CSP
    assert reply.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/metrics", "/api/status",
                                  "/api/clients", "/api/clients/alpha", "/api/nope"])
async def test_everything_else_needs_auth(dash: tuple[Dashboard, FakeRelay, int],
                                          path: str) -> None:
    reply = await request(dash[2], "GET", path)
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith('Basic realm="tunnel"')
    assert reply.headers["referrer-policy"] == "no-referrer"


async def test_bad_host_is_421_before_auth(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    reply = await request(dash[2], "GET", "/api/status", auth=AUTH, host="evil.example")
    assert reply.status == 421


async def test_status_view(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    reply = await request(dash[2], "GET", "/api/status", auth=AUTH)
    assert reply.headers["cache-control"] == "no-store"
    data = reply.json()
    assert data["clients"] == {"online": 1, "offline": 1, "total": 2}
    assert data["uptime"] == NOW - 1000.0 and data["started"] == 1000.0
    assert data["tunnels"] == 1 and data["connections"] == 1
    assert data["traffic"] == {"in": 5000, "out": 7000}
    assert data["rate"] == {"in": 10.0, "out": 20.0}


async def test_clients_view_cleans_telemetry(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    reply = await request(dash[2], "GET", "/api/clients", auth=AUTH)
    assert b"<" not in reply.body  # escaped as \u003c even inside JSON strings
    alpha, beta = reply.json()
    assert alpha["name"] == "alpha" and alpha["online"] and not beta["online"]
    assert alpha["rtt_ms"] == 12.0
    assert alpha["tunnels"] == [{"port": 6000, "mode": "fixed", "target": "127.0.0.1:8888",
                                 "online": True, "connections": 1, "streams_refused": 0,
                                 "traffic": {"in": 5000, "out": 7000},
                                 "rate": {"in": 100.0, "out": 200.0}}]
    telemetry = alpha["telemetry"]
    assert telemetry["hostname"] == "gpu-box<script>" and "secret_field" not in telemetry
    assert [g["index"] for g in telemetry["gpus"]] == [0]
    assert beta["telemetry"] is None and beta["offline_since"] == 1050.0


async def test_client_detail_and_404(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    data = (await request(dash[2], "GET", "/api/clients/alpha", auth=AUTH)).json()
    assert data["connections"] == [{"client": "alpha", "port": 6000, "peer": "10.0.0.9:4444",
                                    "opened": 1180.0, "duration": 20.0, "in": 111,
                                    "out": 222}]
    assert data["series"] == [[1000.0, 1.0, 2.0], [1005.0, 3.0, 4.0]]
    missing = await request(dash[2], "GET", "/api/clients/nobody", auth=AUTH)
    assert missing.status == 404 and missing.json() == {"error": "no such client"}


async def test_leases_connections_history(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    _, relay, port = dash
    leases = (await request(port, "GET", "/api/leases", auth=AUTH)).json()
    assert [(x["port"], x["online"]) for x in leases] == [(6000, True), (6001, False)]
    conns = (await request(port, "GET", "/api/connections", auth=AUTH)).json()
    assert [(c["client"], c["port"]) for c in conns] == [("alpha", 6000)]
    hist = await request(port, "GET", "/api/history?client=alpha&port=6000&hours=2",
                         auth=AUTH)
    assert hist.json() == {"points": [[960.0, 10, 20], [1020.0, 30, 40]]}
    assert relay.history.calls[-1] == ("alpha", 6000, NOW - 7200.0)
    for bad in ("hours=169", "hours=0", "hours=nan", "port=0", "port=x", "client=%3Cx%3E",
                "other=1"):
        reply = await request(port, "GET", f"/api/history?{bad}", auth=AUTH)
        assert reply.status == 400, bad
        assert "error" in reply.json()


async def test_admin_actions_and_csrf(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    _, relay, port = dash
    csrf = {"X-Tunnel-Request": "1"}
    assert (await request(port, "GET", "/api/clients/alpha/disconnect", auth=AUTH)
            ).status == 405
    assert (await request(port, "POST", "/api/clients/alpha/disconnect", auth=AUTH)
            ).status == 403
    foreign = {**csrf, "Origin": "http://evil.example"}
    assert (await request(port, "POST", "/api/clients/alpha/disconnect", auth=AUTH,
                          headers=foreign)).status == 403
    assert relay.disconnected == []
    same = {**csrf, "Origin": f"http://127.0.0.1:{port}"}
    ok = await request(port, "POST", "/api/clients/alpha/disconnect", auth=AUTH, headers=same)
    assert ok.json() == {"ok": True} and relay.disconnected == ["alpha"]
    again = await request(port, "POST", "/api/clients/alpha/disconnect", auth=AUTH,
                          headers=csrf)
    assert again.status == 404
    assert (await request(port, "POST", "/api/leases/6001/release", auth=AUTH, headers=csrf)
            ).json() == {"ok": True}
    assert (await request(port, "POST", "/api/leases/6001/release", auth=AUTH, headers=csrf)
            ).status == 404
    assert (await request(port, "POST", "/api/clients/alpha/disconnect", headers=csrf)
            ).status == 401


async def test_metrics(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    reply = await request(dash[2], "GET", "/metrics", auth=AUTH)
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    for line in ('tunnel_clients_online 1.0', 'tunnel_client_online{client="alpha"} 1.0',
                 'tunnel_client_online{client="beta"} 0.0',
                 'tunnel_tunnel_bytes_in_total{client="alpha",port="6000"} 5000.0',
                 'tunnel_tunnel_bytes_out_total{client="alpha",port="6000"} 7000.0',
                 'tunnel_client_bytes_in_total{client="alpha"} 5000.0',
                 'tunnel_tunnel_connections{client="alpha",port="6000"} 1.0',
                 'tunnel_client_rtt_seconds{client="alpha"} 0.012',
                 'tunnel_client_gpu_utilization_percent{client="alpha",gpu="0"} 87.0'):
        assert line in text.splitlines(), line
    assert PASSWORD not in text


async def test_static_files(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    port = dash[2]
    index = await request(port, "GET", "/", auth=AUTH)
    assert index.status == 200 and index.headers["content-type"] == "text/html; charset=utf-8"
    js = await request(port, "GET", "/static/app.js", auth=AUTH)
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    for path in ("/static/..", "/static/.hidden.js", "/static/link.js", "/static/sub",
                 "/static/%2e%2e%2foutside.js", "/static/../outside.js", "/static/nope.js",
                 "/static/sub/x.js"):
        reply = await request(port, "GET", path, auth=AUTH)
        assert reply.status == 404, path
        assert b"secret" not in reply.body


async def test_static_subfolders_are_served_and_stay_inside(
        dash: tuple[Dashboard, FakeRelay, int]) -> None:
    """The page's modules live in ``static/js/`` and ``static/js/panels/``: paths with
    folders are served, with the JavaScript type a module script insists on, and every way
    out of the folder (dot segments, encoded dots and slashes, backslashes, symlinks to a
    file or a folder, empty segments) or past the depth limit answers 404."""
    port = dash[2]
    for path, body in (("/static/js/main.js", b"import './panels/leases.js';"),
                       ("/static/js/panels/leases.js", b"export default {};")):
        reply = await request(port, "GET", path, auth=AUTH)
        assert reply.status == 200, path
        assert reply.headers["content-type"] == "text/javascript; charset=utf-8"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.body == body
    for path in ("/static/js/../app.js", "/static/js/../../outside.js",
                 "/static/js/%2e%2e/app.js", "/static/js/%2E%2E%2F%2E%2E%2Foutside.js",
                 "/static/js/..%2f..%2foutside.js", "/static/js%2fmain.js",
                 "/static/js/./main.js", "/static/js//main.js", "/static/js/main.js/",
                 "/static/js/", "/static/js", "/static/js/panels", "/static/js/.hidden.js",
                 "/static/js\\main.js", "/static/js/link.js", "/static/js/inside.js",
                 "/static/linked/x.js", "/static/a/b/c/d/e.js", "/static/js/notes.sh",
                 "/static/js/missing.js", "/static//etc/passwd", "/static/%2fetc/passwd"):
        reply = await request(port, "GET", path, auth=AUTH)
        assert reply.status == 404, path
        assert b"secret" not in reply.body and b"export" not in reply.body, path


async def test_password_never_in_responses(dash: tuple[Dashboard, FakeRelay, int]) -> None:
    port = dash[2]
    for path in ("/", "/api/status", "/api/clients", "/api/clients/alpha", "/api/leases",
                 "/api/connections", "/api/history", "/metrics", "/nope"):
        for auth in (AUTH, basic("admin", "bad-password-1"), None):
            reply = await request(port, "GET", path, auth=auth, source="127.0.0.3")
            assert PASSWORD.encode() not in reply.body
            assert PASSWORD not in str(reply.headers)
