"""The fuzz targets of reliability B-1 (tests/fuzz): they hold on seeds and random bytes,
and they can fail. Atheris running the harness is in tests/integration/test_fuzz_atheris.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fuzz import targets
from tests.fuzz.targets import (
    _CHUNK_LEN,
    SEEDS,
    TARGETS,
    fuzz_frames,
    fuzz_mux,
    fuzz_wsframing,
    one_input,
)
from tunnel.common.proto.frames import Frame, FrameType, encode_frame
from tunnel.common.proto.mux import PingReceived


def test_every_seed_passes_and_every_target_has_one() -> None:
    picked = {seed[0] % len(TARGETS) for seed in SEEDS}
    assert picked == set(range(len(TARGETS)))
    for seed in SEEDS:
        one_input(seed)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(TARGETS) - 1), st.binary(max_size=600))
def test_targets_hold_on_random_bytes(target: int, data: bytes) -> None:
    """The checks are the targets' own asserts (codec round trip, mux counters, message
    size cap): any exception other than a refusal they absorb fails here."""
    one_input(bytes([target]) + data)


def test_a_codec_that_raises_anything_else_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: only FrameError may leave the codec."""
    def broken(data: bytes) -> list[object]:
        raise ValueError("not a FrameError")

    monkeypatch.setattr(targets, "decode_frames", broken)
    with pytest.raises(ValueError, match="not a FrameError"):
        one_input(SEEDS[0])


def test_wsframing_target_reads_a_valid_message() -> None:
    unmasked = bytes.fromhex("82 05") + b"hello"  # server to client
    masked = bytes.fromhex("82 85 01 02 03 04") + bytes(
        b ^ k for b, k in zip(b"hello", b"\x01\x02\x03\x04\x01", strict=True))
    for side, frame in ((b"\x01", unmasked), (b"\x03", unmasked), (b"\x00", masked),
                        (b"\x02", masked)):  # client/server, data_received/buffered reads
        got = fuzz_wsframing(side + _CHUNK_LEN.pack(len(frame)) + frame)
        assert [bytes(m) for m in got if not isinstance(m, str)] == [b"hello"], side
    # A server must refuse an unmasked frame: nothing is delivered.
    assert fuzz_wsframing(b"\x00" + _CHUNK_LEN.pack(len(unmasked)) + unmasked) == []


def test_mux_target_reads_valid_messages_until_a_bad_one() -> None:
    ping = encode_frame(Frame(FrameType.PING, value=7))
    data = b"\x00" + b"".join(_CHUNK_LEN.pack(len(m)) + m for m in (ping, b"\x09" * 12, ping))
    assert fuzz_mux(data) == [PingReceived(7)]  # the third message is never read
    assert fuzz_mux(b"\x00" + _CHUNK_LEN.pack(0)) == []  # an empty message: no events


def test_frames_target_returns_what_decodes() -> None:
    ping = encode_frame(Frame(FrameType.PING, value=7))
    assert fuzz_frames(ping + ping) == [Frame(FrameType.PING, value=7)] * 2
    assert fuzz_frames(b"\x09" + ping[1:]) == []  # version 9: refused
