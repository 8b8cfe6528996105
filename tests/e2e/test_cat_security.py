"""Reliability catalogue (docs/reliability.md §2), section (e) security, by id.

Most tests speak the link protocol by hand (a raw WebSocket peer): that is what an attacker
does, and it lets a test say exactly which message was sent and what came back. Each test
that involves the link runs in all four variants (asyncio/uvloop x TLS on/off).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import gc
import itertools
import json
import math
import re
import secrets
import socket
import ssl
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.dashboard.client import Reply, basic, request
from tests.dashboard.test_api import (
    CSRF,
    DASHBOARD_RE,
    ROUTES,
    dashboard_config,
    launch,
    new_password,
    poll,
)
from tests.e2e.conftest import Size
from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    CLIENT_MODULE,
    EXIT_TIMEOUT,
    PINS,
    SERVER_MODULE,
    Proc,
    Variant,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    url_port,
    wait_tunnel,
    write_config,
)
from tests.e2e.rawpeer import control, first_control
from tests.e2e.services import (
    EchoService,
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    pattern_chunks,
    pattern_digest,
    read_exactly_digest,
)
from tests.e2e.tlsproxy import RecordingProxy, TlsMitm, make_self_signed
from tunnel.common.config.credentials import generate_keypair, key_id, sign
from tunnel.common.proto import messages as msg
from tunnel.common.proto.auth import client_proof, derive_key, identify, login_message, new_nonce
from tunnel.common.proto.secret import Secret
from tunnel.server.guard import (
    FAILURES_BEFORE_PENALTY,
    MAX_PENALTY_ENTRIES,
    PENALTY_BASE,
    PENALTY_CAP,
    Penalties,
)
from tunnel.server.registry import REPLACEMENT_FLAG, REPLACEMENT_WINDOW, ClientRecord

MIB = 1024 * 1024
REFUSED = {"type": "refused", "reason": "authentication failed"}
CLOSE_AUTH_FAILED = 1008
CLOSE_TRY_LATER = 1013
EXIT_CONFIG = 2
EXIT_REFUSED = 3
REPO = Path(__file__).resolve().parents[2]
TUNNEL_DIR = REPO / "tunnel"
PAGE_JS = TUNNEL_DIR / "server" / "dashboard" / "static" / "js"


def _page_js() -> str:
    """The status page's JavaScript: every module under static/js/, concatenated."""
    return "\n".join(path.read_text(encoding="utf-8") for path in sorted(PAGE_JS.rglob("*.js")))


# ----------------------------------------------------------------------------- helpers


def _secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, raw.hex(), base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("=")]


def _unverified_tls() -> ssl.SSLContext:
    """A raw test peer's TLS: the pinned client is tested in S-8; here the link matters."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _open(url: str, source: str | None = None) -> tuple[ClientConnection, bytes]:
    """A raw link from ``source``; returns it with the relay's challenge nonce."""
    extra: dict[str, Any] = {}
    if source is not None:
        extra["local_addr"] = (source, 0)
    if url.startswith("wss://"):
        extra["ssl"] = _unverified_tls()
    ws = await connect(url, compression=None, ping_interval=None, proxy=None,
                       open_timeout=20, **extra)
    challenge = first_control(await ws.recv())
    assert challenge["type"] == "challenge"
    return ws, msg.b64decode(str(challenge["nonce"]), "nonce")


def _token_auth(token: str, nonce: bytes, **extra: Any) -> dict[str, Any]:
    client_nonce = new_nonce()
    proof = client_proof(derive_key(Secret(token)), nonce, client_nonce)
    return {"type": "auth", "nonce": msg.b64encode(client_nonce),
            "proof": msg.b64encode(proof), "client_version": "raw-test", **extra}


def _key_auth(private: Secret, claimed_public: str, nonce: bytes) -> dict[str, Any]:
    """Signed with ``private`` but naming the key id of ``claimed_public``."""
    client_nonce = new_nonce()
    signature = sign(private, login_message(nonce, client_nonce))
    return {"type": "auth", "nonce": msg.b64encode(client_nonce),
            "key_id": key_id(claimed_public), "signature": msg.b64encode(signature),
            "client_version": "raw-test"}


async def _outcome(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any] | int:
    """The relay's next control message, or the close code if it closed the link."""
    try:
        async with asyncio.timeout(timeout):
            return first_control(await ws.recv())
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code


async def _token_login(url: str, token: str, source: str | None = None, **extra: Any
                       ) -> tuple[ClientConnection, dict[str, Any] | int]:
    ws, nonce = await _open(url, source)
    await ws.send(control(_token_auth(token, nonce, **extra)))
    return ws, await _outcome(ws)


def _sources(tag: int) -> Iterator[str]:
    """Distinct loopback addresses, one per attempt, so no source reaches the penalty."""
    for i in range(250 * 250):
        yield f"127.{tag}.{i // 250 + 1}.{i % 250 + 1}"
    raise AssertionError("out of loopback sources")


async def _closed_with(ws: ClientConnection, timeout: float = 10.0) -> int:
    try:
        async with asyncio.timeout(timeout):
            for _ in range(1000):  # telemetry or other late messages may come first
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else -1
    raise AssertionError("the link stayed open")


def _relay_log(proc: Proc) -> str:
    return proc.stdout + "\n" + proc.stderr


# ----------------------------------------------------------------------------- S-1

TIMING_MIN_EACH = 200  # the catalogue's medians are over at least this many attempts each
TIMING_MAX_EACH = 2000  # full size; fast stops at a fifth, to keep CI within its budget
TIMING_ROUND = 50  # attempts of each kind added per round
#: Sampling goes on until the standard error of the relative difference of the medians is
#: below this (or the cap), so the 5 % bound is judged on a precise figure.
TIMING_PRECISION = 0.015
TIMING_SECTIONS = 8


