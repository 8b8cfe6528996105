"""Run only by test_harness_signals.py (its name keeps it out of normal collection): starts
a relay through the harness, says its pid, and waits to be ended from outside."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.e2e import harness
from tests.e2e.ports import free_ports


async def test_wait_for_sigterm(tmp_path: Path) -> None:
    proc, _url = await harness.start_server(tmp_path, harness.server_config(tmp_path,
                                                                              free_ports(1)))
    print(f"RELAY-PID {proc.process.pid}", flush=True)
    await asyncio.Event().wait()
