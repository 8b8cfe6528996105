"""Catalogue B-13 (docs/reliability.md): floods of every frame type on every stream state.

An authenticated raw peer (tests/e2e/rawpeer.py) floods the real relay with one frame type
for a stream in one state, as fast as it can; the relay must close that link, spend bounded
CPU on it, and keep a second, real client's download going. The unit side of the same rule
(every type x state x receiving role, on a simulated clock) is
tests/unit/test_mux_bare_frames.py.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import Size
from tests.e2e.harness import Variant
from tests.e2e.procstats import report
from tests.e2e.rawpeer import control, expect_closed, read_frames_until
from tests.e2e.services import close_writer, echo_check
from tests.e2e.test_cat_bad_input import (
    _LINGER_RESET,
    CLOSE_PROTOCOL_ERROR,
    MIB,
    Relay,
    cpu_seconds,
    good_client_unharmed,
    raw_stream,
    start_relay,
)
from tests.unit.test_mux import raw_open
from tunnel.common.proto.frames import Flag, Frame, FrameType, encode_data, encode_frame
from tunnel.common.proto.mux import MAX_BARE_FRAMES_BURST, MIN_EARNED_GRANT, ResetCode

KINDS = ["data", "empty-data", "fin", "window-update", "reset", "open", "ping", "control"]
STATES = ["open", "half-closed-by-relay", "half-closed-by-peer", "reset-by-relay",
          "reset-by-peer", "never-opened", "closed"]
#: The fast size: the reported case (RESET on a finished stream), every type on that
#: finished stream, and a RESET on every state; the full size runs every pair.
FAST_PAIRS = sorted({(kind, "closed") for kind in KINDS} | {("reset", s) for s in STATES})
#: A flood sends at most this many times the burst the relay admits: far past any limit.
FLOOD_TIMES_BURST = 40
#: Bytes of frames per WebSocket message in a flood.
FLOOD_MESSAGE = 256 * 1024
#: Most relay CPU seconds one flood may cost, the second client's download included: a
#: flood the relay never cuts off costs it seconds.
MAX_RELAY_CPU_PER_FLOOD = 1.5
#: Least fraction of its baseline the second client's download keeps during a flood: the
#: flooder, the relay, the real client and the echo service share the test machine.
MIN_THROUGHPUT_FRACTION = 0.2
#: Bytes of each download of the second client (echoed through its tunnel).
DOWNLOAD = 64 * MIB


def flood_frame(kind: str, sid: int) -> bytes:
    return {
        "data": lambda: encode_data(sid, bytes(1024)),
        "empty-data": lambda: encode_data(sid, b""),
        "fin": lambda: encode_data(sid, b"", fin=True),
        "window-update": lambda: encode_frame(
            Frame(FrameType.WINDOW_UPDATE, sid, value=MIN_EARNED_GRANT)),
        "reset": lambda: encode_frame(Frame(FrameType.RESET, sid, value=ResetCode.CANCEL)),
        "open": lambda: raw_open(sid),
        "ping": lambda: encode_frame(Frame(FrameType.PING, value=7)),
        "control": lambda: control({"type": "telemetry", "hostname": "flood"}),
    }[kind]()


async def stream_in_state(relay: Relay, state: str) -> tuple[
        ClientConnection, int, asyncio.StreamWriter]:
    """A raw alpha link with one visitor's stream brought to ``state``; (link, id to
    flood, the visitor's writer)."""
    ws, sid, _, writer = await raw_stream(relay)
    if state in ("half-closed-by-relay", "closed"):
        writer.write_eof()  # the visitor half-closes: the relay sends FIN
        fin, _ = await read_frames_until(ws, FrameType.DATA, sid, timeout=5)
        assert fin.flags & Flag.FIN
    if state in ("half-closed-by-peer", "closed"):
        await ws.send(encode_data(sid, b"", fin=True))
    if state == "reset-by-relay":
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   _LINGER_RESET)
        writer.transport.abort()
        await read_frames_until(ws, FrameType.RESET, sid, timeout=5)
    if state == "reset-by-peer":
        await ws.send(encode_frame(Frame(FrameType.RESET, sid, value=ResetCode.CANCEL)))
    return ws, sid + 2 if state == "never-opened" else sid, writer


async def flood(ws: ClientConnection, frame: bytes) -> int | None:
    """Send ``frame`` as fast as the link takes it, up to FLOOD_TIMES_BURST bursts; the
    close code the relay sent (a TimeoutError if it never closed the link)."""
    message = frame * max(1, FLOOD_MESSAGE // len(frame))
    frames_per_message = len(message) // len(frame)
    try:
        for _ in range(FLOOD_TIMES_BURST * MAX_BARE_FRAMES_BURST // frames_per_message):
            await ws.send(message)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    return await expect_closed(ws, timeout=10)


async def timed_download(relay: Relay, seed: int) -> float:
    """The second client's download through its tunnel; bytes per second."""
    started = time.monotonic()
    await echo_check(relay.good_port, DOWNLOAD, seed=seed, timeout=60)
    return DOWNLOAD / (time.monotonic() - started)


async def test_B13_every_frame_type_on_every_stream_state_closes_only_that_link(
        tmp_path: Path, variant: Variant, size: Size) -> None:
    """Issue 24: a RESET flood on a finished stream was never limited and froze the relay.
    For each (type, state) pair the relay closes the flooding link (1002), its CPU over the
    flood stays under MAX_RELAY_CPU_PER_FLOOD, and the second client's download during the
    flood keeps MIN_THROUGHPUT_FRACTION of its baseline, measured in this test."""
    relay = await start_relay(tmp_path)
    await timed_download(relay, seed=0)  # warm up both links
    baseline = await timed_download(relay, seed=1)
    pairs = size.pick(FAST_PAIRS, [(k, s) for k in KINDS for s in STATES])
    for kind, state in pairs:
        ws, sid, writer = await stream_in_state(relay, state)
        cpu_before = cpu_seconds(relay.proc.pid)
        code, during = await asyncio.gather(flood(ws, flood_frame(kind, sid)),
                                            timed_download(relay, seed=2))
        cpu = cpu_seconds(relay.proc.pid) - cpu_before
        await ws.close()
        await close_writer(writer)
        report(f"B-13 {kind} on {state}", close_code=code, relay_cpu_s=f"{cpu:.2f}",
               download_fraction=f"{during / baseline:.2f}")
        assert code == CLOSE_PROTOCOL_ERROR, (kind, state, code)
        assert cpu <= MAX_RELAY_CPU_PER_FLOOD, (kind, state, cpu)
        assert during >= MIN_THROUGHPUT_FRACTION * baseline, (kind, state, during, baseline)
    await good_client_unharmed(relay)