def _cpu_ns(pid: int) -> int:
    """Nanoseconds a process has run on a CPU, all threads (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text(encoding="ascii").split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


async def _refusal_time(url: str, source: str, signer: Secret, claimed: str,
                        relay_pid: int) -> tuple[float, float]:
    """(wall seconds, relay CPU seconds) from sending a key login naming ``claimed`` to the
    refusal.

    Both kinds of attempt do exactly the same work in this process (an unknown key is made
    beforehand: making it here once cost the "unknown" side a few percent, in allocations
    that then triggered the garbage collector inside the timed part)."""
    ws, nonce = await _open(url, source)
    try:
        frame = control(_key_auth(signer, claimed, nonce))
        cpu = _cpu_ns(relay_pid)
        started = time.perf_counter()
        await ws.send(frame)
        answer = first_control(await ws.recv())
        elapsed = time.perf_counter() - started
        cpu = _cpu_ns(relay_pid) - cpu
        assert answer == REFUSED
        return elapsed, cpu / 1e9
    finally:
        await ws.close()


def _relative_difference_error(first: list[float], second: list[float]) -> float:
    """Standard error of (median1 - median2) / median2, from consecutive sections in time.

    Sectioning (batch means) keeps what slow drifts of the shared machine's load do to both
    samples inside one section, where they largely cancel, and measures the rest."""
    k = TIMING_SECTIONS
    size = min(len(first), len(second)) // k
    if size < 5:
        return math.inf
    ratios = [statistics.median(first[i * size:(i + 1) * size])
              / statistics.median(second[i * size:(i + 1) * size]) - 1.0 for i in range(k)]
    return statistics.stdev(ratios) / math.sqrt(k)



async def test_S1_bad_credentials_fail_closed_same_answer_same_time(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """Wrong token, unknown token, missing credential, unknown key id and wrong key for a
    known key id all get ``refused: authentication failed`` and close code 1008, before any
    port is bound; the real client exits 3. Token clients send no id at all (the proof is
    matched against every token, in constant time), so "unknown id" and "wrong key" are the
    same message for them; for Ed25519 keys the key id is sent, so the relay verifies an
    unknown id against a decoy key. The median time from sending the auth message to the
    refusal differs by < 5 % between unknown id and wrong key, measured over >= 200
    interleaved (ABBA) attempts each, each from its own loopback address (so the per-source
    penalty of S-5 never kicks in). On a loaded 2-core machine a median of 200 moves by
    several percent on its own, so sampling continues in rounds until the difference is
    known to +-1.5 % (standard error by sectioning), up to 400 each (2000 at full size);
    the stopping rule looks at precision only, never at whether the bound holds. Besides
    the response time, the relay's own CPU time per attempt is measured (schedstat), which
    is what a timing leak in the code would change and which the machine's load does not
    blur: its medians must differ by < 5 % always. The response-time medians must differ
    by < 5 % whenever the sampling resolved them; when six other test runs keep the
    machine so busy that the attempts leave more than +-1.5 %, the bound is
    judged within two standard errors of what was resolved, and the test says so."""
    (port,) = free_ports(1)
    _, public = generate_keypair()
    stranger, _ = generate_keypair()
    clients = {"alpha": {"token": ALPHA_TOKEN}, "gamma": {"public_key": public}}
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port], clients=clients))
    sources = _sources(99)

    # Every kind of bad credential: the same answer and close code.
    for name, token in [("wrong token", ALPHA_TOKEN[:-1] + "X"),
                        ("unknown token", secrets.token_urlsafe(24))]:
        ws, answer = await _token_login(url, token, next(sources))
        assert answer == REFUSED, name
        assert await _closed_with(ws) == CLOSE_AUTH_FAILED, name
    for name, auth in [("missing credential", {"type": "auth", "client_version": "raw-test",
                                               "nonce": msg.b64encode(new_nonce())})]:
        ws, _ = await _open(url, next(sources))
        await ws.send(control(auth))
        assert await _outcome(ws) == REFUSED, name
        assert await _closed_with(ws) == CLOSE_AUTH_FAILED, name
    for name, signer, claimed in [("unknown key id", stranger, generate_keypair()[1]),
                                  ("wrong key", stranger, public)]:
        ws, nonce = await _open(url, next(sources))
        await ws.send(control(_key_auth(signer, claimed, nonce)))
        assert await _outcome(ws) == REFUSED, name
        assert await _closed_with(ws) == CLOSE_AUTH_FAILED, name
    # The real client: refused, exit 3, and the port never bound.
    wrong = await start_client(url, "alpha-secret-token-000X", [f"127.0.0.1:9:fixed-{port}"])
    assert await wrong.wait_exit() == EXIT_REFUSED
    assert "authentication failed" in wrong.stderr
    missing = await start_client(url, None, [f"127.0.0.1:9:fixed-{port}"])
    assert await missing.wait_exit() == EXIT_CONFIG  # no credential: refused before dialing
    assert "token" in missing.stderr
    await assert_closed_quickly(port)

    # Timing: unknown key id vs wrong key for a known id, interleaved.
    wall: dict[str, list[float]] = {"unknown": [], "wrong": []}
    cpu: dict[str, list[float]] = {"unknown": [], "wrong": []}
    cap = size.pick(TIMING_MAX_EACH // 5, TIMING_MAX_EACH)
    unknown_ids = iter([generate_keypair()[1] for _ in range(cap)])
    gc.collect()
    gc.disable()  # collections would land on whichever kind happened to be running
    try:
        for _ in range(cap // TIMING_ROUND):
            for kind in ("unknown", "wrong", "wrong", "unknown") * (TIMING_ROUND // 2):
                claimed = public if kind == "wrong" else next(unknown_ids)
                took, used = await _refusal_time(url, next(sources), stranger, claimed,
                                                 relay.pid)
                wall[kind].append(took)
                cpu[kind].append(used)
            errors = [_relative_difference_error(t["unknown"], t["wrong"]) for t in (wall, cpu)]
            if len(wall["unknown"]) >= TIMING_MIN_EACH and max(errors) < TIMING_PRECISION:
                break
    finally:
        gc.enable()
    n = len(wall["unknown"])
    figures = {}
    for what, samples in (("response time", wall), ("relay CPU time", cpu)):
        unknown = statistics.median(samples["unknown"])
        wrong_key = statistics.median(samples["wrong"])
        figures[what] = abs(unknown - wrong_key) / min(unknown, wrong_key)
        print(f"S-1 {variant.id}: median {what}: unknown id {unknown * 1e3:.3f} ms, wrong key "
              f"{wrong_key * 1e3:.3f} ms, difference {figures[what]:.1%} (n={n} each)")
    wall_error, _ = errors
    assert figures["relay CPU time"] < 0.05
    if wall_error < TIMING_PRECISION:
        assert figures["response time"] < 0.05
    else:  # the shared machine was too busy to resolve 5 %: judge within what it resolved
        print(f"S-1 {variant.id}: response-time medians known only to +-{wall_error:.1%}")
        assert figures["response time"] < 0.05 + 2 * wall_error
    await assert_closed_quickly(port)
    assert relay.returncode is None


@pytest.mark.parametrize("token, why", [
    ("", "empty"),
    ("at-least-16-chars-secret", "published example"),
    ("short-token-1", "too short"),
    ("abcdefghijklmnopq", "under 128 bits"),
    ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "a pattern"),
])
async def test_S1_relay_with_weak_secret_refuses_to_start(tmp_path: Path, token: str,
                                                          why: str) -> None:
    """An empty, default (our README's example) or under-128-bit token stops the relay at
    start-up with exit 2 and one clear line naming the key, never the token itself. No link
    is involved, so no variants."""
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], clients={"alpha": {"token": token}})
    path = write_config(tmp_path, config)
    path.chmod(0o600)
    proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)],
                            cwd=tmp_path)
    assert await proc.wait_exit() == EXIT_CONFIG, (why, proc.describe())
    assert "clients.alpha.token" in proc.stderr, proc.describe()
    assert re.search(r"empty|short|default|example|weak", proc.stderr), proc.describe()
    if token:
        assert token not in proc.stdout + proc.stderr
    assert not [ln for ln in proc.stdout_lines if "listening" in ln]


# ----------------------------------------------------------------------------- S-2


async def test_S2_no_secret_in_debug_logs_from_any_source(tmp_path: Path,
                                                          variant: Variant) -> None:
    """The token given by flag, environment and file each works and a wrong one given the
    same way is refused (client side); on the relay side alpha's token comes from an
    environment variable and beta's from a file, and each is enforced (a wrong one refused,
    the right one accepted). No program output at DEBUG nor any dashboard page or API answer
    contains a token or the dashboard password in raw, hex or base64 form. No credential is
    ever in a URL: the client's link URL has none (the login is a challenge-response inside
    the link), and in plaintext variants the recorded HTTP upgrade request carries no token,
    query string or Authorization header."""
    echo = EchoService()
    await echo.start()
    port, beta_port = free_ports(2)
    password = new_password()
    beta_file = tmp_path / "beta.token"
    beta_file.write_text(BETA_TOKEN + "\n", encoding="utf-8")
    beta_file.chmod(0o600)
    clients = {"alpha": {"token_env": "ALPHA_SECRET"}, "beta": {"token_file": str(beta_file)}}
    config = dashboard_config(tmp_path, [port, beta_port], password, log_level="debug",
                              clients=clients)
    dash = await launch(tmp_path, config, env={"ALPHA_SECRET": ALPHA_TOKEN})
    server, url = dash.proc, dash.url
    if url.startswith("wss://"):
        PINS[url] = (await server.wait_for_line(r"tls fingerprint (?P<fp>sha256:\S+)$"))["fp"]
    spec = [f"{echo.target}:fixed-{port}"]
    pin_args = ["--fingerprint", PINS[url]] if url in PINS else []
    wrong_token = "not-the-alpha-token-0000"

    def runs(token: str) -> list[tuple[list[str], dict[str, str]]]:
        settings = tmp_path / f"client-{token[:3]}.yaml"
        pin = f"fingerprint: {PINS[url]}\n" if url in PINS else ""
        settings.write_text(f"server: {url}\ntoken: {token}\n{pin}", encoding="utf-8")
        settings.chmod(0o600)
        return [(["--server", url, *pin_args, "--token", token], {}),
                (["--server", url, *pin_args], {"TUNNEL_TOKEN": token}),
                (["--config", str(settings)], {})]

    outputs: list[str] = []
    for (args, env), (bad_args, bad_env) in zip(runs(ALPHA_TOKEN), runs(wrong_token),
                                                strict=True):
        client = await start_proc("tunnel-client", CLIENT_MODULE,
                                  [*args, "--log-level", "debug",
                                   *[a for s in spec for a in ("--expose", s)]], env=env)
        assert await wait_tunnel(client, echo.target) == port
        await echo_check(port, 64 * 1024)
        assert await client.terminate() == 0
        wrong = await start_proc("tunnel-client", CLIENT_MODULE,
                                 [*bad_args, "--log-level", "debug", "--expose", spec[0]],
                                 env=bad_env)
        assert await wrong.wait_exit() == EXIT_REFUSED
        assert "authentication failed" in wrong.stderr
        outputs += [client.stdout + client.stderr, wrong.stdout + wrong.stderr]
    beta_spec = f"{echo.target}:fixed-{beta_port}"
    wrong = await start_client(url, BETA_TOKEN[:-1] + "9", [beta_spec], name="beta")
    assert await wrong.wait_exit() == EXIT_REFUSED
    beta = await start_client(url, BETA_TOKEN, [beta_spec], name="beta")
    assert await wait_tunnel(beta, echo.target) == beta_port
    await beta.terminate()
    outputs += [wrong.stdout + wrong.stderr, beta.stdout + beta.stderr]
    if not variant.tls:  # what a proxy or access log would see of the upgrade request
        proxy = RecordingProxy(url_port(url))
        await proxy.start()
        via = url.replace(f":{url_port(url)}/", f":{proxy.port}/")
        client = await start_proc("tunnel-client", CLIENT_MODULE,
                                  ["--server", via, "--expose", spec[0]],
                                  env={"TUNNEL_TOKEN": ALPHA_TOKEN})
        assert await wait_tunnel(client, echo.target) == port
        await client.terminate()
        await proxy.close()
        upgrade = proxy.recordings[0].upstream.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        request_line = upgrade.split("\r\n", 1)[0]
        assert request_line == "GET /tunnel HTTP/1.1", request_line
        assert "authorization:" not in upgrade.lower()
        outputs.append(upgrade)
    for text in [url, *server.stdout_lines]:
        for found in re.findall(r"\b(?:wss?|https?)://\S+", text):
            assert "@" not in found and "?" not in found, f"credentials in a URL: {found}"
    pages = [(await dash.get(path)).text for method, path in ROUTES if method == "GET"]
    pages += [(await dash.get(path)).text for path in ("/static/index.html", "/healthz")]
    outputs += pages
    outputs.append(server.stdout + server.stderr)
    for form in (_secret_forms(ALPHA_TOKEN) + _secret_forms(wrong_token)
                 + _secret_forms(BETA_TOKEN) + _secret_forms(password)):
        for text in outputs:
            assert form not in text, "a secret reached a log or a page"


async def test_S2_warns_when_config_with_secrets_is_readable_by_others(
        tmp_path: Path) -> None:
    """A relay config holding tokens, a token file and a client settings file that group or
    others can read each get a warning naming the file and the fix (chmod 600); at 0600
    there is no warning. No link is involved, so no variants."""
    (port,) = free_ports(1)
    token_file = tmp_path / "beta.token"
    token_file.write_text(BETA_TOKEN + "\n", encoding="utf-8")
    clients = {"alpha": {"token": ALPHA_TOKEN}, "beta": {"token_file": str(token_file)}}
    config = server_config(tmp_path, [port], clients=clients)
    path = write_config(tmp_path, config)
    for mode, warned in ((0o644, True), (0o640, True), (0o600, False)):
        path.chmod(mode)
        token_file.chmod(mode)
        proc = await start_proc("tunnel-server --check", SERVER_MODULE,
                                ["--config", str(path), "--check"], cwd=tmp_path)
        assert await proc.wait_exit() == 0, proc.describe()
        text = proc.stdout + proc.stderr
        for name in (path.name, token_file.name):
            lines = [ln for ln in text.splitlines() if "readable by group or others" in ln
                     and name in ln]
            assert bool(lines) == warned, (oct(mode), name, text)
            assert not lines or "chmod 600" in lines[0]
    settings = tmp_path / "client.yaml"
    settings.write_text(f"server: ws://127.0.0.1:{port}/tunnel\ntoken: {ALPHA_TOKEN}\n",
                        encoding="utf-8")
    settings.chmod(0o644)
    client = await start_proc("tunnel-client", CLIENT_MODULE,
                              ["--config", str(settings), "--expose", "127.0.0.1:9:auto"])
    await client.wait_for_line(r"readable by group or others", stream="stderr")
    await client.terminate()


# ----------------------------------------------------------------------------- S-3


async def test_S3_recorded_login_cannot_be_replayed(tmp_path: Path, variant: Variant) -> None:
    """A captured login is replayed at once and again later: refused both times, and the
    port is never bound for it. Why "later" covers the catalogue's "after 1 h": the proof
    covers the server nonce, a fresh 32-byte random value per link, and the relay keeps no
    time window or nonce cache that could ever accept an old one (nothing in the login
    depends on a clock), so a replay after a second, after another login, or after an hour
    meets the same check; the later replay here comes after the real client logged in and
    out again. In plaintext variants the capture is the real client's raw TCP bytes from a
    recording proxy, replayed byte for byte; with TLS the recorded bytes are ciphertext (a
    TLS replay is refused by TLS itself), so the auth message is captured at the link
    layer, from a peer that logs in by hand."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    ws, nonce = await _open(url)
    recorded = control(_token_auth(ALPHA_TOKEN, nonce))
    await ws.send(recorded)
    assert first_control(await ws.recv())["type"] == "welcome"
    await ws.close()
    raw_capture = b""
    if not variant.tls:
        proxy = RecordingProxy(url_port(url))
        await proxy.start()
        via = url.replace(f":{url_port(url)}/", f":{proxy.port}/")
        client = await start_client(via, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(client, echo.target) == port
        await client.terminate()
        await proxy.close()
        raw_capture = bytes(proxy.recordings[0].upstream)
    for when in ("immediately", "later"):
        since = len(relay.stderr_lines)
        replay, _ = await _open(url)
        await replay.send(recorded)
        assert await _outcome(replay) == REFUSED, when
        assert await _closed_with(replay) == CLOSE_AUTH_FAILED
        await relay.wait_for_line(r"login refused from 127\.0\.0\.1: authentication failed",
                                  since=since, stream="stderr")
        if raw_capture:
            since = len(relay.stderr_lines)
            reader, writer = await asyncio.open_connection("127.0.0.1", url_port(url))
            head, _, frames = raw_capture.partition(b"\r\n\r\n")
            writer.write(head + b"\r\n\r\n")  # the recorded upgrade request, then once
            async with asyncio.timeout(10):  # the relay switched protocols, as the client
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
                writer.write(frames)  # did: auth, expose, goaway, close, all as recorded
                while await reader.read(65536):
                    pass  # until the relay closes the link
            await close_writer(writer)
            await relay.wait_for_line(r"login refused from 127\.0\.0\.1", since=since,
                                      stream="stderr")
        await assert_closed_quickly(port)
        if when == "immediately":  # something happens in between: a real login and logout
            client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
            assert await wait_tunnel(client, echo.target) == port
            await echo_check(port, 64 * 1024)
            await client.terminate()


# ----------------------------------------------------------------------------- S-4


_SECRET_NAME = re.compile(
    r"(?:^|_)(secret|secrets|token|tokens|password|passwd|mac|macs|digest|digests|signature|"
    r"signatures|proof|proofs|hmac|credential|credentials|key|keys|private|psk|expected|"
    r"reveal|reveal_bytes|nonce|nonces)(?:_|$)", re.IGNORECASE)
#: Comparisons the scan flags by name that hold no secret, each with the reason.
_NOT_SECRET = {
    ("server/config.py", "key not in data"): "a config key name",
    ("common/config/yamlsafe.py", "key in out"): "a YAML mapping key",
    ("server/tls.py", "key_exists != cert_exists"): "two booleans: which files exist",
    ("server/dashboard/httpmsg.py", "'close' not in tokens"): "Connection header tokens",
    ("server/dashboard/httpwire.py", "key in headers"): "an HTTP header name",
    ("server/dashboard/httpwire.py", "key in _SINGLETON_HEADERS"): "an HTTP header name",
    ("server/dashboard/httpwire.py", "key in params"): "a query parameter name",
}


def _identifier(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Subscript):
        return _identifier(node.value)
    if isinstance(node, ast.Call):
        return _identifier(node.func)
    return None


def _secret_comparisons() -> list[str]:
    found = []
    for path in sorted(TUNNEL_DIR.rglob("*.py")):
        relative = path.relative_to(TUNNEL_DIR).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare) or not any(
                    isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
                continue
            operands = (node.left, *node.comparators)
            if any(isinstance(o, ast.Call) and isinstance(o.func, ast.Name)
                   and o.func.id == "len" for o in operands):
                continue  # a length check: secrets and MACs have public, fixed sizes
            names = [_identifier(o) for o in operands]
            if any(n is not None and _SECRET_NAME.search(n) for n in names):
                code = ast.unparse(node)
                if (relative, code) not in _NOT_SECRET:
                    found.append(f"tunnel/{relative}:{node.lineno}: {code}")
    return found


def test_S4_no_plain_comparison_of_secrets_static() -> None:
    """No ``==``, ``!=``, ``in`` on anything named like a secret, MAC, digest, signature,
    proof, nonce or token anywhere in tunnel/ (the names that hold public values are listed
    with the reason); the login and dashboard checks use ``hmac.compare_digest``."""
    assert _secret_comparisons() == []
    modules = ("common/proto/auth.py", "common/proto/secret.py", "server/dashboard/security.py")
    for module in modules:
        assert "hmac.compare_digest(" in (TUNNEL_DIR / module).read_text(encoding="utf-8")


def _ks_p_value(first: list[int], second: list[int]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov: (D, asymptotic p-value), ties handled by value."""
    a, b = sorted(first), sorted(second)
    n, m = len(a), len(b)
    i = j = 0
    d = 0.0
    while i < n and j < m:
        value = min(a[i], b[j])
        while i < n and a[i] == value:
            i += 1
        while j < m and b[j] == value:
            j += 1
        d = max(d, abs(i / n - j / m))
    effective = math.sqrt(n * m / (n + m))
    lam = (effective + 0.12 + 0.11 / effective) * d
    if lam < 1e-3:
        return d, 1.0
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def test_S4_ks_statistic_matches_known_values() -> None:
    """The hand-written KS test: identical samples give p = 1, disjoint ones p ~ 0, and a
    textbook case (D = 0.5 at n = m = 20) gives p ~ 0.011."""
    same = list(range(100))
    assert _ks_p_value(same, same) == (0.0, 1.0)
    assert _ks_p_value(list(range(100)), list(range(1000, 1100)))[1] < 1e-10
    d, p = _ks_p_value(list(range(20)), list(range(10, 30)))
    assert d == 0.5 and 0.005 < p < 0.02


def test_S4_mac_check_time_does_not_depend_on_where_it_is_wrong(size: Size) -> None:
    """The relay's real proof check (:func:`identify`, against two token clients as the
    relay does) timed in-process with the proof wrong at byte 0 versus byte 31: the two
    time distributions are indistinguishable, KS p > 0.01, over 20k attempts each at full
    size. How it is measured, and why: each sample is the time of 8 consecutive checks of
    the same kind (the timer ticks in ~10 ns steps, and single ~4 us checks collapse onto a
    handful of values whose ties make even an A/A comparison "significant" in a third of
    runs); every check gets a freshly allocated proof (where an object lands in memory
    shifts a check by a few ns, whatever it holds); and the two kinds alternate in random
    order, so load from the shared machine falls on both alike."""
    batch = 8
    samples_each = size.pick(500, 2500)  # x 8 = 4k (fast) or 20k (full) attempts each
    keys = {"alpha": derive_key(Secret(ALPHA_TOKEN)), "beta": derive_key(Secret(BETA_TOKEN))}
    nonce, client_nonce = new_nonce(), new_nonce()
    good = client_proof(keys["alpha"], nonce, client_nonce)
    wrong = {0: bytes([good[0] ^ 1]) + good[1:], 31: good[:31] + bytes([good[31] ^ 1])}
    assert identify(good, nonce, client_nonce, keys) == "alpha"
    assert identify(wrong[0], nonce, client_nonce, keys) is None
    assert identify(wrong[31], nonce, client_nonce, keys) is None
    samples: dict[int, list[int]] = {0: [], 31: []}
    clock = time.perf_counter_ns
    order = secrets.SystemRandom()
    for _ in range(100):  # warm up caches and the allocator
        identify(bytes(bytearray(wrong[0])), nonce, client_nonce, keys)
    gc.disable()
    try:
        for _ in range(samples_each):
            pair = [0, 31]
            order.shuffle(pair)
            for where in pair:
                proofs = [bytes(bytearray(wrong[where])) for _ in range(batch)]
                started = clock()
                for proof in proofs:
                    identify(proof, nonce, client_nonce, keys)
                samples[where].append(clock() - started)
    finally:
        gc.enable()
    d, p = _ks_p_value(samples[0], samples[31])
    print(f"S-4: {samples_each * batch} attempts each, median of {batch} checks: byte 0 "
          f"{statistics.median(samples[0]):.0f} ns, byte 31 "
          f"{statistics.median(samples[31]):.0f} ns, KS D={d:.4f} p={p:.3f}")
    assert p > 0.01


# ----------------------------------------------------------------------------- S-5


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_S5_penalty_schedule_with_injected_clock(size: Size) -> None:
    """1000 bad logins from one address, one attempt every 0.1 s of fake time (attempts
    during a penalty are refused unverified, as the relay does): 5 free failures, then
    penalties of 1 s doubling to the 10 min cap, never more than one verified guess per
    second after the free ones; another address is unaffected; the table keeps at most 10k
    entries, dropping the least recently failed."""
    assert (FAILURES_BEFORE_PENALTY, PENALTY_BASE, PENALTY_CAP, MAX_PENALTY_ENTRIES) == (
        5, 1.0, 600.0, 10_000)
    clock = _Clock()
    table = Penalties(clock)
    verified: list[float] = []
    penalties: list[float] = []
    for _ in range(size.pick(1000, 1000)):
        if table.retry_after("10.0.0.1") == 0:
            verified.append(clock.now)
            table.failed("10.0.0.1")
            penalties.append(table.retry_after("10.0.0.1"))
        clock.now += 0.1
    assert penalties[:4] == [0.0] * 4  # four free failures; the fifth costs 1 s
    expected = [min(600.0, 2.0 ** k) for k in range(len(penalties) - 4)]
    assert penalties[4:] == pytest.approx(expected)
    assert 600.0 in penalties or clock.now - 1000.0 < 1023  # reaches the cap given time
    gaps = [b - a for a, b in itertools.pairwise(verified[4:])]
    assert all(gap >= 1.0 - 1e-9 for gap in gaps)
    assert len(verified) <= 5 + math.ceil(math.log2(clock.now - verified[4] + 1))
    assert table.retry_after("10.0.0.2") == 0.0
    # Long enough: the cap holds.
    for _ in range(20):
        clock.now += 601
        table.failed("10.0.0.1")
    assert table.retry_after("10.0.0.1") == pytest.approx(600.0)
    # Bounded: 10k entries, LRU.
    for i in range(MAX_PENALTY_ENTRIES + 500):
        table.failed(f"10.1.{i // 256}.{i % 256}")
    assert len(table) == MAX_PENALTY_ENTRIES
    assert table.retry_after("10.0.0.1") == 0.0  # the oldest entry was dropped


async def test_S5_abandoned_logins_are_not_penalised(tmp_path: Path) -> None:
    """Logins that drop before answering the challenge (a slow or overloaded moment, many
    boxes behind one NAT address) guessed nothing: twice the free failures of them from one
    address, and a real client from that address still logs in at once, unthrottled."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    for _ in range(2 * FAILURES_BEFORE_PENALTY):
        ws, _nonce = await _open(url, "127.0.0.1")
        await ws.close()
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target, mode="fixed", timeout=5.0) == port
    await echo_check(port, 64 * 1024)
    await relay.wait_for_line(r"login from \S+ abandoned", stream="stderr")
    assert "penalised" not in relay.stderr


