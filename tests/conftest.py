"""Settings for the whole test tree."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import pytest


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Treat SIGTERM as Ctrl-C: pytest then unwinds and the fixtures end the programs the
    tests started. SIGTERM's default action kills pytest alone, and its relays and clients
    ran on (a stopped soak left two behind, each holding its ports)."""
    on_interrupt = signal.getsignal(signal.SIGINT)
    if callable(on_interrupt):
        on_interrupt(signal.SIGINT, frame)  # asyncio's runner: cancel the running test
        return
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
