"""Our own RFC 6455 framing for a link, after websockets did the opening handshake.

Why: the ``websockets`` library's framing and copies are a large share of the tunnel's CPU
(``StreamReader.feed_data``/``read_exact`` copy every received byte into a bytearray and
slice it out again; ``send_data`` builds every frame by concatenation; profile in
docs/benchmarks.md). This
module is an ``asyncio.Protocol`` that takes over the transport once the HTTP upgrade is
done (websockets keeps the handshake, its HTTP parsing and ``process_request``) and then:

* parses frames in place: a frame that arrived whole in one read is handed on as a
  ``memoryview`` of that read (no copy when unmasked); a frame split over reads is joined
  once; masked payloads are unmasked with websockets' C ``apply_mask``;
* writes header and payload with ``transport.writelines`` (no concatenation);
* queues received messages so the Link's read loop takes several per wake-up, pausing the
  transport when the Link lags, and waits in :meth:`send` only while the transport says
  its buffer is full (``pause_writing``/``resume_writing``);
* answers Ping with Pong, runs the closing handshake both ways, and fails the connection
  with the codes websockets uses (1002 protocol error, 1007 bad UTF-8, 1009 too big), so
  peers see the same closes whichever framing runs.

It offers the small surface :class:`~tunnel.common.aio.link.Link` uses: :meth:`recv`,
:meth:`send`, :meth:`close` and ``transport``. Received text messages are returned as
``str`` so the Link rejects them as it does under websockets.

Taking over reads websockets' connection state (its parser and buffers, see
:func:`_websockets_idle`), which is not public API: pyproject.toml allows only the websockets
versions CI runs the link tests on (``.ci/run``: the lowest and the highest allowed).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import struct
from collections.abc import Callable
from typing import Any, cast

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close
from websockets.protocol import OPEN, Side

from tunnel.common.aio.budget import LinkGroup
from tunnel.common.errors import RemoteProtocolError
from tunnel.common.proto.sizeclass import size_class

_MaskFn = Callable[[bytes | bytearray | memoryview, bytes], bytes]
_c_apply_mask: _MaskFn | None
try:  # the C speedup that ships with websockets; the fallback is only for odd builds
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - websockets is always built with it here
    _c_apply_mask = None

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "RECV_HIGH_WATER",
    "WRITE_HIGH_WATER",
    "WsFraming",
    "apply_mask",
    "encode_frame",
    "take_over",
]

log = logging.getLogger("tunnel.common.aio.wsframing")

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset({OP_CONT, OP_TEXT, OP_BINARY})
_CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})
#: RFC 6455 5.5: control frames carry at most 125 bytes and are never fragmented.
MAX_CONTROL_FRAME = 125
#: Longest possible frame header: 2 bytes, 8 bytes of length, 4 bytes of mask.
MAX_HEADER = 14

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
_OK_CODES = frozenset({CLOSE_NORMAL, CLOSE_GOING_AWAY})

#: Received bytes queued for the Link above which we stop reading the socket.
RECV_HIGH_WATER = 4 * 1024 * 1024
RECV_LOW_WATER = RECV_HIGH_WATER // 4
#: Transport write buffer limits: larger than websockets' 32 KiB so a bulk stream does not
#: pause and resume the writer every few frames (the Link's watchdog still drops a peer
#: that lets 4 MiB pile up).
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = WRITE_HIGH_WATER // 4
#: How long a closing handshake may take before the connection is dropped.
CLOSE_TIMEOUT = 2.0
#: Reads of headers and small frames go here (their bytes are copied out); one per link,
#: also before the login, so kept small: large payloads never pass through it.
SCRATCH_SIZE = 64 * 1024
MIN_SCRATCH = 1024
#: A payload at least this long is read straight into a buffer of its own size.
DIRECT_READ_MIN = 16 * 1024
#: Payloads up to this size are joined with their header into one write.
SMALL_WRITE = 4096

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_H2 = struct.Struct("!BB")
_H4 = struct.Struct("!BBH")
_H10 = struct.Struct("!BBQ")

Message = bytes | bytearray | memoryview | str

#: Bytes unmasked per step by :func:`unmask_in_place` (a multiple of the 4-byte mask).
UNMASK_STEP = 64 * 1024


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` (RFC 6455 5.3); C speed when available."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    size = len(data)
    if not size:
        return b""
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")


def unmask_in_place(buf: bytearray | memoryview, mask: bytes) -> None:
    """Unmask a payload we read into a buffer of our own, ``UNMASK_STEP`` at a time.

    A relay receives every client frame masked; unmasking a 512 KiB message into a new copy
    would hold both for a moment, on each of 200 busy links at once (L-3), which adds to the
    relay's peak. The mask repeats every 4 bytes and each step is a multiple of 4.
    """
    view = memoryview(buf)
    for pos in range(0, len(buf), UNMASK_STEP):
        view[pos:pos + UNMASK_STEP] = apply_mask(view[pos:pos + UNMASK_STEP], mask)


def encode_frame(opcode: int, payload: bytes | bytearray | memoryview, *, fin: bool = True,
                 mask: bytes | None = None) -> list[bytes | bytearray | memoryview]:
    """Header and payload of one frame as buffers for ``writelines`` (masked if ``mask``)."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if mask is not None else 0
    if size < 126:
        header = _H2.pack(first, bit | size)
    elif size < 65536:
        header = _H4.pack(first, bit | 126, size)
    else:
        header = _H10.pack(first, bit | 127, size)
    if mask is not None:
        return [header + mask, apply_mask(payload, mask)]
    return [header, payload]


