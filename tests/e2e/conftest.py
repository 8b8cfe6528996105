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

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TypeVar

import pytest

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


@pytest.fixture(autouse=True)
async def _e2e_cleanup() -> AsyncIterator[None]:
    harness.STARTED.clear()
    services.STARTED.clear()
    yield
    procs = list(harness.STARTED)
    harness.STARTED.clear()
    harness.PINS.clear()
    for proc in reversed(procs):  # clients first, then the relay they talk to
        await proc.stop()
    started_services = list(services.STARTED)
    services.STARTED.clear()
    for service in started_services:
        await service.close()
    for proc in procs:
        proc.assert_no_traceback()
