"""Run the real ``tunnel-server`` / ``tunnel-client`` programs as subprocesses for e2e tests.

Every process started here is recorded in :data:`STARTED`; the e2e conftest ends those that
are still running (by pid: SIGTERM, then SIGKILL) and fails the test if any of them wrote a
Python traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.e2e.ports import free_port_range, free_ports

__all__ = [
    "ALPHA_TOKEN",
    "BETA_TOKEN",
    "EXIT_TIMEOUT",
    "GATE_UP_RE",
    "LINE_TIMEOUT",
    "PINS",
    "STARTED",
    "VARIANT",
    "VARIANTS",
    "Proc",
    "Variant",
    "client_source",
    "free_port_range",
    "free_ports",
    "release",
    "server_config",
    "set_variant",
    "start_client",
    "start_proc",
    "start_server",
    "start_tunnel",
    "wait_tunnel",
]

ALPHA_TOKEN = "alpha-secret-token-0001"
BETA_TOKEN = "beta-secret-token-00002"

LINE_TIMEOUT = 20.0  # a program must print an expected line within this (startup included)
EXIT_TIMEOUT = 15.0  # > the relay's 10 s SIGTERM drain of open streams, plus start-up slack
TRACEBACK = "Traceback (most recent call last)"

# Overridable to run the suite against another implementation of the same contract.
SERVER_MODULE = os.environ.get("TUNNEL_E2E_SERVER_MODULE", "tunnel.server.cli")
CLIENT_MODULE = os.environ.get("TUNNEL_E2E_CLIENT_MODULE", "tunnel.client.cli")
LISTENING_RE = r"^tunnel-server: listening on (?P<url>wss?://\S+)$"
FINGERPRINT_RE = r"^tunnel-server: tls fingerprint (?P<fp>sha256:[0-9a-f]{64})$"

STARTED: list[Proc] = []

#: Run by a gated program (:func:`start_proc`): import the module (the interpreter's and the
#: imports' start-up), say so, wait for the test's release line on stdin, then run the module
#: as ``python -m`` does. The module's code runs again as ``__main__``; its imports are cached.
GATE_CODE = """
import importlib, runpy, sys
module = sys.argv.pop(1)
importlib.import_module(module)
print("gate: up", flush=True)
sys.stdin.buffer.readline()
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
GATE_UP_RE = r"^gate: up$"


@dataclass(frozen=True)
class Variant:
    """How the programs of one test run: which event loop, and TLS on the link or not.

    The catalogue runs every link test on the stock asyncio loop and on uvloop, with TLS on
    and off. :func:`server_config` and :func:`start_proc` read :data:`VARIANT`, so a test
    written once runs in all four; the ``variant`` fixture (tests/e2e/conftest.py) sets it.
    """

    uvloop: bool = True
    tls: bool = False

    @property
    def id(self) -> str:
        return f"{'uvloop' if self.uvloop else 'asyncio'}-{'tls' if self.tls else 'plain'}"


VARIANTS = tuple(Variant(uvloop=u, tls=t) for u in (False, True) for t in (False, True))
VARIANT = Variant()
# The pin of each relay started with TLS, by its link URL: start_client passes it on.
PINS: dict[str, str] = {}


def set_variant(variant: Variant) -> None:
    global VARIANT
    VARIANT = variant


