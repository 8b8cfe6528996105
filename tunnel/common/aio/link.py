"""The asyncio adapter: drives a sans-I/O :class:`Mux` over one websockets connection.

One reader loop feeds received messages to the mux and dispatches its events; one writer
task ships :meth:`Mux.next_message` output, so the reader never blocks on a full send buffer
(two readers each waiting for the other's drain would deadlock). A heartbeat task sends PING
frames and declares the link dead when nothing at all arrived for ``heartbeat_timeout``.

Sockets are joined to streams by :class:`StreamSocket` (an ``asyncio.Protocol``, no task per
stream): reads are sent only as far as the stream's send window allows, the rest waits with
reading paused; writes grant credit back only once the transport is below its high-water
mark, so memory per stream stays bounded by the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from tunnel.common.aio.budget import READ_SIZE, LinkGroup, read_buffer
from tunnel.common.aio.wsframing import WsFraming, take_over
from tunnel.common.errors import RemoteProtocolError
from tunnel.common.proto.frames import MAX_DATA_PAYLOAD
from tunnel.common.proto.messages import Message
from tunnel.common.proto.mux import (
    ControlReceived,
    DataReceived,
    Event,
    GoAwayCode,
    GoAwayReceived,
    Mux,
    PingReceived,
    PongReceived,
    ResetCode,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowOpened,
)

__all__ = [
    "LINK_HIGH_WATER",
    "Link",
    "LinkClosed",
    "StreamSocket",
    "Traffic",
    "abort_with_reset",
    "fin_on_close",
    "reset_on_close",
]

#: Queued DATA bytes on a link above which every stream pauses reading its socket.
LINK_HIGH_WATER = 1024 * 1024
LINK_LOW_WATER = LINK_HIGH_WATER // 4
#: Above this, streams that have not read yet in this turn do not get to: with hundreds of
#: readable sockets, one read each (up to 256 KiB) queued hundreds of MiB (L-1). Below it a
#: turn lets every readable stream read once, which is what keeps a saturated link fair
#: (F-4: pausing everyone already at LINK_HIGH_WATER starves most of the streams). Far above
#: 32 streams x 256 KiB, so ordinary fan-outs never reach it.
LINK_CEILING = 16 * 1024 * 1024
#: A peer that lets this much pile up in our send buffer is not reading: drop it. Our own
#: writer waits for the buffer to drain long before this, so only replies we cannot hold
#: back (WebSocket pongs, control replies to a flood) ever get here (reliability B-7).
LINK_WRITE_BUFFER_LIMIT = 4 * 1024 * 1024
#: Queued control replies (pongs, resets) above which the peer is flooding us.
LINK_URGENT_LIMIT = 1024 * 1024
WATCHDOG_INTERVAL = 0.5
#: Most one read of a stream socket takes (into the thread's shared read buffer). Reading
#: one frame (128 KiB) at a time instead costs more CPU per GiB (bench.profile).
STREAM_READ_LIMIT = READ_SIZE
#: ... while the relay's links together queue over half their budget (LinkGroup.squeezed).
STREAM_READ_SQUEEZED = 16 * 1024
#: WebSocket close codes used when we end a link.
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
#: Longest a WebSocket close of a link that never ran (a failed login) may take.
LOGIN_CLOSE_TIMEOUT = 1.0

#: SO_LINGER values: on with 0 s (closing sends RST, also when the kernel closes the socket
#: of a process that died) and off (closing sends FIN after the unsent data).
_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


class LinkClosed(Exception):
    """The link ended while a handshake was waiting for a message."""


@dataclass(slots=True)
class Traffic:
    """Byte counters updated as data flows (not at close), read by the status page."""

    bytes_in: int = 0  # from the socket into the tunnel
    bytes_out: int = 0  # from the tunnel out to the socket
    streams_total: int = 0
    streams_open: int = 0


def reset_on_close(sock: socket.socket) -> None:
    """Make closing ``sock`` send RST, so the far end sees an abort, never a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def fin_on_close(sock: socket.socket) -> None:
    """Undo :func:`reset_on_close`: an orderly close of ``sock`` sends FIN again."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Close a TCP transport with RST (see :func:`reset_on_close`)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        reset_on_close(sock)
    cast(asyncio.Transport, transport).abort()


class StreamSocket(asyncio.BufferedProtocol):
    """Joins one multiplexed stream to one TCP connection.

    A buffered protocol so that we choose how much one read takes: the loop would read up
    to 256 KiB from every ready socket in one turn, before any of them could be paused, so
    thousands of visitors sending at once would fill the relay's queues within a turn (L-3).
    While the relay's links together queue over half their budget, a read takes
    ``STREAM_READ_SQUEEZED``.

    While the stream is open its socket lingers 0 s, so that if this process dies (kill -9,
    a crash) the kernel's close sends RST and the far end never takes the abort for a clean
    end (reliability R-13). Only the orderly end, the peer's FIN passed on as ``write_eof``,
    turns lingering off first: from then on a close sends FIN. Both are one setsockopt at
    open or at end, never per read.
    """

    def __init__(self, link: Link | None = None, stream_id: int = 0,
                 traffic: Traffic | None = None) -> None:
        self.link = link
        self.stream_id = stream_id
        self.traffic = traffic or Traffic()
        self.transport: asyncio.Transport | None = None
        self._backlog = bytearray()  # read from the socket, waiting for send credit
        self._early: list[bytes | memoryview] = []  # from the link before the socket exists
        self._local_eof = False  # the socket said EOF
        self._fin_sent = False
        self._remote_eof = False  # the peer sent FIN
        self._reading_paused = False
        self._write_paused = False
        self._uncredited = 0
        #: The link's resume cycle in which this stream last read (Link.pause_all's order).
        self.read_cycle = -1
        self.closed = False
        self.bytes_in = 0  # this connection alone, for the status page
        self.bytes_out = 0

    # ------------------------------------------------------------ attach

    def attach(self, link: Link, stream_id: int) -> None:
        self.link, self.stream_id = link, stream_id
        link.streams[stream_id] = self
        self.traffic.streams_total += 1
        self.traffic.streams_open += 1

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reset_on_close(sock)
        if self.closed:
            abort_with_reset(transport)
            return
        early, self._early = self._early, []
        for chunk in early:
            self.deliver(chunk)
        if early and self.link is not None:
            # Credit for the early bytes was queued outside the read loop: wake the writer,
            # or the peer waits for the next unrelated frame (a stall of seconds).
            self.link.kick()
        if self._remote_eof:
            self._remote_eof = False
            self.remote_eof()

    def get_buffer(self, sizehint: int) -> memoryview:
        link = self.link
        group = link.group if link is not None else None
        if group is not None and group.squeezed():
            return read_buffer()[:STREAM_READ_SQUEEZED]
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        # No copy here: data_received keeps nothing it is given (DATA frames and the
        # backlog are copies), so the shared read buffer is free again when it returns.
        self.data_received(read_buffer()[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        link = self.link
        if link is None or self.closed:
            return
        size = len(data)
        self.traffic.bytes_in += size
        self.bytes_in += size
        self.read_cycle = link.read_cycle
        if self._backlog:
            self._backlog += data
        else:
            self._send(data)
        # Pause at the same mark at which paused streams resume (link_drained): with the
        # high-water mark here, streams that happened to be reading kept the queue between
        # the two marks, the link never drained to low water, and every stream paused
        # meanwhile starved (F-4).
        pending = link.note_queue()
        if self._backlog or pending > LINK_LOW_WATER:
            self._pause_reading(link)
        group = link.group
        if pending > LINK_CEILING or (group is not None and group.over_share(pending)):
            link.pause_all()

    def eof_received(self) -> bool:
        self._local_eof = True
        self._maybe_send_fin()
        return True  # keep our write half open: the peer may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        link = self.link
        if link is None or was_closed:
            return
        link.forget(self)
        if self.stream_id in link.mux:
            link.mux.reset(self.stream_id, ResetCode.ABORTED if exc else ResetCode.CANCEL)
            link.kick()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._uncredited and self.link is not None:
            self.link.mux.consumed(self.stream_id, self._uncredited)
            self._uncredited = 0
            self.link.kick()

    # ------------------------------------------------------------ events from the link

    def deliver(self, data: bytes | memoryview) -> None:
        transport = self.transport
        if transport is None:
            self._early.append(bytes(data))
            return
        size = len(data)
        transport.write(data)
        self.traffic.bytes_out += size
        self.bytes_out += size
        if self._write_paused:
            self._uncredited += size
        elif self.link is not None:
            self.link.mux.consumed(self.stream_id, size)

    def remote_eof(self) -> None:
        if self.transport is None:
            self._remote_eof = True
            return
        if self._remote_eof:
            return
        self._remote_eof = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            fin_on_close(sock)  # the peer ended cleanly: so may our side, even if we die
        if self.transport.can_write_eof():
            try:
                self.transport.write_eof()
            except OSError as exc:
                # The local end was reset and nothing noticed yet (reading paused, nothing
                # queued): asyncio's write_eof shuts the socket down directly and raises
                # ENOTCONN. That ends this stream, never the link (R-10 under CI load).
                self._lost_locally(exc)
                return
        self._maybe_finish()

    def window_opened(self) -> None:
        link = self.link
        if link is None or self.closed:
            return
        if self._backlog:
            data = bytes(self._backlog)
            self._backlog.clear()
            self._send(data)
        if not self._backlog:
            self._maybe_send_fin()
            # Same bar as link_drained: resuming here at the high-water mark let the streams
            # that got credit back (the fastest ones) read again before the link drained for
            # the others, and they took ever more of a saturated link (F-4).
            if self._reading_paused and link.mux.pending_data_bytes <= LINK_LOW_WATER:
                self._resume_reading()

    def abort(self) -> None:
        """The stream was reset (by the peer or because the link died)."""
        if self.closed:
            return
        self.closed = True
        if self.link is not None:
            self.link.forget(self)
        if self.transport is not None:
            abort_with_reset(self.transport)

    # ------------------------------------------------------------ internals

    def _send(self, data: bytes | bytearray | memoryview) -> None:
        link = self.link
        assert link is not None
        window = link.mux.send_window(self.stream_id)
        view = memoryview(data)
        offset, total = 0, len(view)
        while offset < total and window > 0:
            size = min(total - offset, window, MAX_DATA_PAYLOAD)
            link.mux.send_data(self.stream_id, view[offset:offset + size])
            offset += size
            window -= size
        if offset < total:
            self._backlog += view[offset:]
        link.kick()

    def _maybe_send_fin(self) -> None:
        if self._local_eof and not self._fin_sent and not self._backlog and self.link:
            self._fin_sent = True
            self.link.mux.send_eof(self.stream_id)
            self.link.kick()
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._fin_sent and self._remote_eof and self.transport is not None:
            self.closed = True
            if self.link is not None:
                self.link.forget(self)
            self.transport.close()

    def pause_for_link(self, link: Link) -> None:
        """Pause reading because the whole link is full (see :meth:`Link.pause_all`)."""
        if not self.closed:
            self._pause_reading(link)

    def _pause_reading(self, link: Link) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
            link.paused[self] = None

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        if self.link is not None:
            self.link.paused.pop(self, None)

    def check_reset(self) -> None:
        """Notice a peer's RST while reading is paused.

        A paused socket is not polled, so with nothing queued to write either, a visitor
        (or target) that reset the connection would hold its stream, window and fd until
        the far side ended it. The kernel keeps the reset as a pending socket error: ask.
        """
        transport = self.transport
        if transport is None or self.closed:
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            return
        if err:
            self._lost_locally(OSError(err, os.strerror(err)))

    def _lost_locally(self, exc: OSError) -> None:
        """The local socket failed outside the loop's view: reset the stream, drop the fd."""
        self.connection_lost(exc)
        if self.transport is not None:
            self.transport.abort()

    def detached(self) -> None:
        """The stream left its link (finished, reset or the link died); a hook."""

    def link_drained(self) -> bool:
        """The link's queue fell below the low-water mark; returns whether this resumed."""
        if self._backlog:
            return False
        was_paused = self._reading_paused
        self._resume_reading()
        return was_paused


