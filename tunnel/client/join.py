"""``tunnel-client join JOIN_STRING``: store a relay's address, pin and this client's key.

The join string printed by ``tunnel-server add-client`` is the only secret a user handles.
Decoding it here (not at every start) means a bad paste fails once, with one clear line,
and afterwards ``tunnel-client --expose 8888:fixed-6000`` needs no other flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from tunnel.client.settings import default_client_config
from tunnel.common.config.credentials import JoinInfo, decode_join
from tunnel.common.config.statefiles import StateFileError, regular_file_exists, write_private
from tunnel.common.errors import ConfigError

__all__ = ["join_main", "write_client_config"]

PROG = "tunnel-client join"
EXIT_CONFIG = 2
_HEADER = ("# Written by `tunnel-client join`. It holds this client's private key: keep it "
           "private (mode 0600).\n# Add `expose: [\"8888:fixed-6000\"]` to start tunnels "
           "without flags.\n")


def write_client_config(info: JoinInfo, path: Path) -> None:
    """Write the settings file atomically, private from its first byte."""
    body: dict[str, str] = {"server": info.server_url, "name": info.name}
    if info.fingerprint is not None:
        body["fingerprint"] = info.fingerprint
    body["key"] = info.private_key.reveal()
    write_private(path, _HEADER + yaml.safe_dump(body, sort_keys=False))


def join_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("join_string", metavar="JOIN_STRING")
    parser.add_argument("--config", help=f"where to write (default {default_client_config()})")
    parser.add_argument("--force", action="store_true", help="replace an existing file")
    args = parser.parse_args(argv)
    path = Path(args.config) if args.config else default_client_config()
    try:
        info = decode_join(args.join_string)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if regular_file_exists(path) and not args.force:
            print(f"{PROG}: {path} already exists; pass --force to replace it",
                  file=sys.stderr)
            return EXIT_CONFIG
        write_client_config(info, path)
    except StateFileError as exc:  # a link or directory where the settings go
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"{PROG}: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_CONFIG
    pin = f", pinned {info.fingerprint}" if info.fingerprint else ""
    print(f"joined {info.server_url} as {info.name}{pin}; settings saved to {path}")
    print("now run, for example: tunnel-client --expose 8888:fixed-6000")
    return 0
