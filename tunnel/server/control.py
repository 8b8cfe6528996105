"""Accepting links: pre-auth limits, the challenge-response login, then port claims.

Until a peer has proven its token it gets a small message cap, a handshake deadline and one
of a capped number of pre-auth slots; failures feed the per-source penalty table. A failed
login always gets the same answer, ``authentication failed``, whatever was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tunnel import __version__
from tunnel.common.aio.link import Link, LinkClosed
from tunnel.common.config.credentials import verify
from tunnel.common.errors import ClaimRefused, RemoteProtocolError
from tunnel.common.proto import messages as msg
from tunnel.common.proto.auth import NONCE_SIZE, PROOF_SIZE, identify, login_message, new_nonce
from tunnel.common.proto.frames import MAX_MESSAGE_SIZE, PROTOCOL_VERSION
from tunnel.common.proto.mux import GoAwayCode, Mux, Role
from tunnel.common.proto.telemetry import normalize as normalize_telemetry
from tunnel.server.preauth import PreAuthConnection
from tunnel.server.registry import REPLACEMENT_FLAG
from tunnel.server.tunnels import Claim, TunnelKind

if TYPE_CHECKING:
    from tunnel.server.app import Relay

__all__ = ["AUTH_FAILED", "HANDSHAKE_TIMEOUT", "PRE_AUTH_MAX_MESSAGE", "ControlHandler"]

HANDSHAKE_TIMEOUT = 5.0
#: Largest message accepted before the peer authenticated.
PRE_AUTH_MAX_MESSAGE = 4096
AUTH_FAILED = "authentication failed"
CLOSE_AUTH_FAILED = 1008
CLOSE_TRY_LATER = 1013
#: Telemetry closer together than this is dropped (clients send every few seconds).
MIN_TELEMETRY_GAP = 0.1
#: Fields that would name a client. Identity comes from the login alone, so a message from
#: client B naming anyone but B in one of these is refused (reliability S-6).
IDENTITY_FIELDS = ("client", "client_id", "name", "identity", "owner", "user", "as",
                   "replace", "session", "on_behalf_of")

log = logging.getLogger("tunnel.server.control")


class ControlHandler:
    """The websockets handler of the relay's control listener."""

    def __init__(self, relay: Relay, clock: Callable[[], float] = time.time) -> None:
        self.relay = relay
        self.clock = clock
        self._claim_lock = asyncio.Lock()

    # ------------------------------------------------------------ before the upgrade

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Refuse wrong paths and penalised sources before any WebSocket work."""
        path = request.path.split("?", 1)[0]
        if path != self.relay.config.path:
            return ws.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        source = _source(ws)
        wait = self.relay.penalties.retry_after(source)
        if wait > 0:
            response = ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
            response.headers["Retry-After"] = str(int(wait) + 1)
            return response
        return None

    # ------------------------------------------------------------ the link

    async def __call__(self, ws: ServerConnection) -> None:
        source = _source(ws)
        relay = self.relay
        if not self._hold_preauth(ws, source):
            log.warning("too many unauthenticated connections: refusing %s", source)
            await ws.close(CLOSE_TRY_LATER, "try again later")
            return
        try:
            link = Link(ws, Mux(Role.RELAY, max_streams=relay.config.max_streams), name="?",
                        logger=log,
                        heartbeat_interval=relay.config.heartbeat_interval,
                        heartbeat_timeout=relay.config.heartbeat_timeout, group=relay.links)
            link.set_max_message_size(PRE_AUTH_MAX_MESSAGE)
            watchdog = asyncio.create_task(link.watchdog())
            try:
                hello = await self._login(link, source)
            finally:
                watchdog.cancel()
        finally:
            if isinstance(ws, PreAuthConnection):
                ws.release_preauth()
            else:
                relay.preauth.release(source)
        if hello is None:
            return
        name, version = hello
        link.set_max_message_size(MAX_MESSAGE_SIZE)
        await self._serve(link, name, version, source)

    def _hold_preauth(self, ws: ServerConnection, source: str) -> bool:
        """Whether ``ws`` holds a pre-auth slot: taken at accept, or now for other classes."""
        if isinstance(ws, PreAuthConnection):
            return ws.preauth_source is not None
        return self.relay.preauth.acquire(source)

    async def _login(self, link: Link, source: str) -> tuple[str, str] | None:
        """Run the challenge-response; return (client name, version) or None if refused."""
        nonce = new_nonce()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                # The client sends nothing before our challenge: switch to our framing
                # now, while websockets holds none of its bytes (wsframing.py says why).
                link.take_over_framing()
                await link.send_now(msg.Challenge(PROTOCOL_VERSION, msg.b64encode(nonce),
                                                  __version__))
                raw = await link.receive_control(HANDSHAKE_TIMEOUT)
                auth = msg.parse(raw, msg.Auth)
                client_nonce = msg.b64decode(auth.nonce, "nonce")
                if len(client_nonce) != NONCE_SIZE:
                    raise RemoteProtocolError("nonce of wrong size")
                wait = self.relay.penalties.retry_after(source)
                if wait > 0:
                    # Several links may have passed the HTTP-level check at once: no more
                    # than one guess per penalty period is ever verified (reliability S-5).
                    await self._try_later(link, source, f"source penalised for {wait:.0f} s")
                    return None
                name = self._identify(auth, nonce, client_nonce)
        except (TimeoutError, RemoteProtocolError, LinkClosed, ConnectionClosed,
                OSError) as exc:
            log.info("login from %s abandoned: %s", source, _describe(exc))
            if isinstance(exc, RemoteProtocolError):
                self.relay.counters.protocol_errors += 1
                self.relay.penalties.failed(source)
            # A login that timed out or dropped guessed nothing: penalising it would lock a
            # whole lab behind one NAT address out after a slow moment (a relay busy with
            # a lab's logins at once times some out, L-3).
            await link.close_websocket(CLOSE_AUTH_FAILED, "handshake failed")
            return None
        if name is None:
            self.relay.penalties.failed(source)
            log.warning("login refused from %s: %s", source, AUTH_FAILED)
            with contextlib.suppress(Exception):  # the peer may already be gone
                await link.send_now(msg.Refused(AUTH_FAILED))
            await link.close_websocket(CLOSE_AUTH_FAILED, AUTH_FAILED)
            return None
        self.relay.penalties.succeeded(source)
        claimed = _claimed_identity(raw, name)
        if claimed is not None:
            log.warning("login of client %s from %s refused: it claims to be %r",
                        name, source, claimed)
            with contextlib.suppress(Exception):
                await link.send_now(msg.Refused(AUTH_FAILED))
            await link.close_websocket(CLOSE_AUTH_FAILED, AUTH_FAILED)
            return None
        if self._flapping(name):
            await self._try_later(link, source, f"client {name} replaced "
                                  f"{REPLACEMENT_FLAG}+ times a minute: two machines share it")
            return None
        return name, auth.client_version[:64]

    def _flapping(self, name: str) -> bool:
        """A live identity replaced too often: refuse further replacements for a while.

        Two machines with one identity would otherwise replace each other forever (frp
        #3543). While the identity is flagged, a login that would replace its live link is
        told to try later; a login while no link is live is never refused, and the flag
        clears once the last minute holds fewer than REPLACEMENT_FLAG replacements, so the
        legitimate newest machine gets in at its next retry after that (within a minute).
        """
        record = self.relay.registry.clients.get(name)
        return (record is not None and record.link is not None
                and record.flapping(self.clock()))

    async def _try_later(self, link: Link, source: str, why: str) -> None:
        log.warning("login from %s refused for now: %s", source, why)
        await link.close_websocket(CLOSE_TRY_LATER, "try again later")

    def _identify(self, auth: msg.Auth, nonce: bytes, client_nonce: bytes) -> str | None:
        """The client that made this proof or signature, or None; same work either way."""
        message = login_message(nonce, client_nonce)
        if auth.signature is not None and auth.key_id is not None:
            signature = msg.b64decode(auth.signature, "signature")
            name, public = self.relay.public_keys.get(auth.key_id[:64],
                                                      ("", self.relay.decoy_key))
            ok = verify(public, message, signature)  # a decoy key keeps the timing equal
            return name if ok and name else None
        if auth.proof is not None:
            proof = msg.b64decode(auth.proof, "proof")
            if len(proof) != PROOF_SIZE:
                raise RemoteProtocolError("proof of wrong size")
            return identify(proof, nonce, client_nonce, self.relay.keys)
        return None  # no credential at all: refused like a wrong one (reliability S-1)

    async def _serve(self, link: Link, name: str, version: str, source: str) -> None:
        relay = self.relay
        link.name = name
        link.log = logging.LoggerAdapter(log, {"client": name})
        old = relay.registry.attach(name, link, source, version, self.clock())
        if old is not None:
            # Newest wins at once (no "port already used" window); the old link is told why
            # so a second live machine with the same token backs off instead of flapping.
            log.info("client %s: new login from %s replaces its previous link", name, source)
            task = asyncio.create_task(old.close(GoAwayCode.REPLACED, "replaced by a newer login"))
            relay.background.add(task)
            task.add_done_callback(relay.background.discard)
        await relay.leases.mark_online(name)
        relay.presence(name, True)
        link.on_control = self._on_control
        await link.send_now(msg.Welcome(name, relay.config.heartbeat_interval,
                                        relay.config.heartbeat_timeout,
                                        relay.config.max_streams))
        log.info("client %s online from %s (version %s)", name, source, version)
        try:
            await link.run()
        finally:
            relay.counters.stray_frames += link.stray_frames
            if link.protocol_error is not None:
                relay.counters.protocol_errors += 1
            await relay.leases.mark_offline(name)
            if relay.registry.detach(name, link, self.clock()):
                reason = link.close_reason or "link closed"
                log.info("client %s offline: %s", name, reason)
                relay.presence(name, False)

    # ------------------------------------------------------------ claims

    def _on_control(self, link: Link, message: dict[str, Any]) -> None:
        request = msg.parse(message, msg.Expose, msg.Telemetry)
        claimed = _claimed_identity(message, link.name)
        if claimed is not None:
            # The link's identity is fixed at login; a message naming another client is an
            # attempt to act as it (reliability S-6), so this link closes, logged.
            raise RemoteProtocolError(f"client {link.name} sent a message claiming to be "
                                      f"client {claimed!r}")
        if isinstance(request, msg.Telemetry):
            self._on_telemetry(link, request)
            return
        task = asyncio.create_task(self._expose(link, request))
        self.relay.background.add(task)
        task.add_done_callback(self.relay.background.discard)

    def _on_telemetry(self, link: Link, message: msg.Telemetry) -> None:
        """Keep the latest host figures; a client flooding them is throttled, not heard."""
        record = self.relay.registry.clients.get(link.name)
        if record is None or record.link is not link:
            return
        now = self.clock()
        if record.telemetry_at is not None and now - record.telemetry_at < MIN_TELEMETRY_GAP:
            return
        data = normalize_telemetry(message.figures)
        record.telemetry, record.telemetry_at = data, now
        record.hostname = str(data.get("hostname") or "")
        record.os = str(data.get("os") or "")

    async def _expose(self, link: Link, request: msg.Expose) -> None:
        tunnel_id, target, mode = request.id, request.target, request.mode
        # Every expose on the wire today asks for a public TCP port.
        claim = Claim(link.name, TunnelKind.PUBLIC_TCP, target, mode, request.port)
        try:
            async with self._claim_lock:
                tunnel = await self.relay.bindings[claim.kind].claim(claim)
        except ClaimRefused as refused:
            link.log.warning("client %s: %s", link.name, refused)
            link.send_control(msg.ExposeRefused(tunnel_id, refused.port, refused.reason))
            return
        if self.relay.registry.clients[link.name].link is not link:
            return  # the link was replaced while we were binding
        self.relay.registry.route(tunnel.key, link, tunnel_id)
        bound = tunnel.port
        assert bound is not None, "a public TCP tunnel always has its port"
        link.log.info("client %s: tunnel %s -> port %d (%s) live", link.name, target, bound, mode)
        link.send_control(msg.Exposed(tunnel_id, bound, mode))


def _claimed_identity(message: dict[str, Any], name: str) -> str | None:
    """The other client a message names in an identity field, if any (truncated)."""
    for field in IDENTITY_FIELDS:
        value = message.get(field)
        if value is not None and value != name:
            return str(value)[:64]
    return None


def _source(ws: ServerConnection) -> str:
    peer = ws.remote_address
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    return str(exc) or type(exc).__name__
