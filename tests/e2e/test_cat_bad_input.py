"""Reliability catalogue (docs/reliability.md §2), section (d) bad input, by id.

B-1, B-2, B-3, B-4, B-5, B-7 and I-5 (zero-length frames) live here; the live fuzzer is in
tests/e2e/livefuzz.py. Hostile peers are raw WebSocket clients speaking the protocol by hand
(tests/e2e/rawpeer.py) against the real relay; a real client on another link proves that
only the offending link is closed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.dashboard.client import basic, request
from tests.e2e.conftest import Size
from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    Proc,
    Variant,
    free_ports,
    server_config,
    start_client,
    start_server,
    wait_tunnel,
)
from tests.e2e.livefuzz import LiveFuzzer
from tests.e2e.procstats import fd_count, rss_kib
from tests.e2e.rawpeer import (
    OP_BINARY,
    OP_PING,
    RawWs,
    WsClosed,
    control,
    expect_closed,
    first_control,
    login,
    read_frames_until,
    round_trip_ping,
)
from tests.e2e.services import EchoService, close_writer, echo_check, open_visitor
from tests.unit.test_frames import hostile_messages, valid_frames
from tests.unit.test_mux import MuxPairMachine, raw_open
from tunnel.common.aio.link import LINK_WRITE_BUFFER_LIMIT
from tunnel.common.errors import FrameError, RemoteProtocolError
from tunnel.common.proto import messages as msg
from tunnel.common.proto.frames import (
    HEADER,
    MAX_DATA_PAYLOAD,
    MAX_MESSAGE_SIZE,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    Frame,
    FrameType,
    decode_frames,
    encode_data,
    encode_frame,
)
from tunnel.common.proto.mux import (
    INITIAL_WINDOW,
    MAX_CONTROL_BURST,
    MAX_EMPTY_DATA_PER_SECOND,
    MAX_STRAY_DATA_PER_MINUTE,
    Mux,
    ResetCode,
    Role,
)
from tunnel.server.control import PRE_AUTH_MAX_MESSAGE

MIB = 1024 * 1024
KIB = 1024
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_TOO_BIG = 1009
DASHBOARD_RE = r"^tunnel-server: dashboard on (?P<url>http://\S+)$"
PASSWORD = "bad-input-dashboard-pw"
_LINGER_RESET = struct.pack("ii", 1, 0)
_TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- helpers


@dataclass
class Relay:
    """The relay under attack, its dashboard (for counters) and a good client's tunnel."""

    proc: Proc
    url: str
    dash_port: int
    raw_port: int  # a port the raw peer may claim
    good_port: int  # beta's tunnel to an echo service: must keep working

    async def status(self) -> dict[str, Any]:
        reply = await request(self.dash_port, "GET", "/api/status",
                              auth=basic("admin", PASSWORD))
        assert reply.status == 200, reply
        result: dict[str, Any] = reply.json()
        return result

    async def metrics(self) -> str:
        reply = await request(self.dash_port, "GET", "/metrics", auth=basic("admin", PASSWORD))
        assert reply.status == 200, reply
        return reply.text

    async def wait_counter(self, name: str, want: Callable[[int], bool]) -> int:
        """Counters move when a link ends: poll the API (bounded) until ``want`` holds."""
        value = -1
        for _ in range(100):
            value = int((await self.status())[name])
            if want(value):
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} stayed at {value}")


async def start_relay(tmp_path: Path, **overrides: Any) -> Relay:
    """A relay with a dashboard, a long heartbeat timeout (raw peers do not answer pings
    at once) and beta online through a real client, its tunnel checked end to end."""
    echo = EchoService()
    await echo.start()
    raw_port, good_port = free_ports(2)
    options: dict[str, Any] = {"heartbeat_interval": 1, "heartbeat_timeout": 30,
                               "dashboard": {"listen": "127.0.0.1:0", "username": "admin",
                                             "password": PASSWORD}}
    options.update(overrides)
    proc, url = await start_server(tmp_path, server_config(tmp_path, [raw_port, good_port],
                                                           **options))
    dash = await proc.wait_for_line(DASHBOARD_RE)
    dash_port = int(dash["url"].rsplit(":", 1)[1].strip("/"))
    good = await start_client(url, BETA_TOKEN, [f"{echo.target}:fixed-{good_port}"])
    assert await wait_tunnel(good, echo.target) == good_port
    await echo_check(good_port, 64 * KIB)
    return Relay(proc, url, dash_port, raw_port, good_port)


