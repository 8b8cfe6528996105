"""The relay's lifecycle: load state, bind leased ports, accept links, shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from websockets.asyncio.server import Server, serve

from ..common.auth import derive_key
from ..common.config import ServerConfig
from ..common.credentials import generate_keypair, key_id
from ..common.frames import MAX_MESSAGE_SIZE
from ..common.mux import GoAwayCode
from .control import HANDSHAKE_TIMEOUT, ControlHandler
from .guard import Penalties, PreAuthSlots
from .leases import LeaseBook, SqliteLeaseStore
from .listeners import bind_public_port
from .registry import Registry

__all__ = ["LEASE_DB_NAME", "SHUTDOWN_DRAIN_TIMEOUT", "Relay"]

LEASE_DB_NAME = "leases.sqlite3"
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
        self.leases = LeaseBook(self.store, config.ports, config.client_ports, clock=time.time)
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, tuple[str, str]] = {}
        self.decoy_key = generate_keypair()[1]
        self._load_credentials(config)
        self.preauth = PreAuthSlots()
        self.penalties = Penalties()
        self.servers: dict[int, asyncio.Server] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.control = ControlHandler(self)
        self._ws_server: Server | None = None
        self.started = time.time()

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
        return f"ws://{shown}:{port}{self.config.path}"

    async def start(self) -> None:
        await self._bind_leased_ports()
        self._ws_server = await serve(
            self.control, self.config.listen_host, self.config.listen_port,
            process_request=self.control.process_request,
            compression=None, max_size=MAX_MESSAGE_SIZE, ping_interval=None,
            open_timeout=HANDSHAKE_TIMEOUT, close_timeout=2.0,
            server_header=None,
        )

    async def _bind_leased_ports(self) -> None:
        """Keep every leased port bound from the start, owner online or not."""
        host = self.config.public_host
        for lease in self.leases.leases():
            if lease.port not in self.config.ports:
                log.warning("lease of port %d (client %s) is outside `ports`: not bound",
                            lease.port, lease.client)
                continue
            record = self.registry.reserve(lease.port, lease.client, lease.kind, lease.target)
            try:
                self.servers[lease.port] = await bind_public_port(host, lease.port, record)
            except OSError as exc:
                log.warning("cannot bind leased port %d (client %s): %s", lease.port,
                            lease.client, exc.strerror or exc)
                self.registry.drop(lease.port)

    async def stop(self, drain_timeout: float = SHUTDOWN_DRAIN_TIMEOUT) -> None:
        """Stop accepting, let open streams finish (bounded), then close every link."""
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        for server in self.servers.values():
            server.close()
        links = [c.link for c in self.registry.online() if c.link is not None]
        deadline = time.monotonic() + drain_timeout
        while any(link.streams for link in links) and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL)
        await asyncio.gather(*(link.close(GoAwayCode.SHUTDOWN, "relay shutting down")
                               for link in links), return_exceptions=True)
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        for task in list(self.background):
            task.cancel()
        self.store.close()
        log.info("relay stopped")
