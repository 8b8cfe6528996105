"""Run a program module as ``python -m`` would, with a thread that records where its memory goes.

A soak measures RSS from outside, which cannot tell a leak (live Python objects or C
allocations that grow) from allocator drift (free memory that glibc keeps). This wrapper
answers that from inside, for investigations only (no test depends on it): every
``MEMPROBE_EVERY`` seconds it appends one JSON line to ``MEMPROBE_OUT.<pid>.jsonl`` with RSS,
Python's allocated block count, glibc's ``mallinfo2`` (bytes in use vs. free in the heaps,
summed over arenas), the thread count and the most numerous object types; with
``MEMPROBE_TRACEMALLOC=N`` (frames) it also records the source lines whose allocations
grew most since the first sample. The harness runs it in place of the client with::

    TUNNEL_E2E_CLIENT_MODULE=tests.e2e.memprobe MEMPROBE_OUT=/tmp/probe/client \\
        pytest -m soak tests/e2e/test_cat_load.py -k "L5 and uvloop-tls"

and in place of the relay with ``TUNNEL_E2E_SERVER_MODULE=tests.e2e.memprobe_relay``, which
runs the relay's module and writes ``MEMPROBE_OUT.relay.<pid>.jsonl``, so both programs can
be probed in one run with one ``MEMPROBE_OUT``.

(``MEMPROBE_*`` reach the child: the harness strips only ``TUNNEL_*``.) The program still
runs as ``__main__`` in this process, so its pid and signals are the program's own.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import os
import runpy
import sys
import threading
import time
import tracemalloc
from typing import Any

from tests.e2e.procstats import rss_kib

DEFAULT_MODULE = "tunnel.client.cli"
DEFAULT_EVERY = 60.0
TOP_TYPES = 25
TOP_LINES = 25


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): every field a ``size_t``."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


def _mallinfo() -> dict[str, int]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        call = libc.mallinfo2
    except (OSError, AttributeError):
        return {}
    call.restype = MallInfo2
    info = call()
    return {"heap": info.arena, "mmapped": info.hblkhd, "in_use": info.uordblks,
            "free": info.fordblks, "top_free": info.keepcost}


def _mappings() -> dict[str, int]:
    """Resident KiB by kind of mapping: the brk heap, anonymous mappings (pymalloc's arenas,
    glibc's large blocks and extra arenas, thread stacks) and file-backed ones."""
    kib = {"heap": 0, "anon": 0, "anon_maps": 0, "file": 0, "stack": 0}
    kind = "file"
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                name = fields[5] if len(fields) > 5 else ""
                kind = ("heap" if name == "[heap]" else "stack" if name.startswith("[stack")
                        else "anon" if not name or name.startswith("[anon") else "file")
                if kind == "anon":
                    kib["anon_maps"] += 1
            elif fields[0] == "Rss:":
                kib[kind] += int(fields[1])
    return kib


def _top_types() -> list[tuple[str, int]]:
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    return counts.most_common(TOP_TYPES)


def _grown_lines(first: tracemalloc.Snapshot | None) -> list[str]:
    if first is None:
        return []
    now = tracemalloc.take_snapshot()
    return [str(stat) for stat in now.compare_to(first, "lineno")[:TOP_LINES]]


def _sample(t0: float, first: tracemalloc.Snapshot | None) -> dict[str, Any]:
    return {"t": round(time.monotonic() - t0, 1), "wall": time.time(),
            "rss_kib": rss_kib(os.getpid()),
            "blocks": sys.getallocatedblocks(), "malloc": _mallinfo(), "maps_kib": _mappings(),
            "threads": len(os.listdir("/proc/self/task")), "types": _top_types(),
            "grown": _grown_lines(first)}


def _record(path: str, every: float, frames: int) -> None:
    t0 = time.monotonic()
    first = None
    if frames:
        tracemalloc.start(frames)
    for count in range(10**7):  # bounded: one line a minute for ~19 years
        time.sleep(every)
        line = json.dumps(_sample(t0, first))
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
        if frames and count == 0:
            first = tracemalloc.take_snapshot()  # after start-up and the first traffic


def main(default_module: str = DEFAULT_MODULE, role: str = "") -> None:
    out = os.environ.get("MEMPROBE_OUT", "")
    if out:
        path = f"{out}{'.' + role if role else ''}.{os.getpid()}.jsonl"
        every = float(os.environ.get("MEMPROBE_EVERY", DEFAULT_EVERY))
        frames = int(os.environ.get("MEMPROBE_TRACEMALLOC", "0"))
        threading.Thread(target=_record, args=(path, every, frames), daemon=True,
                         name="memprobe").start()
    module = os.environ.get("MEMPROBE_MODULE", default_module)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