class Proc:
    """A subprocess whose stdout/stderr lines are collected in the background."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.started_at = time.monotonic()
        self._changed = asyncio.Event()
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._pump(process.stdout, self.stdout_lines)),
            asyncio.ensure_future(self._pump(process.stderr, self.stderr_lines)),
        ]

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self.returncode}>"

    async def _pump(self, stream: asyncio.StreamReader, sink: list[str]) -> None:
        # Bounded by the pipe: the loop ends at EOF, i.e. when the process is gone.
        while line := await stream.readline():
            sink.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            self._changed.set()
        self._changed.set()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def stdout(self) -> str:
        return "\n".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def mark(self) -> int:
        """Index of the next stdout line, to wait only for lines printed from now on."""
        return len(self.stdout_lines)

    def describe(self) -> str:
        return (
            f"{self!r}\n--- stdout ---\n{self.stdout}\n--- stderr (last 60 lines) ---\n"
            + "\n".join(self.stderr_lines[-60:])
        )

    async def wait_for_line(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = LINE_TIMEOUT,
        *,
        since: int = 0,
        stream: str = "stdout",
    ) -> re.Match[str]:
        """Wait until a line (index >= ``since``) matches ``pattern``; return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        lines = self.stdout_lines if stream == "stdout" else self.stderr_lines
        reader = self._readers[0 if stream == "stdout" else 1]
        deadline = time.monotonic() + timeout
        index = since
        for _ in range(100_000):
            self._changed.clear()
            for i in range(index, len(lines)):
                if (match := regex.search(lines[i])) is not None:
                    return match
            index = max(index, len(lines))
            if reader.done():
                raise AssertionError(
                    f"{self.name} closed its {stream} without a line matching "
                    f"{regex.pattern!r}\n{self.describe()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        raise AssertionError(
            f"no line matching {regex.pattern!r} from {self.name} within {timeout} s\n"
            f"{self.describe()}"
        )

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the process to exit and its output to be drained; return the exit code."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s\n{self.describe()}"
            ) from None
        await self._drain()
        return code

    async def _drain(self, timeout: float = 5.0) -> None:
        _, pending = await asyncio.wait(self._readers, timeout=timeout)
        for task in pending:  # only if something else still holds the pipes open
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def send_signal(self, sig: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(sig)

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Send ``sig`` (SIGTERM by default) and return the exit code."""
        self.send_signal(sig)
        return await self.wait_exit(timeout)

    async def kill9(self) -> int:
        self.send_signal(signal.SIGKILL)
        return await self.wait_exit()

    async def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it lingers; never raises for slowness."""
        if self.process.returncode is None:
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
            except TimeoutError:
                self.send_signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), EXIT_TIMEOUT)
        await self._drain()

    def tracebacks(self) -> list[str]:
        return [ln for ln in self.stderr_lines + self.stdout_lines if TRACEBACK in ln]

    def assert_no_traceback(self) -> None:
        assert not self.tracebacks(), f"{self.name} printed a Python traceback\n{self.describe()}"


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env.pop("PYTHONUNBUFFERED", None)  # the programs must flush their lines themselves
    if not VARIANT.uvloop:
        env["TUNNEL_NO_UVLOOP"] = "1"
    if extra:
        env.update(extra)
    return env


def _with_repo_root(pythonpath: str | None) -> str:
    """``pythonpath`` with the repository root first: a program started in a temp dir
    (the relay runs in its state dir) must still import ``tests.*`` wrappers."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join([root, *(p for p in (pythonpath or "").split(os.pathsep) if p)])


async def start_proc(
    name: str,
    module: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    wrap: Sequence[str] = (),
    gated: bool = False,
) -> Proc:
    """``wrap`` prefixes the command (e.g. ``prlimit --nofile=256:256``); it must exec the
    program so that the pid stays the program's. A ``gated`` program starts its interpreter
    and imports, prints ``gate: up`` and waits for :func:`release` before it runs."""
    launch = ["-c", GATE_CODE, module] if gated else ["-m", module]
    if module.startswith("tests."):  # a test-tree wrapper (memprobe) from any cwd
        env = {**(env or {}), "PYTHONPATH": _with_repo_root(os.environ.get("PYTHONPATH"))}
    process = await asyncio.create_subprocess_exec(
        *wrap,
        sys.executable,
        *launch,
        *args,
        stdin=asyncio.subprocess.PIPE if gated else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(env),
        cwd=cwd,
        limit=1024 * 1024,
    )
    proc = Proc(name, process)
    STARTED.append(proc)
    return proc


async def release(procs: Sequence[Proc]) -> None:
    """Let gated programs (all already up: see :data:`GATE_UP_RE`) run, as close to
    together as the pipes allow."""
    for proc in procs:
        assert proc.process.stdin is not None, f"{proc.name} is not gated"
        proc.process.stdin.write(b"go\n")
    for proc in procs:
        stdin = proc.process.stdin
        assert stdin is not None
        with contextlib.suppress(ConnectionError):  # a program that died is reported later
            await stdin.drain()
        stdin.close()


def server_config(
    tmp_path: Path,
    ports: Sequence[int | str],
    clients: Mapping[str, Mapping[str, Any]] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A relay config with fast heartbeats; ``clients`` defaults to unrestricted alpha and beta."""
    if clients is None:
        clients = {"alpha": {"token": ALPHA_TOKEN}, "beta": {"token": BETA_TOKEN}}
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "path": "/tunnel",
        "public_host": "127.0.0.1",
        "ports": list(ports),
        "state_dir": str(tmp_path / "state"),
        "heartbeat_interval": 1,
        "heartbeat_timeout": 3,
        "tls": "auto" if VARIANT.tls else "off",  # the variant decides; see Variant
        "clients": {name: dict(spec) for name, spec in clients.items()},
    }
    config.update(overrides)
    return config


