"""The heap trimmer: glibc's ``malloc_trim`` is found and releases memory, the trimmer
calls it on the loop's timer, and both programs' ``run`` starts it and stops it.

Why it exists: see :mod:`tunnel.common.heaptrim` (the L-5 soak's RSS drift was free memory
glibc kept, not live memory)."""

from __future__ import annotations

import asyncio
import os
import platform
from collections.abc import Callable

import pytest

from tunnel.common.heaptrim import TRIM_INTERVAL, HeapTrimmer, find_malloc_trim
from tunnel.common.runtime import run

WAIT = 5.0  # bound on waiting for a timer of a few milliseconds
HOLES = 400  # blocks freed between blocks kept: free memory the heap's top trim cannot return
BLOCK = 160 * 1024  # a batched-frames-sized buffer (above glibc's first mmap threshold)


def _counting(limit: int, done: asyncio.Event) -> tuple[list[int], Callable[[], int]]:
    calls: list[int] = []

    def trim() -> int:
        calls.append(1)
        if len(calls) >= limit:
            done.set()
        return 1

    return calls, trim


def _rss_kib() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_interval_is_a_minute() -> None:
    assert TRIM_INTERVAL == 60.0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_returns_holes_in_the_heap_to_the_kernel() -> None:
    """What the soak measured, made small: blocks freed between live ones stay resident
    until a trim. glibc raises its mmap threshold after the first large block is freed, so
    the rest land in the heap, as the link's buffers do."""
    trim = find_malloc_trim()
    assert trim is not None
    first = bytearray(BLOCK)
    del first  # freeing an mmapped block raises glibc's mmap threshold above BLOCK
    blocks = [bytearray(os.urandom(16)) * (BLOCK // 16) for _ in range(2 * HOLES)]
    keep = blocks[1::2]  # every other block stays live, so the freed ones are holes
    del blocks
    trim()
    before = _rss_kib()
    blocks = [bytearray(BLOCK) for _ in range(HOLES)]
    for block in blocks:  # touch every page, as real payloads do
        block[::4096] = b"\x01" * len(block[::4096])
    del blocks
    held = _rss_kib()
    trim()
    after = _rss_kib()
    assert len(keep) == HOLES
    assert held - after >= HOLES * BLOCK // 1024 // 2, (before, held, after)


async def test_trimmer_trims_on_the_loop_timer_until_stopped() -> None:
    done = asyncio.Event()
    calls, trim = _counting(3, done)
    trimmer = HeapTrimmer(trim, interval=0.001)
    trimmer.start(asyncio.get_running_loop())
    assert trimmer.running
    async with asyncio.timeout(WAIT):
        await done.wait()
    trimmer.stop()
    seen = len(calls)
    assert seen >= 3 and trimmer.trims == seen and not trimmer.running
    await asyncio.sleep(0.01)  # several intervals: a stopped trimmer must stay quiet
    assert len(calls) == seen


async def test_trimmer_survives_a_failing_trim() -> None:
    done = asyncio.Event()
    calls: list[int] = []

    def trim() -> int:
        calls.append(1)
        if len(calls) == 2:
            done.set()
        raise OSError("no")

    trimmer = HeapTrimmer(trim, interval=0.001)
    trimmer.start(asyncio.get_running_loop())
    async with asyncio.timeout(WAIT):
        await done.wait()
    trimmer.stop()
    assert trimmer.trims >= 2


def test_without_malloc_trim_nothing_is_scheduled() -> None:
    trimmer = HeapTrimmer(None, interval=0.001)
    loop = asyncio.new_event_loop()
    try:
        trimmer.start(loop)
        assert not trimmer.running
    finally:
        loop.close()


def test_run_trims_while_main_runs_and_stops_after() -> None:
    done = asyncio.Event()
    calls, trim = _counting(2, done)
    trimmer = HeapTrimmer(trim, interval=0.001)

    async def main() -> str:
        async with asyncio.timeout(WAIT):
            await done.wait()
        return "ran"

    assert run(main(), trimmer=trimmer) == "ran"
    assert len(calls) >= 2 and not trimmer.running
