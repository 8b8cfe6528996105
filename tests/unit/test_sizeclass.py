"""Size classes of the data path's large buffers (tunnel/common/proto/sizeclass.py)."""

from __future__ import annotations

import os

import pytest

from tunnel.common.aio.budget import READ_SIZE
from tunnel.common.proto.frames import MAX_DATA_PAYLOAD, SEND_MESSAGE_SIZE
from tunnel.common.proto.sizeclass import (
    CLASS_HEADROOM,
    CLASSED_MIN,
    CLASSES_PER_DOUBLING,
    classed_join,
    size_class,
)


def test_small_sizes_are_kept_exactly() -> None:
    for size in (0, 1, 100, 4096, CLASSED_MIN - 1):
        assert size_class(size) == size


@pytest.mark.parametrize("size", [CLASSED_MIN, 16 * 1024 + 1, 70_000, MAX_DATA_PAYLOAD,
                                  MAX_DATA_PAYLOAD + 14, 200_000, 256 * 1024, 10**6])
def test_a_class_holds_the_size_and_wastes_under_a_quarter(size: int) -> None:
    capacity = size_class(size)
    assert size <= capacity < size * 5 // 4 + 1
    assert size_class(capacity) == capacity  # a class is its own class


def test_each_doubling_has_four_classes() -> None:
    """Few distinct sizes is the point: a freed block fits the next one of its class."""
    for low in (CLASSED_MIN, 64 * 1024, 1 << 20):
        sizes = range(low + CLASS_HEADROOM + 1, 2 * low + CLASS_HEADROOM + 1, 97)
        classes = {size_class(size) for size in sizes}
        assert len(classes) == CLASSES_PER_DOUBLING
        assert max(classes) == 2 * low + CLASS_HEADROOM


def test_the_commonest_blocks_waste_only_the_headroom() -> None:
    """A message with one full DATA frame, and a full stream read, are the blocks the data
    path makes most: each fits a class whose round size is its own, not the next one up."""
    assert size_class(SEND_MESSAGE_SIZE) == MAX_DATA_PAYLOAD + CLASS_HEADROOM
    assert size_class(SEND_MESSAGE_SIZE + 64) == MAX_DATA_PAYLOAD + CLASS_HEADROOM
    assert size_class(READ_SIZE) == READ_SIZE + CLASS_HEADROOM


def test_classed_join_survives_the_sources_being_reused() -> None:
    for size in (10, CLASSED_MIN + 5, 100_000):
        source = bytearray(os.urandom(size))
        joined = classed_join((b"head", memoryview(source)))
        expected = b"head" + bytes(source)
        source[:] = bytes(size)
        assert bytes(joined) == expected and len(joined) == size + 4


def test_classed_join_is_plain_bytes_when_small_and_a_class_block_when_large() -> None:
    small = classed_join((b"x" * 100, b"y"))
    assert isinstance(small, bytes) and small == b"x" * 100 + b"y"
    large = classed_join((b"y" * 60_000, memoryview(b"z" * 40_000)))
    assert isinstance(large, memoryview) and isinstance(large.obj, bytearray)
    assert len(large.obj) == size_class(100_000) > 100_000
    assert bytes(large) == b"y" * 60_000 + b"z" * 40_000
