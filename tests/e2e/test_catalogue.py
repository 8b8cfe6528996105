"""Acceptance tests from the reliability catalogue (../shared/design/reliability.md), by id.

Only the ones built so far; the rest of the catalogue is open work (issue #6).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import (
    ALPHA_TOKEN,
    CLIENT_MODULE,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    start_tunnel,
    wait_tunnel,
)
from tests.e2e.services import (
    EchoService,
    TcpService,
    assert_closed_quickly,
    close_writer,
    echo_check,
    open_visitor,
    pattern_digest,
    read_exactly_digest,
    read_to_eof,
    send_pattern,
)
from tests.e2e.test_link_faults import _first_control, _login
from tunnel.client.dialer import DIAL_TIMEOUT
from tunnel.common.frames import HEADER, MAX_MESSAGE_SIZE, PROTOCOL_VERSION, FrameType
from tunnel.server.control import PRE_AUTH_MAX_MESSAGE

MIB = 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class ResettingService(TcpService):
    """Sends ``before`` bytes of a 20 MiB reply, then resets the connection (SO_LINGER 0)."""

    def __init__(self, before: int) -> None:
        super().__init__()
        self.before = before

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_pattern(writer, 7, self.before)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.transport.abort()


async def test_I7_abort_is_not_eof(tmp_path: Path) -> None:
    """The local service resets after 5 MiB of a 20 MiB transfer: the visitor sees a reset
    (an error), never a clean end of file, within 1 s of the abort."""
    service = ResettingService(before=5 * MIB)
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    reader, writer = await open_visitor(port)
    received = 0
    outcome = "still open"
    try:
        async with asyncio.timeout(20):
            while received < 20 * MIB:
                try:
                    data = await reader.read(256 * 1024)
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not data:
                    outcome = "clean EOF"
                    break
                received += len(data)
    finally:
        await close_writer(writer)
    assert outcome == "reset", f"visitor saw {outcome} after {received} bytes, not a reset"
    assert received <= 5 * MIB


async def test_R4_client_frozen_is_dropped_and_comes_back(tmp_path: Path) -> None:
    """SIGSTOP the client for 3 x the heartbeat timeout: the relay drops its session within
    H + T + 1 s; after SIGCONT the client logs in again by itself (never two sessions)."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], heartbeat_interval=1, heartbeat_timeout=2)
    server, url = await start_server(tmp_path, config)
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    mark_err, mark_out = len(server.stderr_lines), client.mark()

    client.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        await server.wait_for_line(r"client alpha offline", timeout=1 + 2 + 1 + 1,
                                   since=mark_err, stream="stderr")
        assert time.monotonic() - stopped <= 1 + 2 + 1 + 0.5
        await asyncio.sleep(max(0.0, 6 - (time.monotonic() - stopped)))  # frozen for 3 x T
    finally:
        client.send_signal(signal.SIGCONT)
    resumed = time.monotonic()
    assert await wait_tunnel(client, echo.target, since=mark_out, timeout=10) == port
    assert time.monotonic() - resumed <= 2 + 1  # notices and logs in again within ~2 s
    await echo_check(port, MIB)
    logins = [line for line in server.stderr_lines[mark_err:] if "client alpha online" in line]
    assert len(logins) == 1


class OutcomeService(TcpService):
    """Reads until the connection ends and records how: "reset" or "clean EOF"."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: list[str] = []
        self.ended = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(1_000_000):
                if not await reader.read(256 * 1024):
                    self.outcomes.append("clean EOF")
                    break
        except ConnectionResetError:
            self.outcomes.append("reset")
        finally:
            self.ended.set()


async def test_I7_mirror_visitor_abort_reaches_the_service_as_a_reset(tmp_path: Path) -> None:
    service = OutcomeService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    _, writer = await open_visitor(port)
    await send_pattern(writer, 9, 5 * MIB)
    for _ in range(200):  # the stream is established at the service before the abort
        if service.connections:
            break
        await asyncio.sleep(0.05)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()
    await asyncio.wait_for(service.ended.wait(), 1.0)
    assert service.outcomes == ["reset"]


class SpeaksFirstService(TcpService):
    """Like an SSH server's banner: sends 2 MiB, closes its write half, then reads to EOF."""

    def __init__(self) -> None:
        super().__init__()
        self.received = -1

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await send_pattern(writer, 11, 2 * MIB)
        writer.write_eof()
        total = 0
        for _ in range(1_000_000):
            data = await reader.read(256 * 1024)
            if not data:
                break
            total += len(data)
        self.received = total
        writer.close()