OpenHandler = Callable[["Link", StreamOpened], None]
ControlHandler = Callable[["Link", dict[str, Any]], None]


class Link:
    """One end of a link: a WebSocket connection, a mux, its streams and timers.

    The roles (tunnel/server, tunnel/client) use only the methods below: each one that
    queues output wakes the writer itself, so no caller can leave a frame unsent. ``ws`` and
    ``mux`` are this adapter's own (tests read them); no role touches them.
    """

    def __init__(self, ws: Connection | WsFraming, mux: Mux, *, name: str, logger: logging.Logger,
                 heartbeat_interval: float, heartbeat_timeout: float,
                 clock: Callable[[], float] | None = None,
                 group: LinkGroup | None = None) -> None:
        #: websockets' connection for the opening handshake; our WsFraming once the login
        #: took over the framing (:meth:`take_over_framing`).
        self.ws: Connection | WsFraming = ws
        self.mux = mux
        self.name = name
        self.log = logging.LoggerAdapter(logger, {"client": name})
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock or asyncio.get_running_loop().time
        mux.clock = self.clock  # the mux's flood limits run on our clock
        #: Set when the peer broke the protocol (the relay counts these; reliability B-3).
        self.protocol_error: str | None = None
        self.streams: dict[int, StreamSocket] = {}
        self.group = group
        self._reported = 0  # this link's queue as last added to the group's sum
        self._grouped = False  # counted in the group: from run()'s start to its end
        #: Streams not reading because the link is full, in the order they resume: a dict
        #: for its order (streams that were starved go first; see pause_all).
        self.paused: dict[StreamSocket, None] = {}
        #: Counts the times paused streams were resumed at low water.
        self.read_cycle = 0
        self.on_open: OpenHandler | None = None
        self.on_control: ControlHandler | None = None
        self.last_rx = self.clock()
        self.rtt: float | None = None
        self.close_reason = ""
        self._wake = asyncio.Event()
        self._ping_ids = itertools.count(1)
        self._ping_sent: dict[int, float] = {}
        self._closing = False
        self._goaway: int | None = None
        if isinstance(ws, WsFraming):
            self._hook(ws)

    # ------------------------------------------------------------ the roles' operations

    def send_control(self, message: Message) -> None:
        """Queue a control message for the writer (while :meth:`run` runs)."""
        self.mux.send_control(message.to_wire())
        self.kick()

    def open_stream(self, tunnel_id: int, peer: str) -> int:
        """Open a stream to the peer for a visitor; raises LocalProtocolError at the limit."""
        stream_id = self.mux.open_stream(tunnel_id, peer)
        self.kick()
        return stream_id

    def reset_stream(self, stream_id: int, code: ResetCode = ResetCode.REFUSED) -> None:
        """Refuse or end a stream the peer opened or that we opened."""
        self.mux.reset(stream_id, code)
        self.kick()

    @property
    def max_streams(self) -> int:
        """Most streams open at once on this link (the relay's setting, told at login)."""
        return self.mux.max_streams

    def set_max_streams(self, count: int) -> None:
        self.mux.max_streams = count

    @property
    def stray_frames(self) -> int:
        """Frames the peer sent for streams that no longer exist (a count for the relay)."""
        return self.mux.stray_frames

    def set_max_message_size(self, size: int | None) -> None:
        """Change the largest message accepted (the relay raises it after the login)."""
        ws = self.ws
        if isinstance(ws, WsFraming):
            ws.max_message_size = size
        else:
            ws.protocol.max_message_size = size

    def take_over_framing(self) -> None:
        """Move the link from websockets' framing to ours (wsframing.py), keeping the
        message size limit. Call it only where the peer waits for us, so websockets holds
        none of its bytes (the relay: before the challenge; the client: after reading it);
        otherwise RemoteProtocolError."""
        ws = self.ws
        if isinstance(ws, WsFraming):
            return
        framing = take_over(ws, max_message_size=ws.protocol.max_message_size)
        self.ws = framing
        self._hook(framing)

    def _hook(self, framing: WsFraming) -> None:
        """Check the send buffer each time the framing wrote a reply of its own (see
        :meth:`watchdog`), for the rest of the link's life."""
        framing.on_reply_written = self._check_write_buffer

    async def close_websocket(self, code: int, reason: str,
                              timeout: float = LOGIN_CLOSE_TIMEOUT) -> None:
        """End a link that never ran (a failed login) with this WebSocket close code.

        Bounded by ``timeout``; a peer that does not finish the close is dropped. Never
        raises: closing a misbehaving peer must not fail the caller.
        """
        try:
            async with asyncio.timeout(timeout):
                await self.ws.close(code, reason)
        except Exception:
            self.ws.transport.abort()

    # ------------------------------------------------------------ handshake helpers

    async def send_now(self, message: Message) -> None:
        """Send a control message directly (before :meth:`run` starts the writer)."""
        self.mux.send_control(message.to_wire())
        while (out := self.mux.next_message()) is not None:
            await self.ws.send(out)

    async def receive_control(self, timeout: float) -> dict[str, Any]:
        """Wait for the next control message during a handshake; other frames are errors."""
        try:
            async with asyncio.timeout(timeout):
                raw = await self.ws.recv()
        except ConnectionClosed as exc:
            raise LinkClosed(str(exc)) from exc
        if isinstance(raw, str):
            raise RemoteProtocolError("text message on the link")
        events = self.mux.receive(raw)
        if len(events) != 1 or not isinstance(events[0], ControlReceived):
            raise RemoteProtocolError("expected a control message")
        return events[0].message

    # ------------------------------------------------------------ running

    def kick(self) -> None:
        """Output is waiting: wake the writer."""
        self._wake.set()

    def join_group(self) -> None:
        """Count this link (and what it holds) in its group while it runs."""
        group = self.group
        if group is None or self._grouped:
            return
        group.links += 1
        self._grouped = True
        self.note_queue()
        if isinstance(self.ws, WsFraming):
            self.ws.join(group)

    def leave_group(self) -> None:
        group = self.group
        if group is None or not self._grouped:
            return
        if isinstance(self.ws, WsFraming):
            self.ws.leave()
        self._grouped = False
        group.links -= 1
        group.queued -= self._reported
        self._reported = 0

    def note_queue(self) -> int:
        """The queued DATA bytes, reported to the group (if any) as they change."""
        queued = self.mux.pending_data_bytes
        if self._grouped and queued != self._reported:
            assert self.group is not None
            self.group.queued += queued - self._reported
            self._reported = queued
        return queued

    def pause_all(self) -> None:
        """Stop reading every stream's socket: the link's queue is above ``LINK_CEILING``,
        or above its fair share of its group's ceiling (tunnel/common/aio/budget.py).

        Each stream pauses itself after its read once the queue is above low water, but
        when many sockets are readable in one loop turn each still reads once (up to 256 KiB)
        before its own check, so a thousand visitors (reliability L-1) would queue hundreds
        of MiB in the relay.
        Pausing them all here also covers the readable ones still due this turn: the loop
        skips a reader removed meanwhile. They resume together at low water.

        The streams paused here before they could read go first in the next turn, those
        that read go last: the event loop serves resumed sockets in the order they were
        resumed (epoll's ready list), so a fixed order would give the same streams the
        first reads every turn.
        """
        for sock in self.streams.values():
            sock.pause_for_link(self)
        cycle = self.read_cycle
        # Stable: among equals the older order stays. False (did not read) sorts first.
        self.paused = dict.fromkeys(sorted(self.paused, key=lambda s: s.read_cycle == cycle))

    def resume_paused(self) -> None:
        """The queue is at low water: paused streams read again, in :meth:`pause_all`'s order.

        A stream still holding a backlog waits for its window instead (window_opened)."""
        resumed = [sock for sock in list(self.paused) if sock.link_drained()]
        if resumed:  # a new turn: reads from now on count for it
            self.read_cycle += 1

    def forget(self, sock: StreamSocket) -> None:
        if self.streams.get(sock.stream_id) is sock:
            del self.streams[sock.stream_id]
            sock.traffic.streams_open -= 1
            sock.detached()
        self.paused.pop(sock, None)

    async def run(self) -> None:
        """Serve the link until it closes; every stream is aborted when it does."""
        self.join_group()
        tasks = [asyncio.create_task(self._write_loop(), name=f"link-writer-{self.name}"),
                 asyncio.create_task(self._heartbeat_loop(), name=f"link-heartbeat-{self.name}"),
                 asyncio.create_task(self.watchdog(), name=f"link-watchdog-{self.name}")]
        try:
            await self._read_loop()
        except RemoteProtocolError as exc:
            self.close_reason = f"protocol error: {exc}"
            self.protocol_error = str(exc)
            self.log.warning("closing link of %s: %s", self.name, self.close_reason)
            self.mux.send_goaway(GoAwayCode.PROTOCOL_ERROR)
            await self._flush_quietly()
            await self.ws.close(CLOSE_PROTOCOL_ERROR, "protocol error")
        except ConnectionClosed:
            pass
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._abort_streams()
            if not self.ws.transport.is_closing():
                self.ws.transport.abort()
            self.leave_group()

    async def close(self, code: GoAwayCode = GoAwayCode.NORMAL, reason: str = "") -> None:
        """End the link politely: GOAWAY, then a WebSocket close."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = reason or code.name.lower()
        self.mux.send_goaway(code)
        await self._flush_quietly()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(CLOSE_GOING_AWAY, reason[:100]), 2.0)
        # A peer (or proxy) that never finishes the close must not hold a shutdown for the
        # TLS shutdown timeout: after the bounded polite close, drop the connection.
        self.ws.transport.abort()

    def abort(self, reason: str) -> None:
        """Drop the link at once (dead peer, replaced session)."""
        self.close_reason = reason
        self.ws.transport.abort()

    @property
    def goaway_code(self) -> int | None:
        return self._goaway

    # ------------------------------------------------------------ loops

    async def _read_loop(self) -> None:
        ws = self.ws
        mux = self.mux
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                raise RemoteProtocolError("text message on the link")
            self.last_rx = self.clock()
            for event in mux.receive(message):
                self._dispatch(event)
            if mux.has_output():
                self._wake.set()
                if mux.urgent_bytes() > LINK_URGENT_LIMIT:
                    raise RemoteProtocolError("peer floods control frames without reading")

    def _dispatch(self, event: Event) -> None:
        streams = self.streams
        if isinstance(event, DataReceived):
            sock = streams.get(event.stream_id)
            if sock is not None:
                sock.deliver(event.data)
        elif isinstance(event, WindowOpened):
            sock = streams.get(event.stream_id)
            if sock is not None:
                sock.window_opened()
        elif isinstance(event, StreamEnded):
            sock = streams.get(event.stream_id)
            if sock is not None:
                sock.remote_eof()
        elif isinstance(event, StreamReset):
            sock = streams.get(event.stream_id)
            if sock is not None:
                sock.abort()
        elif isinstance(event, StreamOpened):
            if self.on_open is None:
                raise RemoteProtocolError("unexpected OPEN")
            self.on_open(self, event)
        elif isinstance(event, ControlReceived):
            if self.on_control is None:
                raise RemoteProtocolError("unexpected control message")
            self.on_control(self, event.message)
        elif isinstance(event, PongReceived):
            sent = self._ping_sent.pop(event.value, None)
            if sent is not None:
                self.rtt = self.clock() - sent
        elif isinstance(event, GoAwayReceived):
            self._goaway = event.code
            self.close_reason = f"peer sent goaway ({_goaway_name(event.code)})"
        elif isinstance(event, PingReceived):
            pass  # the mux already queued the reply

    async def _write_loop(self) -> None:
        ws = self.ws
        mux = self.mux
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            self.note_queue()  # a reset may have dropped queued data since the last report
            while (message := mux.next_message()) is not None:
                await ws.send(message)
                if self.note_queue() <= LINK_LOW_WATER and self.paused:
                    self.resume_paused()

    async def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            if now - self.last_rx > self.heartbeat_timeout:
                self.log.warning("link of %s silent for %.1fs: declaring it dead",
                                 self.name, now - self.last_rx)
                self.abort("heartbeat timeout")
                return
            ping_id = next(self._ping_ids) & 0xFFFFFFFF
            self._ping_sent = {k: v for k, v in self._ping_sent.items()
                               if now - v < self.heartbeat_timeout}
            self._ping_sent[ping_id] = now
            self.mux.send_ping(ping_id)
            self.kick()

    async def watchdog(self) -> None:
        """Drop the link when the peer stops reading (also run during the login).

        Replies the framing writes on its own (pongs) bypass our writer's backpressure. A
        timer alone is too slow for them: one event-loop turn may read megabytes of pings
        (uvloop reads up to 32 times per socket per turn), so the framing also calls
        :meth:`_check_write_buffer` each time it wrote one, in the read path (reliability
        B-7; installed by :meth:`_hook`). This loop is the timer, and the check for resets
        of paused sockets.
        """
        while not self._check_write_buffer():
            await asyncio.sleep(WATCHDOG_INTERVAL)
            for sock in list(self.paused):
                sock.check_reset()

    def _check_write_buffer(self) -> bool:
        """Abort the link if the peer let our send buffer pass the limit; True if so."""
        transport = self.ws.transport
        buffered = transport.get_write_buffer_size()
        if buffered <= LINK_WRITE_BUFFER_LIMIT:
            return False
        if not transport.is_closing():
            self.log.warning("link of %s: peer does not read (%d bytes queued): dropping it",
                             self.name, buffered)
            self.abort("peer does not read")
        return True

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                while (message := self.mux.next_message()) is not None:
                    await self.ws.send(message)

    def _abort_streams(self) -> None:
        self.mux.reset_all()
        for sock in list(self.streams.values()):
            sock.abort()
        self.streams.clear()
        self.paused.clear()


def _goaway_name(code: int) -> str:
    try:
        return GoAwayCode(code).name.lower()
    except ValueError:
        return str(code)

