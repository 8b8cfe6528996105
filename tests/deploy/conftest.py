"""Fixtures for the deployment suite: processes and services started through the e2e
harness are ended at teardown (by pid), and a test fails if a program printed a traceback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.e2e import harness, services


@pytest.fixture(autouse=True)
async def _deploy_cleanup() -> AsyncIterator[None]:
    harness.STARTED.clear()
    services.STARTED.clear()
    yield
    procs = list(harness.STARTED)
    harness.STARTED.clear()
    for proc in reversed(procs):  # clients first, then the relay they talk to
        await proc.stop()
    started_services = list(services.STARTED)
    services.STARTED.clear()
    for service in started_services:
        await service.close()
    for proc in procs:
        proc.assert_no_traceback()