async def test_I4b_local_side_half_closes_first(tmp_path: Path) -> None:
    """The mirror of the visitor half-close: the service finishes speaking first; the visitor
    reads all of it and EOF, then still sends its own 1 MiB, which the service receives."""
    service = SpeaksFirstService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)

    async with asyncio.timeout(30):
        reader, writer = await open_visitor(port)
        try:
            got, digest = await read_to_eof(reader, 2 * MIB)
            assert (got, digest) == (2 * MIB, pattern_digest(11, 2 * MIB))
            await send_pattern(writer, 12, MIB)
            writer.write_eof()
            assert await reader.read() == b""
        finally:
            await close_writer(writer)
        for _ in range(200):
            if service.received >= 0:
                break
            await asyncio.sleep(0.05)
    assert service.received == MIB


async def test_R1_kill9_client_mid_transfer_resets_visitors_and_keeps_the_port(
        tmp_path: Path) -> None:
    """Public streams get a reset within 1 s; the port stays bound and refuses at once; the
    restarted client serves it again."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    spec = [f"{echo.target}:fixed-{port}"]
    client = await start_client(url, ALPHA_TOKEN, spec)
    assert await wait_tunnel(client, echo.target) == port

    reader, writer = await open_visitor(port)
    try:
        await send_pattern(writer, 13, MIB)  # a transfer is running through the tunnel
        await reader.readexactly(1024)
        await client.kill9()
        killed = time.monotonic()
        outcome = "open"
        async with asyncio.timeout(1.0):
            for _ in range(100_000):
                try:
                    if not await reader.read(256 * 1024):
                        outcome = "clean EOF"
                        break
                except ConnectionResetError:
                    outcome = "reset"
                    break
        assert outcome == "reset" and time.monotonic() - killed < 1.0
    finally:
        await close_writer(writer)
    assert await assert_closed_quickly(port) in ("reset", "eof", "refused")
    restarted = await start_client(url, ALPHA_TOKEN, spec)
    assert await wait_tunnel(restarted, echo.target, timeout=3 + 2) == port
    await echo_check(port, MIB)


async def test_B2_oversized_messages_close_the_link_not_the_relay(tmp_path: Path) -> None:
    """A WebSocket message one byte over the cap (before and after login) closes that link
    with 1009; a mux header claiming 4 GiB is a protocol error; the relay keeps serving."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))

    async with connect(url, compression=None, ping_interval=None, proxy=None,
                       max_size=None) as raw:
        await raw.recv()  # challenge
        await raw.send(bytes(PRE_AUTH_MAX_MESSAGE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                await raw.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        assert _first_control(await ws.recv())["type"] == "welcome"
        await ws.send(bytes(MAX_MESSAGE_SIZE + 1))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        await ws.close()

    ws, _ = await _login(url, ALPHA_TOKEN)
    try:
        assert _first_control(await ws.recv())["type"] == "welcome"
        claim_4gib = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, 0, 1, 0xFFFFFFFF)
        await ws.send(claim_4gib)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(2):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
    finally:
        await ws.close()

    assert server.returncode is None
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    await echo_check(port, MIB)


class ConnectEofService(TcpService):
    """Records, per connection, the seconds from connect to EOF (or "reset")."""

    def __init__(self) -> None:
        super().__init__()
        self.results: list[float | str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = time.monotonic()
        try:
            data = await reader.read(1)
            self.results.append(time.monotonic() - start if data == b"" else "data")
        except ConnectionResetError:
            self.results.append("reset")
        writer.close()


async def test_I5_empty_streams(tmp_path: Path) -> None:
    """Connect-then-close cycles with no data: the local service sees a connect and a clean
    EOF within 1 s each (200 cycles here; the catalogue asks for 1000)."""
    cycles = 200
    service = ConnectEofService()
    await service.start()
    _, _, port = await start_tunnel(tmp_path, service.target)
    # In batches of 32 (the client allows 64 local connects in flight, by design, B-6).
    for batch in range(cycles // 32 + 1):
        for _ in range(min(32, cycles - batch * 32)):
            _, writer = await open_visitor(port)
            writer.write_eof()
            await close_writer(writer)
        for _ in range(200):  # bounded wait for the batch to reach the service
            if len(service.results) >= min(cycles, (batch + 1) * 32):
                break
            await asyncio.sleep(0.05)
    assert len(service.results) == cycles
    assert all(isinstance(r, float) and r < 1.0 for r in service.results), service.results[:10]


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_R9_session_churn_leaves_nothing_behind(tmp_path: Path) -> None:
    """Connect, authenticate and disconnect many times (some without a close handshake):
    the relay's file descriptors return to their baseline and memory stays flat
    (200 cycles here, 20 of them half-open; the catalogue asks for 1000)."""
    (port,) = free_ports(1)
    server, url = await start_server(tmp_path, server_config(tmp_path, [port]))

    async def cycle(polite: bool) -> None:
        ws, _ = await _login(url, ALPHA_TOKEN)
        assert _first_control(await ws.recv())["type"] == "welcome"
        if polite:
            await ws.close()
        else:
            ws.transport.abort()  # no close frame: the relay must notice the dead socket

    for i in range(20):  # warm-up, so lazily created state is in the baseline
        await cycle(polite=i % 2 == 0)
    await asyncio.sleep(0.5)
    fds, rss = _fds(server.pid), _rss_kib(server.pid)
    for i in range(200):
        await cycle(polite=i % 10 != 0)
    for _ in range(100):  # bounded: the last closes are processed asynchronously
        if _fds(server.pid) <= fds + 2:
            break
        await asyncio.sleep(0.05)
    assert _fds(server.pid) <= fds + 2
    assert _rss_kib(server.pid) - rss < 8 * 1024  # "leak-free": < 8 MiB growth
    assert server.returncode is None


def _secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, raw.hex(), base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("=")]


async def test_S2_no_secret_in_debug_logs_from_any_source(tmp_path: Path) -> None:
    """The token given by flag, environment and file each works, a wrong one is refused, and
    no program output at DEBUG contains the token in raw, hex or base64 form."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], log_level="debug")
    server, url = await start_server(tmp_path, config)
    token_file = tmp_path / "client.yaml"
    token_file.write_text(f"server: {url}\ntoken: {ALPHA_TOKEN}\n", encoding="utf-8")
    token_file.chmod(0o600)
    spec = [f"{echo.target}:fixed-{port}"]
    runs = [
        (["--server", url, "--token", ALPHA_TOKEN], {}),
        (["--server", url], {"TUNNEL_TOKEN": ALPHA_TOKEN}),
        (["--config", str(token_file)], {}),
    ]
    outputs: list[str] = []
    for args, env in runs:
        client = await start_proc("tunnel-client", CLIENT_MODULE,
                                  [*args, "--log-level", "debug",
                                   *[a for s in spec for a in ("--expose", s)]], env=env)
        assert await wait_tunnel(client, echo.target) == port
        await echo_check(port, 64 * 1024)
        assert await client.terminate() == 0
        outputs.append(client.stdout + client.stderr)
    wrong = await start_proc("tunnel-client", CLIENT_MODULE,
                             ["--server", url, "--log-level", "debug", "--expose", spec[0]],
                             env={"TUNNEL_TOKEN": "not-the-alpha-token-0000"})
    assert await wrong.wait_exit() == 3
    outputs.append(wrong.stdout + wrong.stderr)
    outputs.append(server.stdout + server.stderr)
    for form in _secret_forms(ALPHA_TOKEN) + _secret_forms("not-the-alpha-token-0000"):
        for text in outputs:
            assert form not in text, "a secret reached a log"


async def test_R7_blackholed_target_times_out_then_resets_and_logs_once(
        tmp_path: Path) -> None:
    """A local target that swallows SYNs (a listener whose queue is full and never
    accepts): the visitor gets a reset when the 10 s dial timeout ends, not a hang, and the
    client logs the failure once per 10 s per target, not per visitor."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    target_port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs are dropped by the kernel
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", target_port))
            fillers.append(filler)
        (port,) = free_ports(1)
        _, url = await start_server(tmp_path, server_config(tmp_path, [port]))
        client = await start_client(url, ALPHA_TOKEN, [f"127.0.0.1:{target_port}:fixed-{port}"])
        assert await wait_tunnel(client, f"127.0.0.1:{target_port}") == port

        visitors = [await open_visitor(port) for _ in range(3)]
        started = time.monotonic()
        outcomes = []
        for reader, writer in visitors:
            try:
                async with asyncio.timeout(DIAL_TIMEOUT + 3):
                    data = await reader.read(1)
                outcomes.append("eof" if data == b"" else "data")
            except ConnectionResetError:
                outcomes.append("reset")
            finally:
                await close_writer(writer)
        elapsed = time.monotonic() - started
        assert outcomes == ["reset"] * 3
        assert DIAL_TIMEOUT - 1 <= elapsed <= DIAL_TIMEOUT + 3
        unreachable = [line for line in client.stderr_lines if "unreachable" in line]
        assert len(unreachable) == 1, unreachable
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


@pytest.mark.parametrize("nodelay", [True, False])
async def test_I3_write_size_fuzz(tmp_path: Path, nodelay: bool) -> None:
    """Writes of 0, 1, 2, 1460, 16 KiB-1, 64 KiB+1 and 8 MiB bytes, and one 64 MiB write
    (far above the link's message size), arrive byte-exact through an echo."""
    echo = EchoService()
    await echo.start()
    _, _, port = await start_tunnel(tmp_path, echo.target)

    rng = random.Random(1234 + nodelay)
    sizes = [0, 1, 2, 1460, 16 * 1024 - 1, 64 * 1024 + 1, 8 * MIB]
    pieces = [rng.randbytes(size) for size in rng.choices(sizes, k=40)]
    pieces.append(rng.randbytes(64 * MIB))
    total = sum(len(p) for p in pieces)
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()

    async with asyncio.timeout(120):
        reader, writer = await open_visitor(port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(nodelay))

        async def send() -> None:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()

        try:
            _, (got_len, got) = await asyncio.gather(send(), read_exactly_digest(reader, total))
        finally:
            await close_writer(writer)
    assert got_len == total
    assert got == expected


async def test_I6_no_cross_talk_between_concurrent_streams(tmp_path: Path) -> None:
    """200 streams at once (opened in batches: the client allows 64 connects in flight);
    every 4 KiB block carries its stream number and sequence number, and every stream gets
    exactly its own blocks back, in order (the catalogue asks for 500)."""
    streams, blocks, size = 200, 32, 4096
    echo = EchoService()
    await echo.start()
    _, _, port = await start_tunnel(tmp_path, echo.target)

    visitors: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for batch in range(0, streams, 32):
            visitors += [await open_visitor(port) for _ in range(min(32, streams - batch))]
            for _ in range(200):
                if echo.connections >= len(visitors):
                    break
                await asyncio.sleep(0.05)
            assert echo.connections == len(visitors)

        def block(stream: int, seq: int) -> bytes:
            head = struct.pack("!II", stream, seq)
            return head + bytes([stream % 251]) * (size - len(head))

        async def run(stream: int) -> None:
            reader, writer = visitors[stream]

            async def send() -> None:
                for seq in range(blocks):
                    writer.write(block(stream, seq))
                    await writer.drain()

            async def check() -> None:
                for seq in range(blocks):
                    got = await reader.readexactly(size)
                    assert struct.unpack("!II", got[:8]) == (stream, seq), "cross-talk"
                    assert got == block(stream, seq)

            await asyncio.gather(send(), check())

        async with asyncio.timeout(60):
            await asyncio.gather(*(run(i) for i in range(streams)))
    finally:
        for _, writer in visitors:
            await close_writer(writer)