def _valid_close_code(code: int) -> bool:
    return (1000 <= code <= 1014 and code not in {1004, CLOSE_NO_STATUS, CLOSE_ABNORMAL}) or \
        3000 <= code <= 4999


class _Fail(Exception):
    """Raised inside the parser: fail the connection with this close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class WsFraming(asyncio.BufferedProtocol):
    """One WebSocket connection's framing from the end of the handshake to the TCP close.

    A ``BufferedProtocol``: the transport reads (and TLS decrypts) straight into our
    buffers. A large frame's payload is read into a buffer of exactly its size, which then
    *is* the message (no join, no copy, TLS records not joined by the transport either);
    headers and small frames go through a scratch buffer whose bytes are copied out.
    ``data_received`` still works for transports that hand over ``bytes``.
    """

    def __init__(self, *, client: bool, max_message_size: int | None,
                 close_timeout: float = CLOSE_TIMEOUT,
                 mask_key: Callable[[int], bytes] = os.urandom) -> None:
        self.client = client
        self.max_message_size = max_message_size
        self.close_timeout = close_timeout
        self._mask_key = mask_key
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.peer = "?"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: Any = None  # the websockets connection we took over, told at the end
        # parser state
        self._head = b""  # a header split across reads
        self._need = 0  # payload bytes still to come for the current frame
        self._skip = False  # the current frame's payload is discarded
        self._op = 0
        self._fin = True
        self._mask: bytes | None = None
        self._pieces: list[bytes | bytearray | memoryview] = []
        self._scratch = bytearray()  # sized on first use by _scratch_buffer
        self._target: bytearray | None = None  # a large payload being read in place
        self._owned = False  # the one piece is (a view of) _target: ours to unmask in place
        self._filled = 0
        self._msg_op: int | None = None  # opcode of a fragmented message in progress
        self._msg_parts: list[bytes | bytearray | memoryview] = []
        self._msg_size = 0
        # delivery
        self._queue: collections.deque[Message] = collections.deque()
        self._queued = 0
        self.group: LinkGroup | None = None  # the relay's links, while the Link runs
        self._reported = 0  # self._queued as last added to the group's sum
        self._recv_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        # writing and closing
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.close_sent: Close | None = None
        self.close_rcvd: Close | None = None
        self._rcvd_then_sent: bool | None = None
        self._failed = False
        self._lost = False
        self._lost_waiter: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        #: Called after this layer wrote a reply of its own (a pong) in the read path.
        #: Those replies bypass the Link's writer and its backpressure; the Link sets this
        #: to check the send buffer at once, so a ping flood from a peer that never reads
        #: is cut off at the limit rather than at the next timer tick (reliability B-7).
        self.on_reply_written: Callable[[], object] | None = None

    # ------------------------------------------------------------ taking over

    def attach(self, transport: asyncio.BaseTransport, previous: Any = None) -> None:
        """Become ``transport``'s protocol (its bytes come here from now on)."""
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        self._lost_waiter = self._loop.create_future()
        self._previous = previous
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        transport.set_protocol(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Only for a connection started on this protocol (tests); take-over uses attach."""
        self.attach(transport)

    # ------------------------------------------------------------ the Link's surface

    async def recv(self) -> Message:
        """The next message; raises ``ConnectionClosed`` once the connection is gone."""
        queue = self._queue
        while not queue:
            if self._lost:
                raise self._closed_exc()
            assert self._loop is not None
            waiter = self._recv_waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._recv_waiter = None
        message = queue.popleft()
        self._queued -= len(message)
        if self.group is not None:
            self._report()
        if self._reading_paused and self._queued <= RECV_LOW_WATER and not self._lost:
            self._reading_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send one binary message; waits only while the transport's buffer is full."""
        if self.close_sent is not None or self._lost:
            raise self._closed_exc()
        self._write(OP_BINARY, data)
        if self._write_paused:
            await self._drain()

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Run the closing handshake and wait until the TCP connection is gone."""
        if not self._lost:
            self._send_close(code, reason)
        if self._lost_waiter is not None:
            await asyncio.shield(self._lost_waiter)

    # ------------------------------------------------------------ asyncio.Protocol

    def get_buffer(self, sizehint: int) -> memoryview:
        need = self._need
        if self._target is None and need >= DIRECT_READ_MIN and not self._skip:
            pieces, self._pieces = self._pieces, []
            done = sum(len(p) for p in pieces)
            self._target = bytearray(size_class(done + need))  # see sizeclass
            self._target[:done] = b"".join(pieces)
            self._filled = done
        if self._target is not None:
            return memoryview(self._target)[self._filled:self._filled + need]
        return memoryview(self._scratch_buffer())

    def _scratch_buffer(self) -> bytearray:
        """The scratch buffer, no larger than the largest frame we accept needs.

        Before the login the cap is 4 KiB, so up to 512 unauthenticated links cost ~2 MiB
        of scratch, not 32; the buffer grows once when the relay raises the cap.
        """
        limit = self.max_message_size
        size = SCRATCH_SIZE if limit is None else max(MIN_SCRATCH, min(SCRATCH_SIZE, limit
                                                                         + MAX_HEADER))
        if len(self._scratch) < size:
            self._scratch = bytearray(size)  # nothing refers to it between reads
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        target = self._target
        if target is None:
            self._parse(memoryview(self._scratch)[:nbytes], volatile=True)
        else:
            self._filled += nbytes
            self._need -= nbytes
            if not self._need:
                self._target = None
                self._pieces, self._owned = [memoryview(target)[:self._filled]], True
                self._complete()
        self._after_input()

    def data_received(self, data: bytes) -> None:
        self._parse(data)
        self._after_input()

    def _after_input(self) -> None:
        waiter = self._recv_waiter
        if self._queue and waiter is not None and not waiter.done():
            waiter.set_result(None)
        group = self.group
        if group is not None:
            self._report()
        if (self._queued > RECV_HIGH_WATER
                or (group is not None and group.over_recv_share(self._queued))) \
                and not self._reading_paused and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------ the relay's budget

    def join(self, group: LinkGroup) -> None:
        """Count this link's unread messages in ``group`` (tunnel/common/aio/budget.py)."""
        self.group = group
        self._report()

    def leave(self) -> None:
        if self.group is not None:
            self.group.received -= self._reported
            self._reported = 0
            self.group = None

    def _report(self) -> None:
        assert self.group is not None
        self.group.received += self._queued - self._reported
        self._reported = self._queued

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost ends everything

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        # Parsing is over: let the read buffers go now, not when the collector finds a
        # dead link's cycles (unread messages stay for recv()).
        self._scratch, self._target, self._pieces, self._msg_parts = bytearray(), None, [], []
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        for drain in self._drain_waiters:
            if not drain.done():
                drain.set_result(None)
        self._drain_waiters.clear()
        if self._lost_waiter is not None and not self._lost_waiter.done():
            self._lost_waiter.set_result(None)
        previous, self._previous = self._previous, None
        if previous is not None:
            # The websockets connection we replaced still waits for its end (its
            # ``async with`` exit and the server's handler bookkeeping): tell it.
            previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for drain in waiters:
            if not drain.done():
                drain.set_result(None)

    # ------------------------------------------------------------ parsing

    def _parse(self, data: bytes | bytearray | memoryview, volatile: bool = False) -> None:
        """Parse ``data``; ``volatile``: it is our scratch buffer, so payloads are copied."""
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end and not self._lost:
            if self._need:
                take = min(self._need, end - pos)
                if not self._skip:
                    piece = view[pos:pos + take]
                    self._pieces.append(bytes(piece) if volatile else piece)
                pos += take
                self._need -= take
                if not self._need:
                    self._complete()
                continue
            carried = self._head
            chunk = carried + bytes(view[pos:pos + MAX_HEADER]) if carried \
                else bytes(view[pos:pos + MAX_HEADER])
            parsed = self._header(chunk)
            if parsed is None:
                self._head = chunk  # at most 13 bytes: wait for the rest of the header
                return
            self._head = b""
            pos += parsed - len(carried)
            need = self._need
            if need and not self._skip and end - pos >= need:
                # The common case: the whole payload is in this read. No copy.
                piece = view[pos:pos + need]
                self._pieces.append(bytes(piece) if volatile else piece)
                pos += need
                self._need = 0
            if not self._need:
                self._complete()

    def _complete(self) -> None:
        try:
            self._frame_done()
        except _Fail as fail:
            self._fail(fail.code, fail.reason)

    def _header(self, chunk: bytes) -> int | None:
        """Parse a frame header at the start of ``chunk``; its size, or None if incomplete."""
        if len(chunk) < 2:
            return None
        first, second = chunk[0], chunk[1]
        size = second & 0x7F
        offset = 2
        if size == 126:
            if len(chunk) < 4:
                return None
            size = _U16.unpack_from(chunk, 2)[0]
            offset = 4
        elif size == 127:
            if len(chunk) < 10:
                return None
            size = _U64.unpack_from(chunk, 2)[0]
            offset = 10
        masked = bool(second & 0x80)
        if masked:
            if len(chunk) < offset + 4:
                return None
            self._mask = chunk[offset:offset + 4]
            offset += 4
        else:
            self._mask = None
        self._op, self._fin = first & 0x0F, bool(first & 0x80)
        self._need, self._skip = size, False
        self._pieces, self._owned = [], False
        if self._failed:
            self._skip = self._op != OP_CLOSE or size > MAX_CONTROL_FRAME
            return offset
        try:
            self._check_header(first, masked, size)
        except _Fail as fail:
            self._fail(fail.code, fail.reason)
            self._skip = True  # skip its payload: the peer's close reply comes after it
        return offset

    def _check_header(self, first: int, masked: bool, size: int) -> None:
        """The checks websockets made on every frame header, with the same close codes."""
        op = self._op
        if first & 0x70:
            raise _Fail(CLOSE_PROTOCOL_ERROR, "reserved bits must be 0")
        if op not in _DATA_OPCODES and op not in _CONTROL_OPCODES:
            raise _Fail(CLOSE_PROTOCOL_ERROR, f"invalid opcode {op:#x}")
        if masked == self.client:
            raise _Fail(CLOSE_PROTOCOL_ERROR,
                        "incorrect masking" if masked else "unmasked client frame")
        if size >= 1 << 63:
            raise _Fail(CLOSE_PROTOCOL_ERROR, "frame length too large")
        if op in _CONTROL_OPCODES:
            if size > MAX_CONTROL_FRAME:
                raise _Fail(CLOSE_PROTOCOL_ERROR, "control frame too long")
            if not self._fin:
                raise _Fail(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            return
        if op == OP_CONT:
            if self._msg_op is None:
                raise _Fail(CLOSE_PROTOCOL_ERROR, "unexpected continuation frame")
            total = self._msg_size + size
        else:
            if self._msg_op is not None:
                raise _Fail(CLOSE_PROTOCOL_ERROR, "expected a continuation frame")
            total = size
        limit = self.max_message_size
        if limit is not None and total > limit:
            raise _Fail(CLOSE_TOO_BIG, f"message of over {total} bytes exceeds limit of"
                        f" {limit} bytes")

    def _frame_done(self) -> None:
        pieces, self._pieces = self._pieces, []
        if self._skip:
            return
        if len(pieces) == 1:
            payload: bytes | bytearray | memoryview = pieces[0]
        else:
            payload = b"".join(pieces)
        if self._mask is not None:
            if self._owned and isinstance(payload, memoryview):
                unmask_in_place(payload, self._mask)  # keeps its size-class block
            else:
                payload = apply_mask(payload, self._mask)
        op = self._op
        if self._failed:
            if op == OP_CLOSE:
                self._on_close(payload)
            return
        if op in (OP_BINARY, OP_TEXT):
            if self._fin:
                self._deliver(op, payload)
            else:
                self._msg_op, self._msg_parts, self._msg_size = op, [payload], len(payload)
        elif op == OP_CONT:
            assert self._msg_op is not None
            self._msg_parts.append(payload)
            self._msg_size += len(payload)
            if self._fin:
                parts, self._msg_parts = self._msg_parts, []
                msg_op, self._msg_op, self._msg_size = self._msg_op, None, 0
                self._deliver(msg_op, b"".join(parts))
        elif op == OP_PING:
            if self.close_sent is None and not self._lost:
                self._write(OP_PONG, bytes(payload))
                if self.on_reply_written is not None:
                    self.on_reply_written()
        elif op == OP_CLOSE:
            self._on_close(payload)
        # OP_PONG: we never send pings at this layer (the mux has its own); ignore.

    def _deliver(self, op: int, payload: bytes | bytearray | memoryview) -> None:
        if self.close_rcvd is not None:
            return  # nothing counts after the peer's close frame
        message: Message = payload
        if op == OP_TEXT:
            try:
                message = bytes(payload).decode()
            except UnicodeDecodeError as exc:
                raise _Fail(CLOSE_INVALID_DATA, str(exc)) from exc
        self._queue.append(message)
        self._queued += len(message)

    def _on_close(self, payload: bytes | bytearray | memoryview) -> None:
        """The peer's close frame: answer it (unless it answers ours) and end the TCP."""
        if self.close_rcvd is not None:
            return
        raw = bytes(payload)
        if len(raw) >= 2:
            code = _U16.unpack_from(raw)[0]
            try:
                reason = raw[2:].decode()
            except UnicodeDecodeError as exc:
                if not self._failed:
                    raise _Fail(CLOSE_INVALID_DATA, "invalid UTF-8 in close reason") from exc
                reason = ""
            if not _valid_close_code(code) and not self._failed:
                raise _Fail(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        elif len(raw) == 1 and not self._failed:
            raise _Fail(CLOSE_PROTOCOL_ERROR, "close frame too short")
        else:
            code, reason = CLOSE_NO_STATUS, ""
        self.close_rcvd = Close(code, reason)
        if self.close_sent is None:
            self._rcvd_then_sent = True
            echo = code if code != CLOSE_NO_STATUS else None
            self._send_close(echo, "")
        elif self._rcvd_then_sent is None:
            self._rcvd_then_sent = False
        if not self.client:
            self._close_transport()  # RFC 6455 7.1.1: the server closes the TCP first

    def _close_transport(self) -> None:
        """Close the connection; abort it where the transport refuses an orderly close.

        The stock asyncio TLS transport raises RuntimeError from ``close()`` once the peer
        has already ended TLS (state UNWRAPPED), and raising here, inside the transport's
        read callback, would be logged as a fatal error with a traceback (found by the B-1
        live fuzzer). The peer is gone from TLS either way, so an abort loses nothing.
        """
        transport = self.transport
        if transport.is_closing():
            return
        try:
            transport.close()
        except RuntimeError:
            transport.abort()

    # ------------------------------------------------------------ writing and closing

    def _write(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        mask = self._mask_key(4) if self.client else None
        buffers = encode_frame(opcode, payload, mask=mask)
        if len(payload) <= SMALL_WRITE:
            self.transport.write(b"".join(buffers))
        else:
            self.transport.writelines(buffers)

    async def _drain(self) -> None:
        if self._lost:
            raise self._closed_exc()
        assert self._loop is not None
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter
        if self._lost:
            raise self._closed_exc()

    def _send_close(self, code: int | None, reason: str) -> None:
        """Send our close frame once, then give the peer ``close_timeout`` to finish."""
        if self.close_sent is not None or self._lost:
            return
        if code is None:
            payload = b""
            self.close_sent = Close(CLOSE_NO_STATUS, "")
        else:
            encoded = reason.encode()[:MAX_CONTROL_FRAME - 2]
            payload = _U16.pack(code) + encoded
            self.close_sent = Close(code, encoded.decode(errors="ignore"))
        self._write(OP_CLOSE, payload)
        if self._loop is not None and self._close_timer is None:
            self._close_timer = self._loop.call_later(self.close_timeout, self.transport.abort)

    def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: send our close and ignore all but its close reply."""
        if self._failed:
            return
        self._failed = True
        log.warning("closing WebSocket link from %s with %d: %s", self.peer, code, reason)
        self._msg_op, self._msg_parts, self._msg_size = None, [], 0
        if self.close_sent is None:
            self._send_close(code, reason)
        else:
            self.transport.abort()

    def _closed_exc(self) -> ConnectionClosed:
        rcvd, sent = self.close_rcvd, self.close_sent
        if rcvd is not None and sent is not None and rcvd.code in _OK_CODES \
                and sent.code in _OK_CODES:
            return ConnectionClosedOK(rcvd, sent, self._rcvd_then_sent)
        return ConnectionClosedError(rcvd, sent, self._rcvd_then_sent)


def _websockets_idle(ws: Connection) -> bool:
    """Whether websockets holds no byte the peer sent after the handshake."""
    protocol = ws.protocol
    if protocol.state is not OPEN or protocol.reader.buffer or protocol.events:
        return False
    if len(ws.recv_messages.frames):
        return False
    # Between frames the parser waits in ``reader.at_eof()``; anywhere else it has eaten
    # part of a frame (e.g. a header) that we could not hand over.
    # (ServerProtocol/ClientProtocol.parse delegate to Protocol.parse: follow the chain.)
    gen: Any = protocol.parser
    for _ in range(8):
        inner = getattr(gen, "gi_yieldfrom", None)
        if inner is None:
            break
        gen = inner
    return getattr(getattr(gen, "gi_code", None), "co_name", "") == "at_eof"


def take_over(ws: Connection, *, max_message_size: int | None,
              close_timeout: float = CLOSE_TIMEOUT) -> WsFraming:
    """Move ``ws``'s transport to a :class:`WsFraming` for the rest of the link's life.

    Call it only at a point where the peer must not have sent anything since the last
    message read (the relay: before the challenge; the client: after reading it). If
    websockets holds bytes anyway the peer broke the login order: RemoteProtocolError.
    """
    if ws.protocol.state is not OPEN:
        raise ws.protocol.close_exc
    if not _websockets_idle(ws):
        raise RemoteProtocolError("peer sent data before its turn in the login")
    framing = WsFraming(client=ws.protocol.side is Side.CLIENT,
                        max_message_size=max_message_size, close_timeout=close_timeout)
    framing.attach(ws.transport, previous=ws)
    return framing

