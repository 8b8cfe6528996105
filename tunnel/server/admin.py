"""Relay administration: ``init``, ``add-client``, ``remove-client``, ``list-clients``.

These commands write files only; a running relay notices the edit (it watches its config
files) and applies it without a restart. Secrets are generated here, never typed by a
person: the relay keeps a client's *public* key, and the one secret the user handles is the
join string printed once by ``add-client``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tunnel.common.config.credentials import JoinInfo, encode_join, generate_keypair, shown_name
from tunnel.common.config.statefiles import STATE_DIR_MODE, regular_file_exists, write_private
from tunnel.common.config.yamlsafe import load_yaml_file
from tunnel.common.errors import ConfigError, TunnelError
from tunnel.common.proto.portset import PortSet
from tunnel.server.app import LEASE_DB_NAME, cert_hosts, tls_dir
from tunnel.server.config import CLIENT_NAME_PATTERN, ServerConfig, load_server_config
from tunnel.server.leases import Lease, SqliteLeaseStore
from tunnel.server.tls import cert_file_fingerprint, ensure_self_signed

__all__ = ["COMMANDS", "default_config_path", "main"]

PROG = "tunnel-server"
CONFIG_ENV = "TUNNEL_SERVER_CONFIG"
CLIENTS_FILE = "clients.yaml"
ADMIN_PASSWORD_FILE = "admin-password"
DEFAULT_LISTEN = "0.0.0.0:7000"
DEFAULT_PORTS = "6000-6999"
EXIT_OK, EXIT_ERROR = 0, 2

_CLIENTS_HEADER = ("# Clients of this relay, managed by `tunnel-server add-client` and "
                   "`remove-client`.\n# Hand edits are fine too: the running relay reloads "
                   "this file when it changes.\n# Only public keys are stored here.\n")


def default_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tunnel-server"


def default_config_path() -> Path:
    """``$TUNNEL_SERVER_CONFIG``, else ``$XDG_CONFIG_HOME/tunnel-server/server.yaml``."""
    explicit = os.environ.get(CONFIG_ENV)
    return Path(explicit) if explicit else default_config_dir() / "server.yaml"


# --------------------------------------------------------------------------- files


def _ports_yaml(ports: PortSet) -> list[int | str]:
    return [lo if lo == hi else f"{lo}-{hi}" for lo, hi in ports.ranges]


def parse_port_spec(text: str) -> PortSet:
    """``6000-6009`` or ``6000,6005,7000-7010`` from the command line."""
    ranges: list[tuple[int, int]] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([1-9][0-9]{0,4})(?:-([1-9][0-9]{0,4}))?\s*", part)
        if match is None:
            raise ConfigError("--ports", text, "expected ports like 6000-6009 or "
                              "6000,6005,7000-7010")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if not (1 <= lo <= hi <= 65535):
            raise ConfigError("--ports", text, f"{part!r} is not a range within 1-65535")
        ranges.append((lo, hi))
    return PortSet(ranges)


# --------------------------------------------------------------------------- init


def _server_yaml(args: argparse.Namespace, ports: PortSet) -> str:
    public_port = args.listen.rsplit(":", 1)[1]
    host = args.public_host
    shown = f"[{host}]" if ":" in host else host
    return f"""# Relay configuration written by `tunnel-server init`; see the README for every key.
listen: "{args.listen}"              # where clients connect
public_url: "wss://{shown}:{public_port}/tunnel"   # what join strings tell clients
path: /tunnel
public_host: "{args.public_bind}"    # address the public ports bind to
ports: {yaml.safe_dump(_ports_yaml(ports), default_flow_style=True).strip()}
state_dir: state                     # leases and the TLS key live here
tls: auto                            # self-signed, generated once, pinned by clients
clients_file: {CLIENTS_FILE}
dashboard:                           # status page, API and /metrics (localhost only)
  listen: "{args.dashboard_listen}"
  username: admin
  password_file: {ADMIN_PASSWORD_FILE}
