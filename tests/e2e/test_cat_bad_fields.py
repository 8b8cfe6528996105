"""Reliability catalogue (docs/reliability.md §2), section (d) bad input: B-14, control
message fields out of the protocol's ranges (from issue 24).

A raw peer logged in as alpha (tests/e2e/rawpeer.py) sends ``expose`` messages whose
fields lie outside docs/protocol.md's ranges; the relay must close that link as a protocol
error at parse time, before any claim, lease or listener exists for it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e.harness import Variant
from tests.e2e.procstats import fd_count
from tests.e2e.rawpeer import control, read_frames_until
from tests.e2e.test_cat_bad_input import (
    CLOSE_PROTOCOL_ERROR,
    Relay,
    good_client_unharmed,
    raw_session,
    send_and_time_close,
    start_relay,
)
from tunnel.common.proto.frames import FrameType

#: An fd count within this of the baseline counts as returned (closes finish asynchronously).
FD_SLACK = 2


def _bad_exposes(port: int) -> dict[str, dict[str, object]]:
    """One ``expose`` per out-of-range field, each otherwise valid for ``port``."""
    good: dict[str, object] = {"type": "expose", "id": 0, "target": "127.0.0.1:9",
                               "mode": "fixed", "port": port}
    return {
        "id 2^32": {**good, "id": 2**32},
        "id -1": {**good, "id": -1},
        "id 2^64": {**good, "id": 2**64},
        "id true": {**good, "id": True},
        "port 2^40": {**good, "port": 2**40},
        "target 1 KiB": {**good, "target": "a" * 1020 + ":9"},
        "target without port": {**good, "target": "127.0.0.1"},
        "target with a space": {**good, "target": "local host:9"},
        "mode 1 KiB": {**good, "mode": "m" * 1024},
    }


async def _fds_back(relay: Relay, baseline: int) -> int:
    """The relay's fd count once it is back within FD_SLACK of ``baseline`` (polled, bounded)."""
    fds = fd_count(relay.proc.pid)
    for _ in range(100):
        if abs(fds - baseline) <= FD_SLACK:
            break
        await asyncio.sleep(0.1)
        fds = fd_count(relay.proc.pid)
    return fds


async def test_B14_out_of_range_expose_fields_close_the_link_not_the_relay(
        tmp_path: Path, variant: Variant) -> None:
    """Each out-of-range ``expose`` closes alpha's link with 1002 and counts one protocol
    error; no traceback or ERROR line; the relay's fds return to the baseline; beta's
    tunnel keeps carrying bytes on its first link; and alpha can then claim the same port
    with a valid message (nothing was leased or bound for the bad ones)."""
    relay = await start_relay(tmp_path)
    ws = await raw_session(relay)  # warm-up: a first raw login allocates its code paths
    await ws.close()
    baseline = fd_count(relay.proc.pid)
    cases = _bad_exposes(relay.raw_port)
    for name, message in cases.items():
        ws = await raw_session(relay)
        code, elapsed = await send_and_time_close(ws, control(message))
        print(f"B-14 {variant.id}: {name}: closed with {code} after {elapsed * 1000:.1f} ms")
        assert code == CLOSE_PROTOCOL_ERROR, name
    assert await relay.wait_counter("protocol_errors", lambda n: n == len(cases)) == len(cases)
    lines = relay.proc.stderr_lines
    errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    assert not errors, "\n".join(errors[:20])
    await good_client_unharmed(relay)
    fds = await _fds_back(relay, baseline)
    print(f"B-14 {variant.id}: relay fds {baseline} before, {fds} after")
    assert abs(fds - baseline) <= FD_SLACK

    ws = await raw_session(relay)
    await ws.send(control({"type": "expose", "id": 2**32 - 1, "target": "127.0.0.1:9",
                           "mode": "fixed", "port": relay.raw_port}))
    reply, _ = await read_frames_until(ws, FrameType.CONTROL, 0, timeout=5)
    assert b'"exposed"' in bytes(reply.payload), reply
    await ws.close()
