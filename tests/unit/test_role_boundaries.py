"""The roles (tunnel/server, tunnel/client) drive a link only through Link's own methods.

A role that reaches into ``link.mux`` or ``link.ws`` bypasses what Link keeps true: output
queued on the mux wakes the writer, the framing's limits and hooks stay the adapter's. Link
methods that queue output wake the writer themselves, so no role calls ``kick`` either; and
the framing module is the adapter's alone. Checked on the source with ``ast``, on any
object (the scan cannot tell a link from another value, so these names stay off-limits in
role code altogether).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunnel

PACKAGE = Path(tunnel.__file__).resolve().parent
ROLE_FILES = sorted([*(PACKAGE / "server").rglob("*.py"), *(PACKAGE / "client").rglob("*.py")])
ROLES = [path.relative_to(PACKAGE).as_posix() for path in ROLE_FILES]
#: Attributes of the adapter's insides, and the writer's wake-up.
FORBIDDEN_ATTRIBUTES = frozenset({"mux", "ws", "kick"})
#: Modules that only the adapter (tunnel/common/aio/link.py) uses.
ADAPTER_ONLY_MODULES = frozenset({"tunnel.common.aio.wsframing"})


def forbidden_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in ADAPTER_ONLY_MODULES:
            found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {alias.name}") for alias in node.names
                      if alias.name in ADAPTER_ONLY_MODULES]
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_the_role_folders_are_the_ones_walked() -> None:
    """A move that empties the folders must not turn this check into a no-op."""
    assert {"server/control.py", "server/listeners.py", "client/connector.py",
            "client/dialer.py"} <= set(ROLES)


@pytest.mark.parametrize("path", ROLE_FILES, ids=ROLES)
def test_roles_do_not_reach_into_the_link(path: Path) -> None:
    assert forbidden_uses(path) == []


def test_the_scan_sees_what_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from tunnel.common.aio.wsframing import take_over\n"
                      "link.mux.send_control({})\nlink.kick()\nx = self.link.ws\n",
                      encoding="utf-8")
    assert forbidden_uses(sample) == ["line 1: from tunnel.common.aio.wsframing import",
                                      "line 2: .mux", "line 3: .kick", "line 4: .ws"]
