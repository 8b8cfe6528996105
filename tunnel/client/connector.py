"""Connect, authenticate, announce the tunnels, serve the link; reconnect forever.

Network trouble (relay down or restarting, link lost, heartbeat timeout) is retried with
jittered exponential backoff and never ends the program; a refused login, a refused port or
a relay that is not a tunnel relay are final and end it with a clear message, because
retrying cannot fix them (frp's endless-login OOM, #3543, is what a hot retry loop costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Callable, Iterator
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from tunnel import __version__
from tunnel.client.dialer import Dialer
from tunnel.client.expose import ExposeSpec
from tunnel.client.settings import ClientSettings
from tunnel.client.telemetry import telemetry_interval, telemetry_provider
from tunnel.client.tls import tls_connection, transport_url
from tunnel.common.aio.link import Link, LinkClosed
from tunnel.common.aio.runtime import limit_unsent
from tunnel.common.aio.tls import client_ssl_context
from tunnel.common.errors import (
    AuthError,
    ClaimRefused,
    ConfigError,
    RemoteProtocolError,
    TunnelError,
)
from tunnel.common.proto import messages as msg
from tunnel.common.proto.auth import NONCE_SIZE, client_proof, derive_key, login_message, new_nonce
from tunnel.common.proto.frames import MAX_MESSAGE_SIZE, MAX_STREAMS_LIMIT, PROTOCOL_VERSION
from tunnel.common.proto.mux import GoAwayCode, Mux, Role

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FACTOR",
    "BACKOFF_INITIAL",
    "EXPOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "RESTART_RECONNECT_BOUND",
    "RESTART_SPREAD",
    "Connector",
    "UntrustedCertificate",
    "backoff",
    "reconnect_delay",
]

HANDSHAKE_TIMEOUT = 10.0
EXPOSE_TIMEOUT = 30.0
BACKOFF_INITIAL = 0.5
BACKOFF_FACTOR = 2.0
BACKOFF_CAP = 30.0
#: When the relay itself went away (it announced a shutdown, or refuses connections right
#: after a live link was lost), every client of it lost its link in the same instant: the
#: next attempt is drawn uniformly from [0, this] seconds so that the relay that comes back
#: is not hit by all of them in the same second (reliability catalogue R-8: no 1 s window
#: may hold more than 25 % of the reconnects). It is also the longest wait between
#: attempts once a client has had a live link, so the relay coming back is never met by a
#: backoff that grew while it was down.
RESTART_SPREAD = 20.0
#: The stated worst case (seconds) from a relay answering again after a restart to every
#: client that had a live link to it starting the attempt that gets it back: an attempt
#: already in flight fails within HANDSHAKE_TIMEOUT (a host that drops packets while it
#: reboots; a refused one fails at once), then the wait is at most RESTART_SPREAD. The
#: login itself comes on top (milliseconds against a relay that answers). README and the
#: reliability catalogue (R-2, R-8) quote it.
RESTART_RECONNECT_BOUND = RESTART_SPREAD + HANDSHAKE_TIMEOUT
#: Heartbeat settings the relay may ask for are clamped to this range (seconds).
HEARTBEAT_BOUNDS = (0.1, 3600.0)

_RETRYABLE = (OSError, TimeoutError, InvalidHandshake, ConnectionClosed, LinkClosed,
              RemoteProtocolError)

log = logging.getLogger("tunnel.client")

#: The relay's answer to one port claim.
Reply = msg.Exposed | msg.ExposeRefused


def backoff(initial: float = BACKOFF_INITIAL, factor: float = BACKOFF_FACTOR,
            cap: float = BACKOFF_CAP,
            rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays for successive retries: exponential, capped, each drawn in [d/2, d]."""
    delay = initial
    while True:
        yield delay * (0.5 + rand() / 2)
        delay = min(cap, delay * factor)


def reconnect_delay(backoff_delay: float, relay_gone: bool,
                    rand: Callable[[], float] = random.random,
                    spread: float = RESTART_SPREAD, had_link: bool = False) -> float:
    """The wait before the next attempt: the backoff's, or a draw across ``spread`` seconds
    when the relay went away (a storm of its clients is coming; see RESTART_SPREAD).

    A client that has had a live link (``had_link``; implied by ``relay_gone``) never
    waits longer than ``spread``: that is what bounds its return after a relay restart
    (RESTART_RECONNECT_BOUND). Only a client that never got in backs off to BACKOFF_CAP."""
    delay = max(backoff_delay, rand() * spread) if relay_gone else backoff_delay
    return min(spread, delay) if relay_gone or had_link else delay


