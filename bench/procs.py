"""Processes the harness starts (and only those), plus /proc readings of RSS and CPU time."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


class Proc:
    """A child process whose stdout/stderr go to files in the run's temp dir."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None, stdin_pipe: bool = False) -> None:
        self.name = name
        self.argv = list(argv)
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=err, cwd=workdir, env=env,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.out_path.read_text("utf-8", "replace")

    def errors(self, last: int = 30) -> str:
        lines = self.err_path.read_text("utf-8", "replace").splitlines()
        return "\n".join(lines[-last:])

    def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """Poll stdout until a line matches ``pattern`` (bounded by ``timeout``)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 2):
            match = regex.search(self.output())
            if match:
                return match
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with code {self.popen.returncode} "
                                   f"before printing /{pattern}/\n{self.errors()}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not print /{pattern}/ within {timeout} s\n"
                           f"{self.errors()}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; by pid, only this process."""
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout)


def wait_accepting(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on 127.0.0.1:{port} after {timeout} s")


def echo_ok(port: int, timeout: float = 20.0) -> None:
    """Wait until a byte sent to ``port`` comes back (the whole path is live)."""
    deadline = time.monotonic() + timeout
    last = ""
    for _ in range(int(timeout / 0.1) + 2):
        try:
            with socket.create_connection(("127.0.0.1", port), 2) as sock:
                sock.settimeout(2)
                sock.sendall(b"?")
                if sock.recv(1) == b"?":
                    return
                last = "no echo"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise RuntimeError(f"no echo through 127.0.0.1:{port} after {timeout} s ({last})")


def _children(pids: Sequence[int]) -> list[int]:
    """``pids`` plus their descendants (a bounded scan of /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    family = set(pids)
    for _ in range(10):  # a few generations deep is plenty
        grown = {pid for pid, ppid in parents.items() if ppid in family} | family
        if grown == family:
            break
        family = grown
    return sorted(family)


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in _children(pids):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` and their descendants, in seconds."""
    ticks = 0
    for pid in _children(pids):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK
