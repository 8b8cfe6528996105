"""The GPU tests start real relay and client processes too: reuse the e2e clean-up, which
ends them at teardown and fails a test whose programs printed a Python traceback."""

from __future__ import annotations

from tests.e2e.conftest import _e2e_cleanup

__all__ = ["_e2e_cleanup"]
