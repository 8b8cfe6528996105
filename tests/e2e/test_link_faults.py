"""End-to-end tests of link faults and hostile peers, with the real programs on 127.0.0.1.

Faults come from :class:`FaultProxy` (a blackholed link keeps both sockets open, like a dead
NAT mapping) and from a raw WebSocket peer speaking the protocol by hand.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.faultproxy import FaultProxy
from tests.e2e.harness import (
    ALPHA_TOKEN,
    LISTENING_RE,
    SERVER_MODULE,
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
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    read_to_eof,
)
from tunnel.common import messages as msg
from tunnel.common.auth import client_proof, derive_key, new_nonce
from tunnel.common.frames import (
    MAX_MESSAGE_SIZE,
    Frame,
    FrameType,
    decode_frames,
    encode_frame,
)
from tunnel.common.secret import Secret
from tunnel.server.guard import MAX_VISITORS_PER_SOURCE

MIB = 1024 * 1024


def _control(message: dict[str, object]) -> bytes:
    payload = json.dumps(message).encode()
    return encode_frame(Frame(FrameType.CONTROL, payload=payload))


def _first_control(raw: bytes | str) -> dict[str, object]:
    assert isinstance(raw, bytes)
    (frame,) = decode_frames(raw)
    assert frame.type is FrameType.CONTROL
    result: dict[str, object] = json.loads(bytes(frame.payload))
    return result


async def _login(url: str, token: str) -> tuple[ClientConnection, bytes]:
    """Open a raw link and log in by hand; returns (websocket, the auth message sent)."""
    ws = await connect(url, compression=None, ping_interval=None, proxy=None)
    challenge = _first_control(await ws.recv())
    nonce = msg.b64decode(str(challenge["nonce"]), "nonce")
    client_nonce = new_nonce()
    proof = client_proof(derive_key(Secret(token)), nonce, client_nonce)
    auth = _control({"type": "auth", "nonce": msg.b64encode(client_nonce),
                     "proof": msg.b64encode(proof), "client_version": "raw-test"})
    await ws.send(auth)
    return ws, auth


async def test_stale_link_replaced_at_once(tmp_path: Path) -> None:
    """A half-open link (relay has not noticed yet) is replaced by a fresh login at once."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    # A long heartbeat timeout, so only the replacement rule can free the port quickly.
    config = server_config(tmp_path, [port], heartbeat_interval=10, heartbeat_timeout=60)
    _, url = await start_server(tmp_path, config)
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    try:
        via_proxy = url.replace(f":{url_port(url)}/", f":{proxy.port}/")
        first = await start_client(via_proxy, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(first, echo.target, mode="fixed") == port
        await echo_check(port, MIB)
        proxy.blackhole()
        await first.kill9()
        started = time.monotonic()
        second = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(second, echo.target, mode="fixed", timeout=10) == port
        assert time.monotonic() - started < 5.0
        await echo_check(port, MIB)
    finally:
        await proxy.close()


async def test_blackholed_link_detected_and_client_reconnects(tmp_path: Path) -> None:
    """Both ends notice a silent link within the heartbeat timeout; the client comes back."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=0.5, heartbeat_timeout=2)
    server, url = await start_server(tmp_path, config)
    proxy = FaultProxy(url_port(url))
    await proxy.start()
    try:
        via_proxy = url.replace(f":{url_port(url)}/", f":{proxy.port}/")
        client = await start_client(via_proxy, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
        assert await wait_tunnel(client, echo.target) == port
        mark_client = client.mark()
        err_client, err_server = len(client.stderr_lines), len(server.stderr_lines)
        proxy.blackhole()
        started = time.monotonic()
        await client.wait_for_line(r"silent for", timeout=6, since=err_client, stream="stderr")
        await server.wait_for_line(r"link of alpha silent for", timeout=6, since=err_server,
                                   stream="stderr")
        assert time.monotonic() - started < 2 + 0.5 + 1.5
        assert await wait_tunnel(client, echo.target, since=mark_client, timeout=10) == port
        await echo_check(port, MIB)
    finally:
        await proxy.close()


async def test_port_bound_by_other_program_refused(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
        client = await start_client(url, ALPHA_TOKEN, [f"127.0.0.1:9:fixed-{port}"])
        assert await client.wait_exit() == 3
        assert f"port {port}" in client.stderr
        assert "in use by another program" in client.stderr
    finally:
        squatter.close()


async def test_stock_asyncio_loop(tmp_path: Path) -> None:
    """Everything also runs without uvloop (TUNNEL_NO_UVLOOP=1) on both programs."""
    echo = EchoService()
    await echo.start()
    port, auto_port_hint = free_ports(2)
    config = server_config(tmp_path, [port, auto_port_hint])
    path = write_config(tmp_path, config)
    env = {"TUNNEL_NO_UVLOOP": "1"}
    server = await start_proc("tunnel-server", SERVER_MODULE, ["--config", str(path)], env=env)
    url = (await server.wait_for_line(LISTENING_RE))["url"]
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}", echo.target],
                                env=env)
    assert await wait_tunnel(client, echo.target, mode="fixed") == port
    auto = await wait_tunnel(client, echo.target, mode="auto", since=1)
    await asyncio.gather(echo_check(port, 4 * MIB, seed=3), echo_check(auto, 4 * MIB, seed=4))
    assert await client.terminate() == 0
    assert await server.terminate() == 0


async def test_bad_frame_closes_only_that_link(tmp_path: Path) -> None:
    """A malformed frame after login ends that link with a logged reason, not the relay."""
    echo = EchoService()
    await echo.start()
    bad_port, good_port = free_ports(2)
    server, url = await start_server(tmp_path, server_config(tmp_path, [bad_port, good_port]))
    good = await start_client(url, "beta-secret-token-00002", [f"{echo.target}:fixed-{good_port}"])
    assert await wait_tunnel(good, echo.target) == good_port
    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        welcome = _first_control(await ws.recv())
        assert welcome["type"] == "welcome"
        await ws.send(b"\x09" + b"\x00" * 11)  # version 9
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    finally:
        await ws.close()
    await server.wait_for_line(r"protocol error: unsupported protocol version 9", timeout=5,
                               stream="stderr")
    assert server.returncode is None
    await echo_check(good_port, MIB)


async def test_ping_flood_from_a_peer_that_never_reads_drops_only_that_link(
        tmp_path: Path) -> None:
    """Reliability B-7: replies we owe a flooding peer are capped; the relay stays healthy."""
    echo = EchoService()
    await echo.start()
    bad_port, good_port = free_ports(2)
    server, url = await start_server(tmp_path, server_config(tmp_path, [bad_port, good_port]))
    good = await start_client(url, "beta-secret-token-00002", [f"{echo.target}:fixed-{good_port}"])
    assert await wait_tunnel(good, echo.target) == good_port
    ws, _ = await _login(url, ALPHA_TOKEN)
    mark = len(server.stderr_lines)
    ping = encode_frame(Frame(FrameType.PING, value=7))
    burst = ping * (MAX_MESSAGE_SIZE // len(ping))
    try:
        assert _first_control(await ws.recv())["type"] == "welcome"
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(20):
                for _ in range(400):  # bounded: at most ~100 MB of pings, never reading
                    await ws.send(burst)
    finally:
        await ws.close()
    await server.wait_for_line(r"floods control frames|does not read", timeout=10,
                               since=mark, stream="stderr")
    assert server.returncode is None
    await echo_check(good_port, MIB)


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


async def test_streams_beyond_max_streams_are_refused_others_unharmed(tmp_path: Path) -> None:
    """F-5's rule at a small scale: the (N+1)th visitor is reset at once, not queued."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port], max_streams=2))
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    held = [await open_visitor(port) for _ in range(2)]
    try:
        for reader, writer in held:  # both streams really exist before the third arrives
            writer.write(b"ping")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert await assert_closed_quickly(port) in ("reset", "eof")
        reader, writer = held[0]
        writer.write(b"still")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"still"
        for reader, writer in held:  # finish both streams; EOF back means the relay freed them
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        for _, writer in held:
            await close_writer(writer)
    await echo_check(port, MIB)  # freed slots serve again


async def test_per_source_visitor_cap_resets_the_excess_and_spares_other_sources(
        tmp_path: Path) -> None:
    """Reliability B-9 at its stated size: 256 held connections from one address, the
    next one from that address is reset at once, another address is still served."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], max_streams=1000)
    _, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port

    async def visit(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))

    held = []
    try:
        # In batches of 32, each fully connected through to the service before the next:
        # the client refuses more than 64 local connects in flight (B-6), by design.
        for batch in range(MAX_VISITORS_PER_SOURCE // 32):
            held += [await visit("127.0.0.2") for _ in range(32)]
            for _ in range(200):
                if echo.connections >= (batch + 1) * 32:
                    break
                await asyncio.sleep(0.05)
            assert echo.connections == (batch + 1) * 32
        last_reader, last_writer = held[-1]  # the last admitted one really works
        last_writer.write(b"hello")
        await last_writer.drain()
        assert await asyncio.wait_for(last_reader.readexactly(5), 5) == b"hello"

        # The excess visitor is reset at once: during connect() already, or on first use.
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(1):
                reader, writer = await visit("127.0.0.2")
                try:
                    writer.write(b"x")
                    await writer.drain()
                    await reader.readexactly(1)
                finally:
                    await close_writer(writer)

        reader, writer = await visit("127.0.0.3")
        try:
            writer.write(b"other")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"other"
        finally:
            await close_writer(writer)
    finally:
        for _, writer in held:
            await close_writer(writer)
