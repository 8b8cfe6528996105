"""Relay start-up over an existing lease database: its leases are read before anything binds."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from tunnel.server.admin import main
from tunnel.server.app import LEASE_DB_NAME, Relay
from tunnel.server.config import load_server_config
from tunnel.server.leases import LeaseStoreError, SqliteLeaseStore


async def test_a_relay_refuses_to_start_over_an_invalid_lease_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "relay"
    assert main(["init", "--public-host", "relay.example.com", "--dir", str(directory),
                 "--ports", "6000-6099"]) == 0
    capsys.readouterr()
    config = load_server_config(directory / "server.yaml")
    config = dataclasses.replace(config, listen_port=0)  # never a fixed port, even on failure
    path = Path(config.state_dir) / LEASE_DB_NAME
    await SqliteLeaseStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO leases VALUES (70000, 'alice', 'auto', 'x:1', 0, 0)")
    conn.close()
    relay = Relay(config)
    try:
        with pytest.raises(LeaseStoreError, match="invalid row"):
            await relay.start()
        assert relay.public_tcp.bound == set() and relay.dashboard is None
    finally:
        await relay.stop(drain_timeout=0)
