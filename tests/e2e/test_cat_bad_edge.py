"""Reliability catalogue (../shared/design/reliability.md §2), section (d) bad input at the
edges, by id: open/reset floods (B-6), slowloris (B-8), idle floods (B-9), non-WebSocket
garbage (B-10), config abuse (B-11) and port policy (B-12).

Distinct loopback addresses stand for distinct people (Linux routes all of 127.0.0.0/8 to
``lo``): 127.0.0.1 is the legitimate side, 127.0.0.2 and up are the attackers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import re
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.conftest import Size
from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    SERVER_MODULE,
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
from tests.e2e.procstats import fd_count, rss_kib
from tests.e2e.services import EchoService, TcpService, close_writer, echo_check
from tunnel.client.dialer import MAX_PENDING_DIALS
from tunnel.common import messages as msg
from tunnel.common.auth import client_proof, derive_key, new_nonce
from tunnel.common.frames import Frame, FrameType, decode_frames, encode_frame
from tunnel.common.secret import Secret
from tunnel.common.yamlsafe import MAX_CONFIG_BYTES
from tunnel.server.control import HANDSHAKE_TIMEOUT as OPEN_TIMEOUT
from tunnel.server.guard import (
    MAX_PREAUTH_PER_SOURCE,
    MAX_PREAUTH_TOTAL,
    MAX_VISITORS_PER_SOURCE,
    OPENS_PER_SOURCE,
)

MIB = 1024 * 1024
KIB = 1024
_LINGER_RESET = struct.pack("ii", 1, 0)
#: What "closed at once" means for a refused or garbage connection (catalogue: 1 s).
AT_ONCE = 1.0
#: A legitimate login must finish within this during the floods (B-8).
LOGIN_BOUND = 2.0
_CLOSED = (OSError, EOFError, asyncio.IncompleteReadError, ssl.SSLError)


# ----------------------------------------------------------------------------- helpers


def _tls_context() -> ssl.SSLContext:
    """For raw attacker sockets: they do TLS properly but do not care who the relay is."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _is_tls(url: str) -> bool:
    return url.startswith("wss://")


