"""A raw link peer for hostile-input tests: speaks the protocol by hand over a real WebSocket.

Shared by tests/e2e/test_link_faults.py and the catalogue's bad-input tests. With TLS on
(the ``variant`` fixture), the peer accepts the relay's self-signed certificate: these tests
attack the relay, they do not test pinning.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tunnel.common import messages as msg
from tunnel.common.auth import client_proof, derive_key, new_nonce
from tunnel.common.frames import Frame, FrameType, decode_frames, encode_frame
from tunnel.common.secret import Secret

__all__ = [
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


def control(message: dict[str, object]) -> bytes:
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


async def expect_closed(ws: ClientConnection, timeout: float) -> int | None:
    """Read (and drop) frames until the relay closes; the close code it sent, if any."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None
    raise AssertionError("unreachable")


async def read_frames_until(ws: ClientConnection, wanted: FrameType, stream_id: int,
                            timeout: float) -> tuple[Frame, list[Frame]]:
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


LINGER_RESET = struct.pack("ii", 1, 0)
