"""Smoke test of an *installed* tunnel: the wheel in a fresh virtual environment.

Run it with that environment's python, from a directory outside the checkout::

    /tmp/venv/bin/python -I /path/to/checkout/tests/wheel/smoke.py

It refuses to run against the checkout (``tunnel`` must be imported from the environment's
site-packages), then drives the installed console scripts as a user would: ``--version`` on
both programs, ``tunnel-server init`` and ``add-client``, ``tunnel-client join``, the relay
and the client running, bytes through the tunnel, and the status page ``/`` with every asset
``index.html`` names, each answering 200 with its content type. Ports are picked free at run
time on 127.0.0.1; every process started is stopped by its pid. It prints one line: ``wheel
smoke: OK ...`` (exit 0) or ``wheel smoke: FAILED: ...`` (exit 1). Secrets (join strings,
the admin password) are never printed.

Only the standard library and the package itself are imported: the tests' helpers are not
installed, and importing them would put the checkout on ``sys.path``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html.parser
import importlib.metadata
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO
from urllib.parse import urljoin, urlsplit

CHECKOUT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"

COMMAND_TIMEOUT = 60.0  # a one-shot command (init, add-client, join, --version) ends within
LINE_TIMEOUT = 60.0  # a running program prints an expected line within (start-up included)
STOP_TIMEOUT = 20.0  # > the relay's 10 s drain of open streams after SIGTERM
IO_TIMEOUT = 30.0  # one socket or HTTP exchange
PAYLOAD_BYTES = 1024 * 1024
CHUNK = 64 * 1024
TAIL_LINES = 30  # of a program's stderr, in a failure message

JOIN_RE = re.compile(r"tunnel1_[A-Za-z0-9_-]+")
FINGERPRINT_RE = re.compile(r"fingerprint: (sha256:[0-9a-f]{64})")
LISTENING_RE = re.compile(r"^tunnel-server: listening on (wss://\S+)$")
DASHBOARD_RE = re.compile(r"^tunnel-server: dashboard on (http://\S+?)/?$")

#: The content type each kind of asset must be served with: written out here, not read from
#: the package, so a wrong entry there is caught.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json; charset=utf-8",
    ".woff2": "font/woff2",
}


class SmokeError(Exception):
    """A check failed; the message is the one line printed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def redact(text: str, secret_values: Sequence[str]) -> str:
    text = JOIN_RE.sub("tunnel1_<redacted>", text)
    for value in secret_values:
        if value:
            text = text.replace(value, "<redacted>")
    return text


# ----------------------------------------------------------------------------- processes