async def good_client_unharmed(relay: Relay) -> None:
    """The relay process lives, beta's link is the same one (no re-login) and carries bytes."""
    assert relay.proc.returncode is None
    await echo_check(relay.good_port, MIB)
    clients = {c["name"]: c for c in await _clients(relay)}
    assert clients["beta"]["online"] and clients["beta"]["logins"] == 1


async def _clients(relay: Relay) -> list[dict[str, Any]]:
    reply = await request(relay.dash_port, "GET", "/api/clients", auth=basic("admin", PASSWORD))
    assert reply.status == 200, reply
    result: list[dict[str, Any]] = reply.json()
    return result


async def raw_session(relay: Relay) -> ClientConnection:
    """A raw peer logged in as alpha (welcome read)."""
    ws, _ = await login(relay.url, ALPHA_TOKEN, max_size=None)
    assert first_control(await ws.recv())["type"] == "welcome"
    return ws


async def raw_expose(relay: Relay) -> ClientConnection:
    """A raw alpha peer that claimed ``relay.raw_port`` (the relay confirmed it)."""
    ws = await raw_session(relay)
    await ws.send(control({"type": "expose", "id": 0, "target": "127.0.0.1:9",
                           "mode": "fixed", "port": relay.raw_port}))
    reply, _ = await read_frames_until(ws, FrameType.CONTROL, 0, timeout=5)
    assert b'"exposed"' in bytes(reply.payload), reply
    return ws


async def raw_visitor_socket(relay: Relay, rcvbuf: int) -> socket.socket:
    """A non-blocking visitor socket with a small receive buffer, connected to the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.raw_port))
    return sock


async def raw_stream(relay: Relay, rcvbuf: int | None = None) -> tuple[
        ClientConnection, int, asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw alpha peer that claimed ``relay.raw_port``, and one visitor on it: the OPEN of
    that visitor's stream has arrived. Returns (link, stream id, visitor reader, writer)."""
    ws = await raw_expose(relay)
    if rcvbuf is None:
        reader, writer = await open_visitor(relay.raw_port)
    else:
        sock = await raw_visitor_socket(relay, rcvbuf)
        reader, writer = await asyncio.open_connection(sock=sock)
    opened, _ = await read_frames_until(ws, FrameType.OPEN, _next_odd(), timeout=5)
    return ws, opened.stream_id, reader, writer


def _next_odd() -> int:
    return 1  # each raw session is a fresh link: its first stream is 1


async def visitor_outcome(reader: asyncio.StreamReader, timeout: float = 5.0,
                          drain: bool = False) -> str:
    """How a visitor's socket ends: "reset", "eof", "timeout", or "data" if bytes came
    (with ``drain``, bytes already on their way are read past)."""
    try:
        async with asyncio.timeout(timeout):
            for _ in range(100_000):
                data = await reader.read(MIB)
                if not data:
                    return "eof"
                if not drain:
                    return "data"
            return "data"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "timeout"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


async def send_and_time_close(ws: ClientConnection, message: bytes | str) -> tuple[int | None,
                                                                                  float]:
    """Send one message; return (close code the relay sent, seconds until it came)."""
    started = time.monotonic()
    await ws.send(message)
    code = await expect_closed(ws, timeout=5)
    return code, time.monotonic() - started


def frame_header(version: int = PROTOCOL_VERSION, ftype: int = FrameType.PING, flags: int = 0,
                 stream_id: int = 0, length: int = 0) -> bytes:
    return HEADER.pack(version, ftype, flags, stream_id, length)


# ----------------------------------------------------------------------------- B-1


@pytest.mark.timeout(1800)
def test_B1_codec_round_trips_and_rejects_garbage_only_with_frame_error(size: Size) -> None:
    """Encode then decode round-trips; arbitrary and mutated bytes either decode to frames
    that re-encode to the same bytes or raise FrameError, nothing else (10^5 examples in
    the full size). Atheris at night is outside this suite."""
    examples = size.pick(1_000, 100_000)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(valid_frames(), min_size=1, max_size=4))
    def round_trip(frames: list[Frame]) -> None:
        message = b"".join(encode_frame(f) for f in frames)
        assert b"".join(encode_frame(f) for f in decode_frames(message)) == message

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(hostile_messages(), st.binary(max_size=4096)))
    def garbage(message: bytes) -> None:
        try:
            frames = decode_frames(message)
        except FrameError:
            return
        assert b"".join(encode_frame(f) for f in frames) == message

    round_trip()
    garbage()


