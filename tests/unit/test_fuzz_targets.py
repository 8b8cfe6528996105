"""The fuzz targets of reliability B-1 (tests/fuzz): they hold on seeds and random bytes,
and they can fail. Atheris running the harness is in tests/integration/test_fuzz_atheris.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import targets
from tests.fuzz.targets import _CHUNK_LEN, SEEDS, TARGETS, fuzz_mux, fuzz_wsframing, one_input


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
