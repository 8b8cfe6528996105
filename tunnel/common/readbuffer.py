"""One read buffer per thread, for protocols that are done with a read before they return.

The TLS layer feeds each read to OpenSSL, and stream sockets copy each read out, within
``buffer_updated``; the event loop never calls a read callback inside another one, so every
such protocol of a thread can read into the same buffer instead of one buffer each.
"""

from __future__ import annotations

import threading

__all__ = ["READ_SIZE", "read_buffer"]

#: Bytes one read may take: what asyncio and uvloop read at once themselves.
READ_SIZE = 256 * 1024

_local = threading.local()


def read_buffer() -> memoryview:
    """This thread's read buffer (``READ_SIZE`` bytes)."""
    view: memoryview | None = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(READ_SIZE))
    return view