@pytest.mark.timeout(1800)
def test_B1_two_mux_state_machine_keeps_windows_and_bytes(size: Size) -> None:
    """Open, data, window, FIN and RST at random between a relay and a client mux: windows
    stay in 0..W, delivered bytes equal sent bytes in order, no exception escapes (every
    rule and invariant of tests/unit/test_mux.py::MuxPairMachine)."""
    run_state_machine_as_test(MuxPairMachine, settings=settings(
        max_examples=size.pick(150, 10_000), stateful_step_count=40, deadline=None,
        database=None, suppress_health_check=list(HealthCheck)))


@pytest.mark.timeout(1800)
def test_B1_mux_fed_hostile_messages_raises_only_protocol_errors(size: Size) -> None:
    """Either side's mux, with live streams, fed mutated and random messages: events or a
    RemoteProtocolError (the documented error, which closes the link), never another
    exception; windows stay within 0..2^31-1."""

    @settings(max_examples=size.pick(1_000, 100_000), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(Role), st.lists(st.one_of(hostile_messages(),
                                                     st.binary(min_size=12, max_size=64)),
                                           min_size=1, max_size=6))
    def feed(role: Role, messages: list[bytes]) -> None:
        mux = Mux(role)
        if role is Role.CLIENT:
            mux.receive(raw_open(1) + raw_open(3))
        else:
            mux.open_stream(0, "a")
            mux.open_stream(0, "b")
        for message in messages:
            try:
                mux.receive(message)
            except RemoteProtocolError:
                return
            for sid in (1, 3):
                assert 0 <= mux.send_window(sid) <= MAX_WINDOW
            while mux.next_message() is not None:
                pass

    feed()


# ----------------------------------------------------------------------------- B-2


async def test_B2_oversized_messages_close_the_link_not_the_relay(
        tmp_path: Path, variant: Variant) -> None:
    """A WebSocket message one byte over the cap (before and after login) closes that link
    with 1009; a mux header claiming 4 GiB is a protocol error (1002); a WebSocket frame
    header claiming 2^63 - 1 bytes (the largest legal claim) is refused from its header,
    before and after login. Nothing big is allocated: RSS grows by < 2 MiB; the relay and
    its other link keep serving."""
    relay = await start_relay(tmp_path)
    ws = await raw_session(relay)  # warm-up: a first raw login allocates its code paths
    await ws.close()
    rss_before = rss_kib(relay.proc.pid)

    raw = await RawWs.open(relay.url)
    await raw.recv_binary()  # challenge
    await raw.send_binary(bytes(PRE_AUTH_MAX_MESSAGE + 1))
    with pytest.raises(WsClosed) as closed:
        async with asyncio.timeout(2):
            await raw.recv_binary()
    assert closed.value.code == CLOSE_TOO_BIG
    await raw.close()

    ws = await raw_session(relay)
    code, _ = await send_and_time_close(ws, bytes(MAX_MESSAGE_SIZE + 1))
    assert code == CLOSE_TOO_BIG

    ws = await raw_session(relay)
    claim_4gib = HEADER.pack(PROTOCOL_VERSION, FrameType.DATA, 0, 1, 0xFFFFFFFF)
    code, _ = await send_and_time_close(ws, claim_4gib)
    assert code == CLOSE_PROTOCOL_ERROR

    for logged_in in (False, True):
        raw = await RawWs.open(relay.url)
        if logged_in:
            assert (await raw.login(ALPHA_TOKEN))["type"] == "welcome"
        else:
            await raw.recv_binary()
        await raw.send_raw(RawWs.frame(OP_BINARY, b"x" * 64, length=2**63 - 1))
        with pytest.raises(WsClosed) as closed:
            async with asyncio.timeout(2):
                while True:
                    await raw.recv_binary()
        assert closed.value.code in (CLOSE_TOO_BIG, CLOSE_PROTOCOL_ERROR)
        await raw.close()

    growth = rss_kib(relay.proc.pid) - rss_before
    print(f"B-2: relay RSS growth {growth} KiB")
    assert growth < 2 * 1024
    await good_client_unharmed(relay)


# ----------------------------------------------------------------------------- B-3


