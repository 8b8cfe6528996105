"""Size classes for the large, short-lived buffers of the data path.

Every forwarded read is copied out of the shared read buffer into a DATA frame, frames are
joined into link messages, and every large link message is read into a buffer of its own.
Sized exactly, those blocks take any size from a few KiB to a frame and more, and glibc's
heap fragments under them: a freed 100 KiB hole cannot hold the next 120 KiB block, so the
heap grows, and a long-lived allocation landing above the holes keeps it from shrinking.
The nightly soak (reliability L-5) reads this as RSS creeping up, beyond its bound, on the
uvloop TLS client (figures in docs/benchmarks.md).

Rounding each such block up to one of four classes per doubling (as jemalloc does) keeps
the set of sizes small, so a block freed is the right size for a later one; the waste is
under 25 % of a block, and only while the block is in flight. Small blocks are copied
exactly: their holes are small and the rounding would cost more than it saves.

Each class has ``CLASS_HEADROOM`` bytes on top of its round size: the commonest large block
is a link message with one full 128 KiB DATA frame plus a few frame headers, and rounding
that up to the next class would waste a fifth of every such message.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CLASSED_MIN",
    "CLASSES_PER_DOUBLING",
    "CLASS_HEADROOM",
    "classed_join",
    "size_class",
]


#: Blocks below this many bytes keep their exact size.
CLASSED_MIN = 16 * 1024
#: Sizes per power of two: 4 bounds the rounding waste at 25 % (jemalloc's spacing).
CLASSES_PER_DOUBLING = 4
#: Bytes of frame headers a class holds beyond its round size.
CLASS_HEADROOM = 256


def size_class(size: int) -> int:
    """The size a block of ``size`` bytes is allocated at (``size`` itself when small)."""
    if size < CLASSED_MIN:
        return size
    body = size - CLASS_HEADROOM
    step = 1 << ((body - 1).bit_length() - CLASSES_PER_DOUBLING.bit_length())
    return -(-body // step) * step + CLASS_HEADROOM


def classed_join(parts: Sequence[bytes | bytearray | memoryview]) -> bytes | memoryview:
    """``parts`` joined into one buffer.

    A large result lives in a block of its size class and comes back as a view of its first
    ``sum(len(part))`` bytes; a small one is plain ``bytes``.
    """
    size = sum(len(part) for part in parts)
    capacity = size_class(size)
    if capacity == size:
        return b"".join(parts)
    block = bytearray(capacity)
    pos = 0
    for part in parts:
        end = pos + len(part)
        block[pos:end] = part
        pos = end
    return memoryview(block)[:size]
