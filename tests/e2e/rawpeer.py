"""A raw link peer for hostile-input tests: speaks the protocol by hand over a real WebSocket.

Shared by the catalogue's bad-input, fault and security tests. With TLS on
(the ``variant`` fixture), the peer accepts the relay's self-signed certificate: these tests
attack the relay, they do not test pinning.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import ssl
import struct
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from tunnel.common.proto import messages as msg
from tunnel.common.proto.auth import client_proof, derive_key, new_nonce
from tunnel.common.proto.frames import Frame, FrameType, decode_frames, encode_frame
from tunnel.common.proto.secret import Secret

__all__ = [
    "RawWs",
    "WsClosed",
    "control",
    "expect_closed",
    "first_control",
    "login",
    "open_raw",
    "read_frames_until",
    "round_trip_ping",
]


def _ssl_for(url: str) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def open_raw(url: str, **kwargs: Any) -> ClientConnection:
    """A bare WebSocket to the relay: no compression, no library pings, plain or TLS."""
    options: dict[str, Any] = {"compression": None, "ping_interval": None, "proxy": None}
    options.update(kwargs)
    return await connect(url, ssl=_ssl_for(url), **options)


def control(message: Mapping[str, object]) -> bytes:
    payload = json.dumps(message).encode()
    return encode_frame(Frame(FrameType.CONTROL, payload=payload))


def first_control(raw: bytes | str) -> dict[str, object]:
    assert isinstance(raw, bytes)
    (frame,) = decode_frames(raw)
    assert frame.type is FrameType.CONTROL
    result: dict[str, object] = json.loads(bytes(frame.payload))
    return result


async def login(url: str, token: str, **kwargs: Any) -> tuple[ClientConnection, bytes]:
    """Open a raw link and log in by hand; returns (websocket, the auth message sent)."""
    ws = await open_raw(url, **kwargs)
    challenge = first_control(await ws.recv())
    nonce = msg.b64decode(str(challenge["nonce"]), "nonce")
    client_nonce = new_nonce()
    proof = client_proof(derive_key(Secret(token)), nonce, client_nonce)
    auth = control({"type": "auth", "nonce": msg.b64encode(client_nonce),
                    "proof": msg.b64encode(proof), "client_version": "raw-test"})
    await ws.send(auth)
    return ws, auth


async def expect_closed(ws: ClientConnection | ServerConnection, timeout: float) -> int | None:
    """Read (and drop) frames until the relay closes; the close code it sent, if any."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError("unreachable")


async def read_frames_until(ws: ClientConnection | ServerConnection, wanted: FrameType,
                            stream_id: int, timeout: float) -> tuple[Frame, list[Frame]]:
    """Read until a frame of ``wanted`` type on ``stream_id`` arrives; (it, all before it)."""
    seen: list[Frame] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            for frame in decode_frames(raw):
                if frame.type is wanted and frame.stream_id == stream_id:
                    return frame, seen
                seen.append(frame)


async def round_trip_ping(ws: ClientConnection, value: int, timeout: float = 5.0) -> None:
    """Prove the link is alive: the relay answers our PING with PING+ACK of the same value."""
    await ws.send(encode_frame(Frame(FrameType.PING, value=value)))
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, bytes)
            for frame in decode_frames(raw):
                if frame.type is FrameType.PING and frame.flags and frame.value == value:
                    return


# ----------------------------------------------------------------------------- raw WebSocket

#: WebSocket opcodes (RFC 6455 section 5.2).
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_HANDSHAKE_LIMIT = 16 * 1024


class WsClosed(Exception):
    """The relay sent a close frame (``code``) or dropped the connection (``code`` None)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


class RawWs:
    """A WebSocket client written by hand: any frame header, masked or not, can be sent.

    The websockets library refuses to build invalid frames, and it reads (and answers pings)
    in the background; a hostile peer needs neither: this one reads only when asked.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, source: str = "127.0.0.1", timeout: float = 5.0) -> RawWs:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        sock = socket.socket()
        writer: asyncio.StreamWriter | None = None
        try:  # our own socket, so a cancelled connect or handshake leaks nothing
            sock.setblocking(False)
            sock.bind((source, 0))
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
                context = _ssl_for(url)
                reader, writer = await asyncio.open_connection(
                    sock=sock, ssl=context, server_hostname=parts.hostname if context else None)
                key = base64.b64encode(os.urandom(16)).decode()
                writer.write((f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                              "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                              "\r\n").encode())
                head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise WsClosed(None)
        except BaseException:
            if writer is not None:
                writer.transport.abort()
            sock.close()
            raise
        assert len(head) < _HANDSHAKE_LIMIT
        return cls(reader, writer)

    @staticmethod
    def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0,
              length: int | None = None, masked: bool = True) -> bytes:
        """One frame; ``length`` may claim any size (up to 2**64 - 1), true or not."""
        size = len(payload) if length is None else length
        first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
        mask_bit = 0x80 if masked else 0
        if size < 126:
            header = struct.pack("!BB", first, mask_bit | size)
        elif size < 1 << 16:
            header = struct.pack("!BBH", first, mask_bit | 126, size)
        else:
            header = struct.pack("!BBQ", first, mask_bit | 127, size)
        if not masked:
            return header + payload
        mask = os.urandom(4)
        return header + mask + _xor(payload, mask)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_binary(self, payload: bytes) -> None:
        await self.send_raw(self.frame(OP_BINARY, payload))

    async def recv_frame(self) -> tuple[int, bytes]:
        """The next frame the relay sent (unmasked, as servers send)."""
        try:
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0xF, await self.reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise WsClosed(None) from exc

    async def recv_binary(self) -> bytes:
        """The next binary message; pings are ignored, a close raises :class:`WsClosed`."""
        while True:
            opcode, payload = await self.recv_frame()
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                raise WsClosed(code)
            if opcode == OP_BINARY:
                return payload

    async def login(self, token: str) -> dict[str, object]:
        """Answer the challenge; return the relay's reply (welcome or refused)."""
        challenge = first_control(await self.recv_binary())
        nonce = msg.b64decode(str(challenge["nonce"]), "nonce")
        client_nonce = new_nonce()
        proof = client_proof(derive_key(Secret(token)), nonce, client_nonce)
        await self.send_binary(control({"type": "auth", "nonce": msg.b64encode(client_nonce),
                                        "proof": msg.b64encode(proof),
                                        "client_version": "raw-test"}))
        return first_control(await self.recv_binary())

    async def close(self) -> None:
        self.writer.transport.abort()


def _xor(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    repeated = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(data), "big")