@pytest.mark.parametrize("case", ["version", "type", "flags", "text"])
async def test_B3_unknown_version_type_flags_or_text_close_within_100ms(
        tmp_path: Path, variant: Variant, case: str) -> None:
    """Each bad header (version 2, frame type 7, PING flag 0x8) or a text message closes
    the session with 1002 within 100 ms; the relay's protocol-error counter (JSON status
    and Prometheus) goes up by one; no traceback (the e2e fixture); beta keeps serving."""
    relay = await start_relay(tmp_path)
    cases: dict[str, bytes | str] = {
        "version": frame_header(version=2),
        "type": frame_header(ftype=7),
        "flags": frame_header(ftype=FrameType.PING, flags=0x8),
        "text": '{"type":"telemetry"}',
    }
    bad = cases[case]
    mark = relay.proc.mark()
    ws = await raw_session(relay)
    code, elapsed = await send_and_time_close(ws, bad)
    print(f"B-3 {case}: closed with {code} after {elapsed * 1000:.1f} ms")
    assert code == CLOSE_PROTOCOL_ERROR
    assert elapsed < 0.100
    await relay.proc.wait_for_line(r"closing link of alpha: protocol error", timeout=5,
                                   since=mark, stream="stderr")
    assert await relay.wait_counter("protocol_errors", lambda n: n == 1) == 1
    assert "tunnel_relay_protocol_errors_total 1.0" in await relay.metrics()
    await good_client_unharmed(relay)


# ----------------------------------------------------------------------------- B-4


