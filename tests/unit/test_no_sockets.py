"""The rule of tests/unit (see conftest.py): no sockets, no child processes, but event loops
work. Each refused call is also recorded, so a test whose code swallows the error still
fails at teardown; the tests here clear that record after checking it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading

import pytest

from tests.unit.conftest import Guard, OpensResources


def test_a_socket_is_refused(no_sockets: Guard) -> None:
    with pytest.raises(OpensResources, match="tests/integration"):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(OpensResources):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_sockets.attempts) == 2
    no_sockets.attempts.clear()


def test_a_socket_pair_is_refused_and_leaks_no_descriptor(no_sockets: Guard) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OpensResources):
        socket.socketpair()
    assert len(os.listdir("/proc/self/fd")) == before
    no_sockets.attempts.clear()


def test_a_child_process_is_refused(no_sockets: Guard) -> None:
    with pytest.raises(OpensResources, match="child process"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(OpensResources, match=r"os\.system"):
        os.system("true")
    no_sockets.attempts.clear()


async def test_asyncio_connections_are_refused_but_the_loop_runs(no_sockets: Guard) -> None:
    woken = asyncio.Event()
    loop = asyncio.get_running_loop()
    threading.Thread(target=loop.call_soon_threadsafe, args=(woken.set,)).start()
    async with asyncio.timeout(5):
        await woken.wait()  # the self-pipe the guard lets through works
    with pytest.raises(OpensResources):
        await asyncio.open_connection("127.0.0.1", 9)
    with pytest.raises(OpensResources):
        await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    assert no_sockets.attempts
    no_sockets.attempts.clear()


def test_a_swallowed_refusal_still_fails_the_test(no_sockets: Guard) -> None:
    with contextlib.suppress(Exception):  # code under test that hides the error
        socket.socket()
    with pytest.raises(OpensResources, match="create a socket"):
        no_sockets.check()
    no_sockets.attempts.clear()
    no_sockets.check()  # nothing left: passes


def test_a_new_event_loop_is_allowed() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7
    finally:
        loop.close()
