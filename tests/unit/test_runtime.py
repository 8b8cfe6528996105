"""The loop's exception handler turns accept() EMFILE floods into one warning (R-10)."""

from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from tunnel.common.runtime import ACCEPT_ERROR_LOG_INTERVAL, AcceptErrorFilter


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
