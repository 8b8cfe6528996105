"""A time-boxed live fuzzer: random and mutated WebSocket and mux frames at a running relay.

Each connection comes from its own loopback source address (127.0.x.y), so the relay's
per-source login penalties and pre-auth caps do not turn the run into a stream of 429s,
and either stays before the login (random frames instead of an answer to the challenge) or
logs in first and then sends mutated link messages. The fuzzer only sends; whether the
relay survived is for the test to check (process alive, no traceback, a good client still
served, file descriptors back to baseline).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from tests.e2e.rawpeer import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, RawWs, WsClosed
from tunnel.common.proto.frames import HEADER, PROTOCOL_VERSION, FrameType

__all__ = ["FuzzStats", "LiveFuzzer"]

#: Connections in flight at once (the relay caps pre-auth ones at 32 per source anyway).
WORKERS = 4
#: How long one fuzz connection may take, all steps together.
CONNECTION_TIMEOUT = 3.0
#: How long to listen for the relay's reaction after the last frame.
LISTEN = 0.2


@dataclass
class FuzzStats:
    connections: int = 0
    logged_in: int = 0
    frames: int = 0
    closed_by_relay: int = 0
    refused: int = 0  # handshake answered with an HTTP error (penalty, cap)


class LiveFuzzer:
    """Sends hostile input until a deadline; ``seed`` makes a run reproducible."""

    def __init__(self, url: str, token: str, seed: int) -> None:
        self.url = url
        self.token = token
        self.rng = random.Random(seed)
        self.stats = FuzzStats()
        self._source = 0

    async def run(self, seconds: float) -> FuzzStats:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(self._worker(deadline) for _ in range(WORKERS)))
        return self.stats

    async def _worker(self, deadline: float) -> None:
        for _ in range(1_000_000):  # bounded in count as well as in time
            if time.monotonic() >= deadline:
                return
            try:
                async with asyncio.timeout(CONNECTION_TIMEOUT):
                    await self._one_connection()
            except TimeoutError:
                pass

    def _next_source(self) -> str:
        self._source += 1
        index = self._source % (250 * 8)
        return f"127.0.{2 + index // 250}.{1 + index % 250}"

    async def _one_connection(self) -> None:
        rng = self.rng
        try:
            ws = await RawWs.open(self.url, source=self._next_source())
        except (WsClosed, OSError, EOFError, asyncio.IncompleteReadError):
            self.stats.refused += 1
            return
        self.stats.connections += 1
        try:
            if rng.random() < 0.5:
                await ws.recv_binary()  # the challenge, never answered properly
            else:
                if (await ws.login(self.token)).get("type") != "welcome":
                    return
                self.stats.logged_in += 1
            for _ in range(rng.randint(1, 8)):
                await ws.send_raw(self.ws_frame())
                self.stats.frames += 1
            await self._listen(ws)
        except (WsClosed, OSError, AssertionError, ValueError):
            self.stats.closed_by_relay += 1
        finally:
            await ws.close()

    async def _listen(self, ws: RawWs) -> None:
        try:
            async with asyncio.timeout(LISTEN):
                for _ in range(1000):
                    opcode, _ = await ws.recv_frame()
                    if opcode == OP_CLOSE:
                        self.stats.closed_by_relay += 1
                        return
        except TimeoutError:
            pass

    # ------------------------------------------------------------------ generators

    def ws_frame(self) -> bytes:
        """One WebSocket frame, valid or not, mostly carrying a (mutated) mux message."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:
            return RawWs.frame(OP_BINARY, self.mux_message())
        if roll < 0.60:
            return RawWs.frame(rng.randrange(16), self.mux_message(), fin=rng.random() < 0.7,
                               rsv=rng.randrange(8) if rng.random() < 0.3 else 0)
        if roll < 0.70:
            return rng.randbytes(rng.randint(1, 200))  # not even a frame header
        if roll < 0.78:
            text = json.dumps({"type": rng.choice(["auth", "expose", "telemetry", "x"]),
                               "id": rng.randint(-5, 5)})
            return RawWs.frame(OP_TEXT, text.encode())
        if roll < 0.88:
            size = rng.choice([0, 2, 125, 126, 200])
            opcode = rng.choice([OP_PING, OP_PONG, OP_CLOSE])
            return RawWs.frame(opcode, rng.randbytes(size), fin=rng.random() < 0.9)
        if roll < 0.94:
            return RawWs.frame(0x0, self.mux_message(), fin=rng.random() < 0.5)  # continuation
        if roll < 0.97:
            return RawWs.frame(OP_BINARY, self.mux_message(), masked=False)
        claim = rng.choice([2**16, 2**20, 2**32, 2**63 - 1])
        return RawWs.frame(OP_BINARY, self.mux_message(), length=claim)

    def mux_message(self) -> bytes:
        """1-4 plausible frames, then a few bytes changed, cut or appended."""
        rng = self.rng
        message = bytearray(b"".join(self._mux_frame() for _ in range(rng.randint(1, 4))))
        for _ in range(rng.choice([0, 0, 0, 1, 2, 3])):
            if message:
                message[rng.randrange(len(message))] = rng.randrange(256)
        if rng.random() < 0.2:
            del message[rng.randrange(len(message) + 1):]
        if rng.random() < 0.2:
            message += rng.randbytes(rng.randint(1, 16))
        return bytes(message)

    def _mux_frame(self) -> bytes:
        rng = self.rng
        ftype: int = rng.choice([*FrameType, 7, 255])
        if rng.random() < 0.6:  # a well-formed header, to get past the codec into the mux
            session = ftype in (FrameType.PING, FrameType.GOAWAY, FrameType.CONTROL)
            sid = 0 if session else rng.choice([1, 3, 5])
            flag_choices: dict[int, int] = {FrameType.DATA: rng.choice([0, 1]),
                                            FrameType.PING: rng.choice([0, 2])}
            flags = flag_choices.get(ftype, 0)
            version = PROTOCOL_VERSION
        else:
            sid = rng.choice([0, 1, 2, 3, 5, 0xFFFFFFFF])
            flags = rng.choice([0, 0, 1, 2, 4, 0xFFFF])
            version = PROTOCOL_VERSION if rng.random() < 0.9 else rng.randrange(256)
        if ftype in (FrameType.DATA, FrameType.OPEN, FrameType.CONTROL):
            payload = self._payload(ftype)
            length = len(payload) if rng.random() < 0.9 else rng.randrange(2**32)
            return HEADER.pack(version, ftype, flags, sid, length) + payload
        value = rng.choice([0, 1, 1, 2**17, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])
        return HEADER.pack(version, ftype, flags, sid, value)

    def _payload(self, ftype: int) -> bytes:
        rng = self.rng
        if ftype == FrameType.CONTROL:
            message = rng.choice([
                {"type": "expose", "id": rng.randint(0, 3), "target": "127.0.0.1:9",
                 "mode": rng.choice(["fixed", "auto", "x"]), "port": rng.randint(0, 70000)},
                {"type": "telemetry", "hostname": "h" * rng.randint(0, 300), "gpus": [{}]},
                {"type": "auth"}, {"type": 5}, [], {"type": "error", "message": "x"},
            ])
            return json.dumps(message).encode()
        if ftype == FrameType.OPEN:
            return rng.randbytes(rng.randint(0, 12))
        return rng.randbytes(rng.choice([0, 1, 100, 4096]))