async def test_S5_relay_throttles_bad_logins_per_source(tmp_path: Path, variant: Variant,
                                                        size: Size) -> None:
    """The real relay: bad logins from one address, 400 over 4.6 s (fast) or the
    catalogue's 1000 over 30 s (full). Only the first 5 and then one per penalty period
    (1 s, 2 s, 4 s, ...) are verified and answered ``authentication failed``; the rest
    are refused unheard (HTTP 429 with Retry-After, or close 1013 when the penalty began
    after the upgrade). Verified
    guesses after the free five are >= 1 s apart. Ten links that all passed the upgrade
    before the penalty started get only one guess verified among them. Another address
    logs in and tunnels at once."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    attacker = "127.0.5.5"
    attempts, pace = size.pick((400, 0.0115), (1000, 0.03))  # over >= 4.6 s / >= 30 s
    verified: list[float] = []
    refused_unheard = 0
    retry_after: list[int] = []
    started = time.monotonic()
    for made in range(attempts):
        # Pacing, not waiting for an event: the attempts must span several penalty periods.
        await asyncio.sleep(max(0.0, started + made * pace - time.monotonic()))
        try:
            ws, answer = await _token_login(url, secrets.token_urlsafe(24), attacker)
        except InvalidStatus as exc:  # the 429
            assert exc.response.status_code == 429, repr(exc)
            retry_after.append(int(exc.response.headers["Retry-After"]))
            refused_unheard += 1
            continue
        if answer == REFUSED:
            verified.append(time.monotonic())
        else:
            assert answer == CLOSE_TRY_LATER, answer
            refused_unheard += 1
        await ws.close()
    span = verified[-1] - verified[5] if len(verified) > 5 else 0.0
    print(f"S-5 {variant.id}: {attempts} bad logins, {len(verified)} verified, "
          f"{refused_unheard} refused unheard over {span:.1f} s")
    # After the 5th: 1 s, then 2 s later (3 s), 4 s (7 s), 8 s (15 s) ...
    assert len(verified) >= FAILURES_BEFORE_PENALTY + size.pick(2, 4)
    gaps = [b - a for a, b in itertools.pairwise(verified[4:])]
    assert all(gap >= 0.9 for gap in gaps), gaps  # 1 s, minus the client's timer slack
    assert len(verified) <= FAILURES_BEFORE_PENALTY + 1 + math.log2(max(2.0, span + 1)) + 1
    assert retry_after and all(1 <= r <= 601 for r in retry_after)

    # Ten links opened together by a fresh attacker, all past the upgrade: one guess heard.
    burst_source = "127.0.5.6"
    for _ in range(FAILURES_BEFORE_PENALTY):
        ws, answer = await _token_login(url, secrets.token_urlsafe(24), burst_source)
        assert answer == REFUSED
        await ws.close()
    await asyncio.sleep(PENALTY_BASE + 0.2)  # the 1 s penalty runs out (a timer, no event)
    opened = await asyncio.gather(*[_open(url, burst_source) for _ in range(10)])
    for ws, nonce in opened:
        await ws.send(control(_token_auth(secrets.token_urlsafe(24), nonce)))
    answers = [await _outcome(ws) for ws, _ in opened]
    assert answers.count(REFUSED) == 1, answers
    assert answers.count(CLOSE_TRY_LATER) == 9, answers

    # Another address is unaffected.
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    await echo_check(port, 256 * 1024)
    assert relay.returncode is None


# ----------------------------------------------------------------------------- S-6


async def test_S6_client_cannot_act_as_another(tmp_path: Path, variant: Variant) -> None:
    """Beta, logged in, (a) asks for alpha's fixed port, (b) names alpha in a field of its
    auth, expose and telemetry messages, (c) sends a replace-session request for alpha.
    Each is refused and logged: (a) ``expose_refused`` (the port is leased to another
    client); (b) and (c) close beta's link with a logged protocol error (identity is fixed
    at login; a message claiming another is an attack), or for auth ``refused``. Alpha's
    link is never replaced and a transfer of alpha's, running all along, ends with the
    right digest."""
    echo = EchoService()
    await echo.start()
    alpha_port, beta_port = free_ports(2)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [alpha_port, beta_port]))
    alpha = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{alpha_port}"])
    assert await wait_tunnel(alpha, echo.target) == alpha_port
    reader, writer = await open_visitor(alpha_port)
    size, seed = 4 * MIB, 66
    chunks = list(pattern_chunks(seed, size))
    reading = asyncio.create_task(read_exactly_digest(reader, size))
    half = len(chunks) // 2
    for chunk in chunks[:half]:
        writer.write(chunk)
    await writer.drain()

    async def beta() -> ClientConnection:
        ws, answer = await _token_login(url, BETA_TOKEN)
        assert isinstance(answer, dict) and answer["type"] == "welcome", answer
        return ws

    # (a) alpha's port
    ws = await beta()
    since = len(relay.stderr_lines)
    await ws.send(control({"type": "expose", "id": 1, "target": "127.0.0.1:9", "mode": "fixed",
                          "port": alpha_port}))
    answer = await _outcome(ws)
    assert isinstance(answer, dict) and answer["type"] == "expose_refused", answer
    assert "another client" in answer["reason"]
    await relay.wait_for_line(rf"client beta: .*port {alpha_port}", since=since,
                              stream="stderr")
    await ws.close()
    # (b) alpha's name in any field
    for message in (
        {"type": "expose", "id": 1, "target": "127.0.0.1:9", "mode": "fixed",
         "port": beta_port, "client": "alpha"},
        {"type": "expose", "id": 2, "target": "127.0.0.1:9", "mode": "auto", "port": None,
         "owner": "alpha"},
        {"type": "telemetry", "hostname": "box", "client_id": "alpha"},
    ):
        ws = await beta()
        since = len(relay.stderr_lines)
        await ws.send(control(message))
        assert await _closed_with(ws) != 1000
        await relay.wait_for_line(r"closing link of beta: protocol error: .*claiming to be "
                                  r"client 'alpha'", since=since, stream="stderr")
    since = len(relay.stderr_lines)
    ws, answer = await _token_login(url, BETA_TOKEN, client="alpha")
    assert answer == REFUSED
    await relay.wait_for_line(r"login of client beta .* refused: it claims to be 'alpha'",
                              since=since, stream="stderr")
    # (c) replace alpha's session
    for message in ({"type": "replace_session", "client": "alpha"},
                    {"type": "replace", "session": "alpha"}):
        ws = await beta()
        since = len(relay.stderr_lines)
        await ws.send(control(message))
        assert await _closed_with(ws) != 1000
        await relay.wait_for_line(r"closing link of beta: protocol error", since=since,
                                  stream="stderr")

    for chunk in chunks[half:]:
        writer.write(chunk)
    await writer.drain()
    received, digest = await asyncio.wait_for(reading, 60)
    assert (received, digest) == (size, pattern_digest(seed, size))
    await close_writer(writer)
    assert len([ln for ln in alpha.stdout_lines if echo.target in ln]) == 1  # never relinked
    assert "client alpha offline" not in _relay_log(relay)
    assert "replaces its previous link" not in _relay_log(relay)
    await echo_check(alpha_port, 64 * 1024)
    assert alpha.returncode is None and relay.returncode is None


# ----------------------------------------------------------------------------- S-7


def test_S7_replacement_rate_with_injected_clock() -> None:
    """Replacements are counted over a sliding minute: the 5th within 60 s flags the
    identity, and the flag clears as they age out; the kept history is bounded."""
    record = ClientRecord("alpha")
    assert REPLACEMENT_FLAG == 5 and REPLACEMENT_WINDOW == 60.0
    for t in range(4):
        record.replacements.append(100.0 + t * 10)
    assert not record.flapping(140.0)
    record.replacements.append(145.0)
    assert record.flapping(145.0) and record.replacement_rate(145.0) == 5
    assert not record.flapping(160.0)  # the one at 100 s aged out
    for t in range(1000):
        record.replacements.append(200.0 + t * 0.01)
    assert len(record.replacements) <= 64


async def test_S7_same_identity_on_two_machines(tmp_path: Path, variant: Variant) -> None:
    """Machine 1 (a real client) serves alpha; machine 2 logs in with alpha's token, again
    and again. Newest wins each time (machine 1 is told it was replaced and backs off); at
    the 5th replacement within a minute the identity is flagged on the dashboard (JSON API
    ``flapping``/``replacements_last_minute``; the page's "shared identity" badge, drawn
    from that field, is checked in Chromium by tests/dashboard/test_browser.py) and
    further replacing logins from either machine are refused with close 1013 "try again
    later": machine 3 (another real client with the token) is
    throttled too. How the legitimate newest still gets in: a login while no link of the
    identity is live is never refused, and the flag clears once the minute holds fewer than
    5 replacements; here machine 2 goes away and machine 3, retrying with backoff, gets in
    without waiting for the minute. Alpha's port is never given to another identity: beta
    asking for it is refused throughout, and the lease stays alpha's."""
    echo = EchoService()
    await echo.start()
    port, beta_port = free_ports(2)
    dash = await launch(tmp_path, dashboard_config(tmp_path, [port, beta_port],
                                                   new_password()))
    url = dash.url
    if url.startswith("wss://"):
        PINS[url] = (await dash.proc.wait_for_line(r"tls fingerprint (?P<fp>sha256:\S+)$"))[
            "fp"]
    machine1 = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(machine1, echo.target) == port
    links: list[ClientConnection] = []
    for i in range(REPLACEMENT_FLAG):
        ws, answer = await _token_login(url, ALPHA_TOKEN)
        assert isinstance(answer, dict) and answer["type"] == "welcome", (i, answer)
        await ws.send(control({"type": "expose", "id": 0, "target": echo.target,
                              "mode": "fixed", "port": port}))
        links.append(ws)
    await machine1.wait_for_line(r"replaced this one", stream="stderr")
    for old in links[:-1]:
        assert await _closed_with(old) != CLOSE_AUTH_FAILED  # replaced, newest won
    alpha = await poll(lambda: dash.client("alpha"), lambda c: c["flapping"], "alpha flagged")
    assert alpha["replacements_last_minute"] >= REPLACEMENT_FLAG and alpha["online"]
    js = _page_js()
    assert "client-flapping" in js and "c.flapping" in js

    since = len(dash.proc.stderr_lines)
    ws, answer = await _token_login(url, ALPHA_TOKEN)
    assert answer == CLOSE_TRY_LATER
    await dash.proc.wait_for_line(r"refused for now: client alpha replaced", since=since,
                                  stream="stderr")
    machine3 = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    await machine3.wait_for_line(r"link to .* lost or not established", stream="stderr")
    beta = await start_client(url, BETA_TOKEN, [f"{echo.target}:fixed-{port}"], name="beta")
    assert await beta.wait_exit() == EXIT_REFUSED
    leases = (await dash.get("/api/leases")).json()
    assert [lease["client"] for lease in leases if lease["port"] == port] == ["alpha"]

    await links[-1].close()  # machine 2 goes away: machine 3 is the newest, and gets in
    assert await wait_tunnel(machine3, echo.target, timeout=40) == port
    await echo_check(port, 256 * 1024)
    leases = (await dash.get("/api/leases")).json()
    assert [lease["client"] for lease in leases if lease["port"] == port] == ["alpha"]


