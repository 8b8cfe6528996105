"""Shared process plumbing for both programs: logging set-up and the event loop choice."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["ACCEPT_ERROR_LOG_INTERVAL", "LINK_NOTSENT_LOWAT", "NO_UVLOOP_ENV", "RATE_LIMIT_KEYS",
           "RESOURCE_ERRNOS", "AcceptErrorFilter", "RateLimitedLogger", "limit_unsent", "run",
           "setup_logging"]

#: Set to 1 to run on the stock asyncio loop even where uvloop is installed.
NO_UVLOOP_ENV = "TUNNEL_NO_UVLOOP"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Keys a RateLimitedLogger keeps apart (ports of one relay): bounds its memory.
RATE_LIMIT_KEYS = 4096

#: Running out of file descriptors on accept() is logged at most this often (seconds).
ACCEPT_ERROR_LOG_INTERVAL = 10.0
#: accept() errors that mean "out of descriptors or memory": pause, warn once, retry.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Bytes of not-yet-sent data the kernel may hold for a link socket (TCP_NOTSENT_LOWAT).
#: Without it Linux grows a send buffer to several MiB, and on a slow or saturated path a
#: heartbeat reply queued behind that much bulk data arrives seconds late (reliability F-4:
#: ping RTT p99 < 2 s at 20 Mbit/s). With it the backlog stays in the multiplexer, which
#: sends control frames first. 128 KiB is 50 ms at 20 Mbit/s and keeps loopback speed.
LINK_NOTSENT_LOWAT = 128 * 1024

T = TypeVar("T")

log = logging.getLogger("tunnel")


def limit_unsent(sock: Any) -> None:
    """Set :data:`LINK_NOTSENT_LOWAT` on a link socket (or a listener, whose accepted
    sockets inherit it); a platform without the option keeps its default."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if sock is None or option is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, LINK_NOTSENT_LOWAT)
    except OSError as exc:
        log.debug("TCP_NOTSENT_LOWAT not set: %s", exc)


@dataclass
class _Quiet:
    """One key's state: when its last line went out, and the events swallowed since."""

    last: float
    skipped: int = 0


class RateLimitedLogger:
    """Logs a warning at most once per interval and key; counts what it swallowed meanwhile.

    For floods (refused visitors, failed accepts): one line per interval says it is still
    happening and how often, instead of a line per event. Each key (a port, say) has its
    own interval, so a flood on one port cannot hide that another one started refusing; at
    most :data:`RATE_LIMIT_KEYS` keys are remembered, the longest unused forgotten first.
    """

    def __init__(self, logger: logging.Logger, interval: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 note: str = "{} similar refusals not logged") -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._note = note
        self._keys: OrderedDict[Hashable, _Quiet] = OrderedDict()

    def warning(self, message: str, *args: object, key: Hashable = None) -> None:
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _Quiet(now)
            if len(self._keys) > RATE_LIMIT_KEYS:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
            if now - state.last < self._interval:
                state.skipped += 1
                return
            if state.skipped:
                message += f" ({self._note.format(state.skipped)})"
            state.last, state.skipped = now, 0
        self._logger.warning(message, *args)


class AcceptErrorFilter:
    """The event loop's exception handler: EMFILE and kin on ``accept()`` become one warning.

    The stock loop already survives them (it pauses the listener for 1 s and retries), but
    reports every failed accept as an ERROR with a traceback, hundreds per burst: a relay
    out of file descriptors must say so in one line, at most once per interval, and keep
    going (reliability R-10; frp PR #2467 is what a listener that quits on EMFILE costs).
    Every other error goes to the loop's default handler unchanged.
    """

    def __init__(self, interval: float = ACCEPT_ERROR_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = RateLimitedLogger(log, interval, clock=clock,
                                      note="{} more since the last report")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not (isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS
                and "accept" in str(context.get("message", ""))):
            loop.default_exception_handler(context)
            return
        self._log.warning("cannot accept new connections: %s (out of file descriptors?); "
                          "retrying", exc.strerror or exc)


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
        runner.get_loop().set_exception_handler(AcceptErrorFilter())
        return runner.run(main)
