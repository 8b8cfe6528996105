"""The test tree's port pool hands out ports the kernel would never assign by itself."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest

from tests.e2e.ports import (
    DEFAULT_EPHEMERAL,
    PortPool,
    candidate_ports,
    ephemeral_range,
    free_port_range,
    free_ports,
)


def test_ephemeral_range_is_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("40000\t50000\n")
    assert ephemeral_range(path) == (40000, 50000)


@pytest.mark.parametrize("text", [None, "", "junk", "1 2 3"])
def test_ephemeral_range_falls_back_to_linux_default(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "range"
    if text is not None:
        path.write_text(text)
    assert ephemeral_range(path) == DEFAULT_EPHEMERAL


def test_candidates_skip_the_ephemeral_range() -> None:
    ports = candidate_ports((20000, 60000))
    assert ports[0] == 10000 and ports[-1] == 65535
    assert 19999 in ports and 60001 in ports
    assert not any(20000 <= p <= 60000 for p in ports)


def test_free_ports_are_distinct_bindable_and_outside_the_kernel_range() -> None:
    lo, hi = ephemeral_range()
    ports = free_ports(8)
    assert len(set(ports)) == 8
    for port in ports:
        assert not lo <= port <= hi
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_skipped() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_ports(1)[0]))
        busy = int(held.getsockname()[1])
        pool = PortPool([busy, busy + 1] if busy < 65535 else [busy, busy - 1])
        assert busy not in pool.take(1)
        with pytest.raises(RuntimeError, match="fewer than 2"):
            pool.take(2)


def test_the_pool_does_not_hand_a_port_out_again_until_it_went_round() -> None:
    pool = PortPool(candidate_ports(ephemeral_range()), random.Random(7))
    first = pool.take(50)
    second = pool.take(50)
    assert not set(first) & set(second)


def test_a_range_is_contiguous_free_and_outside_the_kernel_range() -> None:
    lo_e, hi_e = ephemeral_range()
    lo, hi = free_port_range(5)
    assert hi - lo == 4
    assert all(not lo_e <= p <= hi_e for p in range(lo, hi + 1))


def test_no_range_in_a_pool_too_fragmented() -> None:
    with pytest.raises(RuntimeError, match="no run of 3"):
        PortPool([12000, 12002, 12004]).take_range(3)


def test_an_empty_pool_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no port"):
        PortPool([])
