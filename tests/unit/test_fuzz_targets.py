"""The fuzz harness of reliability B-1 (tests/fuzz): its targets hold on seeds and random
bytes here, and Atheris, where installed, runs it coverage-guided for a few thousand inputs.
The nightly run is ``python tests/fuzz/fuzz_link.py -max_total_time=600``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import targets
from tests.fuzz.targets import _CHUNK_LEN, SEEDS, TARGETS, fuzz_mux, fuzz_wsframing, one_input

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_link.py"
SMOKE_RUNS = 3000


def test_every_seed_passes_and_every_target_has_one() -> None:
    picked = {seed[0] % len(TARGETS) for seed in SEEDS}
    assert picked == set(range(len(TARGETS)))
    for seed in SEEDS:
        one_input(seed)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(TARGETS) - 1), st.binary(max_size=600))
def test_targets_hold_on_random_bytes(target: int, data: bytes) -> None:
    one_input(bytes([target]) + data)


def test_a_codec_that_raises_anything_else_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: only FrameError may leave the codec."""
    def broken(data: bytes) -> list[object]:
        raise ValueError("not a FrameError")

    monkeypatch.setattr(targets, "decode_frames", broken)
    with pytest.raises(ValueError, match="not a FrameError"):
        one_input(SEEDS[0])


def test_wsframing_target_reads_a_valid_message() -> None:
    frame = bytes.fromhex("82 05") + b"hello"  # server to client: unmasked
    fuzz_wsframing(b"\x03" + _CHUNK_LEN.pack(len(frame)) + frame)
    fuzz_mux(b"\x00" + _CHUNK_LEN.pack(0))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (x86-64 Linux wheels only)")
def test_atheris_runs_the_harness(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), f"-runs={SMOKE_RUNS}", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {SMOKE_RUNS} runs" in result.stderr
