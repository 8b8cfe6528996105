"""``python -m tunnel.demo``: the whole story on one machine, on loopback.

Starts a small HTTP sample service, a relay (``tunnel-server``) and a client
(``tunnel-client``) as real processes with a throw-away config and a fresh random token,
then prints the public URL to open. Ctrl+C stops all three. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

__all__ = ["main"]

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0
_LISTENING = re.compile(r"listening on (wss?://\S+)")
_FINGERPRINT = re.compile(r"tls fingerprint (sha256:[0-9a-f]{64})")
_TUNNEL = re.compile(r"-> (\S+):(\d+) \((fixed|auto)\)")


class _Sample(http.server.BaseHTTPRequestHandler):
    """A stand-in for Jupyter or TensorBoard."""

    def do_GET(self) -> None:
        body = (b"<!doctype html><title>tunnel demo</title>"
                b"<h1>Hello through the tunnel</h1>"
                b"<p>This page is served on the 'workstation' side and reached via the relay.</p>")
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_line(proc: subprocess.Popen[str], pattern: re.Pattern[str],
               name: str) -> re.Match[str]:
    assert proc.stdout is not None
    timer = threading.Timer(READY_TIMEOUT, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            match = pattern.search(line)
            if match:
                return match
    finally:
        timer.cancel()
    raise SystemExit(f"tunnel demo: {name} exited early (code {proc.wait()})")


@contextlib.contextmanager
def _process(args: Sequence[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunnel.demo", description=__doc__)
    parser.add_argument("--once", action="store_true",
                        help="fetch the page through the tunnel once and exit (a smoke test)")
    args = parser.parse_args(argv)
    sample = http.server.ThreadingHTTPServer((HOST, 0), _Sample)
    threading.Thread(target=sample.serve_forever, daemon=True).start()
    public_port = _free_port()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="tunnel-demo-") as tmp:
        config = Path(tmp) / "server.yaml"
        config.write_text(yaml.safe_dump({
            "listen": f"{HOST}:0", "public_host": HOST, "ports": [public_port],
            "state_dir": str(Path(tmp) / "state"),
            "clients": {"workstation": {"token_env": "TUNNEL_DEMO_TOKEN"}},
        }))
        # The token travels by environment, never on a command line (visible in `ps`).
        env = {**os.environ, "TUNNEL_DEMO_TOKEN": token, "TUNNEL_TOKEN": token}
        with _process(["-m", "tunnel.server.cli", "--config", str(config)], env) as relay:
            pin = _wait_line(relay, _FINGERPRINT, "tunnel-server").group(1)
            url = _wait_line(relay, _LISTENING, "tunnel-server").group(1)
            target = f"{HOST}:{sample.server_address[1]}:fixed-{public_port}"
            with _process(["-m", "tunnel.client.cli", "--server", url, "--fingerprint", pin,
                           "--expose", target], env) as client:
                match = _wait_line(client, _TUNNEL, "tunnel-client")
                page = f"http://{match.group(1)}:{match.group(2)}/"
                print(f"tunnel demo: relay {url} (TLS, pinned {pin[:19]}...), sample "
                      f"service on {HOST}:{sample.server_address[1]}")
                print(f"tunnel demo: open {page}  (Ctrl+C to stop)", flush=True)
                if args.once:
                    return _fetch_once(page)
                with contextlib.suppress(KeyboardInterrupt):
                    client.wait()
    sample.shutdown()
    return 0


def _fetch_once(page: str) -> int:


    with urllib.request.urlopen(page, timeout=10) as response:
        body = response.read()
    ok = b"Hello through the tunnel" in body
    print(f"tunnel demo: fetched {len(body)} bytes through the tunnel: {'OK' if ok else 'BAD'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
