"""The status page in a real browser, against a real relay and real clients.

Headless Chromium (Debian's, at /usr/bin/chromium) opens the dashboard with HTTP Basic
credentials and the page is checked the way a person would use it: the client shows up
online, its traffic number moves while bytes flow (no reload), its card turns offline when
the client dies, the admin buttons work after a confirm(), and whatever a client reports
about itself (host name, GPU name) is shown as text, never run as HTML. Every test also
fails on a console error (a CSP violation, a script error) or an unexpected dialog.

A full-page screenshot is left in ``tests/dashboard/artifacts/`` for a human to look at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect

from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    Proc,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.services import CHUNK, EchoService, close_writer, open_visitor
from tunnel import __version__
from tunnel.common.proto import messages as msg
from tunnel.common.proto.auth import client_proof, derive_key, new_nonce
from tunnel.common.proto.frames import Frame, FrameType, decode_frames, encode_frame
from tunnel.common.proto.secret import Secret
from tunnel.server.registry import REPLACEMENT_FLAG

try:
    from playwright.async_api import (
        Browser,
        ConsoleMessage,
        Dialog,
        Locator,
        Page,
        Response,
        async_playwright,
        expect,
    )
except ImportError:  # pragma: no cover - depends on the machine
    HAVE_PLAYWRIGHT = False
else:
    HAVE_PLAYWRIGHT = True

CHROMIUM = Path("/usr/bin/chromium")
if not HAVE_PLAYWRIGHT:
    pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
STATIC = Path(__file__).resolve().parents[2] / "tunnel" / "server" / "dashboard" / "static"
USER = "admin"
PASSWORD = "dashboard-test-password-1"
MIB = 1024 * 1024

POLL = 2.0  # the page's poll interval (static/js/poll.js POLL_MS)
HEARTBEAT_TIMEOUT = 3.0  # harness.server_config
MARGIN = 4.0
UI_TIMEOUT_MS = 10_000  # for things the next poll or two must show

HOSTILE_HOSTNAME = "<img src=x onerror=alert(1)>"
HOSTILE_GPU = "<b>GPU</b>"
HOSTILE_TELEMETRY: dict[str, Any] = {
    "hostname": HOSTILE_HOSTNAME,
    "os": "Linux",
    "cpu_percent": 12.5,
    "memory_used": 1073741824,
    "memory_total": 4294967296,
    "gpus": [{"index": 0, "name": HOSTILE_GPU, "utilization": 77, "memory_used": 1,
              "memory_total": 2, "temperature": 60, "power_watts": 250}],
    "gpu_status": "ok",
}
GIB = 1024 * MIB
BOX_TELEMETRY: dict[str, Any] = {
    "hostname": "gpu-box-1",
    "os": "Linux 6.8 (Ubuntu 24.04)",
    "cpu_percent": 37.5,
    "memory_used": 52 * GIB,
    "memory_total": 64 * GIB,
    "gpus": [
        {"index": 0, "name": "NVIDIA RTX A6000", "utilization": 97, "memory_used": 41 * GIB,
         "memory_total": 48 * GIB, "temperature": 78, "power_watts": 287.5},
        {"index": 1, "name": "NVIDIA RTX A6000", "utilization": 0, "memory_used": 512 * MIB,
         "memory_total": 48 * GIB, "temperature": 34, "power_watts": 21},
    ],
    "gpu_status": "ok",
}


# ------------------------------------------------------------------------------ fixtures


@dataclass
class Relay:
    proc: Proc
    link_url: str
    dashboard_url: str
    tmp_path: Path

    async def client(self, token: str, exposes: list[str],
                     telemetry: dict[str, Any] | None = None, name: str = "client") -> Proc:
        env = {"TUNNEL_TELEMETRY_INTERVAL": "0.5"}
        if telemetry is not None:
            path = self.tmp_path / f"telemetry-{name}.json"
            path.write_text(json.dumps(telemetry), encoding="utf-8")
            env["TUNNEL_TELEMETRY_FILE"] = str(path)
        return await start_client(self.link_url, token, exposes, env=env, name=name)


@dataclass
class Watch:
    """What the page did that a test did not ask for: console errors, dialogs, crashes."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    scripts: dict[str, tuple[int, str]] = field(default_factory=dict)  # path: status, type
    answer_dialogs: bool | None = None  # None: dismiss and record as unexpected

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def on_response(self, response: Response) -> None:
        if response.request.resource_type == "script":
            path = urlsplit(response.url).path
            self.scripts[path] = (response.status, response.headers.get("content-type", ""))

    async def on_dialog(self, dialog: Dialog) -> None:
        if self.answer_dialogs is None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            await dialog.dismiss()
        elif self.answer_dialogs:
            await dialog.accept()
        else:
            await dialog.dismiss()

    def assert_clean(self) -> None:
        assert not self.console_errors, f"console errors: {self.console_errors}"
        assert not self.page_errors, f"uncaught page errors: {self.page_errors}"
        assert not self.dialogs, f"unexpected dialogs: {self.dialogs}"


