"""The lease store's durability against a real crash: a claim is on disk the moment it
returns, so a relay killed with SIGKILL right after it loses nothing (the store itself is
tested in-process in tests/unit/test_leases.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tunnel.server.leases import Lease, SqliteLeaseStore


async def test_a_claim_survives_kill_9_right_after_it(tmp_path: Path) -> None:
    path = tmp_path / "leases.db"
    script = (
        "import asyncio, os, signal, sys\n"
        "from pathlib import Path\n"
        "from tunnel.server.leases import Lease, SqliteLeaseStore\n"
        "store = SqliteLeaseStore(Path(sys.argv[1]))\n"
        "lease = Lease(6000, 'alice', 'fixed', '127.0.0.1:22', 1.0, 1.0)\n"
        "assert asyncio.run(store.claim(lease, None))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert proc.returncode == -signal.SIGKILL
    async with SqliteLeaseStore(path) as store:
        assert await store.load() == [Lease(6000, "alice", "fixed", "127.0.0.1:22", 1.0, 1.0)]
