"""What a reload of the relay's config applies live, and what it keeps until a restart.

:func:`plan_reload` walks every field of :class:`ServerConfig` (and of the dashboard
section) instead of listing the keys that need a restart: a field not named live here is
kept at its running value and reported, so a key added later can never change silently or
be ignored silently. The caller logs each reported key as a warning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tunnel.server.config import ServerConfig
from tunnel.server.config_dashboard import DashboardSettings

__all__ = ["LIVE_DASHBOARD_FIELDS", "LIVE_FIELDS", "ReloadPlan", "plan_reload", "shown_key"]

#: Fields a reload takes over as they are: they are read where they are used.
LIVE_FIELDS = frozenset({"clients", "clients_file", "public_url"})
#: Dashboard fields a running dashboard takes over (credentials and the Host allow-list);
#: its listen address needs a new socket, hence a restart.
LIVE_DASHBOARD_FIELDS = frozenset({"username", "password", "password_hash", "hosts"})
#: Sections whose settings object a running consumer swaps in, when it exists before and after.
_SWAPPED_SECTIONS = frozenset({"dashboard", "alerts"})
#: How the config file spells a field, where it differs from the field's name.
_KEY_NAMES = {"listen_host": "listen", "listen_port": "listen",
              "opens_per_source": "open_rate.per_source",
              "opens_per_port": "open_rate.per_port",
              "source": "the config file's path", "config_dir": "the config file's directory"}


@dataclass(frozen=True)
class ReloadPlan:
    """The configuration to run with after a reload, and the keys whose edit waits."""

    config: ServerConfig
    """Live fields from the new file, every other field as running."""
    applied: tuple[str, ...]
    """Config keys whose changed value is now in effect."""
    restart: tuple[str, ...]
    """Config keys that changed but keep their running value until a restart."""


def shown_key(field_name: str) -> str:
    """The config file's key for a :class:`ServerConfig` field (``listen_host`` is ``listen``)."""
    return _KEY_NAMES.get(field_name, field_name)


def plan_reload(old: ServerConfig, new: ServerConfig) -> ReloadPlan:
    """Merge ``new`` into ``old`` field by field; never raises, never logs (values are secret)."""
    updates: dict[str, Any] = {}
    applied: list[str] = []
    restart: list[str] = []
    for field in dataclasses.fields(ServerConfig):
        name = field.name
        before, after = getattr(old, name), getattr(new, name)
        if before == after:
            continue
        if name == "dashboard" and before is not None and after is not None:
            merged, live, waiting = _plan_dashboard(before, after)
            updates[name] = merged
            applied += live
            restart += waiting
        elif name in LIVE_FIELDS or (name in _SWAPPED_SECTIONS and before is not None
                                     and after is not None):
            updates[name] = after
            applied.append(name)
        else:
            restart.append(name)
    config = dataclasses.replace(old, **updates)
    return ReloadPlan(config, _unique(map(shown_key, applied)), _unique(map(shown_key, restart)))


def _plan_dashboard(old: DashboardSettings, new: DashboardSettings
                    ) -> tuple[DashboardSettings, list[str], list[str]]:
    updates: dict[str, Any] = {}
    live: list[str] = []
    waiting: list[str] = []
    for field in dataclasses.fields(DashboardSettings):
        name = field.name
        if getattr(old, name) == getattr(new, name):
            continue
        key = "dashboard." + ("listen" if name in ("listen_host", "listen_port") else name)
        if name in LIVE_DASHBOARD_FIELDS:
            updates[name] = getattr(new, name)
            live.append(key)
        else:
            waiting.append(key)
    return dataclasses.replace(old, **updates), live, waiting


def _unique(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(keys))