class Connector:
    """The client's main loop around one link at a time."""

    def __init__(self, settings: ClientSettings,
                 announce: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.announce = announce
        self.key = derive_key(settings.token) if settings.token is not None else b""
        self.ssl: ssl.SSLContext | None = None
        self.connection_class: type[ClientConnection] = ClientConnection
        self.url = settings.server_url  # what websockets connects to
        if settings.server_url.startswith("wss://"):
            ca = settings.ca_file
            self.ssl = client_ssl_context(fingerprint=settings.fingerprint, ca_file=ca)
            self.url, server_name = transport_url(settings.server_url)
            self.connection_class = tls_connection(self.ssl, server_name, settings.fingerprint,
                                                   HANDSHAKE_TIMEOUT)
        self.tunnels: dict[int, ExposeSpec] = dict(enumerate(settings.exposes))
        self.dialer = Dialer(self.tunnels)
        self.link: Link | None = None
        self.replaced = False  # the last link ended because a newer login took over
        self.relay_shutdown = False  # the last link ended with the relay's shutdown GOAWAY
        self.rand: Callable[[], float] = random.random
        self.telemetry = telemetry_provider(os.environ)
        self.telemetry_interval = telemetry_interval(os.environ)

    async def run(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set; raise AuthError/ClaimRefused/ConfigError if final."""
        delays = backoff(rand=self.rand)
        link_lost = False  # a live link ended and no attempt has been made since
        relay_gone = False  # the relay went away and no link has been live since
        had_link = False  # some link of this run went live
        while not stop.is_set():
            established = refused = False
            self.replaced = self.relay_shutdown = False
            try:
                established = await self._session(stop)
            except InvalidStatus as exc:
                if exc.response.status_code == 404:
                    raise ConfigError("--server", self.settings.server_url,
                                      "no tunnel relay at this path (HTTP 404)") from exc
                log.warning("relay %s refused the connection: HTTP %d",
                            self.settings.server_url, exc.response.status_code)
            except InvalidURI as exc:
                raise ConfigError("--server", self.settings.server_url, str(exc)) from exc
            except ssl.SSLCertVerificationError as exc:
                # Retrying cannot make an untrusted certificate trusted: say what to do.
                raise UntrustedCertificate(self.settings.server_url,
                                           exc.verify_message or str(exc)) from exc
            except ConnectionRefusedError:
                refused = True
                log.warning("cannot reach the relay at %s: connection refused (is "
                            "tunnel-server running and the port open?)",
                            self.settings.server_url)
            except _RETRYABLE as exc:
                log.warning("link to %s lost or not established: %s", self.settings.server_url,
                            _describe(exc))
            if established:
                delays = backoff(rand=self.rand)
                had_link = True
            if stop.is_set():
                break
            # Once gone, the relay stays gone until a link is live again: an attempt
            # refused early in the spread must not fall back to a backoff that grows past
            # it (issue 24: 23-27 s to reconnect after a restart, for "about 20 s").
            relay_gone = (relay_gone and not established) or self.relay_shutdown or (
                refused and link_lost)
            delay = reconnect_delay(next(delays), relay_gone, self.rand, had_link=had_link)
            link_lost = established and not self.relay_shutdown
            if self.replaced:
                log.error("another client logged in with this token and replaced this one; "
                          "two machines must not share a token")
                delay = BACKOFF_CAP
            log.info("reconnecting in %.1fs", delay)
            await self._pause(stop, delay)
        self.dialer.cancel()
        self.telemetry.close()

    async def _pause(self, stop: asyncio.Event, delay: float) -> None:
        """Wait ``delay`` seconds between attempts, or until ``stop`` is set (a unit test
        replaces this with a simulated clock)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    def _local_addr(self) -> tuple[str, int] | None:
        source = self.settings.source_address
        return None if source is None else (source, 0)

    async def _session(self, stop: asyncio.Event) -> bool:
        """One link from connect to close; returns whether tunnels went live."""
        async with connect(self.url, compression=None,
                           max_size=MAX_MESSAGE_SIZE, ping_interval=None,
                           open_timeout=HANDSHAKE_TIMEOUT, close_timeout=2.0, proxy=None,
                           user_agent_header=f"tunnel-client/{__version__}",
                           create_connection=self.connection_class,
                           local_addr=self._local_addr()) as ws:
            limit_unsent(ws.transport.get_extra_info("socket"))
            link = Link(ws, Mux(Role.CLIENT), name="-", logger=log,
                        heartbeat_interval=HEARTBEAT_BOUNDS[1],
                        heartbeat_timeout=HEARTBEAT_BOUNDS[1])
            await self._login(link)
            replies: dict[int, asyncio.Future[Reply]] = {
                tid: asyncio.get_running_loop().create_future() for tid in self.tunnels}
            link.on_control = lambda _link, message: self._on_control(replies, message)
            link.on_open = self.dialer.on_open
            self.link = link
            runner = asyncio.create_task(link.run())
            reporter: asyncio.Task[None] | None = None
            try:
                await self._announce(link, replies, runner)
                reporter = asyncio.create_task(self._report_telemetry(link))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if stop.is_set():
                    await link.close(GoAwayCode.NORMAL, "client shutting down")
                await runner
                self.replaced = link.goaway_code == GoAwayCode.REPLACED
                self.relay_shutdown = link.goaway_code == GoAwayCode.SHUTDOWN
                if link.close_reason and not stop.is_set():
                    log.warning("link closed: %s", link.close_reason)
                return True
            finally:
                self.link = None
                if reporter is not None:
                    reporter.cancel()
                runner.cancel()
                with contextlib.suppress(BaseException):
                    await runner

    async def _report_telemetry(self, link: Link) -> None:
        """Send host figures now and every interval; sampling runs off the event loop."""
        provider = self.telemetry
        while True:
            try:
                sample = await asyncio.to_thread(provider.sample)
            except Exception:  # a broken sensor must never take the tunnel down
                log.exception("telemetry sample failed")
                sample = {"gpu_status": "telemetry failed"}
            link.send_control(msg.Telemetry(sample))
            await asyncio.sleep(self.telemetry_interval)

    async def _login(self, link: Link) -> None:
        challenge = msg.parse(await link.receive_control(HANDSHAKE_TIMEOUT), msg.Challenge)
        if challenge.version != PROTOCOL_VERSION:
            raise ConfigError("--server", self.settings.server_url,
                              f"the relay speaks protocol {challenge.version}, this client "
                              f"speaks {PROTOCOL_VERSION}: install matching versions")
        server_nonce = msg.b64decode(challenge.nonce, "nonce")
        if len(server_nonce) != NONCE_SIZE:
            raise RemoteProtocolError("relay nonce of wrong size")
        # The relay sends nothing more until our answer: switch to our framing now,
        # while websockets holds none of its bytes (wsframing.py says why).
        link.take_over_framing()
        await link.send_now(self._auth(server_nonce, new_nonce()))
        reply = msg.parse(await link.receive_control(HANDSHAKE_TIMEOUT),
                          msg.Welcome, msg.Refused)
        if isinstance(reply, msg.Refused):
            raise AuthError(reply.reason)
        low, high = HEARTBEAT_BOUNDS
        link.name = reply.client[:64]
        link.log = logging.LoggerAdapter(log, {"client": link.name})
        link.heartbeat_interval = min(high, max(low, float(reply.heartbeat_interval)))
        link.heartbeat_timeout = min(high, max(low, float(reply.heartbeat_timeout)))
        if reply.max_streams is not None:
            link.set_max_streams(min(MAX_STREAMS_LIMIT, max(1, reply.max_streams)))
        log.info("logged in to %s as %s", self.settings.server_url, link.name)

    def _auth(self, server_nonce: bytes, client_nonce: bytes) -> msg.Auth:
        """Our answer to the challenge: a signature (key clients) or a proof (token)."""
        nonce = msg.b64encode(client_nonce)
        private = self.settings.private_key
        if private is None:
            proof = client_proof(self.key, server_nonce, client_nonce)
            return msg.Auth(nonce, __version__, proof=msg.b64encode(proof))
        # Imported here: cryptography's key modules would cost every token client's start.
        from tunnel.common.config.credentials import key_id, public_key_of, sign

        signature = sign(private, login_message(server_nonce, client_nonce))
        return msg.Auth(nonce, __version__, key_id=key_id(public_key_of(private)),
                        signature=msg.b64encode(signature))

    async def _announce(self, link: Link, replies: dict[int, asyncio.Future[Reply]],
                        runner: asyncio.Task[None]) -> None:
        for tid, spec in self.tunnels.items():
            link.send_control(msg.Expose(tid, spec.target, spec.mode, spec.remote_port))
        waiting: asyncio.Future[Any] = asyncio.gather(*replies.values())
        watched: set[asyncio.Future[Any]] = {waiting, runner}
        done, _ = await asyncio.wait(watched, timeout=EXPOSE_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            raise LinkClosed(link.close_reason or "the relay did not answer the port claims")
        refused: ClaimRefused | None = None
        for tid, future in replies.items():
            reply = future.result()
            spec = self.tunnels[tid]
            if isinstance(reply, msg.Exposed):
                self.announce(f"{spec.target} -> {self.settings.server_host}:{reply.port} "
                              f"({reply.mode})")
            elif refused is None:
                refused = ClaimRefused(reply.port, reply.reason)
        if refused is not None:
            await link.close(GoAwayCode.NORMAL, "port claim refused")
            raise refused

    def _on_control(self, replies: dict[int, asyncio.Future[Reply]],
                    message: dict[str, Any]) -> None:
        reply = msg.parse(message, msg.Exposed, msg.ExposeRefused, msg.Error)
        if isinstance(reply, msg.Error):
            raise RemoteProtocolError(f"relay error: {reply.message[:200]}")
        future = replies.get(reply.id)
        if future is None or future.done():
            raise RemoteProtocolError(f"reply for unknown tunnel id {reply.id}")
        future.set_result(reply)


class UntrustedCertificate(TunnelError):
    """The relay's certificate failed CA verification and no fingerprint is pinned.

    Like a fingerprint mismatch this is a refusal (exit 3), not a config error: an expired
    certificate renewed on the relay must heal a client that a service manager restarts.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"the certificate of {url} is not trusted ({reason}); pin it with "
                         "--fingerprint (tunnel-server prints it) or pass --ca-file")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionClosed):
        return "connection closed"
    return str(exc) or type(exc).__name__
