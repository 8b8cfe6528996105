"""``tunnel-client``: expose local ports through a relay.

Exit codes: 0 after SIGTERM/SIGINT; 2 for bad arguments or configuration (checked before
any connection); 3 when the relay refuses (wrong token, refused port). Network errors never
end the program: it reconnects forever.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from tunnel import __version__
from tunnel.client.connector import Connector, UntrustedCertificate
from tunnel.client.expose import EXPOSE_GRAMMAR
from tunnel.client.settings import ClientSettings, resolve_client_settings
from tunnel.common.aio.runtime import run, setup_logging
from tunnel.common.errors import (
    AuthError,
    ClaimRefused,
    ConfigError,
    FingerprintMismatch,
    TlsFilesError,
)

__all__ = ["EXIT_CONFIG", "EXIT_REFUSED", "main"]

EXIT_CONFIG = 2
EXIT_REFUSED = 3
PROG = "tunnel-client"

log = logging.getLogger("tunnel.client")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Expose local TCP ports on a tunnel relay.",
        epilog=f"--expose grammar: {EXPOSE_GRAMMAR}")
    parser.add_argument("--server", "-s", metavar="URL",
                        help="relay address: HOST:PORT, ws://HOST:PORT[/PATH] "
                             "(env TUNNEL_SERVER)")
    parser.add_argument("--token", "-t", metavar="TOKEN",
                        help="this client's token (env TUNNEL_TOKEN keeps it out of the "
                             "process list)")
    parser.add_argument("--expose", "-e", action="append", default=[], metavar="SPEC",
                        help="a tunnel; repeat for several")
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="client.yaml with server, token/token_env/token_file, expose")
    parser.add_argument("--fingerprint", metavar="sha256:HEX",
                        help="pin the relay certificate (env TUNNEL_FINGERPRINT); set by join")
    parser.add_argument("--ca-file", metavar="PEM",
                        help="verify the relay against this CA instead of the system's")
    parser.add_argument("--insecure", action="store_true",
                        help="allow plain ws:// to a non-loopback relay (TLS terminated "
                             "elsewhere on a trusted network)")
    parser.add_argument("--source-address", metavar="IP",
                        help="connect to the relay from this local address (hosts with "
                             "several uplinks)")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "join":
        from tunnel.client.join import (
            join_main,  # PyYAML and key parsing: only this subcommand needs them
        )

        return join_main(argv[1:])
    args = _parser().parse_args(argv)
    setup_logging(getattr(args, "log_level", None) or "info")
    try:
        settings = resolve_client_settings(server=args.server, token=args.token,
                                           exposes=args.expose, config_path=args.config,
                                           env=os.environ, fingerprint=args.fingerprint,
                                           ca_file=args.ca_file, insecure=args.insecure,
                                           source_address=args.source_address)
    except ConfigError as exc:
        print(_message(exc), file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(args.log_level)
    return run(_main(settings))


def _message(exc: ConfigError) -> str:
    """One line; errors about the settings as a whole already name the program."""
    text = str(exc)
    return text if text.startswith(f"{PROG}:") else f"{PROG}: {text}"


def _announce(line: str) -> None:
    print(line, flush=True)


async def _main(settings: ClientSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connector = Connector(settings, announce=_announce)
    try:
        await connector.run(stop)
    except AuthError:
        what = "this client's key (revoked or wrong: ask the relay admin for a new join " \
            "string)" if settings.private_key else "this token (check --token / TUNNEL_TOKEN)"
        print(f"{PROG}: authentication failed: the relay at {settings.server_url} did not "
              f"accept {what}", file=sys.stderr)
        return EXIT_REFUSED
    except ClaimRefused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except FingerprintMismatch as exc:
        print(f"{PROG}: {exc}. This may be a man in the middle; nothing was sent. If the "
              "relay's key was replaced on purpose, join again with a new join string or "
              "pass the new --fingerprint.", file=sys.stderr)
        return EXIT_REFUSED
    except UntrustedCertificate as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except TlsFilesError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(_message(exc), file=sys.stderr)
        return EXIT_CONFIG
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
