"""Catalogue tests R-11 and R-12 (issue 24): what a hot reload of the relay's config does.

R-11: a clients file (or server.yaml) that is empty, missing or half-written keeps the
running configuration; a client dropped from a valid file keeps its leases until an explicit
``remove-client``. R-12: a reload applies the dashboard's credentials live and warns about
every changed key that needs a restart. Everything runs as the real programs on 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.dashboard.client import basic, request
from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    SERVER_MODULE,
    Proc,
    free_ports,
    server_config,
    start_client,
    start_proc,
    start_server,
    wait_tunnel,
    write_config,
)
from tests.e2e.observe import DASHBOARD_RE
from tests.e2e.services import EchoService, assert_closed_quickly, echo_check

RELOAD_WITHIN = 10.0  # the relay polls its files every 0.5 s; margin for a loaded machine
REFUSED_RE = r"reload failed, keeping the running configuration"
RELOADED_RE = r"configuration reloaded: (?P<n>\d+) clients; removed: (?P<removed>\S+)"
COMMAND_TIMEOUT = 30.0
CLIENTS = "clients.yaml"
EXIT_REFUSED = 3


# ----------------------------------------------------------------------------- helpers


def _clients_text(port: int, *, beta: bool = False) -> str:
    """Alpha owning ``port`` (and beta with any port), in flow style: any cut is invalid."""
    clients: dict[str, Any] = {"alpha": {"token": ALPHA_TOKEN, "ports": [port]}}
    if beta:
        clients["beta"] = {"token": BETA_TOKEN}
    return yaml.safe_dump(clients, default_flow_style=True, width=10_000)


def _replace(path: Path, text: str) -> None:
    """Write as editors and our own tools do (temp file, then rename)."""
    temp = path.with_name(f".{path.name}.edit")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


async def _reload_line(relay: Proc, pattern: str, since: int) -> str:
    match = await relay.wait_for_line(pattern, RELOAD_WITHIN, since=since, stream="stderr")
    return match.string


async def _relay_with_alpha(tmp_path: Path, *, beta: bool = False, **overrides: Any
                            ) -> tuple[Proc, str, Proc, EchoService, int]:
    """A relay whose clients file holds alpha (fixed port), with alpha serving an echo."""
    (port,) = free_ports(1)
    (tmp_path / CLIENTS).write_text(_clients_text(port, beta=beta), encoding="utf-8")
    config = server_config(tmp_path, [port], clients={}, clients_file=CLIENTS, **overrides)
    relay, url = await start_server(tmp_path, config)
    echo = EchoService()
    await echo.start()
    alpha = await start_client(url, ALPHA_TOKEN, [f"{echo.target}:fixed-{port}"], name="alpha")
    assert await wait_tunnel(alpha, echo.target, mode="fixed") == port
    await echo_check(port, seed=port)
    return relay, url, alpha, echo, port


# -----------------------------------------------------------------------------


def _empty(path: Path) -> None:
    _replace(path, "")


def _whitespace(path: Path) -> None:
    _replace(path, "  \n\n   \n")


def _comments_only(path: Path) -> None:
    _replace(path, "# being edited\n")


def _null_document(path: Path) -> None:
    _replace(path, "~\n")


def _missing(path: Path) -> None:
    path.unlink()


def _truncated(path: Path) -> None:
    """Cut in place (as a crash leaves it) inside a key, where no prefix is valid YAML."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) == 1:  # a flow-style document: any cut leaves a bracket open
        cut = lines[0][: len(lines[0]) // 2]
    else:
        middle = len(lines) // 2
        cut = "".join(lines[:middle]) + lines[middle][:2]
    path.write_text(cut, encoding="utf-8")


def _first_byte(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    path.write_text(text[:1], encoding="utf-8")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere.yaml"))


def _clients_key_null(path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc.pop("clients_file")
    doc["clients"] = None
    _replace(path, yaml.safe_dump(doc, sort_keys=False))


BREAKAGES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "clients-empty": (CLIENTS, _empty),
    "clients-whitespace": (CLIENTS, _whitespace),
    "clients-comments-only": (CLIENTS, _comments_only),
    "clients-null-document": (CLIENTS, _null_document),
    "clients-missing": (CLIENTS, _missing),
    "clients-truncated": (CLIENTS, _truncated),
    "clients-half-written": (CLIENTS, _first_byte),
    "clients-directory": (CLIENTS, _directory),
    "clients-dangling-symlink": (CLIENTS, _dangling_symlink),
    "server-empty": ("server.yaml", _empty),
    "server-truncated": ("server.yaml", _truncated),
    "server-missing": ("server.yaml", _missing),
    "server-directory": ("server.yaml", _directory),
    "server-clients-key-null": ("server.yaml", _clients_key_null),
}


def _restore(path: Path, text: str) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    elif path.is_symlink() or path.exists():
        path.unlink()
    _replace(path, text)


@pytest.mark.parametrize("case", list(BREAKAGES))
async def test_R11_broken_config_file_keeps_clients_and_leases(tmp_path: Path, case: str) -> None:
    """R-11: a reload of a file that looks empty, is gone or half-written changes nothing.

    The relay logs why it kept the running configuration; alpha stays logged in on its
    fixed port (same link, bytes intact), and restoring the file reloads with nobody removed.
    """
    relay, _, alpha, echo, port = await _relay_with_alpha(tmp_path)
    name, breakage = BREAKAGES[case]
    path = tmp_path / name
    original = path.read_text(encoding="utf-8")
    try:
        since = len(relay.stderr_lines)
        breakage(path)
        await _reload_line(relay, REFUSED_RE, since)
        await echo_check(port, seed=11)
        since = len(relay.stderr_lines)
        _restore(path, original)
        line = await _reload_line(relay, RELOADED_RE, since)
        assert "clients; removed: none; changed: none" in line, relay.describe()
        await echo_check(port, seed=12)
        assert alpha.returncode is None, alpha.describe()
        tunnels = [ln for ln in alpha.stdout_lines if f"{echo.target} -> " in ln]
        assert len(tunnels) == 1, f"alpha's link was replaced\n{alpha.describe()}"
        assert relay.returncode is None
    finally:
        await echo.close()


async def test_R11_hand_removed_client_keeps_ports_until_remove_client(tmp_path: Path) -> None:
    """R-11: a client dropped from a *valid* clients file can no longer log in, but its
    fixed port stays its own (another client is refused it) until ``remove-client``."""
    relay, url, alpha, echo, port = await _relay_with_alpha(tmp_path, beta=True)
    try:
        clients = tmp_path / CLIENTS
        since = len(relay.stderr_lines)
        doc = yaml.safe_load(clients.read_text(encoding="utf-8"))
        _replace(clients, yaml.safe_dump({"beta": doc["beta"]}))
        line = await _reload_line(relay, RELOADED_RE, since)
        assert "removed: alpha" in line, relay.describe()
        assert await alpha.wait_exit() == EXIT_REFUSED, alpha.describe()
        await _reload_line(relay, rf"ports {port} stay reserved", since)

        beta = await start_client(url, BETA_TOKEN, [f"{echo.target}:fixed-{port}"], name="beta")
        assert await beta.wait_exit() == EXIT_REFUSED, beta.describe()
        assert f"port {port}" in beta.stderr, beta.describe()

        removed = await start_proc("remove-client", SERVER_MODULE,
                                   ["remove-client", "alpha", "--config",
                                    str(tmp_path / "server.yaml")], cwd=tmp_path)
        assert await removed.wait_exit(COMMAND_TIMEOUT) == 0, removed.describe()
        await _reload_line(relay, rf"port {port} released \(client alpha", since)
        await assert_closed_quickly(port)
        beta = await start_client(url, BETA_TOKEN, [f"{echo.target}:fixed-{port}"], name="beta")
        assert await wait_tunnel(beta, echo.target, mode="fixed") == port
        await echo_check(port, seed=13)
    finally:
        await echo.close()


# -----------------------------------------------------------------------------


async def test_R12_reload_applies_dashboard_password_and_warns_about_restart_keys(
        tmp_path: Path) -> None:
    """R-12: a rotated dashboard password works at once (the old one is refused); each
    changed key that needs a restart is named in a WARNING; no password is ever logged."""
    old_password, new_password = "old-password-" + "a" * 12, "new-password-" + "b" * 12
    dashboard = {"listen": "127.0.0.1:0", "username": "admin", "password": old_password}
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], dashboard=dashboard)
    relay, _ = await start_server(tmp_path, config)
    dash_port = int((await relay.wait_for_line(DASHBOARD_RE))["url"].rsplit(":", 1)[1]
                    .rstrip("/"))
    ok = await request(dash_port, "GET", "/api/status", auth=basic("admin", old_password))
    assert ok.status == 200, ok

    (other,) = free_ports(1)
    edited = {**config, "max_streams": 64, "heartbeat_interval": 2,
              "dashboard": {**dashboard, "listen": f"127.0.0.1:{other}",
                            "password": new_password}}
    since = len(relay.stderr_lines)
    write_config(tmp_path, edited)
    line = await _reload_line(relay, RELOADED_RE, since)
    assert "settings applied: dashboard.password" in line, relay.describe()
    warnings = [ln for ln in relay.stderr_lines[since:] if "needs a restart" in ln]
    for key in ("dashboard.listen", "max_streams", "heartbeat_interval"):
        assert any(f" {key} changed" in ln and "WARNING" in ln.upper() for ln in warnings), (
            f"no restart warning for {key}\n{relay.describe()}")

    new = await request(dash_port, "GET", "/api/status", auth=basic("admin", new_password))
    assert new.status == 200, new
    old = await request(dash_port, "GET", "/api/status", auth=basic("admin", old_password))
    assert old.status == 401, old
    await relay.terminate()
    for secret in (old_password, new_password):
        assert secret not in relay.stdout + relay.stderr, "a dashboard password was logged"
