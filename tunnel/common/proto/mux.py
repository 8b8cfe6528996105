"""Sans-I/O stream multiplexer: the stream table, credit windows and limits of one link.

Also home of :class:`TokenBucket`, the one rate limiter behind the mux's flood limits and
the relay's open limits.

No sockets, no event loop, no clock. The I/O layer feeds each received link message to
:meth:`Mux.receive` and gets back a list of events; it calls :meth:`Mux.send_data`,
:meth:`Mux.send_eof`, :meth:`Mux.reset` and :meth:`Mux.consumed` as its sockets produce and
absorb bytes, and ships each message :meth:`Mux.next_message` returns.

Flow control follows yamux with credit granted on *consumption* (rust-yamux OnRead): a
receiver grants credit back only once the bytes left its buffer (written to the local socket),
so a slow reader stalls its own stream and nothing else, and memory per stream is bounded by
the window. Credit is batched: an update is sent once half the window has been consumed.

Only the relay opens streams (a visitor connected to a public port); stream ids are odd and
strictly increasing, and an OPEN from the client is a protocol error.

Floods are bounded here, on an injected clock (reliability B-4, B-7, I-5): frames that carry
no stream bytes and that the peer sends on its own initiative (PING, GOAWAY, CONTROL, and
window updates that return no credit we actually spent) are limited to
``MAX_CONTROL_FRAMES_PER_SECOND``; empty DATA frames to ``MAX_EMPTY_DATA_PER_SECOND``; DATA for
a stream reset by either side, beyond what the peer may still have had in flight, to
``MAX_STRAY_DATA_PER_MINUTE``. Going over any of them is a protocol error.

Those limits are per kind; over them one rule covers every frame, whatever its type and
whatever the state of its stream (reliability B-13): a frame that delivers no bytes to a
live stream is a *bare* frame, charged at the single point where frames enter the mux to
``MAX_BARE_FRAMES_PER_SECOND`` before its handler runs, so no handler path can skip it.
What is left uncharged, DATA bytes for a live stream, is bounded by that stream's window.

RESET goes out ahead of queued DATA (control frames first), so a reset drops the stream's
DATA still queued here: sent behind the RESET, it would reach a peer that already forgot
the stream and count against its stray-data limit (F-5: hundreds of visitors leaving at
once must not make the client close the link for stray data).
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunnel.common.errors import LocalProtocolError, RemoteProtocolError
from tunnel.common.proto.frames import (
    MAX_CONTROL_PAYLOAD,
    MAX_DATA_PAYLOAD,
    MAX_OPEN_PAYLOAD,
    MAX_WINDOW,
    SEND_MESSAGE_SIZE,
    Flag,
    Frame,
    FrameType,
    data_frame,
    encode_frame,
    iter_frames,
)
from tunnel.common.proto.sizeclass import classed_join

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "INITIAL_WINDOW",
    "MAX_BARE_FRAMES_BURST",
    "MAX_BARE_FRAMES_PER_SECOND",
    "MAX_CONTROL_BURST",
    "MAX_CONTROL_FRAMES_PER_SECOND",
    "MAX_EMPTY_DATA_PER_SECOND",
    "MAX_STRAY_DATA_PER_MINUTE",
    "MIN_EARNED_GRANT",
    "ControlReceived",
    "DataReceived",
    "Event",
    "GoAwayCode",
    "GoAwayReceived",
    "Mux",
    "PingReceived",
    "PongReceived",
    "RateLimit",
    "ResetCode",
    "Role",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "TokenBucket",
    "WindowOpened",
]


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst`` events.

    Refilled lazily from the time passed in, so it costs nothing while idle; a time that
    does not move forward refills nothing.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

#: Send window every stream starts with, on both sides (the wire spec fixes it).
INITIAL_WINDOW = 1024 * 1024
#: Streams one link may hold at once; an OPEN beyond it is answered with RESET(REFUSED).
DEFAULT_MAX_STREAMS = 256
#: Unsolicited data-less frames a peer may send per second (PINGs, GOAWAY, CONTROL, window
#: updates that return no spent credit). Our own peer sends about 2 per heartbeat interval
#: plus a telemetry message every 5 s; the credit it returns for bulk data does not count.
MAX_CONTROL_FRAMES_PER_SECOND = 100
#: ...of which this many may come at once: a login legitimately brings up to 256 expose
#: claims (tunnel.client.settings.MAX_EXPOSES) in one burst, and as many replies back. A
#: sustained rate above the limit is still cut off, after burst / (rate - limit) seconds.
MAX_CONTROL_BURST = 512
#: Empty DATA frames (no bytes, no FIN) a peer may send per second; ours sends none.
MAX_EMPTY_DATA_PER_SECOND = 1000
#: DATA frames per minute for a stream already gone, beyond the bytes the peer could still
#: have had in flight when we reset it (those are drained without counting against it).
MAX_STRAY_DATA_PER_MINUTE = 100
#: Bare frames (any frame that delivers no bytes to a live stream: OPEN, RESET, FIN, empty
#: DATA, WINDOW_UPDATE, PING, GOAWAY, CONTROL, and every frame for a stream that is gone) a
#: peer may send per second. A stream's life costs a few (OPEN, FIN or RESET each way, the
#: DATA still in flight when it was reset), so this leaves room for several times the
#: relay's default opens per port (2000 a second); earned window updates come one per half
#: window of bulk data, a few thousand a second at gigabytes a second.
MAX_BARE_FRAMES_PER_SECOND = 20_000
#: ...of which this many may come at once: every stream of a full link (DEFAULT_MAX_STREAMS)
#: reset together, each with a window of DATA in flight in frames of 16 KiB or more.
MAX_BARE_FRAMES_BURST = 65_536
#: A WINDOW_UPDATE returning at least this much spent credit is earned, not a control frame:
#: our receiver grants in batches of half a window, a dribbler in single bytes.
MIN_EARNED_GRANT = MAX_DATA_PAYLOAD // 8
#: Closed streams whose in-flight allowance we remember (oldest forgotten first).
STRAY_MEMORY = 2 * DEFAULT_MAX_STREAMS
#: OPEN payload: tunnel id, then the visitor address as UTF-8.
HEADER_OPEN = struct.Struct("!I")
MAX_PEER_BYTES = MAX_OPEN_PAYLOAD - HEADER_OPEN.size


class Role(enum.Enum):
    RELAY = "relay"  # opens streams (odd ids)
    CLIENT = "client"  # accepts them


class ResetCode(enum.IntEnum):
    CANCEL = 0  # the local side went away without error
    REFUSED = 1  # the target could not be reached, or a limit was hit
    ABORTED = 2  # a socket failed or was reset mid-stream
    FLOW_CONTROL = 3  # the peer overran the receive window
    LINK_LOST = 4  # the link carrying the stream ended


class GoAwayCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2
    REPLACED = 3  # a newer link of the same client took over
    SHUTDOWN = 4  # the peer is shutting down
    REVOKED = 5  # the client was removed from the relay or its credential changed


# ----------------------------------------------------------------------------- events


@dataclass(slots=True)
class StreamOpened:
    stream_id: int
    tunnel_id: int
    peer: str


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes | memoryview


@dataclass(slots=True)
class StreamEnded:
    """The peer half-closed: no more data will arrive on this stream."""

    stream_id: int


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    code: int


@dataclass(slots=True)
class WindowOpened:
    """Send credit arrived for a stream that the pump may be waiting on."""

    stream_id: int


@dataclass(slots=True)
class ControlReceived:
    message: dict[str, Any]


@dataclass(slots=True)
class PingReceived:
    value: int


@dataclass(slots=True)
class PongReceived:
    value: int


@dataclass(slots=True)
class GoAwayReceived:
    code: int


Event = (StreamOpened | DataReceived | StreamEnded | StreamReset | WindowOpened
         | ControlReceived | PingReceived | PongReceived | GoAwayReceived)


# ----------------------------------------------------------------------------- state


def _frozen_clock() -> float:
    """The default clock of a bare Mux: limits then count in total, never refill."""
    return 0.0


class RateLimit:
    """``limit`` events per ``period`` seconds, bursts up to ``burst`` (``limit`` when not
    given): a :class:`TokenBucket` that starts full at the first event it sees."""

    __slots__ = ("_bucket", "burst", "limit", "period")

    def __init__(self, limit: int, period: float, burst: int = 0) -> None:
        self.limit = limit
        self.period = period
        self.burst = burst
        self._bucket: TokenBucket | None = None

    def allow(self, now: float) -> bool:
        """Take one token at time ``now``; False once the peer has gone over the rate."""
        if self._bucket is None:
            self._bucket = TokenBucket(self.limit / self.period,
                                       float(self.burst or self.limit), now)
        return self._bucket.take(now)


@dataclass(slots=True)
class _Stream:
    send_window: int = INITIAL_WINDOW
    recv_window: int = INITIAL_WINDOW  # bytes the peer may still send before our next grant
    unacked: int = 0  # consumed bytes not yet granted back
    local_ended: bool = False
    remote_ended: bool = False
    queued: int = 0  # bytes of this stream's DATA frames waiting in the send queue


@dataclass
class Mux:
    """The multiplexer state of one link end."""

    role: Role
    max_streams: int = DEFAULT_MAX_STREAMS
    window: int = INITIAL_WINDOW
    _streams: dict[int, _Stream] = field(default_factory=dict)
    _urgent: list[bytes] = field(default_factory=list)
    _urgent_size: int = 0
    #: DATA frames by stream id, in sending order.
    _data: deque[tuple[int, bytes | memoryview]] = field(default_factory=deque)
    #: Streams reset while frames of theirs were queued: those are skipped when taken.
    #: Ids are never reused, so the set empties whenever the queue does.
    _dropped: set[int] = field(default_factory=set)
    #: Bytes of DATA frames queued but not yet taken by :meth:`next_message`.
    pending_data_bytes: int = 0
    _last_id: int = 0
    #: Frames of any type for streams already gone (drained, counted; reliability B-4, B-13).
    stray_frames: int = 0
    #: Time source for the flood limits; the I/O layer injects its event loop's clock.
    clock: Callable[[], float] = _frozen_clock
    _now: float = 0.0
    _control_rate: RateLimit = field(
        default_factory=lambda: RateLimit(MAX_CONTROL_FRAMES_PER_SECOND, 1.0,
                                          MAX_CONTROL_BURST))
    _empty_rate: RateLimit = field(
        default_factory=lambda: RateLimit(MAX_EMPTY_DATA_PER_SECOND, 1.0))
    _stray_rate: RateLimit = field(
        default_factory=lambda: RateLimit(MAX_STRAY_DATA_PER_MINUTE, 60.0))
    _bare_rate: RateLimit = field(
        default_factory=lambda: RateLimit(MAX_BARE_FRAMES_PER_SECOND, 1.0,
                                          MAX_BARE_FRAMES_BURST))
    #: Reset stream -> DATA bytes the peer may still have had in flight (either side reset it).
    _in_flight_allowance: dict[int, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ outputs

    def next_message(self) -> bytes | memoryview | None:
        """The next link message to send, or None when nothing is queued.

        Control frames (window updates, pings, resets, opens, control messages) go first, so
        a link full of bulk data never starves heartbeats or credit; DATA frames keep their
        order and several share one message up to ``SEND_MESSAGE_SIZE`` (joined in a block
        of its size class: see sizeclass).
        """
        urgent = self._urgent
        if urgent:
            size, count = len(urgent[0]), 1
            while count < len(urgent) and size + len(urgent[count]) <= SEND_MESSAGE_SIZE:
                size += len(urgent[count])
                count += 1
            batch, self._urgent = urgent[:count], urgent[count:]
            self._urgent_size -= size
            return batch[0] if count == 1 else classed_join(batch)
        if self._peek_data() is None:
            return None
        data_batch: list[bytes | memoryview] = [self._pop_data()]
        size = len(data_batch[0])
        while (following := self._peek_data()) is not None and \
                size + len(following) <= SEND_MESSAGE_SIZE:
            data_batch.append(self._pop_data())
            size += len(following)
        return data_batch[0] if len(data_batch) == 1 else classed_join(data_batch)

    def _peek_data(self) -> bytes | memoryview | None:
        """The next queued DATA frame still wanted, past those of streams reset meanwhile."""
        data, dropped = self._data, self._dropped
        while data:
            stream_id, frame = data[0]
            if stream_id not in dropped:
                return frame
            data.popleft()
        dropped.clear()
        return None

    def _pop_data(self) -> bytes | memoryview:
        """Take the frame :meth:`_peek_data` returned."""
        stream_id, frame = self._data.popleft()
        size = len(frame)
        self.pending_data_bytes -= size
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.queued -= size
        return frame

    def urgent_bytes(self) -> int:
        """Size of the queued control frames (a flood check for the I/O layer)."""
        return self._urgent_size

    def has_output(self) -> bool:
        return bool(self._urgent) or self._peek_data() is not None

    def _queue_urgent(self, frame: bytes) -> None:
        self._urgent.append(frame)
        self._urgent_size += len(frame)

    def _queue_data(self, stream_id: int, stream: _Stream,
                    frame: bytes | memoryview) -> None:
        self._data.append((stream_id, frame))
        self.pending_data_bytes += len(frame)
        stream.queued += len(frame)

    def _forget_reset(self, stream_id: int, stream: _Stream) -> None:
        """A reset by either side (the stream already left the table): its DATA still
        queued will not be sent (see the module doc), and what the peer's window allowed
        may still arrive; drained unpenalised (a peer that queues RESET ahead of its DATA,
        as ours did, sends it after the RESET)."""
        if stream.queued:
            self.pending_data_bytes -= stream.queued
            stream.queued = 0
            self._dropped.add(stream_id)
        if not stream.remote_ended:
            self._remember_in_flight(stream_id, stream.recv_window)

    # ------------------------------------------------------------------ queries

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def send_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.send_window if stream is not None and not stream.local_ended else 0

    # ------------------------------------------------------------------ commands

    def open_stream(self, tunnel_id: int, peer: str) -> int:
        """Open a stream towards the client for a visitor of tunnel ``tunnel_id``."""
        if self.role is not Role.RELAY:
            raise LocalProtocolError("only the relay opens streams")
        if len(self._streams) >= self.max_streams:
            raise LocalProtocolError("stream limit reached")
        stream_id = self._last_id + 2 if self._last_id else 1
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted")
        self._last_id = stream_id
        self._streams[stream_id] = _Stream()
        payload = HEADER_OPEN.pack(tunnel_id) + peer.encode("utf-8", "replace")[:MAX_PEER_BYTES]
        self._queue_urgent(encode_frame(Frame(FrameType.OPEN, stream_id, payload=payload)))
        return stream_id

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue DATA; ``len(data)`` must fit the send window and the frame cap."""
        stream = self._live(stream_id)
        if stream.local_ended:
            raise LocalProtocolError(f"stream {stream_id}: data after FIN")
        size = len(data)
        if size > stream.send_window or size > MAX_DATA_PAYLOAD:
            raise LocalProtocolError(f"stream {stream_id}: {size} bytes exceed window or cap")
        if size == 0:
            return
        stream.send_window -= size
        self._queue_data(stream_id, stream, data_frame(stream_id, data))

    def send_eof(self, stream_id: int) -> None:
        """Half-close our direction (FIN); the stream is freed once both sides ended."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_ended:
            return
        stream.local_ended = True
        self._queue_data(stream_id, stream, data_frame(stream_id, b"", fin=True))
        self._maybe_free(stream_id, stream)

    def reset(self, stream_id: int, code: ResetCode = ResetCode.ABORTED) -> None:
        """Abort a stream in both directions; unknown or finished streams are ignored."""
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        self._forget_reset(stream_id, stream)
        self._queue_urgent(encode_frame(Frame(FrameType.RESET, stream_id, value=code)))

    def consumed(self, stream_id: int, size: int) -> None:
        """Bytes of a stream left our buffers: grant them back in batches."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_ended:
            return
        stream.unacked += size
        if stream.unacked >= self.window // 2:
            grant, stream.unacked = stream.unacked, 0
            stream.recv_window += grant
            update = Frame(FrameType.WINDOW_UPDATE, stream_id, value=grant)
            self._queue_urgent(encode_frame(update))

    def send_control(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message, separators=(",", ":")).encode("utf-8")
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise LocalProtocolError(f"control message of {len(payload)} bytes is too large")
        self._queue_urgent(encode_frame(Frame(FrameType.CONTROL, payload=payload)))

    def send_ping(self, value: int) -> None:
        self._queue_urgent(encode_frame(Frame(FrameType.PING, value=value & 0xFFFFFFFF)))

    def send_goaway(self, code: GoAwayCode) -> None:
        self._queue_urgent(encode_frame(Frame(FrameType.GOAWAY, value=code)))

    def reset_all(self) -> list[int]:
        """Forget every stream (the link is gone); returns their ids for the I/O layer."""
        ids = list(self._streams)
        self._streams.clear()
        self._in_flight_allowance.clear()
        self._data.clear()
        self._dropped.clear()
        self.pending_data_bytes = 0
        return ids

    # ------------------------------------------------------------------ input

    def receive(self, message: bytes | bytearray | memoryview) -> list[Event]:
        """Process one link message; raise RemoteProtocolError if the peer broke the rules.

        Frames are handled as they are decoded, so after an error the frames before it may
        have changed state: that is fine, as a protocol error ends the link.
        """
        events: list[Event] = []
        self._now = self.clock()
        for frame in iter_frames(message):
            if not self._delivers_bytes(frame):
                self._limit(self._bare_rate, "frames without stream bytes")
            _HANDLERS[frame.type](self, frame, events)
        return events

    def _delivers_bytes(self, frame: Frame) -> bool:
        """True for the one kind of frame not charged as bare: DATA with bytes for a live
        stream. Its cost is bounded by the stream's receive window, which only the
        application's consumption reopens."""
        return (frame.type is FrameType.DATA and len(frame.payload) > 0
                and frame.stream_id in self._streams)

    def _limit(self, rate: RateLimit, what: str) -> None:
        """Count one frame against ``rate``; a peer over it is flooding (reliability B-7)."""
        if not rate.allow(self._now):
            per = "second" if rate.period == 1.0 else f"{rate.period:g} s"
            raise RemoteProtocolError(f"more than {rate.limit} {what} per {per}")

    def _on_data(self, frame: Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        size = len(frame.payload)
        fin = bool(frame.flags & Flag.FIN)
        if size == 0 and not fin:
            # Carries nothing and creates no event, but costs a decode: rate-limited (I-5).
            self._limit(self._empty_rate, "empty DATA frames")
        stream = self._streams.get(sid)
        if stream is None:
            self._on_stray_data(sid, size, fin)
            return
        if stream.remote_ended:
            raise RemoteProtocolError(f"stream {sid}: data after FIN")
        if size > stream.recv_window:
            # Overrunning the window resets the stream, not the link (reliability B-5).
            self.reset(sid, ResetCode.FLOW_CONTROL)
            events.append(StreamReset(sid, ResetCode.FLOW_CONTROL))
            return
        stream.recv_window -= size
        if size:
            events.append(DataReceived(sid, frame.payload))
        if fin:
            stream.remote_ended = True
            self._maybe_free(sid, stream)
            events.append(StreamEnded(sid))

    def _on_stray_data(self, sid: int, size: int, fin: bool) -> None:
        """DATA for a stream already gone: drained and counted (reliability B-4).

        What the peer sent before our RESET reached it is expected, up to the window it
        still had; anything beyond that is counted against ``MAX_STRAY_DATA_PER_MINUTE``.
        """
        self._check_known_id(sid)
        self.stray_frames += 1
        allowance = self._in_flight_allowance.get(sid)
        if allowance is not None and size <= allowance:
            if fin:
                del self._in_flight_allowance[sid]
            else:
                self._in_flight_allowance[sid] = allowance - size
            return
        self._in_flight_allowance.pop(sid, None)
        self._limit(self._stray_rate, "DATA frames for closed streams")

    def _remember_in_flight(self, sid: int, allowance: int) -> None:
        if len(self._in_flight_allowance) >= STRAY_MEMORY:
            del self._in_flight_allowance[next(iter(self._in_flight_allowance))]
        self._in_flight_allowance[sid] = allowance

    def _on_window(self, frame: Frame, events: list[Event]) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self._check_known_id(frame.stream_id)
            self.stray_frames += 1
            self._limit(self._control_rate, "control frames")
            return
        earned = (frame.value >= MIN_EARNED_GRANT
                  and stream.send_window + frame.value <= INITIAL_WINDOW)
        if not earned:  # credit we never spent, or a dribble of tiny grants (B-5, B-7)
            self._limit(self._control_rate, "control frames")
        if stream.send_window + frame.value > MAX_WINDOW:
            raise RemoteProtocolError(f"stream {frame.stream_id}: window above {MAX_WINDOW}")
        stream.send_window += frame.value
        if not stream.local_ended:
            events.append(WindowOpened(frame.stream_id))

    def _on_open(self, frame: Frame, events: list[Event]) -> None:
        if self.role is Role.RELAY:
            raise RemoteProtocolError("the client may not open streams")
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_id:
            raise RemoteProtocolError(f"stream id {sid} reused, not increasing or wrong parity")
        self._last_id = sid
        if len(frame.payload) < HEADER_OPEN.size:
            raise RemoteProtocolError("OPEN payload too short")
        (tunnel_id,) = HEADER_OPEN.unpack_from(frame.payload)
        peer = bytes(frame.payload[HEADER_OPEN.size:]).decode("utf-8", "replace")
        if len(self._streams) >= self.max_streams:
            # The opener may already have sent data after the OPEN: drain it unpenalised.
            self._remember_in_flight(sid, INITIAL_WINDOW)
            self._queue_urgent(encode_frame(Frame(FrameType.RESET, sid, value=ResetCode.REFUSED)))
            return
        self._streams[sid] = _Stream()
        events.append(StreamOpened(sid, tunnel_id, peer))

    def _on_reset(self, frame: Frame, events: list[Event]) -> None:
        sid = frame.stream_id
        stream = self._streams.pop(sid, None)
        if stream is None:
            self._check_known_id(sid)
            self.stray_frames += 1
            return
        self._forget_reset(sid, stream)
        events.append(StreamReset(sid, frame.value))

    def _on_ping(self, frame: Frame, events: list[Event]) -> None:
        self._limit(self._control_rate, "control frames")
        if frame.flags & Flag.ACK:
            events.append(PongReceived(frame.value))
            return
        self._queue_urgent(encode_frame(Frame(FrameType.PING, flags=Flag.ACK, value=frame.value)))
        events.append(PingReceived(frame.value))

    def _on_goaway(self, frame: Frame, events: list[Event]) -> None:
        self._limit(self._control_rate, "control frames")
        events.append(GoAwayReceived(frame.value))

    def _on_control(self, frame: Frame, events: list[Event]) -> None:
        self._limit(self._control_rate, "control frames")
        try:
            message = json.loads(bytes(frame.payload))
        except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, huge ints, deep nesting
            raise RemoteProtocolError("CONTROL payload is not JSON") from exc
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise RemoteProtocolError("CONTROL payload must be an object with a type")
        events.append(ControlReceived(message))

    # ------------------------------------------------------------------ helpers

    def _live(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _check_known_id(self, stream_id: int) -> None:
        """Frames for a stream that existed are drained; for one never opened, fatal."""
        if stream_id % 2 == 0 or stream_id > self._last_id:
            raise RemoteProtocolError(f"frame for stream {stream_id} that was never opened")

    def _maybe_free(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_ended and stream.remote_ended:
            del self._streams[stream_id]


_Handler = Callable[[Mux, Frame, list[Event]], None]
_HANDLERS: dict[FrameType, _Handler] = {
    FrameType.DATA: Mux._on_data,
    FrameType.WINDOW_UPDATE: Mux._on_window,
    FrameType.OPEN: Mux._on_open,
    FrameType.RESET: Mux._on_reset,
    FrameType.PING: Mux._on_ping,
    FrameType.GOAWAY: Mux._on_goaway,
    FrameType.CONTROL: Mux._on_control,
}
