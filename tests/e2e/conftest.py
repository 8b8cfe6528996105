"""Fixtures for the end-to-end suite: every process and service started by a test is
ended at teardown, and a test fails if any program it started printed a Python traceback.

Two parametrising fixtures serve the reliability catalogue:

- ``variant``: a test that asks for it runs four times, on the stock asyncio loop and on
  uvloop, each with TLS on and off (``@pytest.mark.tls_only`` / ``plain_only`` narrow it
  where the other half does not apply, and the docstring says why).
- ``size``: a test that asks for it runs at a scaled-down ``fast`` size in CI and at the
  catalogue's ``full`` size under the ``slow`` marker: ``pytest -m slow tests/e2e``.
"""

from __future__ import annotations

import compileall
import gc
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

import tunnel
from tests.e2e import harness, services

T = TypeVar("T")


@dataclass(frozen=True)
class Size:
    """Which size of a catalogue test runs: ``size.pick(fast, full)`` chooses the figure."""

    full: bool

    def pick(self, fast: T, full: T) -> T:
        return full if self.full else fast


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "variant" in metafunc.fixturenames:
        variants = list(harness.VARIANTS)
        if metafunc.definition.get_closest_marker("tls_only"):
            variants = [v for v in variants if v.tls]
        if metafunc.definition.get_closest_marker("plain_only"):
            variants = [v for v in variants if not v.tls]
        metafunc.parametrize("variant", variants, ids=[v.id for v in variants], indirect=True)
    if "size" in metafunc.fixturenames:
        metafunc.parametrize(
            "size",
            [pytest.param(False, id="fast"), pytest.param(True, id="full", marks=pytest.mark.slow)],
            indirect=True,
        )


@pytest.fixture
def variant(request: pytest.FixtureRequest) -> Iterator[harness.Variant]:
    chosen: harness.Variant = request.param
    harness.set_variant(chosen)
    try:
        yield chosen
    finally:
        harness.set_variant(harness.Variant())


@pytest.fixture
def size(request: pytest.FixtureRequest) -> Size:
    return Size(full=bool(request.param))


@pytest.fixture(scope="session", autouse=True)
def _compiled_programs() -> None:
    """Write the bytecode of the programs under test once, before any is started.

    Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine kind sets it) and the project is
    installed in editable mode, every program start compiled all of ``tunnel`` again: ~30
    ms of CPU per start, which L-3 pays 200 times in its login window. An installed wheel
    ships its bytecode, so this measures what users run."""
    compileall.compile_dir(str(Path(tunnel.__file__).parent), quiet=1)


#: Set to a folder to keep every program's whole output there (a failure message shows
#: only the last lines): ``TUNNEL_E2E_LOG_DIR=/tmp/logs pytest -m slow -k L3``.
LOG_DIR_ENV = "TUNNEL_E2E_LOG_DIR"


def keep_logs(nodeid: str, procs: list[harness.Proc]) -> None:
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return
    base = Path(folder)
    base.mkdir(parents=True, exist_ok=True)
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid.rsplit("::", 1)[-1])
    for proc in procs:
        lines = [*proc.stdout_lines, "--- stderr ---", *proc.stderr_lines]
        path = base / f"{test}.{proc.name}.{proc.process.pid}.log"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(autouse=True)
async def _e2e_cleanup(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    harness.STARTED.clear()
    services.STARTED.clear()
    yield
    procs = list(harness.STARTED)
    harness.STARTED.clear()
    harness.PINS.clear()
    for proc in reversed(procs):  # clients first, then the relay they talk to
        await proc.stop()
    keep_logs(request.node.nodeid, procs)
    started_services = list(services.STARTED)
    services.STARTED.clear()
    for service in started_services:
        await service.close()
    # Collect the test's cyclic garbage now: an unclosed socket or transport warns (an
    # error under our filters) when collected, and left to chance it was collected in
    # whichever later test ran then (CI: a unit test failed on two sockets leaked here).
    gc.collect()
    for proc in procs:
        proc.assert_no_traceback()