# ----------------------------------------------------------------------------- S-8


@pytest.mark.tls_only
async def test_S8_pinned_tls_and_mitm(tmp_path: Path, variant: Variant) -> None:
    """TLS only: the test is about the TLS layer. The client pinned to the relay's SPKI
    SHA-256 connects and tunnels; through a MITM presenting another self-signed certificate
    it aborts after the handshake with exit 3 (naming both fingerprints) and the MITM
    decrypts 0 application bytes (no auth byte, not even the HTTP upgrade); a malformed pin
    stops the client at start-up (exit 2) without a connection; ``ws://`` to a non-loopback
    address is refused unless ``--insecure``; the relay negotiates TLS 1.2 or newer and
    refuses a client limited to TLS 1.1."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    assert url.startswith("wss://") and url in PINS
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    await echo_check(port, 256 * 1024)
    await client.terminate()

    mitm = TlsMitm(url_port(url), tmp_path / "mitm")
    await mitm.start()
    try:
        via = url.replace(f":{url_port(url)}/", f":{mitm.port}/")
        proc = await start_proc("tunnel-client", CLIENT_MODULE,
                                ["--server", via, "--fingerprint", PINS[url], "--token",
                                 ALPHA_TOKEN, "--expose", f"{echo.target}:fixed-{port}"])
        assert await proc.wait_exit() == EXIT_REFUSED, proc.describe()
        assert PINS[url] in proc.stderr and mitm.fingerprint in proc.stderr
        assert mitm.connections >= 1, "the client never reached the MITM"
        assert mitm.decrypted_from_client == 0 and mitm.upstream_connections == 0
    finally:
        await mitm.close()

    silent = EchoService()  # stands in for a relay: must get no connection at all
    await silent.start()
    for pin in ("sha256:xyz", "sha256:" + "0" * 63, "md5:" + "0" * 32, "not-a-pin"):
        proc = await start_proc("tunnel-client", CLIENT_MODULE,
                                ["--server", f"wss://127.0.0.1:{silent.port}/tunnel",
                                 "--fingerprint", pin, "--token", ALPHA_TOKEN,
                                 "--expose", "127.0.0.1:9:auto"])
        assert await proc.wait_exit() == EXIT_CONFIG, proc.describe()
        assert "fingerprint" in proc.stderr
    assert silent.connections == 0

    for insecure in ([], ["--insecure"]):
        started = time.monotonic()
        proc = await start_proc("tunnel-client", CLIENT_MODULE,
                                ["--server", "ws://192.0.2.1:7000/tunnel", *insecure,
                                 "--token", ALPHA_TOKEN, "--expose", "127.0.0.1:9:auto"])
        if not insecure:
            assert await proc.wait_exit() == EXIT_CONFIG, proc.describe()
            assert "--insecure" in proc.stderr
            assert time.monotonic() - started < EXIT_TIMEOUT
        else:  # accepted: it tries to connect (TEST-NET-1 never answers) and keeps trying
            await proc.wait_for_line(r"192\.0\.2\.1", stream="stderr", timeout=30)
            assert proc.returncode is None
            await proc.terminate()

    modern = _unverified_tls()
    with socket.create_connection(("127.0.0.1", url_port(url)), timeout=10) as raw, \
            modern.wrap_socket(raw) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    old = _unverified_tls()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with warnings.catch_warnings():  # deprecated: which is the point of offering it
        warnings.simplefilter("ignore", DeprecationWarning)
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", url_port(url)), timeout=10) as raw, \
            pytest.raises((ssl.SSLError, ConnectionResetError)):
        old.wrap_socket(raw)
    assert relay.returncode is None
    # Control: that client does speak TLS 1.1 to a server that allows it, so the refusal
    # above is the relay's, not this machine's OpenSSL declining to offer TLS 1.1.
    key, cert = make_self_signed(tmp_path / "legacy")
    legacy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    legacy.load_cert_chain(cert, key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        legacy.set_ciphers("DEFAULT:@SECLEVEL=0")
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=legacy)
    try:
        legacy_port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", legacy_port, ssl=old)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.1"
        writer.close()
    finally:
        server.close()


# ----------------------------------------------------------------------------- S-9


async def test_S9_dashboard_requires_credentials(tmp_path: Path) -> None:
    """The dashboard is HTTP beside the link, so no link variants. Every HTML, JSON and
    static route (and unknown paths) answers 401 with a Basic challenge without or with
    wrong credentials; ``/healthz`` alone answers, with ``ok`` and nothing else; it binds
    127.0.0.1 by default and will not start without a password, on loopback or any other
    address (exit 2); ``Host: evil.example`` gets 421 before authentication; failed logins
    are throttled like the link's (5 free, then 429 with Retry-After, other sources fine).
    CSRF: changes of state are POST only, with the ``X-Tunnel-Request`` header and, when
    the browser sends one, a matching ``Origin``; a cross-origin form POST (no custom
    header, foreign Origin) gets 403 and changes nothing, a GET of an action gets 405. The
    catalogue asks for a SameSite=Strict cookie: we use no cookie at all. Basic credentials
    are attached by the browser to cross-site requests too, which is exactly what SameSite
    guards against for cookies; here the guard is the custom header, which a cross-site
    form cannot send and a cross-site fetch cannot send without a CORS preflight that the
    dashboard never grants, plus the Origin check: the same intent (no state change from
    another site), met without a cookie."""
    port, other = free_ports(2)
    password = new_password()
    dash = await launch(tmp_path, dashboard_config(tmp_path, [port, other], password))
    health = await request(dash.port, "GET", "/healthz")
    assert (health.status, health.body) == (200, b"ok\n")
    assert not {"server", "x-powered-by"} & set(health.headers)
    static = ["/static/js/main.js", "/static/js/panels/clients.js", "/static/style.css",
              "/static/index.html", "/static/favicon.svg", "/favicon.ico", "/index.html"]
    wrong = basic("admin", new_password())
    for i, (method, route) in enumerate([*ROUTES, *[("GET", p) for p in static]]):
        for auth, source in ((None, None), (wrong, f"127.0.9.{i + 1}")):
            reply = await request(dash.port, method, route, auth=auth, headers=CSRF,
                                  source=source)
            assert reply.status == 401, (method, route, reply)
            assert reply.headers["www-authenticate"].startswith('Basic realm="tunnel"')
            assert password.encode() not in reply.body
    for host in ("evil.example", f"evil.example:{dash.port}"):
        assert (await dash.get("/api/status", host=host)).status in (421, 403)
        assert (await request(dash.port, "GET", "/api/status", host=host)).status in (421,
                                                                                      403)
    statuses = [(await request(dash.port, "GET", "/api/status", auth=wrong,
                               source="127.0.9.250")).status for _ in range(7)]
    assert statuses[:5] == [401] * 5 and statuses[-1] == 429
    locked = await dash.get("/api/status", source="127.0.9.250")
    assert locked.status == 429 and int(locked.headers["retry-after"]) >= 1
    assert (await dash.get("/api/status")).status == 200

    echo = EchoService()
    await echo.start()
    client = await start_client(dash.url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    before = await poll(lambda: dash.client("alpha"), lambda c: c["online"], "alpha online")
    action = "/api/clients/alpha/disconnect"
    form = {"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    assert (await dash.post(action, headers=form)).status == 403
    assert (await dash.post(action, headers={**CSRF, "Origin": "http://evil.example"})
            ).status == 403
    assert (await dash.post(action, headers={})).status == 403
    assert (await dash.get(action)).status == 405
    for _method, route in ROUTES:  # every GET, with credentials: nothing changes
        await dash.get(route)
    still = await dash.client("alpha")
    assert still["online"] and still["logins"] == before["logins"]
    assert (await dash.post(action, headers={**CSRF, "Origin": f"http://127.0.0.1:{dash.port}"}
                            )).status == 200

    for listen in ("0.0.0.0:0", "127.0.0.1:0"):
        config = server_config(tmp_path, [other], dashboard={"listen": listen})
        path = write_config(tmp_path, config, f"nopass-{listen[0]}.yaml")
        path.chmod(0o600)
        proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)],
                                cwd=tmp_path)
        assert await proc.wait_exit() == EXIT_CONFIG, proc.describe()
        assert "password" in proc.stderr
    config = server_config(tmp_path, [other], dashboard={"password": new_password()})
    path = write_config(tmp_path, config, "default-listen.yaml")
    proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)],
                            cwd=tmp_path)
    line = await proc.wait_for_line(DASHBOARD_RE)
    assert line["url"].startswith("http://127.0.0.1:")
    await proc.terminate()


# ----------------------------------------------------------------------------- S-10


HOSTILE_NAMES = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>',
                 "javascript:alert(1)", "evil\u202etxt.exe", "a" * 10 * 1024, "nul\x00name"]


async def test_S10_hostile_client_names_rejected(tmp_path: Path) -> None:
    """Each hostile name is rejected by the pattern ``^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$``
    in server.yaml, in clients.yaml and by ``tunnel-server add-client`` (exit 2, nothing
    written); the error line neither echoes the raw name back unescaped nor grows with
    it. (NUL cannot be passed in argv at all, so add-client gets the other five.) No link
    is involved, so no variants."""
    (port,) = free_ports(1)
    init_dir = tmp_path / "relay"
    init = await start_proc("init", SERVER_MODULE,
                            ["init", "--public-host", "127.0.0.1", "--dir", str(init_dir),
                             "--listen", f"127.0.0.1:{free_ports(1)[0]}",
                             "--ports", str(port), "--public-bind", "127.0.0.1",
                             "--dashboard-listen", "127.0.0.1:0"], cwd=tmp_path)
    assert await init.wait_exit(30) == 0, init.describe()
    config_path = next(init_dir.glob("*.yaml"))
    for candidate in init_dir.glob("*.yaml"):
        if "clients" not in candidate.name:
            config_path = candidate
    clients_file = init_dir / "clients.yaml"
    before = clients_file.read_bytes() if clients_file.exists() else b""
    for i, name in enumerate(HOSTILE_NAMES):
        # server.yaml
        config = server_config(tmp_path, [port],
                               clients={name: {"token": f"hostile-name-token-{i:06d}"}})
        path = write_config(tmp_path, config, f"hostile-{i}.yaml")  # NUL written escaped
        path.chmod(0o600)
        proc = await start_proc("tunnel-server --check", SERVER_MODULE,
                                ["--config", str(path), "--check"], cwd=tmp_path)
        assert await proc.wait_exit() == EXIT_CONFIG, (name[:40], proc.describe())
        assert "invalid client name" in proc.stderr, proc.describe()
        _assert_not_echoed(name, proc)
        # clients.yaml
        listed = tmp_path / f"clients-{i}.yaml"
        listed.write_text(yaml.safe_dump({name: {"token": f"hostile-name-token-{i:06d}"}}),
                          encoding="utf-8")
        listed.chmod(0o600)
        config = server_config(tmp_path, [port], clients={}, clients_file=str(listed))
        path = write_config(tmp_path, config, f"with-clients-{i}.yaml")
        path.chmod(0o600)
        proc = await start_proc("tunnel-server --check", SERVER_MODULE,
                                ["--config", str(path), "--check"], cwd=tmp_path)
        assert await proc.wait_exit() == EXIT_CONFIG, (name[:40], proc.describe())
        assert "invalid client name" in proc.stderr, proc.describe()
        _assert_not_echoed(name, proc)
        # add-client
        if "\x00" in name:
            continue
        proc = await start_proc("add-client", SERVER_MODULE,
                                ["add-client", name, "--config", str(config_path)],
                                cwd=tmp_path)
        assert await proc.wait_exit(30) == EXIT_CONFIG, (name[:40], proc.describe())
        assert "tunnel1_" not in proc.stdout
        _assert_not_echoed(name, proc)
    after = clients_file.read_bytes() if clients_file.exists() else b""
    assert after == before


def _assert_not_echoed(name: str, proc: Proc) -> None:
    text = proc.stdout + proc.stderr
    assert len(text) < 2048, "an error line grew with the name"
    for bad in ("\u202e", "\x00"):  # markup is harmless on a terminal; these are not
        if bad in name:
            assert bad not in text, (bad, text)


async def test_S10_client_supplied_strings_render_escaped(tmp_path: Path,
                                                          variant: Variant) -> None:
    """Names cannot carry markup, but what a client reports about itself (host name, OS,
    GPU names) and its version string can: those reach the dashboard as JSON text
    (``application/json`` with ``nosniff``, no raw ``<`` or ``>`` in the body), every
    response carries a CSP with ``default-src 'self'`` and ``frame-ancestors 'none'``, no
    HTML page holds ``<script`` with inline code or an ``on*=`` attribute, and the page's
    JavaScript never assigns ``innerHTML``/``outerHTML``, never calls
    ``insertAdjacentHTML``/``document.write``/``eval``; it writes data with ``textContent``.
    (The browser test tests/dashboard/test_browser.py shows the hostile host name as
    text in a real Chromium.)"""
    (port,) = free_ports(1)
    dash = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    url = dash.url
    if url.startswith("wss://"):
        PINS[url] = (await dash.proc.wait_for_line(r"tls fingerprint (?P<fp>sha256:\S+)$"))[
            "fp"]
    telemetry = {"hostname": HOSTILE_NAMES[1], "os": HOSTILE_NAMES[0], "gpu_status": "ok",
                 "gpus": [{"index": 0, "name": "<svg onload=alert(1)>", "utilization": 1,
                           "memory_used": 1, "memory_total": 2}]}
    path = tmp_path / "telemetry.json"
    path.write_text(json.dumps(telemetry), encoding="utf-8")
    env = {"TUNNEL_TELEMETRY_FILE": str(path), "TUNNEL_TELEMETRY_INTERVAL": "0.5"}
    await start_client(url, ALPHA_TOKEN, [f"127.0.0.1:9:fixed-{port}"], env=env)
    alpha = await poll(lambda: dash.client("alpha"),
                       lambda c: c["telemetry"] is not None and bool(c["telemetry"]["gpus"]),
                       "alpha's telemetry")
    assert alpha["hostname"] == HOSTILE_NAMES[1]  # kept as data...
    replies: list[Reply] = []
    for path_ in ("/api/clients", "/api/clients/alpha", "/api/status", "/api/connections"):
        reply = await dash.get(path_)
        assert reply.headers["content-type"] == "application/json; charset=utf-8"
        assert b"<" not in reply.body and b">" not in reply.body  # ...escaped on the wire
        replies.append(reply)
    metrics = await dash.get("/metrics")
    assert not re.search(r"<script|<img|<svg", metrics.text, re.IGNORECASE)
    page = await dash.get("/")
    assert page.headers["content-type"].startswith("text/html")
    replies += [metrics, page]
    for reply in replies:
        assert reply.headers["x-content-type-options"] == "nosniff"
        directives = [d.strip() for d in reply.headers["content-security-policy"].split(";")]
        assert "default-src 'self'" in directives and "frame-ancestors 'none'" in directives
    html = page.text
    assert not re.search(r"\son[a-z]+\s*=", html, re.IGNORECASE)
    for script in re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S | re.IGNORECASE):
        assert script.strip() == "", "inline script in the page"
    js = _page_js()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function"):
        assert sink not in js, sink
    assert "textContent" in js
