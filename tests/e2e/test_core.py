"""End-to-end tests: the real relay and client processes, real sockets on 127.0.0.1.

Every byte that crosses a tunnel is checked with SHA-256 on both ends. Set
``TUNNEL_E2E_SCALE`` (e.g. ``0.125``) to shrink the bulk-transfer test; the default is the
full 32 MiB per direction per stream.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
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
    DuplexDigestService,
    EchoService,
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    read_exactly_digest,
    send_pattern,
)

MIB = 1024 * 1024
SCALE = float(os.environ.get("TUNNEL_E2E_SCALE", "1"))


@pytest.mark.timeout(300)
async def test_16_streams_32mib_each_way_sha256(tmp_path: Path) -> None:
    size = max(1, int(32 * MIB * SCALE))
    streams = 16
    service = DuplexDigestService()
    await service.start()
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    client = await start_client(url, ALPHA_TOKEN, [f"{service.target}:fixed-{port}"])
    assert await wait_tunnel(client, service.target, mode="fixed") == port

    async with asyncio.timeout(280):
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            tasks = [
                group.create_task(DuplexDigestService.visit(port, i, size, size))
                for i in range(streams)
            ]
    results = [task.result() for task in tasks]

    assert service.errors == []
    assert sorted(service.results) == list(range(streams))
    for conn_id, (visitor_sent, visitor_got_len, visitor_got) in enumerate(results):
        at_service = service.results[conn_id]
        assert at_service.received_len == size, f"stream {conn_id}: upload truncated"
        assert at_service.received_digest == visitor_sent, f"stream {conn_id}: upload corrupt"
        assert visitor_got_len == size, f"stream {conn_id}: reply truncated"
        assert visitor_got == at_service.sent_digest, f"stream {conn_id}: reply corrupt"
    assert client.returncode is None


async def test_kill9_client_restart_same_fixed_port_within_5s(tmp_path: Path) -> None:
    service = EchoService()
    await service.start()
    (port,) = free_ports(1)
    clients: dict[str, dict[str, Any]] = {
        "alpha": {"token": ALPHA_TOKEN, "ports": [port]},
        "beta": {"token": BETA_TOKEN},
    }
    _, url = await start_server(tmp_path, server_config(tmp_path, [port], clients))
    spec = f"{service.target}:fixed-{port}"
    first = await start_client(url, ALPHA_TOKEN, [spec], name="alpha-1")
    assert await wait_tunnel(first, service.target, mode="fixed") == port
    await echo_check(port, seed=11)

    assert await first.kill9() == -signal.SIGKILL
    # Owner offline: the relay keeps the leased port bound and drops visitors at once.
    assert await assert_closed_quickly(port, within=1.0) in ("eof", "reset")
    assert service.connections == 1

    second = await start_client(url, ALPHA_TOKEN, [spec], name="alpha-2")
    assert await wait_tunnel(second, service.target, mode="fixed", timeout=5.0) == port
    await echo_check(port, seed=12)
    assert service.connections == 2


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


async def test_other_client_cannot_take_fixed_port(tmp_path: Path) -> None:
    alpha_service, beta_service = EchoService(), EchoService()
    await alpha_service.start()
    await beta_service.start()
    port, spare = free_ports(2)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port, spare]))
    alpha = await start_client(url, ALPHA_TOKEN, [f"{alpha_service.target}:fixed-{port}"])
    assert await wait_tunnel(alpha, alpha_service.target, mode="fixed") == port

    beta_spec = f"{beta_service.target}:fixed-{port}"
    beta = await start_client(url, BETA_TOKEN, [beta_spec], name="beta-1")
    assert await beta.wait_exit() == 3, beta.describe()
    assert re.search(rf"port {port} refused", beta.stderr), beta.describe()
    await echo_check(port, seed=31)
    assert alpha_service.connections == 1

    await alpha.kill9()
    beta_again = await start_client(url, BETA_TOKEN, [beta_spec], name="beta-2")
    assert await beta_again.wait_exit() == 3, beta_again.describe()
    assert re.search(rf"port {port} refused", beta_again.stderr), beta_again.describe()
    assert await assert_closed_quickly(port) in ("eof", "reset")
    assert beta_service.connections == 0
    assert alpha_service.connections == 1


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


async def test_wrong_token_refused_exits_nonzero(tmp_path: Path) -> None:
    service = EchoService()
    await service.start()
    (port,) = free_ports(1)
    clients = {"alpha": {"token": ALPHA_TOKEN}}
    server, url = await start_server(tmp_path, server_config(tmp_path, [port], clients))
    wrong = "wrong-token-zq-0123456789abcdef"
    client = await start_client(url, wrong, [f"{service.target}:fixed-{port}"])

    assert await client.wait_exit() == 3, client.describe()
    assert "authentication failed" in client.stderr.lower(), client.describe()
    assert wrong not in client.stderr and wrong not in client.stdout
    await assert_closed_quickly(port)  # refused, or accepted and dropped: nothing exposed
    assert service.connections == 0

    assert await server.terminate() == 0
    assert wrong not in server.stderr and wrong not in server.stdout


async def test_local_target_down_then_back(tmp_path: Path) -> None:
    relay_port, local_port = free_ports(2)  # nothing listens on local_port yet
    _, url = await start_server(tmp_path, server_config(tmp_path, [relay_port]))
    target = f"127.0.0.1:{local_port}"
    client = await start_client(url, ALPHA_TOKEN, [target])
    public = await wait_tunnel(client, target, mode="auto")
    assert public == relay_port

    assert await assert_closed_quickly(public, within=1.0) in ("eof", "reset")
    assert client.returncode is None

    service = EchoService()
    await service.start(local_port)
    await echo_check(public, seed=41)
    assert service.connections == 1
    assert client.returncode is None


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