async def test_B4_stray_data_is_drained_and_counted_until_the_rate_limit(
        tmp_path: Path, variant: Variant) -> None:
    """DATA for a stream the relay reset is drained and counted: the bytes the peer could
    still have had in flight (its whole window) cost nothing; more than 100 further frames
    per minute close the session (1002). "Unknown" ids (even, or never opened) are a
    protocol error at once in our design, as the next test shows: only the opener makes
    ids, so a frame for an id it never made cannot be a race."""
    relay = await start_relay(tmp_path)
    ws, sid, _, writer = await raw_stream(relay)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()  # the visitor resets: the relay resets the stream
    reset, _ = await read_frames_until(ws, FrameType.RESET, sid, timeout=5)
    assert reset.value in (ResetCode.CANCEL, ResetCode.ABORTED)

    in_flight = encode_data(sid, bytes(MAX_DATA_PAYLOAD))
    for _ in range(INITIAL_WINDOW // MAX_DATA_PAYLOAD):
        await ws.send(in_flight)
    await round_trip_ping(ws, 11)  # drained, no error: the link lives

    stray = encode_data(sid, b"!") * (MAX_STRAY_DATA_PER_MINUTE + 1)
    mark = relay.proc.mark()
    code, elapsed = await send_and_time_close(ws, stray)
    assert code == CLOSE_PROTOCOL_ERROR and elapsed < 1.0
    await relay.proc.wait_for_line(r"more than 100 DATA frames for closed streams", timeout=5,
                                   since=mark, stream="stderr")
    expected = INITIAL_WINDOW // MAX_DATA_PAYLOAD + MAX_STRAY_DATA_PER_MINUTE + 1
    stray_count = await relay.wait_counter("stray_frames", lambda n: n >= expected)
    print(f"B-4: {stray_count} stray frames drained and counted, then closed")
    assert await relay.wait_counter("protocol_errors", lambda n: n == 1) == 1
    await good_client_unharmed(relay)


@pytest.mark.parametrize("case", ["open-from-client", "even-id", "never-opened-id",
                                  "window-for-never-opened-id"])
async def test_B4_stream_id_misuse_is_a_protocol_error(
        tmp_path: Path, variant: Variant, case: str) -> None:
    """An OPEN from the side not allowed to open (the client), or a frame naming an id
    the relay never made (even, or beyond its last), is a protocol error: 1002 at once.
    A reused live id, a wrong-parity OPEN and a non-increasing OPEN can only come from the
    relay (the opener), so the client's side of those rules is in tests/unit/test_mux.py
    (test_B4_stream_id_misuse_is_a_protocol_error)."""
    relay = await start_relay(tmp_path)
    ws, sid, _, writer = await raw_stream(relay)
    bad = {
        "open-from-client": raw_open(sid + 2),
        "even-id": encode_data(sid + 1, b"x"),
        "never-opened-id": encode_data(sid + 100, b"x"),
        "window-for-never-opened-id": encode_frame(Frame(FrameType.WINDOW_UPDATE, sid + 100,
                                                         value=1)),
    }[case]
    code, elapsed = await send_and_time_close(ws, bad)
    assert code == CLOSE_PROTOCOL_ERROR and elapsed < 1.0
    await close_writer(writer)
    assert await relay.wait_counter("protocol_errors", lambda n: n == 1) == 1
    await good_client_unharmed(relay)


@pytest.mark.plain_only
@pytest.mark.parametrize("case", ["reused", "decreasing", "even"])
async def test_B4_relay_side_id_misuse_closes_the_real_clients_link(
        tmp_path: Path, variant: Variant, case: str) -> None:
    """The rules only the opener (the relay) can break, against the real client: a hand-made
    relay logs it in, confirms its claim, then sends OPEN for a live id again, an id lower
    than the last, or an even id. The client closes the link with 1002 and a logged
    protocol error, and comes back. Plain only: the fake relay speaks ws://, and the rule
    lives above TLS; both event loops are covered."""
    echo = EchoService()
    await echo.start()
    opens = {"reused": [raw_open(3), raw_open(3)], "decreasing": [raw_open(3), raw_open(1)],
             "even": [raw_open(2)]}[case]
    closes: asyncio.Queue[int | None] = asyncio.Queue()

    async def fake_relay(ws: ServerConnection) -> None:
        await ws.send(control({"type": "challenge", "version": 1,
                               "nonce": msg.b64encode(os.urandom(32)),
                               "server_version": "fake"}))
        assert first_control(await ws.recv())["type"] == "auth"
        await ws.send(control({"type": "welcome", "client": "alpha", "heartbeat_interval": 1,
                               "heartbeat_timeout": 30, "max_streams": 256}))
        expose, _ = await read_frames_until(ws, FrameType.CONTROL, 0, timeout=5)
        claim = json.loads(bytes(expose.payload))
        await ws.send(control({"type": "exposed", "id": claim["id"], "port": 1,
                               "mode": "fixed"}))
        for frame in opens:
            await ws.send(frame)
        await closes.put(await expect_closed(ws, timeout=5))

    async with serve(fake_relay, "127.0.0.1", 0, compression=None, ping_interval=None,
                     max_size=MAX_MESSAGE_SIZE) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        client = await start_client(f"ws://127.0.0.1:{port}/tunnel", ALPHA_TOKEN,
                                    [f"{echo.target}:fixed-6000"])
        code = await asyncio.wait_for(closes.get(), 20)
        assert code == CLOSE_PROTOCOL_ERROR
        await client.wait_for_line(r"protocol error: stream id \d+ reused, not increasing or "
                                   r"wrong parity", timeout=5, stream="stderr")
        assert await asyncio.wait_for(closes.get(), 20) == CLOSE_PROTOCOL_ERROR  # came back


# ----------------------------------------------------------------------------- B-5


async def test_B5_data_one_byte_past_the_window_resets_only_that_stream(
        tmp_path: Path, variant: Variant) -> None:
    """The raw peer fills the relay's receive window (the visitor reads nothing, so credit
    stops coming back once its socket buffers are full), then sends one byte more: the
    relay answers RESET(FLOW_CONTROL) on that stream, resets the visitor's socket, and the
    link survives."""
    relay = await start_relay(tmp_path)
    ws, sid, reader, writer = await raw_stream(relay, rcvbuf=4096)
    window = INITIAL_WINDOW
    total = 0
    for _ in range(200):  # bounded: the socket buffers in between hold a few MiB at most
        while window > 0:
            chunk = min(window, MAX_DATA_PAYLOAD)
            await ws.send(encode_data(sid, bytes(chunk)))
            window -= chunk
            total += chunk
        granted = await _collect_grants(ws, sid, quiet=0.5)
        if granted == 0:
            break
        window += granted
    else:
        raise AssertionError("the relay kept granting credit to a stream nobody reads")
    assert window == 0
    started = time.monotonic()
    await ws.send(encode_data(sid, b"!"))
    reset, _ = await read_frames_until(ws, FrameType.RESET, sid, timeout=5)
    print(f"B-5: {total} bytes sent into a non-reading visitor; one more byte reset the "
          f"stream in {(time.monotonic() - started) * 1000:.0f} ms")
    assert reset.value == ResetCode.FLOW_CONTROL
    assert await visitor_outcome(reader, drain=True) == "reset"
    await close_writer(writer)
    await round_trip_ping(ws, 5)
    await ws.close()
    await good_client_unharmed(relay)


async def _collect_grants(ws: ClientConnection, sid: int, quiet: float) -> int:
    """Sum the WINDOW_UPDATEs for ``sid`` until none came for ``quiet`` seconds."""
    granted = 0
    for _ in range(10_000):
        try:
            async with asyncio.timeout(quiet):
                raw = await ws.recv()
        except TimeoutError:
            return granted
        assert isinstance(raw, bytes)
        granted += sum(f.value for f in decode_frames(raw)
                       if f.type is FrameType.WINDOW_UPDATE and f.stream_id == sid)
    raise AssertionError("endless frames")


@pytest.mark.parametrize("case", ["increment-0", "above-max"])
async def test_B5_bad_window_updates_are_protocol_errors(
        tmp_path: Path, variant: Variant, case: str) -> None:
    """WINDOW_UPDATE with increment 0, or one pushing the window above 2^31 - 1: 1002."""
    relay = await start_relay(tmp_path)
    ws, sid, _, writer = await raw_stream(relay)
    value = 0 if case == "increment-0" else MAX_WINDOW
    code, elapsed = await send_and_time_close(
        ws, HEADER.pack(PROTOCOL_VERSION, FrameType.WINDOW_UPDATE, 0, sid, value))
    assert code == CLOSE_PROTOCOL_ERROR and elapsed < 1.0
    await close_writer(writer)
    assert await relay.wait_counter("protocol_errors", lambda n: n == 1) == 1
    await good_client_unharmed(relay)


@pytest.mark.timeout(300)
async def test_B5_one_byte_window_updates_get_one_small_frame_each(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """A peer that took a whole window, then grants 1 byte at a time (50 per second, under
    the control-frame limit): the relay sends at most 2 frames per grant and never more
    bytes than granted, queues no tiny frames (all granted bytes arrive promptly), and
    spends under 10 % of a core. A burst of more than 512 tiny grants is a flood: 1002."""
    relay = await start_relay(tmp_path)
    ws, sid, _, writer = await raw_stream(relay)
    writer.write(bytes(2 * INITIAL_WINDOW))  # the visitor uploads more than one window
    received = 0
    async with asyncio.timeout(20):
        while received < INITIAL_WINDOW:
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            received += sum(len(f.payload) for f in decode_frames(raw)
                            if f.type is FrameType.DATA and f.stream_id == sid)
    assert received == INITIAL_WINDOW
    await _collect_grants(ws, sid, quiet=0.3)  # anything else in flight

    grants = size.pick(100, 1000)
    frames = payload = 0
    cpu_before, wall_before = cpu_seconds(relay.proc.pid), time.monotonic()
    grant = encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=1))
    for index in range(grants):
        await ws.send(grant)
        deadline = wall_before + (index + 1) / 50
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(left):
                    raw = await ws.recv()
            except TimeoutError:
                break
            assert isinstance(raw, bytes)
            data = [f for f in decode_frames(raw) if f.type is FrameType.DATA]
            frames += len(data)
            payload += sum(len(f.payload) for f in data)
    async with asyncio.timeout(2):  # no queue: what was granted has all arrived by now
        while payload < grants:
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            data = [f for f in decode_frames(raw) if f.type is FrameType.DATA]
            frames += len(data)
            payload += sum(len(f.payload) for f in data)
    wall = time.monotonic() - wall_before
    cpu = cpu_seconds(relay.proc.pid) - cpu_before
    print(f"B-5 dribble: {grants} 1-byte grants in {wall:.1f} s -> {frames} DATA frames, "
          f"{payload} bytes; relay CPU {cpu:.2f} s = {100 * cpu / wall:.1f} % of a core")
    assert payload == grants
    assert frames <= 2 * grants
    assert cpu / wall < 0.10

    flood = grant * (MAX_CONTROL_BURST + 1)
    code, _ = await send_and_time_close(ws, flood)
    assert code == CLOSE_PROTOCOL_ERROR
    await close_writer(writer)
    await good_client_unharmed(relay)


