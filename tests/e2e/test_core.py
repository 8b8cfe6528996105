"""End-to-end tests outside the reliability catalogue: the real relay and client
processes, real sockets on 127.0.0.1. Command-line and configuration behaviour, graceful
exit on a signal, auto ports across a relay restart, and regressions.

The old core tests that the catalogue now covers were merged into it (tests/e2e/
test_cat_*.py): bulk duplex digests into I-2, the client's kill -9 and restart into R-1,
another client's claim on a fixed port into R-6, a wrong token into R-8, S-1 and S-2, a
local target that is down then back into R-7; of the link-fault tests, a port held by
another program into B-12, a bad frame into B-3, and the stock asyncio loop into the
variant matrix every catalogue test runs on.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    ALPHA_TOKEN,
    EXIT_TIMEOUT,
    SERVER_MODULE,
    free_port_range,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    url_port,
    wait_tunnel,
    write_config,
)
from tests.e2e.services import (
    EchoService,
    HalfCloseService,
    close_writer,
    echo_check,
    open_visitor,
    read_exactly_digest,
    read_to_eof,
    send_pattern,
)


async def test_relay_restart_client_reconnects_same_ports(tmp_path: Path) -> None:
    fixed_service, auto_service = EchoService(), EchoService()
    await fixed_service.start()
    await auto_service.start()
    (fixed,) = free_ports(1)
    lo, hi = free_port_range(3)
    config = server_config(tmp_path, [fixed, f"{lo}-{hi}"])
    server, url = await start_server(tmp_path, config)
    client = await start_client(
        url, ALPHA_TOKEN, [f"{fixed_service.target}:fixed-{fixed}", f"{auto_service.target}:auto"]
    )
    assert await wait_tunnel(client, fixed_service.target, mode="fixed") == fixed
    auto = await wait_tunnel(client, auto_service.target, mode="auto")
    assert lo <= auto <= hi
    await echo_check(fixed, seed=21)
    await echo_check(auto, seed=22)

    assert await server.terminate() == 0
    mark = client.mark()
    restart_config = {**config, "listen": f"127.0.0.1:{url_port(url)}"}
    _, url2 = await start_server(tmp_path, restart_config)
    assert url2 == url

    assert await wait_tunnel(client, fixed_service.target, mode="fixed", since=mark) == fixed
    assert await wait_tunnel(client, auto_service.target, mode="auto", since=mark) == auto
    await echo_check(fixed, seed=23)
    await echo_check(auto, seed=24)
    assert client.returncode is None
    assert (fixed_service.connections, auto_service.connections) == (2, 2)


async def test_client_connects_from_its_source_address(tmp_path: Path) -> None:
    """``--source-address`` picks the link's local address (frp's connectServerLocalIP):
    the relay sees the client coming from 127.0.0.9, and the tunnel carries bytes."""
    service = EchoService()
    await service.start()
    (port,) = free_ports(1)
    relay, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    client = await start_client(url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"],
                                extra=["--source-address", "127.0.0.9"])
    assert await wait_tunnel(client, service.target, mode="fixed") == port
    await relay.wait_for_line(r"client alpha online from 127\.0\.0\.9 ", stream="stderr")
    await echo_check(port, seed=9)


async def test_client_reads_server_and_token_from_env(tmp_path: Path) -> None:
    service = EchoService()
    await service.start()
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    env = {"TUNNEL_SERVER": url, "TUNNEL_TOKEN": ALPHA_TOKEN}
    client = await start_client(None, None, [f"{service.target}:fixed-{port}"], env=env)
    assert await wait_tunnel(client, service.target, mode="fixed") == port
    await echo_check(port, seed=51)


@pytest.mark.parametrize("spec", ["8080:bogus", "notaport", "8080:fixed-abc", "1:2:3:4"])
async def test_bad_expose_spec_rejected_before_connecting(spec: str) -> None:
    fake_relay = EchoService()  # counts connections: there must be none
    await fake_relay.start()
    client = await start_client(f"ws://127.0.0.1:{fake_relay.port}/tunnel", ALPHA_TOKEN, [spec])
    assert await client.wait_exit() == 2, client.describe()
    assert "fixed-N" in client.stderr, client.describe()
    assert fake_relay.connections == 0


def _short_token(config: dict[str, Any]) -> None:
    config["clients"]["alpha"]["token"] = "short"


def _timeout_not_above_interval(config: dict[str, Any]) -> None:
    config["heartbeat_interval"] = 5
    config["heartbeat_timeout"] = 5


def _bad_ports(config: dict[str, Any]) -> None:
    config["ports"] = ["not-a-port"]


def _bad_listen(config: dict[str, Any]) -> None:
    config["listen"] = "no-port-here"


@pytest.mark.parametrize(
    ("mutate", "keys"),
    [
        (_short_token, ["alpha", "token"]),
        (_timeout_not_above_interval, ["heartbeat_timeout"]),
        (_bad_ports, ["ports"]),
        (_bad_listen, ["listen"]),
    ],
    ids=["short-token", "heartbeat", "ports", "listen"],
)
async def test_server_check_reports_file_and_key(
    tmp_path: Path, mutate: Any, keys: list[str]
) -> None:
    (port,) = free_ports(1)
    good = server_config(tmp_path, [port])
    good_path = write_config(tmp_path, good, "relay-good.yaml")
    check_good = await start_proc(
        "check-good", SERVER_MODULE, ["--config", str(good_path), "--check"]
    )
    assert await check_good.wait_exit() == 0, check_good.describe()

    bad = server_config(tmp_path, [port])
    mutate(bad)
    bad_path = write_config(tmp_path, bad, "relay-bad.yaml")
    check = await start_proc("check-bad", SERVER_MODULE, ["--config", str(bad_path), "--check"])
    assert await check.wait_exit() != 0, check.describe()
    run = await start_proc("run-bad", SERVER_MODULE, ["--config", str(bad_path)])
    assert await run.wait_exit() == 2, run.describe()
    for proc in (check, run):
        assert bad_path.name in proc.stderr, proc.describe()
        for key in keys:
            assert key in proc.stderr, proc.describe()
        assert "listening on" not in proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_graceful_exit_zero(tmp_path: Path, sig: signal.Signals) -> None:
    service = EchoService()
    await service.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    client = await start_client(url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"])
    assert await wait_tunnel(client, service.target, mode="fixed") == port

    reader, writer = await open_visitor(port)  # a live forwarded connection during shutdown
    try:
        sent = await send_pattern(writer, 61, 64 * 1024)
        assert await asyncio.wait_for(read_exactly_digest(reader, 64 * 1024), 10) == (
            64 * 1024,
            sent,
        )
        assert await client.terminate(sig) == 0, client.describe()
        # The owner left: the visitor's connection must end, not hang.
        try:
            rest = await asyncio.wait_for(reader.read(65536), EXIT_TIMEOUT)
        except ConnectionResetError:
            rest = b""
        assert rest == b""
    finally:
        await close_writer(writer)

    assert await server.terminate(sig) == 0, server.describe()


async def test_bytes_that_arrive_before_the_local_dial_are_credited_at_once(
        tmp_path: Path) -> None:
    """Regression: credit for data buffered while the client dialled its target was queued
    without waking the writer, so an upload stalled until some unrelated frame (a ping,
    telemetry) went out. With heartbeats and telemetry far apart, a stall is a hang."""
    service = HalfCloseService(reply_size=64, reply_seed=3)  # silent until the upload ends
    await service.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=30, heartbeat_timeout=90)
    _, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"],
                                env={"TUNNEL_TELEMETRY_INTERVAL": "3600"})
    assert await wait_tunnel(client, service.target) == port
    payload = bytes(range(256)) * 4096  # 1 MiB written at once: the first window races the dial
    for _ in range(30):
        async with asyncio.timeout(10):
            reader, writer = await open_visitor(port)
            try:
                writer.write(payload)
                writer.write_eof()
                got_len, _ = await read_to_eof(reader, 64)
            finally:
                await close_writer(writer)
        assert got_len == 64
    assert [r.received_len for r in service.results] == [len(payload)] * 30
