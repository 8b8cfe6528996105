"""What a test can read about a program it started, from /proc: open fds and resident memory.

The catalogue asserts on growth across repetitions (leak-free), never on absolute figures.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fd_count", "report", "rss_kib"]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def report(test: str, **figures: object) -> None:
    """Print a test's measured figures (shown with pytest -s, kept in the -rA summary)."""
    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    print(f"\n[{test}] {text}")