class Program:
    """A running console script whose output lines are collected by two reader threads."""

    def __init__(self, name: str, args: Sequence[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.process = subprocess.Popen(
            [str(BIN / name), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._pump, args=(self.process.stdout, self.stdout),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self.process.stderr, self.stderr),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: IO[bytes], sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._changed:
                sink.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first stdout line matching ``pattern``; fails when the program ends first."""
        deadline = time.monotonic() + LINE_TIMEOUT
        with self._changed:
            while True:
                for line in self.stdout:
                    if (match := pattern.search(line)) is not None:
                        return match
                remaining = deadline - time.monotonic()
                if not self._readers[0].is_alive() or remaining <= 0:
                    raise SmokeError(f"{self.name} printed no line matching {pattern.pattern!r}"
                                     f" (exit {self.process.poll()}); {self.tail()}")
                self._changed.wait(remaining)

    def tail(self) -> str:
        return "stderr: " + " | ".join(self.stderr[-TAIL_LINES:])

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it lingers (by this process's pid only)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
        for reader in self._readers:
            reader.join(STOP_TIMEOUT)
        return self.process.wait()


def run_command(name: str, args: Sequence[str], env: dict[str, str], cwd: Path) -> str:
    """Run a one-shot console script; its stdout, or SmokeError on a non-zero exit."""
    result = subprocess.run([str(BIN / name), *args], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT, check=False)
    if result.returncode != 0:
        raise SmokeError(f"{name} {args[0]} exited {result.returncode}: "
                         + " | ".join(result.stderr.splitlines()[-TAIL_LINES:]))
    return result.stdout


def free_ports(count: int) -> list[int]:
    """Distinct ports the kernel reports free on loopback now (all held until all are
    picked, so no two are the same)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


# ----------------------------------------------------------------------------- echo service


class Echo:
    """A loopback TCP echo service on a thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(CHUNK):
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def echo_through(port: int) -> None:
    """Send PAYLOAD_BYTES to the public port and check the echo byte for byte (SHA-256)."""
    payload = secrets.token_bytes(PAYLOAD_BYTES)
    with socket.create_connection((LOOPBACK, port), IO_TIMEOUT) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        digest, got = hashlib.sha256(), 0
        while got < PAYLOAD_BYTES:
            data = sock.recv(CHUNK)
            check(bool(data), f"tunnel closed after {got} of {PAYLOAD_BYTES} bytes")
            digest.update(data)
            got += len(data)
        sender.join(IO_TIMEOUT)
    check(digest.digest() == hashlib.sha256(payload).digest(), "tunnel corrupted the bytes")


# ----------------------------------------------------------------------------- status page


class AssetLinks(html.parser.HTMLParser):
    """The same-origin URLs a page loads: script src, link href, img src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        for name, value in attrs:
            if name == wanted and value and not urlsplit(value).scheme and (
                    value not in self.urls):
                self.urls.append(value)


def http_get(url: str, auth: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    try:
        with urllib.request.urlopen(request, timeout=IO_TIMEOUT) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), b""


#: Relative module specifiers in ``import ... from "./x.js"``, ``import "./x.js"`` and
#: ``import("./x.js")``: the modules a script loads besides what index.html names.
JS_IMPORT = re.compile(r"""\bimport\s*(?:\(\s*|[^"'()]*?\bfrom\s*|)["'](\.{1,2}/[^"']+)["']""")


def module_imports(script_url: str, source: bytes) -> list[str]:
    """The absolute URLs of the relative modules ``source`` imports."""
    return [urljoin(script_url, spec) for spec in JS_IMPORT.findall(source.decode("utf-8"))]


def check_status_page(base: str, username: str, password: str) -> list[str]:
    """``/`` and every asset it loads (what index.html names, and the modules those scripts
    import, transitively): 200 and the right content type. Returns the assets' URLs."""
    auth = base64.b64encode(f"{username}:{password}".encode()).decode()
    root = base.rstrip("/") + "/"
    status, ctype, body = http_get(root, auth)
    check(status == 200, f"GET / has status {status}")
    check(ctype == CONTENT_TYPES[".html"], f"GET / has Content-Type {ctype!r}")
    parser = AssetLinks()
    parser.feed(body.decode("utf-8"))
    check(bool(parser.urls), "index.html names no asset")
    pending = [urljoin(root, url) for url in parser.urls]
    seen: list[str] = []
    while pending:
        url = pending.pop(0)
        if url in seen:
            continue
        seen.append(url)
        suffix = Path(urlsplit(url).path).suffix.lower()
        check(suffix in CONTENT_TYPES, f"{url}: no expected content type for {suffix!r}")
        status, ctype, data = http_get(url, auth)
        check(status == 200, f"GET {url} has status {status}")
        check(ctype == CONTENT_TYPES[suffix], f"GET {url} has Content-Type {ctype!r}")
        check(bool(data), f"GET {url} is empty")
        if suffix in (".js", ".mjs"):
            pending += module_imports(url, data)
    return seen


# ----------------------------------------------------------------------------- the run


def check_installed() -> str:
    """The imported package is the installed one, not the checkout; returns its version."""
    import tunnel

    where = Path(tunnel.__file__).resolve()
    check(where.is_relative_to(Path(sys.prefix).resolve()),
          f"tunnel imported from {where}, outside this environment ({sys.prefix})")
    check(not where.is_relative_to(CHECKOUT), f"tunnel imported from the checkout: {where}")
    check(sys.prefix != sys.base_prefix, "not running in a virtual environment")
    version = importlib.metadata.version("tunnel")
    check(tunnel.__version__ == version,
          f"tunnel.__version__ {tunnel.__version__} != installed metadata {version}")
    return version


@contextlib.contextmanager
def programs() -> Iterator[list[Program]]:
    started: list[Program] = []
    try:
        yield started
    finally:
        for program in reversed(started):
            program.stop()


def smoke(work: Path) -> str:
    version = check_installed()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNNEL_", "PYTHON"))}
    env.update(HOME=str(work / "home"), XDG_CONFIG_HOME=str(work / "xdg"))
    (work / "home").mkdir()
    cwd = work / "elsewhere"
    cwd.mkdir()
    for name in ("tunnel-server", "tunnel-client"):
        out = run_command(name, ["--version"], env, cwd).strip()
        check(out == f"{name} {version}", f"{name} --version printed {out!r}")

    listen, public = free_ports(2)
    relay_dir = work / "relay"
    out = run_command("tunnel-server", [
        "init", "--public-host", LOOPBACK, "--dir", str(relay_dir),
        "--listen", f"{LOOPBACK}:{listen}", "--ports", str(public),
        "--public-bind", LOOPBACK, "--dashboard-listen", f"{LOOPBACK}:0"], env, cwd)
    fingerprint = FINGERPRINT_RE.search(out)
    check(fingerprint is not None, "init printed no fingerprint")
    config = relay_dir / "server.yaml"
    password = (relay_dir / "admin-password").read_text(encoding="utf-8").strip()
    out = run_command("tunnel-server", ["add-client", "box", "--ports", str(public),
                                        "--config", str(config)], env, cwd)
    joins = set(JOIN_RE.findall(out))
    check(len(joins) == 1, f"add-client printed {len(joins)} join strings, not 1")
    (join,) = joins
    client_env = dict(env, HOME=str(work / "box-home"), XDG_CONFIG_HOME=str(work / "box-xdg"))
    (work / "box-home").mkdir()
    run_command("tunnel-client", ["join", join], client_env, cwd)

    echo = Echo()
    try:
        with programs() as started:
            relay = Program("tunnel-server", ["--config", str(config)], env, cwd)
            started.append(relay)
            try:
                url = relay.wait_line(LISTENING_RE)[1]
                check(url == f"wss://{LOOPBACK}:{listen}/tunnel", f"relay listens on {url}")
                dashboard = relay.wait_line(DASHBOARD_RE)[1]
                target = f"{LOOPBACK}:{echo.port}"
                client = Program("tunnel-client", ["--expose", f"{target}:fixed-{public}"],
                                 client_env, cwd)
                started.append(client)
                line = re.compile(rf"^{re.escape(target)} -> {LOOPBACK}:{public} \(fixed\)$")
                try:
                    client.wait_line(line)
                    echo_through(public)
                except SmokeError as exc:
                    raise SmokeError(f"{exc}; client {client.tail()}") from None
                assets = check_status_page(dashboard, "admin", password)
            except SmokeError as exc:
                raise SmokeError(f"{exc}; relay {relay.tail()}") from None
            for program in reversed(started):
                code = program.stop()
                check(code == 0, f"{program.name} exited {code} on SIGTERM; {program.tail()}")
    finally:
        echo.close()
    return (f"tunnel {version} from {BIN.parent}: init, add-client, join, "
            f"{PAYLOAD_BYTES} bytes through a tunnel, / and {len(assets)} assets "
            f"({', '.join(assets)}), --version")


def main() -> int:
    password: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="tunnel-wheel-smoke-") as tmp:
            work = Path(tmp)
            try:
                summary = smoke(work)
            finally:
                secret = work / "relay" / "admin-password"
                if secret.exists():
                    password.append(secret.read_text(encoding="utf-8").strip())
    except (SmokeError, OSError, subprocess.SubprocessError) as exc:
        message = redact(f"{type(exc).__name__}: {exc}" if not isinstance(exc, SmokeError)
                         else str(exc), password)
        print(f"wheel smoke: FAILED: {message}", flush=True)
        return 1
    print(f"wheel smoke: OK: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
