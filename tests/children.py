"""Ending helper processes a test started with ``subprocess.Popen`` (bench target, GPU load)."""

from __future__ import annotations

import subprocess

__all__ = ["end_by_stdin"]

KILL_WAIT = 10.0


def end_by_stdin(proc: subprocess.Popen[str], timeout: float) -> None:
    """Close the child's stdin (its signal to stop), wait up to ``timeout``, then kill it.

    Only this process, by its handle; its stdout pipe is closed too, so no ResourceWarning."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=KILL_WAIT)
    if proc.stdout is not None:
        proc.stdout.close()
