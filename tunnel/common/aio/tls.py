"""The link's TLS on both sides: a TLS layer over a TCP transport, the client context, pins.

The layer (:class:`TlsLayer`, :func:`start_tls`) keeps its buffers small for the link's life.
Why not the event loop's own TLS (``create_server(ssl=...)``, ``connect_accepted_socket``,
``create_connection(ssl=...)``): asyncio's and uvloop's SSL protocols run OpenSSL through
memory BIOs that take a whole ``writelines`` (up to a 512 KiB message) or a 256 KiB socket read
at a time, and an OpenSSL memory BIO never shrinks: each busy link would keep its high-water
mark for as long as it lives, a cost the plain relay does not have (L-3; the figures are in
docs/benchmarks.md).

Here every write is encrypted one TLS record (16 KiB) at a time and each record's ciphertext
is taken out at once, so the outgoing BIO never holds more than a record; the write's
ciphertext goes to the TCP transport in one call, and the buffering is the TCP transport's,
which frees what it sends. Reads are fed to
OpenSSL ``FEED_CHUNK`` at a time and decrypted at once; while the protocol has paused reading,
the TCP transport is paused too and the rest of a read waits as ordinary bytes, so the
incoming BIO never holds more than one chunk.

The layer is the TCP transport's protocol; the protocol above sees a :class:`TlsTransport`.
Closing sends ``close_notify`` and closes TCP without waiting for the peer's (TLS 1.3 allows
it, and the link's own closing handshake has already run by then).

The client's side (:func:`client_ssl_context`, :func:`check_pin`) lives here, away from
:mod:`tunnel.server.tls` (certificate generation, the relay's context), so that a client never
imports ``cryptography.x509``, whose import is a large share of a client's start and is paid
once per program by a lab that starts many clients at once (L-3). The pin only needs the
certificate's SubjectPublicKeyInfo, which :func:`spki_der` cuts out of the DER bytes with a
strict, position-based walk (no search, so nothing elsewhere in a certificate can pose as its
key). The walk reads a certificate the TLS library has already parsed and whose key has just
signed the handshake, so it needs no tolerance: anything but definite-length DER in the
RFC 5280 order is a ``ValueError``, which :func:`check_pin` reports as a mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

from tunnel.common.aio.budget import READ_SIZE, read_buffer
from tunnel.common.config.base import FINGERPRINT_PREFIX, parse_fingerprint
from tunnel.common.errors import FingerprintMismatch, TlsFilesError

__all__ = [
    "FEED_CHUNK",
    "MIN_TLS_VERSION",
    "READ_CHUNK",
    "READ_SQUEEZED",
    "TLS_RECORD",
    "TlsLayer",
    "TlsTransport",
    "check_pin",
    "client_ssl_context",
    "spki_der",
    "spki_fingerprint",
    "ssl_reason",
    "start_tls",
]


MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

_SEQUENCE = 0x30
_INTEGER = 0x02
_EXPLICIT_VERSION = 0xA0  # [0] EXPLICIT Version, absent in v1 certificates
#: Length octets beyond this would describe more than 4 GiB: no certificate is that large.
_MAX_LENGTH_OCTETS = 4
#: tbsCertificate fields before subjectPublicKeyInfo (RFC 5280 4.1), after the version:
#: serialNumber, signature, issuer, validity, subject.
_FIELDS_BEFORE_SPKI = (_INTEGER, _SEQUENCE, _SEQUENCE, _SEQUENCE, _SEQUENCE)


def _element(der: bytes, pos: int, limit: int, tag: int) -> tuple[int, int]:
    """The value span ``(start, end)`` of the element at ``pos``, which must carry ``tag``."""
    if pos + 2 > limit or der[pos] != tag:
        raise ValueError(f"expected DER tag {tag:#04x} at offset {pos}")
    first = der[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    else:
        octets = first & 0x7F
        if not 1 <= octets <= _MAX_LENGTH_OCTETS or start + octets > limit:
            raise ValueError(f"bad DER length at offset {pos}")
        length = int.from_bytes(der[start:start + octets], "big")
        if length < 0x80 or der[start] == 0:
            raise ValueError(f"non-minimal DER length at offset {pos}")
        start += octets
    end = start + length
    if end > limit:
        raise ValueError(f"DER element at offset {pos} runs past its container")
    return start, end


def spki_der(cert_der: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an X.509 certificate, exactly as it appears in it."""
    cert_start, cert_end = _element(cert_der, 0, len(cert_der), _SEQUENCE)
    if cert_end != len(cert_der):
        raise ValueError("bytes after the certificate")
    pos, tbs_end = _element(cert_der, cert_start, cert_end, _SEQUENCE)
    if pos < tbs_end and cert_der[pos] == _EXPLICIT_VERSION:
        pos = _element(cert_der, pos, tbs_end, _EXPLICIT_VERSION)[1]
    for tag in _FIELDS_BEFORE_SPKI:
        pos = _element(cert_der, pos, tbs_end, tag)[1]
    end = _element(cert_der, pos, tbs_end, _SEQUENCE)[1]
    return cert_der[pos:end]


