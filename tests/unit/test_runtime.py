"""The loop's exception handler turns accept() EMFILE floods into one warning (R-10), and
refusal floods are one line per interval and port."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from tunnel.common.aio.runtime import (
    ACCEPT_ERROR_LOG_INTERVAL,
    RATE_LIMIT_KEYS,
    AcceptErrorFilter,
    RateLimitedLogger,
)


def _emfile() -> dict[str, object]:
    return {"message": "socket.accept() out of system resource",
            "exception": OSError(errno.EMFILE, "Too many open files")}


def test_emfile_on_accept_is_one_warning_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    handler = AcceptErrorFilter(clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(500):  # what one burst of asyncio's accept loop reports
                handler(loop, _emfile())
            now[0] += ACCEPT_ERROR_LOG_INTERVAL
            handler(loop, _emfile())
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "out of file descriptors" in lines[0] and "Too many open files" in lines[0]
    assert "499 more since the last report" in lines[1]
    assert all(r.exc_info is None for r in caplog.records)  # no traceback


def test_other_errors_reach_the_default_handler(caplog: pytest.LogCaptureFixture) -> None:
    handler = AcceptErrorFilter()
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR):
            handler(loop, {"message": "something else", "exception": ValueError("boom")})
            handler(loop, {"message": "socket.accept() failed",
                           "exception": OSError(errno.ECONNABORTED, "aborted")})
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records] == ["something else",
                                                        "socket.accept() failed"]


LOG = logging.getLogger("tests.ratelimit")


def _limited() -> tuple[RateLimitedLogger, list[float]]:
    now = [0.0]
    return RateLimitedLogger(LOG, 10.0, clock=lambda: now[0]), now


def test_a_flood_on_one_port_does_not_hide_another(caplog: pytest.LogCaptureFixture) -> None:
    limited, now = _limited()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for _ in range(100):
            limited.warning("port %d: refused", 7000, key=7000)
        limited.warning("port %d: refused", 7001, key=7001)
        now[0] = 10.0
        limited.warning("port %d: refused", 7000, key=7000)
        limited.warning("port %d: refused", 7001, key=7001)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["port 7000: refused", "port 7001: refused",
                     "port 7000: refused (99 similar refusals not logged)", "port 7001: refused"]


def test_within_the_interval_a_key_stays_quiet(caplog: pytest.LogCaptureFixture) -> None:
    limited, now = _limited()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        limited.warning("a")
        now[0] = 9.99
        limited.warning("a")
    assert [r.getMessage() for r in caplog.records] == ["a"]


def test_the_keys_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """Past RATE_LIMIT_KEYS keys the longest unused is forgotten: it logs again at once."""
    limited, _ = _limited()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for key in range(RATE_LIMIT_KEYS + 1):
            limited.warning("k", key=key)
        limited.warning("k", key=RATE_LIMIT_KEYS)  # remembered: quiet
        limited.warning("k", key=0)  # forgotten: logs
    assert len(caplog.records) == RATE_LIMIT_KEYS + 2
