"""Proxies on 127.0.0.1 that sit on the client-relay link, for the TLS/onboarding tests.

- :class:`RecordingProxy` is a plain TCP forwarder that keeps every byte it forwards, per
  connection and direction, so a test can assert what an eavesdropper on the wire would see.
- :class:`TlsMitm` is a man in the middle that terminates TLS with its own freshly generated
  self-signed certificate and would forward the decrypted bytes to the relay over a second
  TLS connection. It counts the decrypted application bytes it receives from clients; a
  client that pins the relay's key must hand it none.

Neither touches anything beyond 127.0.0.1; every socket and task is ended by ``close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Recording", "RecordingProxy", "TlsMitm", "make_self_signed", "spki_sha256"]

CHUNK = 64 * 1024
MAX_READS = 1 << 20  # per direction and connection: far beyond any test's traffic
HANDSHAKE_TIMEOUT = 10.0


def spki_sha256(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo (what clients pin)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def make_self_signed(directory: Path, common_name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A new P-256 key and a self-signed certificate for 127.0.0.1; returns (key, cert)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "mitm-key.pem", directory / "mitm-cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class _Base:
    """Listener bookkeeping shared by both proxies: tracked sockets and tasks, one close().

    ``close()`` ends connections by closing their sockets (every pump then sees EOF or an
    error and returns), not by cancelling the handlers that asyncio's stream server watches.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # TCP connections accepted from clients
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    def _ssl(self) -> ssl.SSLContext | None:
        return None

    def _protocol(self) -> asyncio.StreamReaderProtocol:
        # Called per accepted TCP connection, before any TLS handshake.
        self.connections += 1
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), self._on_accept)

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        context = self._ssl()
        self._server = await loop.create_server(
            self._protocol, "127.0.0.1", 0, ssl=context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if context is not None else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass  # a peer that goes away is what these tests provoke
        finally:
            await _close(writer)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._writers:
            writer.close()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=HANDSHAKE_TIMEOUT)
            for task in pending:  # only if a socket would not close
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for writer in self._writers:
            await _close(writer)
        self._writers.clear()
        if server is not None:
            await server.wait_closed()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: bytearray | None
) -> None:
    """Copy ``reader`` to ``writer`` until EOF (recording into ``sink``), then pass the EOF on.

    A TLS stream cannot be half-closed, so there the EOF closes ``writer`` altogether.
    """
    with contextlib.suppress(OSError):
        for _ in range(MAX_READS):
            data = await reader.read(CHUNK)
            if not data:
                break
            if sink is not None:
                sink += data
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            return
    writer.close()


@dataclass
class Recording:
    """What one proxied connection carried: ``upstream`` is client -> relay."""

    upstream: bytearray = field(default_factory=bytearray)
    downstream: bytearray = field(default_factory=bytearray)


class RecordingProxy(_Base):
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``, recording both directions."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.recordings: list[Recording] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)
        recording = Recording()
        self.recordings.append(recording)
        try:
            await asyncio.gather(
                _pump(reader, up_writer, recording.upstream),
                _pump(up_reader, writer, recording.downstream),
            )
        finally:
            await _close(up_writer)


class TlsMitm(_Base):
    """Terminates TLS with its own certificate; forwards decrypted bytes to the relay's TLS.

    ``fingerprint`` is the pin of the MITM's own certificate, ``handshakes`` counts TLS
    handshakes completed with clients and ``decrypted_from_client`` the application bytes
    they sent after it. The upstream connection to the relay is opened only once a client
    sent a byte, so the relay sees nothing from a client that stops at the handshake.
    """

    def __init__(self, target_port: int, cert_dir: Path) -> None:
        super().__init__(target_port)
        key_path, cert_path = make_self_signed(cert_dir)
        self.fingerprint = spki_sha256(cert_path.read_bytes())
        self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_ctx.load_cert_chain(cert_path, key_path)
        self._upstream_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._upstream_ctx.check_hostname = False
        self._upstream_ctx.verify_mode = ssl.CERT_NONE  # a MITM accepts whatever the relay has
        self.handshakes = 0
        self.decrypted_from_client = 0
        self.upstream_connections = 0
        self.got_bytes = asyncio.Event()  # set at the first decrypted byte from a client

    def _ssl(self) -> ssl.SSLContext | None:
        return self._server_ctx

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # the stream server calls back only after a complete handshake
        up_writer: asyncio.StreamWriter | None = None
        try:
            for _ in range(MAX_READS):
                data = await reader.read(CHUNK)
                if not data:
                    break
                self.decrypted_from_client += len(data)
                self.got_bytes.set()
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(
                        "127.0.0.1", self.target_port, ssl=self._upstream_ctx,
                        server_hostname="127.0.0.1",
                    )
                    self._writers.append(up_writer)
                    self.upstream_connections += 1
                    self._tasks.add(asyncio.create_task(_pump(up_reader, writer, None)))
                up_writer.write(data)
                await up_writer.drain()
        finally:
            if up_writer is not None:
                await _close(up_writer)