@pytest.fixture
async def relay(tmp_path: Path) -> Relay:
    config = server_config(
        tmp_path, free_ports(3),  # single ports: no need to find a free contiguous run
        dashboard={"listen": "127.0.0.1:0", "username": USER, "password": PASSWORD},
    )
    proc, link_url = await start_server(tmp_path, config)
    match = await proc.wait_for_line(r"^tunnel-server: dashboard on (http://\S+)$")
    return Relay(proc, link_url, match[1], tmp_path)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Dashboard:
    page: Page
    watch: Watch

    def card(self, name: str) -> Locator:
        return self.page.locator(f'[data-testid="client-card"][data-client="{name}"]')

    def item(self, name: str, testid: str) -> Locator:
        return self.card(name).locator(f'[data-testid="{testid}"]')

    async def number(self, name: str, testid: str, attribute: str) -> float:
        value = await self.item(name, testid).get_attribute(attribute)
        assert value is not None, f"{testid} of {name} has no {attribute}"
        return float(value)

    async def wait_number(self, name: str, testid: str, attribute: str, above: float,
                          timeout: float) -> float:
        """Wait until the card's ``attribute`` exceeds ``above``; return the value seen."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 1):
            value = await self.item(name, testid).get_attribute(attribute)
            if value is not None and float(value) > above:
                return float(value)
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        raise AssertionError(f"{testid} of {name} stayed at {value!r} (wanted > {above}) "
                             f"for {timeout} s")


async def open_dashboard(browser: Browser, relay: Relay, **context: Any) -> Dashboard:
    ctx = await browser.new_context(
        http_credentials={"username": USER, "password": PASSWORD},
        viewport={"width": 1440, "height": 900},
        **context,
    )
    page = await ctx.new_page()
    watch = Watch()
    page.on("console", watch.on_console)
    page.on("pageerror", lambda exc: watch.page_errors.append(str(exc)))
    page.on("dialog", watch.on_dialog)
    page.on("response", watch.on_response)
    response = await page.goto(relay.dashboard_url)
    assert response is not None and response.status == 200, response
    try:
        await expect(page.get_by_test_id("updated")).to_have_attribute(
            "data-state", "ok", timeout=UI_TIMEOUT_MS
        )
    except AssertionError:
        watch.assert_clean()  # a broken module: say which error, not just "never ok"
        raise
    return Dashboard(page, watch)


async def screenshot(dash: Dashboard, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    await dash.page.screenshot(path=str(path), full_page=True)
    return path


async def slow_transfer(port: int, size: int, chunks: int, pause: float) -> int:
    """Send ``size`` bytes to the echo service behind ``port`` in ``chunks`` pieces with
    ``pause`` s between them, on one connection kept open throughout; return bytes echoed."""
    reader, writer = await open_visitor(port)
    piece = bytes(range(256)) * (size // chunks // 256)
    received = 0

    async def drain_echo() -> None:
        nonlocal received
        for _ in range(size):  # every read returns >= 1 byte until the echo is complete
            if received >= chunks * len(piece):
                return
            data = await reader.read(CHUNK)
            if not data:
                return
            received += len(data)

    try:
        async with asyncio.timeout(60):
            echo = asyncio.ensure_future(drain_echo())
            try:
                for _ in range(chunks):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(pause)
                await echo
            finally:
                echo.cancel()
    finally:
        await close_writer(writer)
    return received


# ------------------------------------------------------------------------------ tests


async def test_client_online_and_traffic_updates_live(relay: Relay, browser: Browser) -> None:
    echo = EchoService()
    await echo.start()
    alpha = await relay.client(ALPHA_TOKEN, [echo.target], BOX_TELEMETRY, name="alpha")
    port = await wait_tunnel(alpha, echo.target)

    dash = await open_dashboard(browser, relay)
    card = dash.card("alpha")
    await expect(card.get_by_test_id("client-status")).to_have_text("online", timeout=UI_TIMEOUT_MS)
    await expect(card.get_by_test_id("client-hostname")).to_have_text("gpu-box-1",
                                                                    timeout=UI_TIMEOUT_MS)
    await expect(dash.page.get_by_test_id("relay-version")).to_contain_text(__version__)
    row = card.locator(f'[data-testid="tunnel-row"][data-port="{port}"]')
    await expect(row).to_contain_text(echo.target)
    lease = dash.page.locator(f'[data-testid="lease-row"][data-port="{port}"]')
    await expect(lease).to_contain_text("alpha", timeout=UI_TIMEOUT_MS)

    before = await dash.number("alpha", "client-traffic-in", "data-bytes")
    size = 8 * MIB
    # ~10 s: longer than two of the relay's 5 s rate samples, so a rate is on show for a
    # while even when a loaded machine delays a sample or a poll.
    transfer = asyncio.ensure_future(slow_transfer(port, size, chunks=64, pause=0.15))
    try:
        # First read: the number moved while the transfer is still running (no reload).
        during = await dash.wait_number("alpha", "client-traffic-in", "data-bytes", before,
                                        timeout=POLL + MARGIN)
        assert during < before + size, "the whole transfer was counted before it could finish"
        await dash.wait_number("alpha", "client-rate-in", "data-rate", 0, timeout=15.0)
        assert await transfer == size
    finally:
        transfer.cancel()
    # Second read: it kept going up to (at least) everything that was sent.
    after = await dash.wait_number("alpha", "client-traffic-in", "data-bytes",
                                   before + size - 1, timeout=POLL + MARGIN)
    assert after > during
    shown = await dash.item("alpha", "client-traffic-in").text_content()
    assert shown is not None and "MiB" in shown, shown

    # Let the per-client detail (chart, open connections) refresh once before the picture.
    with contextlib.suppress(AssertionError):
        await expect(card.get_by_test_id("chart-peak")).to_have_text(re.compile(r"^peak [1-9]"),
                                                                     timeout=12_000)
    await screenshot(dash, "dashboard.png")
    dash.watch.assert_clean()


async def test_every_module_loads_without_console_error(relay: Relay,
                                                         browser: Browser) -> None:
    """The page is ES modules under static/js/ (main.js, shared helpers, one per panel):
    every .js file there is fetched as a module script, with 200 and a JavaScript type, and
    none is left unused; with a client online, each panel draws (totals, a card with its
    chart loaded, a lease row) without a console error, a CSP violation or an uncaught
    exception."""
    echo = EchoService()
    await echo.start()
    alpha = await relay.client(ALPHA_TOKEN, [echo.target], BOX_TELEMETRY, name="alpha")
    port = await wait_tunnel(alpha, echo.target)
    dash = await open_dashboard(browser, relay)
    page = dash.page
    await expect(page.locator("#total-online")).to_have_text("1", timeout=UI_TIMEOUT_MS)
    card = dash.card("alpha")
    await expect(card.get_by_test_id("client-status")).to_have_text("online",
                                                                    timeout=UI_TIMEOUT_MS)
    await expect(card.get_by_test_id("chart-peak")).not_to_have_text("loading\u2026",
                                                                     timeout=UI_TIMEOUT_MS)
    await expect(card.locator(".gpu")).to_have_count(2)
    lease = page.locator(f'[data-testid="lease-row"][data-port="{port}"]')
    await expect(lease).to_contain_text("alpha", timeout=UI_TIMEOUT_MS)

    on_disk = {"/static/" + path.relative_to(STATIC).as_posix()
               for path in (STATIC / "js").rglob("*.js")}
    assert {"/static/js/main.js", "/static/js/panels/clients.js",
            "/static/js/panels/leases.js", "/static/js/panels/status.js"} <= on_disk
    assert set(dash.watch.scripts) == on_disk
    for path, (status, content_type) in dash.watch.scripts.items():
        assert status == 200, path
        assert content_type == "text/javascript; charset=utf-8", path
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script type="module" src="static/js/main.js">']
    dash.watch.assert_clean()


async def test_card_turns_offline_when_client_dies(relay: Relay, browser: Browser) -> None:
    echo = EchoService()
    await echo.start()
    alpha = await relay.client(ALPHA_TOKEN, [echo.target], name="alpha")
    port = await wait_tunnel(alpha, echo.target)
    dash = await open_dashboard(browser, relay)
    status = dash.item("alpha", "client-status")
    await expect(status).to_have_text("online", timeout=UI_TIMEOUT_MS)

    await alpha.kill9()
    killed = time.monotonic()
    budget = HEARTBEAT_TIMEOUT + POLL + MARGIN
    await expect(status).to_have_text("offline", timeout=budget * 1000)
    assert time.monotonic() - killed <= budget
    await expect(dash.card("alpha")).to_have_attribute("data-status", "offline")
    lease = dash.page.locator(f'[data-testid="lease-row"][data-port="{port}"]')
    await expect(lease).to_contain_text("offline", timeout=UI_TIMEOUT_MS)
    await screenshot(dash, "dashboard-offline.png")
    dash.watch.assert_clean()


async def test_admin_buttons_confirm_then_post(relay: Relay, browser: Browser) -> None:
    echo = EchoService()
    await echo.start()
    alpha = await relay.client(ALPHA_TOKEN, [echo.target], name="alpha")
    port = await wait_tunnel(alpha, echo.target)
    dash = await open_dashboard(browser, relay)
    await expect(dash.item("alpha", "client-status")).to_have_text("online",
                                                                   timeout=UI_TIMEOUT_MS)
    button = dash.card("alpha").get_by_role("button", name="disconnect")

    dash.watch.answer_dialogs = False  # "Cancel": nothing is sent
    mark = alpha.mark()
    await button.click()
    await asyncio.sleep(POLL)
    await expect(dash.page.locator("#notice")).to_be_hidden()

    dash.watch.answer_dialogs = True  # "OK": the link is closed and the client logs in again
    await button.click()
    await expect(dash.page.locator("#notice")).to_have_text("Disconnected alpha.")
    await wait_tunnel(alpha, echo.target, since=mark)
    await expect(dash.item("alpha", "client-status")).to_have_text("online",
                                                                   timeout=UI_TIMEOUT_MS)

    # Release the lease of a client that is gone for good: the row disappears.
    await alpha.kill9()
    lease = dash.page.locator(f'[data-testid="lease-row"][data-port="{port}"]')
    await expect(lease).to_contain_text("offline", timeout=UI_TIMEOUT_MS)
    await lease.get_by_role("button", name="release").click()
    await expect(dash.page.locator("#notice")).to_have_text(f"Released port {port}.")
    await expect(lease).to_have_count(0, timeout=UI_TIMEOUT_MS)
    dash.watch.assert_clean()


async def test_client_strings_are_text_not_html(relay: Relay, browser: Browser) -> None:
    echo = EchoService()
    await echo.start()
    beta = await relay.client(BETA_TOKEN, [echo.target], HOSTILE_TELEMETRY, name="beta")
    await wait_tunnel(beta, echo.target)
    dash = await open_dashboard(browser, relay)

    hostname = dash.item("beta", "client-hostname")
    await expect(hostname).to_have_text(HOSTILE_HOSTNAME, timeout=UI_TIMEOUT_MS)
    assert await hostname.evaluate("node => node.textContent") == HOSTILE_HOSTNAME
    gpu = dash.card("beta").locator(".gpu-name")
    await expect(gpu).to_have_text(HOSTILE_GPU, timeout=UI_TIMEOUT_MS)
    await asyncio.sleep(POLL)  # a few more polls: re-rendering must not change anything
    cards = dash.page.get_by_test_id("client-card")
    assert await cards.locator("img").count() == 0
    assert await cards.locator("b").count() == 0
    assert await dash.page.evaluate("() => document.querySelectorAll('img[src=x]').length") == 0
    assert await hostname.evaluate("node => node.childElementCount") == 0
    await screenshot(dash, "dashboard-hostile.png")
    dash.watch.assert_clean()


def _control_message(raw: str | bytes) -> dict[str, Any]:
    assert isinstance(raw, bytes)
    message: dict[str, Any] = json.loads(bytes(decode_frames(raw)[0].payload))
    return message


async def test_identity_shared_by_two_machines_is_flagged(relay: Relay,
                                                          browser: Browser) -> None:
    """Reliability S-7 on the page: alpha's live link replaced 5 times within a minute shows
    the "shared identity" badge on alpha's card (and on no other card)."""
    echo = EchoService()
    await echo.start()
    beta = await relay.client(BETA_TOKEN, [echo.target], name="beta")
    await wait_tunnel(beta, echo.target)
    dash = await open_dashboard(browser, relay)
    links = []
    for _ in range(REPLACEMENT_FLAG + 1):  # the first login is not a replacement
        ws = await connect(relay.link_url, compression=None, ping_interval=None, proxy=None)
        challenge = _control_message(await ws.recv())
        nonce = msg.b64decode(challenge["nonce"], "nonce")
        client_nonce = new_nonce()
        proof = client_proof(derive_key(Secret(ALPHA_TOKEN)), nonce, client_nonce)
        auth = {"type": "auth", "nonce": msg.b64encode(client_nonce),
                "proof": msg.b64encode(proof), "client_version": "raw-test"}
        await ws.send(encode_frame(Frame(FrameType.CONTROL, payload=json.dumps(auth).encode())))
        welcome = _control_message(await ws.recv())
        assert welcome["type"] == "welcome"
        links.append(ws)
    badge = dash.item("alpha", "client-flapping")
    await expect(badge).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert "two machines" in (await badge.get_attribute("title") or "")
    await expect(dash.item("beta", "client-flapping")).to_be_hidden()
    await screenshot(dash, "dashboard-flapping.png")
    for ws in links:
        await ws.close()
    dash.watch.assert_clean()
