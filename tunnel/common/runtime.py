"""Shared process plumbing for both programs: logging set-up and the event loop choice."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["NO_UVLOOP_ENV", "run", "setup_logging"]

#: Set to 1 to run on the stock asyncio loop even where uvloop is installed.
NO_UVLOOP_ENV = "TUNNEL_NO_UVLOOP"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

T = TypeVar("T")


def setup_logging(level: str) -> None:
    """Idempotent: called early (config warnings) and again once the level is known."""
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if os.environ.get(NO_UVLOOP_ENV, "") not in ("", "0"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is importable, else on the stock loop."""
    factory = _loop_factory()
    logging.getLogger("tunnel").info("event loop: %s", "asyncio" if factory is None else "uvloop")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
