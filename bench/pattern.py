"""The deterministic byte stream the pattern source sends and the load generator verifies.

A stream is identified by ``seed``; it is a sequence of CHUNK-sized views into one random
base block, at offsets that move with the chunk index (period 2**20 chunks = 256 GiB), so
reordered, duplicated, lost or cross-stream bytes change the SHA-256 of what arrives.
Sending needs no copy: every chunk is a memoryview of the base block.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator

CHUNK = 256 * 1024
_SPAN = 1 << 20
_BASE = memoryview(random.Random(0x7E11_BE1C).randbytes(_SPAN + CHUNK))

#: Download request sent to the source: u64 size, u64 seed (network byte order).
REQUEST = struct.Struct("!QQ")
#: Upload header sent to the sink before the data: u64 size (TO_EOF: read until EOF).
#: frp does not carry TCP half-close (a shutdown(SHUT_WR) closes the whole proxied
#: connection), so the benchmark announces the size instead of relying on EOF.
HEADER = struct.Struct("!Q")
TO_EOF = (1 << 64) - 1
#: Sink reply: u64 byte count, then the 32-byte SHA-256 of the bytes after the header.
REPLY = struct.Struct("!Q32s")


def chunks(seed: int, size: int) -> Iterator[memoryview]:
    """The ``size`` bytes of stream ``seed`` as memoryviews of at most CHUNK bytes."""
    start = (seed * 104_729) % _SPAN
    index = 0
    left = size
    while left > 0:
        off = (start + index * 40_961) % _SPAN
        n = min(CHUNK, left)
        yield _BASE[off:off + n]
        left -= n
        index += 1


def digest(seed: int, size: int) -> bytes:
    h = hashlib.sha256()
    for view in chunks(seed, size):
        h.update(view)
    return h.digest()
