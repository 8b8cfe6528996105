"""The deployment suite reuses the e2e clean-up: every process and service a test starts
is ended at teardown (by pid), and a test fails if a program printed a Python traceback."""

from __future__ import annotations

from tests.e2e.conftest import _e2e_cleanup

__all__ = ["_e2e_cleanup"]
