"""A transport for driving a protocol without a socket: writes are recorded, closing ends
the protocol on the next loop turn, as a real transport does (tests of our WebSocket
framing, and the fuzz targets that feed it untrusted bytes)."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["RecordingTransport"]


class RecordingTransport(asyncio.Transport):
    """A transport that records what is written; closing it ends the protocol soon."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.protocol: Any = None
        self.closing = False
        self.aborted = False
        self.reading = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        assert not self.closing, "write after close"
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def take(self) -> bytes:
        out, self.written = bytes(self.written), bytearray()
        return out