@pytest.mark.timeout(300)
async def test_B5_a_visitor_reading_one_byte_at_a_time_gets_no_tiny_window_updates(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """The other side of the dribble: the relay writes to a visitor that reads 1 byte per
    recv(). Credit goes back to the peer only in batches of half a window, so the peer is
    never asked to send tiny frames; the relay spends under 10 % of a core meanwhile."""
    relay = await start_relay(tmp_path)
    ws = await raw_expose(relay)
    sock = await raw_visitor_socket(relay, 4096)
    sid = (await read_frames_until(ws, FrameType.OPEN, _next_odd(), timeout=5))[0].stream_id
    loop = asyncio.get_running_loop()
    updates: list[int] = []

    async def keep_the_window_full() -> None:
        """Send a window, then as much again as each grant allows (a bulk sender)."""
        credit = INITIAL_WINDOW
        for _ in range(100_000):
            while credit > 0:
                chunk = min(credit, MAX_DATA_PAYLOAD)
                await ws.send(encode_data(sid, bytes(chunk)))
                credit -= chunk
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            granted = [f.value for f in decode_frames(raw)
                       if f.type is FrameType.WINDOW_UPDATE and f.stream_id == sid]
            updates.extend(granted)
            credit += sum(granted)

    sender = asyncio.create_task(keep_the_window_full())
    seconds = size.pick(2.0, 10.0)
    cpu_before, started = cpu_seconds(relay.proc.pid), time.monotonic()
    got = 0
    try:
        while time.monotonic() - started < seconds:
            chunk = await loop.sock_recv(sock, 1)
            assert chunk
            got += 1
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    wall = time.monotonic() - started
    cpu = cpu_seconds(relay.proc.pid) - cpu_before
    print(f"B-5 1-byte reader: {got} bytes read in {wall:.1f} s; {len(updates)} window "
          f"updates, smallest {min(updates, default=0)}; relay CPU {100 * cpu / wall:.1f} %")
    assert all(value >= INITIAL_WINDOW // 2 for value in updates)
    assert cpu / wall < 0.10
    await ws.close()
    sock.close()
    await good_client_unharmed(relay)


# ----------------------------------------------------------------------------- B-7


async def test_B7_websocket_ping_flood_from_a_peer_that_never_reads(
        tmp_path: Path, variant: Variant) -> None:
    """WebSocket Pings (the library answers each with a Pong) from a peer that never reads:
    the relay's write buffer passes 4 MiB and the link is dropped; RSS grows < 16 MiB; the
    other link is untouched. (The measured 574 MB case had no such watchdog.)"""
    relay = await start_relay(tmp_path)
    rss_before = rss_kib(relay.proc.pid)
    mark = relay.proc.mark()
    raw = await RawWs.open(relay.url)
    assert (await raw.login(ALPHA_TOKEN))["type"] == "welcome"
    burst = RawWs.frame(OP_PING, b"p" * 125) * (MIB // 131)
    peak = 0
    sent = 0
    with pytest.raises((ConnectionError, WsClosed, TimeoutError)):
        async with asyncio.timeout(60):
            for _ in range(256):  # bounded: at most 256 MiB of pings, never reading
                await raw.send_raw(burst)
                sent += len(burst)
                peak = max(peak, rss_kib(relay.proc.pid))
                if raw.writer.transport.is_closing():
                    raise WsClosed(None)
    await raw.close()
    line = await relay.proc.wait_for_line(r"does not read.*", timeout=10, since=mark,
                                          stream="stderr")
    print(line.group(0))
    growth = max(peak, rss_kib(relay.proc.pid)) - rss_before
    print(f"B-7 ws pings: {sent / MIB:.0f} MiB of pings sent before the drop; relay RSS "
          f"growth at peak {growth} KiB (limit {LINK_WRITE_BUFFER_LIMIT // MIB} MiB buffer)")
    assert growth < 16 * 1024
    await good_client_unharmed(relay)


@pytest.mark.parametrize("case", ["mux-ping", "window-update", "control", "ping-no-read",
                                  "sustained-500-per-second"])
async def test_B7_control_frame_floods_close_the_link(
        tmp_path: Path, variant: Variant, case: str) -> None:
    """Control-frame floods (mux PINGs, 1-byte WINDOW_UPDATEs, CONTROL messages; also mux
    PINGs from a peer that never reads the PONGs) close the link with a protocol error;
    RSS grows < 16 MiB; the other link is untouched.

    The limit is 100 per second with a burst of 512 (MAX_CONTROL_BURST), not a flat 100
    per second: a login legitimately carries up to 256 expose claims at once, and as many
    replies. So a burst over 512 closes the link at once, and a sustained 500 per second
    closes it after 512 / (500 - 100) = 1.3 s."""
    relay = await start_relay(tmp_path)
    rss_before = rss_kib(relay.proc.pid)
    mark = relay.proc.mark()
    ws, sid, _, writer = await raw_stream(relay)
    frame = {
        "window-update": encode_frame(Frame(FrameType.WINDOW_UPDATE, sid, value=1)),
        "control": control({"type": "telemetry", "hostname": "flood"}),
    }.get(case, encode_frame(Frame(FrameType.PING, value=7)))
    if case == "ping-no-read":
        burst = frame * (MAX_MESSAGE_SIZE // len(frame))
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(20):
                for _ in range(400):  # bounded: ~200 MB of pings, never reading
                    await ws.send(burst)
        print(f"B-7 {case}: ended by {closed.value!r}")
    elif case == "sustained-500-per-second":
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(15):
                for _ in range(150):  # 50 pings every 0.1 s, bounded
                    await ws.send(frame * 50)
                    await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        print(f"B-7 {case}: closed after {elapsed:.1f} s")
        assert 0.9 < elapsed < 5.0
    else:
        code, elapsed = await send_and_time_close(ws, frame * (MAX_CONTROL_BURST + 1))
        print(f"B-7 {case}: closed with {code} after {elapsed * 1000:.0f} ms")
        assert code == CLOSE_PROTOCOL_ERROR
    await ws.close()
    await relay.proc.wait_for_line(r"more than 100 control frames per second", timeout=10,
                                   since=mark, stream="stderr")
    growth = rss_kib(relay.proc.pid) - rss_before
    print(f"B-7 {case}: relay RSS growth {growth} KiB")
    assert growth < 16 * 1024
    await close_writer(writer)
    await good_client_unharmed(relay)


@pytest.mark.timeout(600)
async def test_B7_bulk_transfer_on_64_streams_stays_under_the_control_limit(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """Our own traffic never trips the limit: 64 streams of bulk echo at full speed make
    many WINDOW_UPDATEs a second, but each returns credit really spent (half a window), so
    none counts; heartbeats and telemetry are a few frames a second."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    proc, url = await start_server(tmp_path, server_config(tmp_path, [port]))
    client = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"])
    assert await wait_tunnel(client, echo.target) == port
    each = size.pick(MIB, 16 * MIB)
    started = time.monotonic()
    await asyncio.gather(*(echo_check(port, each, seed=i, timeout=90) for i in range(64)))
    elapsed = time.monotonic() - started
    print(f"B-7 bulk: 64 x {each // MIB} MiB echoed in {elapsed:.1f} s")
    for program in (proc, client):
        assert "protocol error" not in program.stderr, program.stderr
    assert client.stdout.count(f"{echo.target} ->") == 1  # one login: never reconnected


# ----------------------------------------------------------------------------- I-5


@pytest.mark.timeout(300)
async def test_I5_zero_length_data_frames_create_no_events_and_are_rate_limited(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """Empty DATA frames (no bytes, no FIN) reach nothing: the visitor gets no bytes and
    the stream works after them. A flood of 10^5 (over 1000 per second) closes the link
    with 1002, and the relay spends under one core-second on it."""
    relay = await start_relay(tmp_path)
    ws, sid, reader, writer = await raw_stream(relay)
    empty = encode_data(sid, b"")
    await ws.send(empty * (MAX_EMPTY_DATA_PER_SECOND // 2))
    await ws.send(encode_data(sid, b"hello"))
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"

    count = 100_000
    per_message = MAX_MESSAGE_SIZE // len(empty)
    cpu_before = cpu_seconds(relay.proc.pid)
    mark = relay.proc.mark()
    started = time.monotonic()
    code: int | None = None
    try:
        for offset in range(0, count, per_message):
            await ws.send(empty * min(per_message, count - offset))
    except ConnectionClosed:  # the relay may close before we finished sending
        pass
    code = await expect_closed(ws, timeout=5)
    elapsed = time.monotonic() - started
    await relay.proc.wait_for_line(r"more than 1000 empty DATA frames per second", timeout=5,
                                   since=mark, stream="stderr")
    cpu = cpu_seconds(relay.proc.pid) - cpu_before
    print(f"I-5: {count} empty DATA frames: closed with {code} after {elapsed:.2f} s; relay "
          f"CPU {cpu:.2f} s")
    assert code == CLOSE_PROTOCOL_ERROR
    assert cpu < 1.0
    assert await visitor_outcome(reader) in ("reset", "eof")  # and not one byte
    await close_writer(writer)
    await good_client_unharmed(relay)


# ----------------------------------------------------------------------------- live fuzzer


@pytest.mark.timeout(300)
async def test_B1_live_fuzzer_against_a_running_relay(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """Random and mutated WebSocket and mux frames at a running relay (about 5 s, 60 s in
    the full size), before and after logging in: the relay never crashes, prints no
    traceback (the e2e fixture), keeps serving a good client on the same link, and its file
    descriptors return to the baseline within 2."""
    relay = await start_relay(tmp_path)
    baseline = fd_count(relay.proc.pid)
    seed = int.from_bytes(os.urandom(4), "big")
    print(f"live fuzzer seed {seed}")
    stats = await LiveFuzzer(relay.url, ALPHA_TOKEN, seed).run(size.pick(5.0, 60.0))
    print(f"live fuzzer: {stats}")
    assert stats.connections > 0 and stats.logged_in > 0 and stats.frames > 0
    lines = relay.proc.stderr_lines
    errors = [i for i, line in enumerate(lines) if " ERROR " in line or " CRITICAL " in line]
    assert not errors, "\n".join(lines[errors[0]:errors[0] + 40])
    await good_client_unharmed(relay)
    fds = fd_count(relay.proc.pid)
    for _ in range(100):  # closes finish asynchronously: poll, bounded
        if abs(fds - baseline) <= 2:
            break
        await asyncio.sleep(0.1)
        fds = fd_count(relay.proc.pid)
    print(f"live fuzzer: relay fds {baseline} before, {fds} after")

    assert abs(fds - baseline) <= 2
