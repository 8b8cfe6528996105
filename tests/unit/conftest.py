"""tests/unit opens no sockets and starts no programs; this file makes that a rule.

During every test here (its fixtures included) creating a socket, a socket pair or a child
process raises :class:`OpensResources`, and the test fails at teardown even where the code
under test swallowed the error. A test that needs a listener, a connection or a program
belongs in tests/integration (sockets and child processes on 127.0.0.1) or tests/e2e (the
real relay and client).

One exception, on purpose: the socket pair that asyncio's event loop makes for itself. On
Linux a selector event loop opens an AF_UNIX pair as its self-pipe
(``BaseSelectorEventLoop._make_self_pipe``) so that another thread or a signal handler can
wake it; it is in-process and never reaches a network. Many pure tests need a loop without
any I/O (the link, the multiplexer's adapters and the WebSocket framing driven through
``tests.recording_transport``, timers, futures); calling them integration tests for that
would leave "unit" meaning "synchronous" rather than "no I/O". So the guard lets exactly
that pair through, recognised by its caller, and nothing else: a test's own
``socket.socketpair()``, any ``socket.socket``, ``asyncio.open_connection`` or
``start_server`` (they create sockets), ``subprocess`` (``run``, ``Popen``, asyncio's
subprocesses) and ``os.fork``/``os.system``/``os.posix_spawn`` all fail. uvloop's loop is
not allowed in here: it makes its sockets in C, out of this guard's sight, and the tests
that run on both loops are in tests/integration/both_loops.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest


class OpensResources(AssertionError):
    """A unit test tried to open a socket or start a program."""


class Guard:
    """What the guard refused during the current test (``attempts``, one line each)."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def refuse(self, what: str) -> OpensResources:
        self.attempts.append(what)
        return OpensResources(f"a unit test may not {what}: move the test to "
                              "tests/integration or tests/e2e (see tests/unit/conftest.py)")

    def check(self) -> None:
        """Fail if anything was refused, even if the code under test caught the error."""
        if self.attempts:
            raise OpensResources("this unit test tried to " + "; ".join(self.attempts))


def _called_by_asyncio_self_pipe() -> bool:
    """Whether the caller of the guarded ``socket.socketpair`` is ``_make_self_pipe`` in
    asyncio's selector_events (the event loop's own wake-up pipe)."""
    code = sys._getframe(2).f_code  # 0: this function, 1: the guarded socketpair
    return code.co_name == "_make_self_pipe" and "asyncio" in code.co_filename


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Guard]:
    guard = Guard()
    socket_init, socketpair = socket.socket.__init__, socket.socketpair
    in_self_pipe = False

    def guarded_socketpair(*args: Any, **kwargs: Any) -> tuple[socket.socket, socket.socket]:
        nonlocal in_self_pipe
        if not _called_by_asyncio_self_pipe():
            raise guard.refuse("create a socket pair")
        in_self_pipe = True
        try:
            return socketpair(*args, **kwargs)
        finally:
            in_self_pipe = False

    def guarded_socket(self: socket.socket, family: Any = -1, type: Any = -1,
                       proto: int = -1, fileno: int | None = None) -> None:
        if not in_self_pipe:
            raise guard.refuse(f"create a socket (family {family}, type {type})")
        socket_init(self, family, type, proto, fileno)

    def refused(what: str) -> Any:
        def call(*args: object, **kwargs: object) -> Any:
            raise guard.refuse(what)
        return call

    monkeypatch.setattr(socket.socket, "__init__", guarded_socket)
    monkeypatch.setattr(socket, "socketpair", guarded_socketpair)
    monkeypatch.setattr(subprocess.Popen, "__init__", refused("start a child process"))
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refused(f"call os.{name}"))
    yield guard
    monkeypatch.undo()
    guard.check()
