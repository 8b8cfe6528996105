"""The relay's lifecycle: load state, bind leased ports, accept links, shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, serve

from tunnel.common.aio.budget import LinkGroup
from tunnel.common.aio.runtime import limit_unsent
from tunnel.common.config.base import is_loopback
from tunnel.common.config.credentials import generate_keypair, key_id
from tunnel.common.errors import ConfigError
from tunnel.common.proto.auth import derive_key
from tunnel.common.proto.frames import MAX_MESSAGE_SIZE
from tunnel.common.proto.mux import GoAwayCode
from tunnel.common.proto.portset import PortSet
from tunnel.server.config import ServerConfig, load_server_config
from tunnel.server.control import HANDSHAKE_TIMEOUT, ControlHandler
from tunnel.server.dashboard import Alerts, Dashboard, start_alerts, start_dashboard
from tunnel.server.guard import (
    MAX_VISITORS_PER_SOURCE,
    MAX_VISITORS_TOTAL,
    OpenRate,
    Penalties,
    PreAuthSlots,
    SourceSlots,
)
from tunnel.server.leases import LeaseBook, LeaseStoreError, SqliteLeaseStore
from tunnel.server.listeners import LISTEN_BACKLOG
from tunnel.server.monitor import Monitor
from tunnel.server.preauth import preauth_connection
from tunnel.server.public_tcp import PublicTcp
from tunnel.server.registry import Registry
from tunnel.server.reload import plan_reload
from tunnel.server.stats import LinkCounters
from tunnel.server.tls import (
    cert_file_fingerprint,
    check_private_file,
    ensure_self_signed,
    server_ssl_context,
)
from tunnel.server.tunnels import Binding, TunnelKind

__all__ = ["LEASE_DB_NAME", "RELOAD_POLL_INTERVAL", "SHUTDOWN_DRAIN_TIMEOUT", "Relay",
           "tls_dir"]

LEASE_DB_NAME = "leases.sqlite3"
TLS_DIR_NAME = "tls"
#: How often the relay checks its config files for edits (add-client, remove-client).
RELOAD_POLL_INTERVAL = 0.5
#: How long SIGTERM waits for open streams to finish before resetting them.
SHUTDOWN_DRAIN_TIMEOUT = 10.0
_DRAIN_POLL = 0.05

log = logging.getLogger("tunnel.server")


class Relay:
    """Owns every piece of relay state; :meth:`start` and :meth:`stop` bracket its life."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.store = SqliteLeaseStore(Path(config.state_dir) / LEASE_DB_NAME)
        self.leases = LeaseBook(self.store, config.ports, self._allowed_ports, clock=time.time)
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, tuple[str, str]] = {}
        self.decoy_key = generate_keypair()[1]
        self._load_credentials(config)
        self.preauth = PreAuthSlots()
        self.visitor_slots = SourceSlots(MAX_VISITORS_PER_SOURCE, MAX_VISITORS_TOTAL)
        self.open_rate = OpenRate(per_source=config.opens_per_source,
                                  per_port=config.opens_per_port)
        self.penalties = Penalties()
        self.public_tcp = PublicTcp(self.registry, self.leases, config.public_host, config.ports,
                                    self.reserved_ports, self.visitor_slots, self.open_rate)
        #: One binding per kind: what an ``expose`` of that kind claims outside the registry.
        self.bindings: dict[TunnelKind, Binding] = {TunnelKind.PUBLIC_TCP: self.public_tcp}
        self.background: set[asyncio.Task[None]] = set()
        self.control = ControlHandler(self)
        self._ws_server: Server | None = None
        self.started = time.time()
        self.fingerprint: str | None = None
        self._watched = self._file_stamps()
        self.monitor = Monitor(self.registry, Path(config.state_dir))
        self.stats = self.monitor.stats
        self.counters = LinkCounters()
        #: Every client link, for the budget of stream data they may queue together (L-3).
        self.links = LinkGroup()
        self.history = self.monitor.history
        #: Called with (client name, online) on every presence change (alerts, dashboard).
        self.presence_listeners: list[Callable[[str, bool], None]] = []
        self.dashboard: Dashboard | None = None
        self.alerts: Alerts | None = None
        #: Set by :meth:`stop_now`: the drain ends and links are dropped, not closed politely.
        self._hurry = asyncio.Event()
        self.registry.sync_clients(set(config.clients))

    def _allowed_ports(self, name: str) -> PortSet:
        """Read through ``self.config`` so a reload changes what a client may claim."""
        if name not in self.config.clients:
            return PortSet()
        return self.config.client_ports(name)

    def _load_credentials(self, config: ServerConfig) -> None:
        """Token clients by name (HMAC keys), key clients by their public key id."""
        self.keys = {name: derive_key(entry.token) for name, entry in config.clients.items()
                     if entry.token is not None}
        self.public_keys = {key_id(entry.public_key): (name, entry.public_key)
                            for name, entry in config.clients.items()
                            if entry.public_key is not None}

    @property
    def url(self) -> str:
        assert self._ws_server is not None
        sock = next(iter(self._ws_server.sockets))
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        scheme = "ws" if self.fingerprint is None and self.config.tls.mode == "off" else "wss"
        return f"{scheme}://{shown}:{port}{self.config.path}"

    def reserved_ports(self) -> dict[int, str]:
        """The relay's own listening ports (as bound), which no tunnel may take."""
        reserved: dict[int, str] = {}
        if self.dashboard is not None:
            port = _url_port(self.dashboard.url)
            if port is not None:
                reserved[port] = "dashboard"
        if self._ws_server is not None:
            port = _url_port(self.url)
            if port is not None:
                reserved[port] = "control"
        return reserved

    async def start(self) -> None:
        """Bind everything; raises TlsFilesError, LeaseStoreError or OSError before accepting
        anyone."""
        ssl_context = self._tls_context()
        await self.leases.load()
        await self.public_tcp.restore(self.config.clients)
        self._ws_server = await serve(
            self.control, self.config.listen_host, self.config.listen_port,
            process_request=self.control.process_request,
            # The connection class takes a pre-auth slot at TCP accept, then does TLS itself
            # (preauth.py says why), so serve() gets no ssl context.
            create_connection=preauth_connection(self.preauth, ssl_context, HANDSHAKE_TIMEOUT,
                                                 self.links.recv_squeezed),
            compression=None, max_size=MAX_MESSAGE_SIZE, ping_interval=None,
            open_timeout=HANDSHAKE_TIMEOUT, close_timeout=2.0,
            server_header=None, ssl=None,
            # A burst of connects (B-8) must not drop a legitimate client's SYN (1 s retry).
            backlog=LISTEN_BACKLOG,
        )
        for sock in self._ws_server.sockets:  # links accepted here inherit it
            limit_unsent(sock)
        task = asyncio.create_task(self._watch_files(), name="config-watch")
        self.background.add(task)
        self.monitor.start()
        self.dashboard = await start_dashboard(self)
        self.alerts = start_alerts(self)

    # ------------------------------------------------------------ presence and admin

    def presence(self, name: str, online: bool) -> None:
        for listener in list(self.presence_listeners):
            try:
                listener(name, online)
            except Exception:  # a listener's bug must not break a login
                log.exception("presence listener failed")

    def disconnect_client(self, name: str) -> bool:
        """Admin action: drop a client's link (it will log in again by itself)."""
        record = self.registry.clients.get(name)
        if record is None or record.link is None:
            return False
        self._disconnect(name, "disconnected by the admin", GoAwayCode.NORMAL)
        return True

    async def release_lease(self, port: int) -> bool:
        """Admin action: forget a lease; the port is free for anyone allowed."""
        lease = await self.public_tcp.release(port)
        if lease is None:
            return False
        log.info("port %d released by the admin (was client %s)", port, lease.client)
        return True

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls.mode == "off":
            if not is_loopback(self.config.listen_host):
                log.warning("tls: off - the link is plain ws:// on %s; safe only behind a "
                            "TLS-terminating proxy on this host", self.config.listen_host)
            return None
        if tls.mode == "auto":
            key, cert, created = ensure_self_signed(tls_dir(self.config), cert_hosts(self.config))
            if created:
                log.info("generated the relay's TLS key and certificate in %s", key.parent)
        else:
            assert tls.cert is not None and tls.key is not None
            cert, key = tls.cert, tls.key
        check_private_file(key, log)
        context = server_ssl_context(cert, key)
        self.fingerprint = cert_file_fingerprint(cert)
        return context

    # ------------------------------------------------------------ reload

    def _file_stamps(self) -> list[tuple[int, int] | None]:
        stamps: list[tuple[int, int] | None] = []
        for path in (Path(self.config.source), self.config.clients_file):
            try:
                info = os.stat(path) if path is not None else None
            except OSError:
                info = None
            stamps.append((info.st_mtime_ns, info.st_size) if info is not None else None)
        return stamps

    async def _watch_files(self) -> None:
        """Apply edits of server.yaml or the clients file without a restart."""
        while True:
            await asyncio.sleep(RELOAD_POLL_INTERVAL)
            stamps = self._file_stamps()
            if stamps != self._watched:
                self._watched = stamps
                await self.reload()

    def reload_soon(self) -> None:
        """Reload from a signal handler, which cannot await: in a background task."""
        task = asyncio.create_task(self.reload(), name="config-reload")
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def reload(self) -> None:
        """Re-read the config; apply what can change live, keep the rest as running.

        A config that fails to load changes nothing, and neither does one whose client list
        only looks empty (a missing, empty or half-written clients file): the error is
        logged. Each changed key that needs a restart is logged as a warning
        (:func:`plan_reload` finds them field by field). A client gone from a valid file can
        no longer log in and its link is closed, but its leases stay (ports reserved, shown
        on the status page) until released explicitly: by the admin release or by
        ``remove-client`` (:meth:`_forget_released`). A client whose entry changed is
        disconnected so it logs in again under the new rules. Other clients are not touched.
        """
        try:
            new = load_server_config(self.config.source, reload=True)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        old = self.config
        plan = plan_reload(old, new)
        for key in plan.restart:
            log.warning("reload: %s changed but needs a restart; the running value is kept",
                        key)
        self.config = plan.config
        self._apply_sections(old)
        self._load_credentials(self.config)
        self.registry.sync_clients(set(new.clients))
        removed = sorted(set(old.clients) - set(new.clients))
        changed = sorted(name for name in set(old.clients) & set(new.clients)
                         if old.clients[name] != new.clients[name])
        # Before the links close: closing one touches its leases, which would write back
        # the rows remove-client deleted.
        await self._forget_released()
        for name in removed + changed:
            self._disconnect(name, "client removed" if name in removed else "client changed")
        for name in removed:
            kept = [lease.port for lease in self.leases.leases_of(name)]
            if kept:
                log.warning("client %s is no longer configured: it cannot log in, and its "
                            "ports %s stay reserved until released (remove-client or the "
                            "status page)", name, ", ".join(map(str, kept)))
        self._watched = self._file_stamps()
        settings = [name for name in plan.applied if name not in ("clients", "clients_file")]
        log.info("configuration reloaded: %d clients; removed: %s; changed: %s; "
                 "settings applied: %s", len(new.clients), ", ".join(removed) or "none",
                 ", ".join(changed) or "none", ", ".join(settings) or "none")

    def _apply_sections(self, old: ServerConfig) -> None:
        """Hand changed dashboard and alert settings to the running dashboard and alerts."""
        new = self.config
        if self.dashboard is not None and new.dashboard is not None \
                and new.dashboard != old.dashboard:
            self.dashboard.apply(new.dashboard)
        if self.alerts is not None and new.alerts is not None and new.alerts != old.alerts:
            self.alerts.settings = new.alerts

    async def _forget_released(self) -> None:
        """Drop the leases of unconfigured clients whose rows left the lease database.

        ``remove-client`` releases a client's leases by deleting its rows, which works
        whether the relay runs or not; the running relay follows here. Nothing else drops
        a lease of a client that left the config: a hand edit or a file that looks empty
        must never cost a client its ports.
        """
        orphans = [lease for lease in self.leases.leases()
                   if lease.client not in self.config.clients]
        if not orphans:
            return
        try:
            stored = {lease.port for lease in await self.store.load()}
        except LeaseStoreError as exc:
            log.error("cannot read the lease database; leases of removed clients are kept: "
                      "%s", exc)
            return
        for lease in orphans:
            if lease.port not in stored and await self.public_tcp.release(lease.port) is not None:
                log.info("port %d released (client %s removed by remove-client)", lease.port,
                         lease.client)

    def _disconnect(self, name: str, reason: str,
                    code: GoAwayCode = GoAwayCode.REVOKED) -> None:
        record = self.registry.clients.get(name)
        if record is None or record.link is None:
            return
        log.info("client %s: closing its link (%s)", name, reason)
        link = record.link
        self.registry.detach(name, link, time.time())
        self.presence(name, False)
        task = asyncio.create_task(link.close(code, reason))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def stop_now(self) -> None:
        """Cut a :meth:`stop` short (the second signal): no more drain, every link dropped.

        Dropping a link resets its streams, so visitors still connected see RST, never a
        clean EOF. Safe to call before, during or after :meth:`stop`, and more than once.
        """
        if not self._hurry.is_set():
            log.warning("stopping at once: resetting every open stream")
        self._hurry.set()
        for client in self.registry.online():
            if client.link is not None:
                client.link.abort("relay stopping at once")

    async def stop(self, drain_timeout: float = SHUTDOWN_DRAIN_TIMEOUT) -> None:
        """Stop accepting, let open streams finish (bounded), then close every link.

        The drain lasts until no stream is open or ``drain_timeout`` passed, so a relay
        with an open idle connection (an SSH session) takes the whole timeout; streams still
        open then are reset. :meth:`stop_now` ends it early."""
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.alerts is not None:
            await self.alerts.stop()
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        for binding in self.bindings.values():
            binding.close()
        links = [c.link for c in self.registry.online() if c.link is not None]
        deadline = time.monotonic() + drain_timeout
        open_streams = sum(len(link.streams) for link in links)
        if open_streams and drain_timeout > 0:
            log.info("waiting up to %.0f s for %d open streams to finish", drain_timeout,
                     open_streams)
        while (any(link.streams for link in links) and time.monotonic() < deadline
               and not self._hurry.is_set()):
            await asyncio.sleep(_DRAIN_POLL)
        if self._hurry.is_set():
            self.stop_now()  # links that came online during the drain go too
        else:
            await asyncio.gather(*(link.close(GoAwayCode.SHUTDOWN, "relay shutting down")
                                   for link in links), return_exceptions=True)
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        for task in list(self.background):
            task.cancel()
        await self.monitor.stop()
        await self.store.close()
        log.info("relay stopped")


def tls_dir(config: ServerConfig) -> Path:
    """Where ``tls: auto`` keeps the relay's generated key and certificate."""
    return Path(config.state_dir) / TLS_DIR_NAME


def cert_hosts(config: ServerConfig) -> list[str]:
    """Names the self-signed certificate is issued for (informational: clients pin it)."""
    hosts: list[str] = []
    if config.public_url:
        host = urlsplit(config.public_url).hostname
        if host:
            hosts.append(host)
    if not _is_wildcard(config.listen_host):
        hosts.append(config.listen_host)
    return hosts


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _url_port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None