"""


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else default_config_dir()
    config = directory / "server.yaml"
    clients, password = directory / CLIENTS_FILE, directory / ADMIN_PASSWORD_FILE
    # Checked before anything is written: a link or directory in place of any is refused.
    have_config, have_clients, have_password = (
        regular_file_exists(path) for path in (config, clients, password))
    if have_config and not args.force:
        print(f"{PROG} init: {config} already exists; pass --force to overwrite it "
              "(the TLS key is kept)", file=sys.stderr)
        return EXIT_ERROR
    ports = parse_port_spec(args.ports)
    directory.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    if not have_clients:
        write_private(clients, _CLIENTS_HEADER + "{}\n")
    if not have_password:
        write_private(password, secrets.token_urlsafe(18) + "\n")
    before = config.read_text(encoding="utf-8") if have_config else None
    write_private(config, _server_yaml(args, ports))
    try:  # never leave a config behind that the relay cannot load
        loaded = load_server_config(config)
    except ConfigError:
        if before is None:
            config.unlink()
        else:
            write_private(config, before)
        raise
    _, cert, _ = ensure_self_signed(tls_dir(loaded), cert_hosts(loaded))
    print(f"wrote {config} (clients in {clients}, state in {loaded.state_dir})")
    print(f"dashboard admin password stored in {password} (mode 0600)")
    print(f"fingerprint: {cert_file_fingerprint(cert)}")
    print("next:")
    print(f"  tunnel-server add-client NAME --ports 6000-6009 --config {config}")
    print(f"  tunnel-server --config {config}")
    return EXIT_OK


# --------------------------------------------------------------------------- clients


def _load_clients_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = load_yaml_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "expected a mapping of client name to settings")
    return dict(data)


def _save_clients(path: Path, data: dict[str, Any], config_path: Path) -> ServerConfig:
    """Write the clients file, then validate the whole config; roll back if it fails."""
    before = path.read_text(encoding="utf-8") if path.exists() else None
    body = yaml.safe_dump(data, sort_keys=True, default_flow_style=False) if data else "{}\n"
    write_private(path, _CLIENTS_HEADER + body)
    try:
        return load_server_config(config_path)
    except ConfigError:
        if before is None:
            path.unlink()
        else:
            write_private(path, before)
        raise


def _clients_file(config: ServerConfig) -> Path:
    if config.clients_file is None:
        raise ConfigError(config.source, "clients_file", "not set; add `clients_file: "
                          f"{CLIENTS_FILE}` to use add-client and remove-client")
    return config.clients_file


def _fingerprint(config: ServerConfig) -> str | None:
    if config.tls.mode == "off":
        return None  # TLS is terminated in front of the relay: clients verify its CA cert
    if config.tls.mode == "files":
        assert config.tls.cert is not None
        return cert_file_fingerprint(config.tls.cert)
    _, cert, _ = ensure_self_signed(tls_dir(config), cert_hosts(config))
    return cert_file_fingerprint(cert)


def cmd_add_client(args: argparse.Namespace) -> int:
    config_path = Path(args.config) if args.config else default_config_path()
    config = load_server_config(config_path)
    name = args.name
    if not re.fullmatch(CLIENT_NAME_PATTERN, name):
        raise ConfigError("NAME", shown_name(name),
                          "names are 1-63 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    if name in config.clients:
        raise ConfigError("NAME", name, "a client of that name exists; remove-client it first "
                                        "or pick another name")
    if config.public_url is None:
        raise ConfigError(config.source, "public_url", "not set; add the URL clients use, "
                          "e.g. public_url: wss://vps.example.com:7000/tunnel")
    path = _clients_file(config)
    data = _load_clients_raw(path)
    private, public = generate_keypair()
    try:  # encode first: never record a client whose join string cannot be printed
        join = encode_join(JoinInfo(config.public_url, _fingerprint(config), name, private))
    except ValueError as exc:
        raise ConfigError(config.source, "public_url", str(exc)) from None
    entry: dict[str, Any] = {"public_key": public}
    if args.ports:
        entry["ports"] = _ports_yaml(parse_port_spec(args.ports))
    data[name] = entry
    config = _save_clients(path, data, config_path)
    allowed = config.client_ports(name).describe() or "none"
    print(f"added client {name} (ports {allowed}) to {path}")
    print(f"join string for {name} - it is the client's secret and is shown only once:")
    print(f"  {join}")
    print("on the client machine run:")
    print(f"  tunnel-client join {join}")
    return EXIT_OK


async def _release_then_save(db: Path, name: str, *, known: bool,
                             save: Callable[[], object]) -> list[Lease]:
    """Delete ``name``'s lease rows, then ``save()`` the clients file; put the rows back if
    the save fails, so a failed ``remove-client`` changes nothing. Returns the leases."""
    async with SqliteLeaseStore(db) as store:
        leases = [lease for lease in await store.load() if lease.client == name]
        if not known and not leases:
            raise ConfigError("NAME", name, "no such client")
        for lease in leases:
            await store.delete(lease.port)
        try:  # rewritten even when unchanged: the write is what makes the relay reload
            save()
        except BaseException:
            for lease in leases:
                await store.claim(lease, None)
            raise
    return leases


def cmd_remove_client(args: argparse.Namespace) -> int:
    """Drop the client's entry and release its leases.

    The leases go first (their rows in the lease database), then the entry: the running
    relay reloads on the file write, and frees in memory the leases whose rows are gone.
    A client already gone from the file by a hand edit keeps its leases until this runs,
    so ``remove-client`` also accepts a name that only holds leases.
    """
    config_path = Path(args.config) if args.config else default_config_path()
    config = load_server_config(config_path)
    name = args.name
    path = _clients_file(config)
    data = _load_clients_raw(path)
    if name in config.clients and name not in data:
        raise ConfigError(config.source, f"clients.{name}", "this client is defined in the "
                          "server config itself; remove it there")
    leases = asyncio.run(_release_then_save(
        Path(config.state_dir) / LEASE_DB_NAME, name, known=name in config.clients,
        save=lambda: _save_clients(path, {k: v for k, v in data.items() if k != name},
                                   config_path)))
    ports = ", ".join(str(lease.port) for lease in leases) or "none"
    print(f"removed client {name} (released ports: {ports}); a running relay disconnects it "
          "and frees its ports within a second")
    return EXIT_OK


def cmd_list_clients(args: argparse.Namespace) -> int:
    config_path = Path(args.config) if args.config else default_config_path()
    config = load_server_config(config_path)
    leases = asyncio.run(_load_leases(Path(config.state_dir) / LEASE_DB_NAME))
    print(f"{'NAME':<24} {'CREDENTIAL':<10} {'PORTS':<20} {'LEASES':<30} LAST SEEN")
    for name, entry in sorted(config.clients.items()):
        mine = [lease for lease in leases if lease.client == name]
        held = ", ".join(f"{lease.port}({lease.kind})" for lease in mine) or "-"
        seen = max((lease.last_seen for lease in mine), default=None)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seen)) if seen else "never"
        kind = "key" if entry.public_key else "token"
        ports = config.client_ports(name).describe() or "none"
        print(f"{name:<24} {kind:<10} {ports:<20} {held:<30} {when}")
    return EXIT_OK


async def _load_leases(path: Path) -> list[Lease]:
    async with SqliteLeaseStore(path) as store:
        return await store.load()


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a new relay config, TLS key and admin password")
    init.add_argument("--public-host", required=True,
                      help="the name or address clients use to reach this relay")
    init.add_argument("--dir", help=f"config directory (default {default_config_dir()})")
    init.add_argument("--listen", default=DEFAULT_LISTEN, help="link address HOST:PORT")
    init.add_argument("--ports", default=DEFAULT_PORTS, help="public ports, e.g. 6000-6999")
    init.add_argument("--public-bind", default="0.0.0.0",
                      help="address the public ports bind to")
    init.add_argument("--dashboard-listen", default="127.0.0.1:7500",
                      help="status page address (keep it on localhost; use an SSH tunnel)")
    init.add_argument("--force", action="store_true", help="overwrite an existing config")
    init.set_defaults(func=cmd_init)
    for command, func, text in (("add-client", cmd_add_client, "add a client, print its join "
                                 "string"),
                                ("remove-client", cmd_remove_client, "remove a client"),
                                ("list-clients", cmd_list_clients, "show clients and leases")):
        cmd = sub.add_parser(command, help=text)
        if command != "list-clients":
            cmd.add_argument("name", metavar="NAME")
        if command == "add-client":
            cmd.add_argument("--ports", help="this client's own ports, e.g. 6000-6009")
        cmd.add_argument("--config", "-c", help=f"server.yaml (default {default_config_path()})")
        cmd.set_defaults(func=func)
    return parser


COMMANDS = ("init", "add-client", "remove-client", "list-clients")


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, TunnelError) as exc:  # TlsFilesError, LeaseStoreError included
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
