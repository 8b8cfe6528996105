"""Reload rules (issue 24): what a clients file that looks empty means, and which config
fields a reload applies live or warns about. The running-relay side is R-11/R-12 (e2e)."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tunnel.common.config.statefiles import StateFileError, write_private
from tunnel.common.errors import ConfigError
from tunnel.server.config import ServerConfig, load_server_config
from tunnel.server.config_dashboard import DashboardSettings
from tunnel.server.reload import LIVE_DASHBOARD_FIELDS, LIVE_FIELDS, plan_reload, shown_key

TOKEN = "alpha-secret-token-0001"
SERVER_YAML = """\
listen: "127.0.0.1:7000"
ports: ["6000-6099"]
tls: "off"
clients_file: clients.yaml
dashboard: {listen: "127.0.0.1:7500", password: "dashboard-password-1"}
alerts: {webhook: "http://127.0.0.1:9/hook"}
"""
CLIENTS_YAML = f'{{alpha: {{token: "{TOKEN}", ports: [6001]}}}}\n'


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "server.yaml").write_text(SERVER_YAML, encoding="utf-8")
    (tmp_path / "clients.yaml").write_text(CLIENTS_YAML, encoding="utf-8")
    return tmp_path


def _load(directory: Path, *, reload: bool) -> ServerConfig:
    return load_server_config(directory / "server.yaml", {}, reload=reload)


# --- a clients list that only looks empty ------------------------------------------------


def _replace_text(text: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(text, encoding="utf-8")

    return write


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere.yaml"))


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "empty": _replace_text(""),
    "whitespace": _replace_text(" \n\n  \n"),
    "comments-only": _replace_text("# editing\n"),
    "null-document": _replace_text("null\n"),
    "tilde": _replace_text("~\n"),
    "truncated": _replace_text(CLIENTS_YAML[: len(CLIENTS_YAML) // 2]),
    "half-written": _replace_text(CLIENTS_YAML[:1]),
    "missing": Path.unlink,
    "directory": _directory,
    "dangling-symlink": _dangling,
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_clients_file_that_looks_empty_fails_a_reload(config_dir: Path, case: str) -> None:
    BREAKAGES[case](config_dir / "clients.yaml")
    with pytest.raises(ConfigError) as caught:
        _load(config_dir, reload=True)
    assert "clients.yaml" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_explicit_empty_mapping_is_no_clients_on_reload(config_dir: Path) -> None:
    (config_dir / "clients.yaml").write_text("# none left\n{}\n", encoding="utf-8")
    assert dict(_load(config_dir, reload=True).clients) == {}


def test_inline_clients_key_without_value_fails_a_reload(config_dir: Path) -> None:
    text = SERVER_YAML.replace("clients_file: clients.yaml", "clients:")
    (config_dir / "server.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        _load(config_dir, reload=True)
    assert caught.value.key == "clients"
    assert dict(_load(config_dir, reload=False).clients) == {}  # start-up: nobody yet


@pytest.mark.parametrize("case", ["empty", "missing"])
def test_start_up_reads_a_missing_or_empty_clients_file_as_none(config_dir: Path,
                                                                case: str) -> None:
    BREAKAGES[case](config_dir / "clients.yaml")
    assert dict(_load(config_dir, reload=False).clients) == {}


# --- every field is applied live or warned about -------------------------------------------


def test_live_field_names_exist() -> None:
    names = {field.name for field in dataclasses.fields(ServerConfig)}
    assert names >= LIVE_FIELDS
    assert {field.name for field in dataclasses.fields(DashboardSettings)} >= LIVE_DASHBOARD_FIELDS


def test_every_config_field_is_applied_or_warned(config_dir: Path) -> None:
    """A stand-in value in each field in turn: it must be either in effect and reported
    applied, or kept at the running value and reported as needing a restart."""
    old = _load(config_dir, reload=False)
    assert old.dashboard is not None and old.alerts is not None
    for field in dataclasses.fields(ServerConfig):
        if field.name == "dashboard":  # walked field by field below
            continue
        changed: Any = object()
        plan = plan_reload(old, dataclasses.replace(old, **{field.name: changed}))
        key = shown_key(field.name)
        if getattr(plan.config, field.name) is changed:
            assert (plan.applied, plan.restart) == ((key,), ()), field.name
        else:
            assert getattr(plan.config, field.name) == getattr(old, field.name), field.name
            assert (plan.applied, plan.restart) == ((), (key,)), field.name


def test_every_dashboard_field_is_applied_or_warned(config_dir: Path) -> None:
    old = _load(config_dir, reload=False)
    assert old.dashboard is not None
    for field in dataclasses.fields(DashboardSettings):
        changed: Any = object()
        dashboard = dataclasses.replace(old.dashboard, **{field.name: changed})
        plan = plan_reload(old, dataclasses.replace(old, dashboard=dashboard))
        assert plan.config.dashboard is not None
        value = getattr(plan.config.dashboard, field.name)
        if field.name in LIVE_DASHBOARD_FIELDS:
            assert value is changed
            assert plan.applied == (f"dashboard.{field.name}",) and not plan.restart
        else:
            assert value == getattr(old.dashboard, field.name), field.name
            assert not plan.applied and len(plan.restart) == 1, field.name
            assert plan.restart[0].startswith("dashboard."), plan.restart


def test_named_restart_keys(config_dir: Path) -> None:
    """The keys issue 24 names: the dashboard's address and max_streams wait for a restart;
    a password rotation applies; a dashboard section added or dropped waits too."""
    old = _load(config_dir, reload=False)
    assert old.dashboard is not None
    text = SERVER_YAML.replace("7500", "7501").replace("dashboard-password-1",
                                                        "dashboard-password-2")
    (config_dir / "server.yaml").write_text(text + "max_streams: 64\n", encoding="utf-8")
    plan = plan_reload(old, _load(config_dir, reload=True))
    assert plan.restart == ("dashboard.listen", "max_streams")
    assert plan.applied == ("dashboard.password",)
    assert plan.config.dashboard is not None
    assert plan.config.dashboard.listen_port == 7500
    assert plan.config.max_streams == old.max_streams
    assert plan_reload(old, dataclasses.replace(old, dashboard=None)).restart == ("dashboard",)


def test_unchanged_config_plans_nothing(config_dir: Path) -> None:
    old = _load(config_dir, reload=False)
    plan = plan_reload(old, _load(config_dir, reload=True))
    assert (plan.applied, plan.restart) == ((), ())
    assert plan.config == old


# --- our own writes are atomic and private ------------------------------------------------


def test_private_write_refuses_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    """Every file a reload reads (clients file, server.yaml, the client's settings) is
    written by write_private: temp file, fsync, rename, mode 0600 from the first byte; a link
    in its place is refused by name (statefiles' rule), never written through or replaced."""
    victim = tmp_path / "victim"
    victim.write_text("untouched\n", encoding="utf-8")
    target = tmp_path / "clients.yaml"
    os.symlink(victim, target)
    with pytest.raises(StateFileError, match=r"clients\.yaml: is a symbolic link"):
        write_private(target, "{}\n")
    assert victim.read_text(encoding="utf-8") == "untouched\n"
    assert target.is_symlink()
    target.unlink()
    write_private(target, "{}\n")
    assert target.read_text(encoding="utf-8") == "{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