def write_config(tmp_path: Path, config: Mapping[str, Any], name: str = "server.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    return path


async def start_server(
    tmp_path: Path, config: Mapping[str, Any], name: str = "server.yaml",
    wrap: Sequence[str] = (),
) -> tuple[Proc, str]:
    """Write ``config`` to ``tmp_path/name``, start the relay, wait for its listening line.

    ``wrap`` prefixes the command, as in :func:`start_proc`."""
    path = write_config(tmp_path, config, name)
    proc = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)], cwd=tmp_path,
                            wrap=wrap)
    since = proc.mark()
    match = await proc.wait_for_line(LISTENING_RE, since=since)
    url = match["url"]
    if url.startswith("wss://"):
        PINS[url] = (await proc.wait_for_line(FINGERPRINT_RE, since=since))["fp"]
    return proc, url


async def start_client(
    url: str | None,
    token: str | None,
    exposes: Sequence[str],
    env: Mapping[str, str] | None = None,
    name: str = "tunnel-client",
    extra: Sequence[str] = (),
    gated: bool = False,
) -> Proc:
    """Start a client; ``url``/``token`` of None are left out (e.g. given through ``env``).

    ``extra`` are further command-line arguments (``--source-address 127.0.0.9``); a
    ``gated`` client waits for :func:`release` (see :func:`start_proc`)."""
    args: list[str] = list(extra)
    if url is not None:
        args += ["--server", url]
        if url in PINS:  # a relay this test started with TLS: pin its key, as users do
            args += ["--fingerprint", PINS[url]]
    if token is not None:
        args += ["--token", token]
    for spec in exposes:
        args += ["--expose", spec]
    return await start_proc(name, CLIENT_MODULE, args, env=env, gated=gated)


async def wait_tunnel(
    proc: Proc,
    local_target: str,
    *,
    mode: str | None = None,
    since: int = 0,
    server_host: str = "127.0.0.1",
    timeout: float = LINE_TIMEOUT,
) -> int:
    """Wait for ``LOCAL -> HOST:PORT (fixed|auto)`` for ``local_target``; return PORT."""
    pattern = (
        rf"(?:^|\s){re.escape(local_target)} -> (?P<host>[^\s:]+):(?P<port>\d+) "
        r"\((?P<mode>fixed|auto)\)\s*$"
    )
    match = await proc.wait_for_line(pattern, timeout, since=since)
    assert match["host"] == server_host, f"tunnel line names host {match['host']!r}"
    if mode is not None:
        assert match["mode"] == mode, f"expected a {mode} tunnel, got: {match.group(0)!r}"
    return int(match["port"])


async def start_tunnel(tmp_path: Path, target: str, **overrides: Any) -> tuple[Proc, Proc, int]:
    """A relay with one free public port and client alpha exposing ``target`` on it, live.

    Returns ``(relay, client, public port)``; ``overrides`` go into :func:`server_config`.
    """
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port], **overrides))
    client = await start_client(url, ALPHA_TOKEN, [f"{target}:fixed-{port}"])
    assert await wait_tunnel(client, target, mode="fixed") == port
    return relay, client, port


def client_source(index: int) -> list[str]:
    """Arguments giving client ``index`` its own loopback address (127.1.0.0/16).

    Real boxes reach a relay from their own addresses; 200 test clients all on 127.0.0.1
    would instead meet the per-address pre-auth cap (32), which is there for floods."""
    return ["--source-address", f"127.1.{index // 250}.{index % 250 + 1}"]


def url_port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, f"no port in {url!r}"
    return port