def spki_fingerprint(cert_der: bytes) -> str:
    """``sha256:<hex>`` of the certificate's public key, stable across re-issued certificates."""
    return FINGERPRINT_PREFIX + hashlib.sha256(spki_der(cert_der)).hexdigest()


def ssl_reason(exc: Exception) -> str:
    """A short reason from an ssl/OS error; these carry codes and paths, never file contents."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).replace("_", " ").lower()
        return "not valid PEM (or the key is encrypted)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def client_ssl_context(*, fingerprint: str | None, ca_file: Path | None = None) -> ssl.SSLContext:
    """The client's TLS context.

    With a fingerprint the handshake accepts any certificate and :func:`check_pin` must be
    called on the result: the pin is stronger than CA + hostname checks (it names one key).
    Without one, ordinary CA and hostname verification applies, against ``ca_file`` if given.
    """
    if fingerprint is not None and ca_file is not None:
        raise ValueError("give either a pinned fingerprint or a CA file, not both")
    if fingerprint is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (ssl.SSLError, OSError) as exc:
            paths = [ca_file] if ca_file is not None else []
            raise TlsFilesError(paths, f"cannot load CA file: {ssl_reason(exc)}") from None
    context.minimum_version = MIN_TLS_VERSION
    return context


def check_pin(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> None:
    """Raise :class:`FingerprintMismatch` unless the peer's public key is the pinned one."""
    expected = parse_fingerprint(expected, "pinned fingerprint")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        actual = "none (no certificate presented)"
    else:
        try:
            actual = spki_fingerprint(der)
        except ValueError as exc:
            actual = f"unreadable ({exc})"
    if not hmac.compare_digest(actual.encode("ascii"), expected.encode("ascii")):
        raise FingerprintMismatch(expected, actual)

log = logging.getLogger("tunnel.tls")

#: Plaintext per ``SSLObject.write``: one full TLS record.
TLS_RECORD = 16 * 1024
#: Ciphertext read from the socket at a time, into the thread's shared read buffer. As large
#: as asyncio's own TLS reads: a busy link must move as much per event-loop turn as before, or
#: its heartbeats wait behind its data (L-3 with 32 KiB reads: links declared dead under load).
READ_CHUNK = READ_SIZE
#: Ciphertext given to OpenSSL at a time, then decrypted: the most the incoming BIO holds
#: (plus one partial record).
FEED_CHUNK = 64 * 1024
#: Ciphertext read at a time while the owner says its readers are squeezed (the relay: its
#: links hold over half their budget of received messages). One feed chunk, so a read is
#: all given to OpenSSL at once and a protocol that pauses leaves nothing in ``_backlog``:
#: 200 links paused in one turn held up to 192 KiB each there (L-3).
READ_SQUEEZED = FEED_CHUNK
#: Plaintext handed at a time to a protocol that takes ``data_received`` (not buffered).
PLAIN_CHUNK = 64 * 1024

_HANDSHAKING, _OPEN, _CLOSED = "handshaking", "open", "closed"
_MORE, _DRY, _PEER_CLOSED = object(), object(), object()  # outcomes of one read


