"""A test run ended by SIGTERM (a CI timeout, ``kill``) ends the programs it started."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(__file__).with_name("sigterm_target.py")
#: Bounds on each step; the run ends in about a second on a quiet machine.
STARTUP_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, ended but not reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(STARTUP_TIMEOUT + 2 * EXIT_TIMEOUT + 30)
async def test_sigterm_to_pytest_ends_the_relay_it_started(tmp_path: Path) -> None:
    runner = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-s", "-q", "-p", "no:cacheprovider",
        f"--basetemp={tmp_path / 'inner'}", str(TARGET),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL)
    assert runner.stdout is not None
    relay_pid = None
    seen: list[str] = []
    try:
        async with asyncio.timeout(STARTUP_TIMEOUT):
            while relay_pid is None:
                line = (await runner.stdout.readline()).decode(errors="replace")
                assert line, f"inner pytest ended before starting its relay: {seen}"
                seen.append(line.rstrip())
                if match := re.search(r"RELAY-PID (\d+)", line):
                    relay_pid = int(match[1])
        assert alive(relay_pid)
        runner.send_signal(signal.SIGTERM)
        async with asyncio.timeout(EXIT_TIMEOUT):
            output = await runner.stdout.read()
            await runner.wait()
        assert not alive(relay_pid), "the relay outlived the pytest run that started it"
        assert b"KeyboardInterrupt" in output  # ended by the interrupt path, teardown ran
    finally:
        if runner.returncode is None:
            runner.kill()
            await runner.wait()
        if relay_pid is not None and alive(relay_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(relay_pid, signal.SIGKILL)  # ours: started by the run we started