async def _raw_connect(url: str, source: str, *, tls: bool | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP (and TLS, for a wss:// relay) connection to the control port from ``source``."""
    use_tls = _is_tls(url) if tls is None else tls
    return await asyncio.open_connection(
        "127.0.0.1", url_port(url), local_addr=(source, 0),
        ssl=_tls_context() if use_tls else None,
        server_hostname="relay" if use_tls else None)


def _control(message: dict[str, object]) -> bytes:
    return encode_frame(Frame(FrameType.CONTROL, payload=json.dumps(message).encode()))


def _controls(raw: bytes | str) -> list[dict[str, Any]]:
    assert isinstance(raw, bytes)
    return [json.loads(bytes(frame.payload)) for frame in decode_frames(raw)
            if frame.type is FrameType.CONTROL]


async def _raw_login(url: str, token: str) -> ClientConnection:
    """Log in by hand (a legitimate peer), up to and including the welcome."""
    ws = await connect(url, compression=None, ping_interval=None, proxy=None,
                       ssl=_tls_context() if _is_tls(url) else None)
    try:
        (challenge,) = _controls(await ws.recv())
        nonce = msg.b64decode(str(challenge["nonce"]), "nonce")
        client_nonce = new_nonce()
        proof = client_proof(derive_key(Secret(token)), nonce, client_nonce)
        await ws.send(_control({"type": "auth", "nonce": msg.b64encode(client_nonce),
                                "proof": msg.b64encode(proof), "client_version": "raw-test"}))
        (welcome,) = _controls(await ws.recv())
        assert welcome["type"] == "welcome", welcome
    except BaseException:
        await ws.close()
        raise
    return ws


async def _timed_login(url: str) -> float:
    """Seconds a legitimate client from 127.0.0.1 needs to be welcomed (then it leaves)."""
    started = time.monotonic()
    async with asyncio.timeout(4 * LOGIN_BOUND):
        ws = await _raw_login(url, ALPHA_TOKEN)
    elapsed = time.monotonic() - started
    await ws.close()
    return elapsed


async def _poll(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll where no event exists (another process's state), bounded in count and time."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step) + 2):
        if condition():
            return True
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(step)
    return condition()


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------- B-11


async def _run_server(args: list[str], cwd: Path) -> tuple[int, list[str], float]:
    """Run ``tunnel-server ARGS`` to its exit: (exit code, stderr lines, seconds)."""
    started = time.monotonic()
    proc = await start_proc("tunnel-server", SERVER_MODULE, args, cwd=cwd)
    code = await proc.wait_exit()
    return code, proc.stderr_lines, time.monotonic() - started


_BASE_CONFIG = """\
listen: "127.0.0.1:0"
path: /tunnel
ports: [{port}]
state_dir: {state}
tls: "off"
clients:
  alpha:
    token: alpha-secret-token-0001
"""
# Each case: (name, text replacing ``ports: [{port}]``, (line, column) the message must give).
_BAD_CONFIGS = [
    ("invalid_yaml", "ports: [{port}", (4, 10)),
    ("alias_bomb", 'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
                   "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                   "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nports: [{port}]", (3, 4)),
    ("duplicate_key", "ports: [{port}]\nports: [{port}]", (4, 1)),
    ("port_on", "ports: [on]", (3, 9)),
    ("port_octal_looking", "ports: [08080]", (3, 9)),
    ("port_hex", "ports: [0x1F90]", (3, 9)),
    ("port_float", "ports: [8080.0]", (3, 9)),
    ("python_object", "ports: !!python/object:os.system [{port}]", (3, 8)),
]


@pytest.mark.parametrize(("case", "replacement", "where"), _BAD_CONFIGS,
                         ids=[c[0] for c in _BAD_CONFIGS])
async def test_B11_bad_server_config_exits_2_naming_file_line_and_column(
        tmp_path: Path, case: str, replacement: str, where: tuple[int, int]) -> None:
    """Each abuse exits with code 2 and one line naming file, line and column, both with
    ``--check`` and when starting for real (nothing is bound then)."""
    (port,) = free_ports(1)
    text = _BASE_CONFIG.replace("ports: [{port}]", replacement)
    path = tmp_path / f"{case}.yaml"
    path.write_text(text.format(port=port, state=tmp_path / "state"))
    line, column = where
    for args in (["--check", "--config", str(path)], ["--config", str(path)]):
        code, stderr, _ = await _run_server(args, tmp_path)
        assert code == 2, (args, stderr)
        assert len(stderr) == 1, stderr
        assert stderr[0].startswith(f"tunnel-server: configuration error: {path}: ")
        assert re.search(rf"\bline {line}, column {column}\b", stderr[0]), stderr[0]


async def test_B11_huge_config_is_refused_by_the_size_cap_before_parsing(
        tmp_path: Path) -> None:
    """(i) A 100 MiB file (sparse, made in no time) is refused by the 1 MiB cap from its
    size alone. The whole program takes well under 1 s more than for a 1-line bad file (the
    interpreter's start-up is the same for both and is not the loader's doing). The message
    names the file and the cap; it names no line and column, since refusing before reading
    a single line is the point of the cap."""
    small = tmp_path / "small.yaml"
    small.write_text("ports: [on]\n")
    big = tmp_path / "big.yaml"
    with big.open("wb") as handle:
        handle.truncate(100 * MIB)
    _, _, baseline = await _run_server(["--check", "--config", str(small)], tmp_path)
    code, stderr, elapsed = await _run_server(["--check", "--config", str(big)], tmp_path)
    assert code == 2
    assert stderr == [f"tunnel-server: configuration error: {big}: file is {100 * MIB} bytes; "
                      f"config files are limited to {MAX_CONFIG_BYTES} bytes"]
    assert elapsed - baseline < 1.0, (elapsed, baseline)


_BAD_CLIENT_CONFIGS = [
    ("invalid_yaml", "expose: [8080", (3, 1)),
    ("alias_bomb", 'a: &a ["8080", "8081"]\nexpose: *a', (2, 4)),
    ("duplicate_key", 'expose: ["8080"]\nexpose: ["8081"]', (3, 1)),
    ("python_object", "expose: !!python/object:os.system [8080]", (2, 9)),
    ("expose_on", "expose: [on]", (2, 10)),
    ("expose_hex", "expose: [0x1F90]", (2, 10)),
    ("expose_float", "expose: [8080.0]", (2, 10)),
]


@pytest.mark.parametrize(("case", "body", "where"), _BAD_CLIENT_CONFIGS,
                         ids=[c[0] for c in _BAD_CLIENT_CONFIGS])
async def test_B11_bad_client_config_exits_2_naming_file_line_and_column(
        tmp_path: Path, case: str, body: str, where: tuple[int, int]) -> None:
    """The client's settings file gets the same treatment: exit 2, one line, position."""
    path = tmp_path / f"{case}.yaml"
    path.write_text(f'server: "ws://127.0.0.1:9/tunnel"\n{body}\n')
    proc = await start_proc("tunnel-client", "tunnel.client.cli",
                            ["--config", str(path), "--token", ALPHA_TOKEN], cwd=tmp_path)
    assert await proc.wait_exit() == 2
    assert len(proc.stderr_lines) == 1, proc.stderr_lines
    line = proc.stderr_lines[0]
    assert line.startswith(f"tunnel-client: {path}: "), line
    assert re.search(rf"\bline {where[0]}, column {where[1]}\b", line), line