def records(buffers: Iterable[bytes | bytearray | memoryview]) -> Iterator[bytes | memoryview]:
    """``buffers`` cut into full records where possible, joining small pieces (a frame's
    header with the start of its payload) so that no record is needlessly short."""
    carry = bytearray()
    for buf in buffers:
        view = memoryview(buf).cast("B")
        pos = 0
        if carry:
            pos = min(len(view), TLS_RECORD - len(carry))
            carry += view[:pos]
            if len(carry) < TLS_RECORD:
                continue
            yield bytes(carry)
            carry = bytearray()
        while len(view) - pos >= TLS_RECORD:
            yield view[pos:pos + TLS_RECORD]
            pos += TLS_RECORD
        if pos < len(view):
            carry += view[pos:]
    if carry:
        yield bytes(carry)


class TlsTransport(asyncio.Transport):
    """What the protocol above the TLS layer writes to; everything goes through the layer."""

    def __init__(self, layer: TlsLayer) -> None:
        super().__init__()
        self._layer = layer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._layer.extra(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._layer.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._layer.app

    def is_closing(self) -> bool:
        return self._layer.closing

    def close(self) -> None:
        self._layer.close()

    def abort(self) -> None:
        self._layer.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._layer.write((data,))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self._layer.write(list_of_data)

    def can_write_eof(self) -> bool:
        return False  # TLS has close_notify, not a half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot write EOF")

    def get_write_buffer_size(self) -> int:
        return self._layer.tcp.get_write_buffer_size()  # the BIOs are emptied at each write

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._layer.tcp.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._layer.tcp.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._layer.pause_reading()

    def resume_reading(self) -> None:
        self._layer.resume_reading()

    def is_reading(self) -> bool:
        return self._layer.app_reading and not self._layer.closing


class TlsLayer(asyncio.BufferedProtocol):
    """The TCP transport's protocol: runs the handshake, then encrypts and decrypts for ``app``.

    ``handshake_done`` resolves when the handshake succeeds (``app.connection_made`` has then
    run) or fails with the reason (the TCP connection is then aborted, ``app`` never sees it).
    """

    def __init__(self, context: ssl.SSLContext, app: asyncio.BaseProtocol, *,
                 server_side: bool, server_hostname: str | None = None,
                 handshake_timeout: float = 10.0, name: str = "?",
                 squeezed: Callable[[], bool] | None = None) -> None:
        self.context = context
        self.squeezed = squeezed  # asked before each read: small reads while it says so
        self.app = app
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.handshake_timeout = handshake_timeout
        self.name = name  # for logs: the peer, or the relay's URL
        self.tcp: asyncio.Transport = cast(asyncio.Transport, None)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None
        self.transport = TlsTransport(self)
        self.state = _HANDSHAKING
        self.closing = False
        self.app_reading = True
        self._app_made = False
        self._eof = False  # the TCP peer sent FIN
        self._eof_fed = False  # ... and OpenSSL was told, after everything before it
        self._error: Exception | None = None  # why we aborted, told to the app at the end
        self._backlog = memoryview(b"")  # ciphertext read but not yet fed to OpenSSL
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.handshake_done: asyncio.Future[None] = self._loop.create_future()

    # ------------------------------------------------------------ TCP side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tcp = cast(asyncio.Transport, transport)
        self.sslobj = self.context.wrap_bio(self.incoming, self.outgoing,
                                            server_side=self.server_side,
                                            server_hostname=self.server_hostname)
        self._timer = self._loop.call_later(self.handshake_timeout, self._handshake_late)
        self._handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.squeezed is not None and self.squeezed():
            return read_buffer()[:READ_SQUEEZED]
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._receive(read_buffer()[:nbytes])

    def data_received(self, data: bytes) -> None:  # transports that ignore get_buffer
        self._receive(memoryview(data))

    def eof_received(self) -> bool:
        self._eof = True
        if self._backlog or self._stalled():
            return True  # half-closed until the protocol has taken what came before
        self._feed_eof()
        return False

    def _receive(self, data: memoryview) -> None:
        if self._backlog:  # read after a pause (some loops finish a turn's reads): keep order
            data = memoryview(bytes(self._backlog) + bytes(data))
            self._backlog = memoryview(b"")
        self._pump(data)

    def _pump(self, data: memoryview) -> None:
        """Feed ``data`` to OpenSSL ``FEED_CHUNK`` at a time, delivering after each, so the
        incoming BIO never holds more than a chunk; what the protocol is not ready for waits
        in ``_backlog`` (ordinary memory, freed once taken)."""
        pos = 0
        while pos < len(data) and not self._stalled() and self._error is None \
                and self.state != _CLOSED:
            self.incoming.write(data[pos:pos + FEED_CHUNK])
            pos += FEED_CHUNK
            self._advance()
        if pos < len(data) and self.state != _CLOSED and self._error is None:
            self._backlog = memoryview(bytes(data[pos:]))

    def _stalled(self) -> bool:
        return self.state == _OPEN and not self.app_reading

    def _feed_eof(self) -> None:
        self._eof_fed = True
        self.incoming.write_eof()
        if self.state == _HANDSHAKING:
            self._fail(ConnectionResetError("connection closed during the TLS handshake"))
            return
        self._advance()

    def _resume(self) -> None:
        """The protocol reads again: first what OpenSSL holds, then the backlog, then EOF."""
        self._advance()
        data, self._backlog = self._backlog, memoryview(b"")
        if data:
            self._pump(data)
        if self._backlog or self._stalled() or self.state != _OPEN:
            return  # paused again (a later resume comes back here) or gone
        if self._eof:
            if not self._eof_fed:
                self._feed_eof()
        elif not self.closing and self.tcp is not None:
            self.tcp.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = _CLOSED
        self.closing = True
        self._cancel_timer()
        if was == _HANDSHAKING:
            self._fail(exc or ConnectionResetError("connection closed during the TLS handshake"))
        if self._app_made:
            self._app_made = False
            self.app.connection_lost(exc or self._error)
        # Nothing of the connection stays referenced through us once it is gone.
        self.sslobj = None
        self.incoming = self.outgoing = ssl.MemoryBIO()
        self._backlog = memoryview(b"")

    def pause_writing(self) -> None:
        if self._app_made:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self._app_made:
            self.app.resume_writing()

    # ------------------------------------------------------------ the app's transport

    def extra(self, name: str, default: Any) -> Any:
        sslobj = self.sslobj
        if name == "ssl_object":
            return sslobj if sslobj is not None else default
        if name == "sslcontext":
            return self.context
        if name in ("peercert", "cipher", "compression"):
            if sslobj is None:
                return default
            return getattr(sslobj, "getpeercert" if name == "peercert" else name)()
        return self.tcp.get_extra_info(name, default) if self.tcp is not None else default

    def write(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        sslobj = self.sslobj
        if self.closing or self.state != _OPEN or sslobj is None:
            return  # like a closed TCP transport: a late write is dropped
        chunks: list[bytes] = []
        try:
            for record in records(buffers):
                sslobj.write(record)
                chunks.append(self.outgoing.read())  # the BIO never holds more than a record
        except ssl.SSLError as exc:
            self._fail(exc)
            return
        if len(chunks) == 1:
            self.tcp.write(chunks[0])
        elif chunks:
            self.tcp.writelines(chunks)  # one send (uvloop: writev) for the whole write

    def pause_reading(self) -> None:
        if self.app_reading:
            self.app_reading = False
            if not self.closing:
                self.tcp.pause_reading()

    def resume_reading(self) -> None:
        if not self.app_reading:
            self.app_reading = True
            # TCP resumes in _resume, once what waits is taken: resumed here, uvloop read
            # before _resume ran, and when the protocol paused again first, reads piled up
            # behind the backlog (L-3), outside every budget.
            self._loop.call_soon(self._resume)  # what waits comes next turn, in order

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.state == _OPEN and self.sslobj is not None:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self.sslobj.unwrap()  # queues close_notify; the peer's is not awaited
            self._flush()
        self.tcp.close()

    def abort(self) -> None:
        self.closing = True
        if self.tcp is not None:
            self.tcp.abort()

    # ------------------------------------------------------------ internals

    def _advance(self) -> None:
        if self.state == _HANDSHAKING:
            self._handshake()
        if self.state == _OPEN:
            self._deliver()

    def _handshake(self) -> None:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as exc:
            self._flush()  # the alert, so the peer learns why
            self._fail(exc)
            return
        self._cancel_timer()
        self.state = _OPEN
        self._flush()
        self._app_made = True
        self.app.connection_made(self.transport)
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)

    def _deliver(self) -> None:
        """Decrypt what has arrived into the app, while it reads."""
        while self.state == _OPEN and self.app_reading and self._app_made:
            if isinstance(self.app, asyncio.BufferedProtocol):
                outcome = self._fill(self.app)
            else:
                outcome = self._read_plain(cast(asyncio.Protocol, self.app))
            if outcome is _DRY:
                break
            if outcome is _PEER_CLOSED:
                self._peer_closed()
                break
            if isinstance(outcome, ssl.SSLError):
                if self._eof and isinstance(outcome, ssl.SSLEOFError):
                    self._peer_closed()  # TCP FIN without close_notify: as asyncio does
                else:
                    self._fail(outcome)
                break
        self._flush()  # replies OpenSSL produced while reading (key updates, tickets)

    def _fill(self, app: asyncio.BufferedProtocol) -> object:
        """Fill one buffer of ``app`` with as many records as there are, then hand it over
        (one ``buffer_updated`` per buffer, not per 16 KiB record)."""
        sslobj = self.sslobj
        assert sslobj is not None
        buf = memoryview(app.get_buffer(-1))
        got = 0
        outcome: object = _MORE
        try:
            while got < len(buf):
                count = cast(int, sslobj.read(len(buf) - got, buf[got:]))  # a count, here
                if not count:
                    outcome = _PEER_CLOSED
                    break
                got += count
        except ssl.SSLWantReadError:
            outcome = _DRY
        except ssl.SSLError as exc:
            outcome = exc
        if got:
            app.buffer_updated(got)
            if outcome is _PEER_CLOSED:
                outcome = _MORE  # the next read says it again, once the app has taken this
        return outcome

    def _read_plain(self, app: asyncio.Protocol) -> object:
        sslobj = self.sslobj
        assert sslobj is not None
        try:
            data = sslobj.read(PLAIN_CHUNK)
        except ssl.SSLWantReadError:
            return _DRY
        except ssl.SSLError as exc:
            return exc
        if not data:
            return _PEER_CLOSED
        app.data_received(data)
        return _MORE

    def _peer_closed(self) -> None:
        if self.closing:
            return
        if not cast(asyncio.Protocol, self.app).eof_received():
            self.close()

    def _flush(self) -> None:
        if self.outgoing.pending and self.tcp is not None and self.state != _CLOSED:
            self.tcp.write(self.outgoing.read())

    def _handshake_late(self) -> None:
        self._timer = None
        if self.state == _HANDSHAKING:
            self._fail(TimeoutError("TLS handshake timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        """End the connection for ``exc``: before the handshake finished, or a TLS error."""
        log.debug("TLS with %s failed: %s", self.name, exc)
        if not self.handshake_done.done():
            self.handshake_done.set_exception(exc)
            # Retrieved here: whoever waits still gets it, and a handshake nobody waits for
            # any more (the client's open timeout came first) logs no "never retrieved".
            self.handshake_done.exception()
        if isinstance(exc, Exception) and self._error is None:
            self._error = exc
        self.closing = True
        if self.tcp is not None and self.state != _CLOSED:
            self.tcp.abort()


def start_tls(transport: asyncio.BaseTransport, app: asyncio.BaseProtocol,
              context: ssl.SSLContext, *, server_side: bool,
              server_hostname: str | None = None, handshake_timeout: float = 10.0,
              name: str = "?", squeezed: Callable[[], bool] | None = None) -> TlsLayer:
    """Put a :class:`TlsLayer` on ``transport`` (before it has delivered a byte) for ``app``."""
    layer = TlsLayer(context, app, server_side=server_side, server_hostname=server_hostname,
                     handshake_timeout=handshake_timeout, name=name, squeezed=squeezed)
    transport.set_protocol(layer)
    layer.connection_made(transport)
    return layer
