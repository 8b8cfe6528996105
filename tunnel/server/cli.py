"""``tunnel-server``: run the relay.

The first SIGTERM or SIGINT stops accepting and lets open connections finish for up to
``SHUTDOWN_DRAIN_TIMEOUT`` (10 s), then resets those left; a second one resets them at once.

Exit codes: 0 after a shutdown on a signal (either way) or a passing ``--check``; 1 when a
socket cannot be bound; 2 for a configuration error (nothing is bound then).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from tunnel import __version__
from tunnel.common.aio.runtime import run, setup_logging
from tunnel.common.config.statefiles import StateFileError
from tunnel.common.errors import ConfigError
from tunnel.server import admin
from tunnel.server.app import Relay
from tunnel.server.config import ServerConfig, load_server_config
from tunnel.server.leases import LeaseStoreError
from tunnel.server.tls import TlsFilesError

__all__ = ["EXIT_BIND", "EXIT_CONFIG", "main"]

EXIT_BIND = 1
EXIT_CONFIG = 2
PROG = "tunnel-server"

log = logging.getLogger("tunnel.server")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Relay: accepts tunnel clients and publishes their ports.",
        epilog="other commands: init, add-client, remove-client, list-clients "
               "(tunnel-server COMMAND --help)")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="server.yaml (default: $TUNNEL_SERVER_CONFIG or "
                             "~/.config/tunnel-server/server.yaml)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 when valid)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="overrides log_level from the config")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in admin.COMMANDS:
        return admin.main(argv)
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "info")
    if args.config is None:
        args.config = str(admin.default_config_path())
    try:
        config = load_server_config(args.config)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{PROG}: {args.config}: configuration OK ({len(config.clients)} clients, "
              f"ports {config.ports.describe()})")
        return 0
    setup_logging(args.log_level or config.log_level)
    return run(_serve(config))


async def _serve(config: ServerConfig) -> int:
    try:
        relay = Relay(config)
    except (LeaseStoreError, StateFileError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    try:
        await relay.start()
    except (TlsFilesError, StateFileError, LeaseStoreError) as exc:
        log.error("%s", exc)
        await relay.stop(drain_timeout=0)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot listen: %s (link %s:%d, dashboard %s)", exc.strerror or exc,
                  config.listen_host, config.listen_port,
                  f"{config.dashboard.listen_host}:{config.dashboard.listen_port}"
                  if config.dashboard else "off")
        await relay.stop(drain_timeout=0)
        return EXIT_BIND
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, relay.reload_soon)
    # The ready line comes after the handlers: a signal sent on seeing it must be handled.
    if relay.fingerprint is not None:
        print(f"{PROG}: tls fingerprint {relay.fingerprint}", flush=True)
    print(f"{PROG}: listening on {relay.url}", flush=True)
    if relay.dashboard is not None:
        print(f"{PROG}: dashboard on {relay.dashboard.url}", flush=True)
    log.info("relay %s ready: control %s, public ports %s on %s", __version__, relay.url,
             config.ports.describe(), config.public_host)
    await stop.wait()
    log.info("shutting down (a second signal stops at once)")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop_now)
    await relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
