"""The fuzz harness of reliability B-1 (tests/fuzz/fuzz_link.py) run by Atheris, where
installed, coverage-guided for a few thousand inputs in a child process. The targets
themselves are tested in-process in tests/unit/test_fuzz_targets.py. The nightly run is
``python tests/fuzz/fuzz_link.py -max_total_time=600``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_link.py"
SMOKE_RUNS = 3000


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (x86-64 Linux wheels only)")
def test_atheris_runs_the_harness(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={SMOKE_RUNS}", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {SMOKE_RUNS} runs" in result.stderr
