"""The protocol core stays sans-I/O: no event loop, no sockets, no clock, no network library.

Checked on the source with ``ast`` (nothing is imported), so a stray ``import asyncio``
inside a function, behind ``TYPE_CHECKING`` or via ``__import__`` is caught as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tunnel

PACKAGE = Path(tunnel.__file__).resolve().parent
#: The pure layer: every module in this folder, whatever it is called.
PURE_DIR = PACKAGE / "common" / "proto"
#: The exception tree every layer raises from; pure as well.
ERRORS = PACKAGE / "common" / "errors.py"
CORE_FILES = [*sorted(PURE_DIR.glob("*.py")), ERRORS]
CORE = [path.relative_to(PACKAGE).as_posix() for path in CORE_FILES]
#: Configuration reads files but never opens a socket or runs a loop.
CONFIG_FILES = sorted((PACKAGE / "common" / "config").glob("*.py"))
CONFIG = [path.relative_to(PACKAGE).as_posix() for path in CONFIG_FILES]

#: Event loops, sockets, clocks, threads, processes and network stacks.
FORBIDDEN = frozenset({
    "asyncio", "socket", "socketserver", "ssl", "select", "selectors", "time", "sched",
    "threading", "_thread", "multiprocessing", "concurrent", "subprocess", "signal",
    "websockets", "uvloop", "http", "urllib", "aiohttp", "requests", "trio", "anyio",
    "importlib",
})
#: Pure submodules of forbidden packages: string parsing only, no I/O.
ALLOWED_PURE = frozenset({"urllib.parse"})


def _internal_ok(module: str, prefixes: tuple[str, ...]) -> bool:
    return module == "tunnel.common.errors" or module.startswith(prefixes)


def test_the_pure_folder_is_the_one_walked() -> None:
    """A move that empties the folder must not turn these checks into no-ops."""
    assert len(CORE_FILES) >= 10
    assert {"frames.py", "mux.py", "messages.py", "auth.py"} <= {p.name for p in CORE_FILES}


def imported_modules(path: Path, package: tuple[str, ...] | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, wherever it appears.

    ``package`` is the file's package, for relative imports; by default it is read off the
    file's place under the installed ``tunnel`` package.
    """
    if package is None:
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = ".".join(package[:len(package) + 1 - node.level])
                if node.module:
                    found.append((node.lineno, f"{prefix}.{node.module}"))
                else:  # ``from . import frames``
                    found += [(node.lineno, f"{prefix}.{a.name}") for a in node.names]
            else:
                assert node.module is not None
                found.append((node.lineno, node.module))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "__import__"):
            found.append((node.lineno, "__import__"))
    return found


@pytest.mark.parametrize("path", CORE_FILES + CONFIG_FILES, ids=CORE + CONFIG)
def test_core_module_imports_no_io(path: Path) -> None:
    assert path.is_file(), f"core module {path} is missing"
    bad = [f"{path.name}:{line}: {module}" for line, module in imported_modules(path)
           if module == "__import__"
           or (module.split(".")[0] in FORBIDDEN and module not in ALLOWED_PURE)]
    assert bad == []


@pytest.mark.parametrize("path", CORE_FILES, ids=CORE)
def test_core_module_imports_only_core_modules_of_the_project(path: Path) -> None:
    bad = [f"{path.name}:{line}: {module}" for line, module in imported_modules(path)
           if module.split(".")[0] == "tunnel"
           and not _internal_ok(module, ("tunnel.common.proto.",))]
    assert bad == []


@pytest.mark.parametrize("path", CONFIG_FILES, ids=CONFIG)
def test_config_modules_import_only_pure_and_config_modules(path: Path) -> None:
    bad = [f"{path.name}:{line}: {module}" for line, module in imported_modules(path)
           if module.split(".")[0] == "tunnel"
           and not _internal_ok(module, ("tunnel.common.proto.", "tunnel.common.config."))]
    assert bad == []


def test_the_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, socket as s\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from asyncio import Event\n"
        "def f():\n"
        "    import time\n"
        "    return __import__('ssl')\n"
        "from .link import Link\n"
        "from .. import server\n",
        encoding="utf-8")
    found = sorted(m for _, m in imported_modules(sample, package=("tunnel", "common", "proto")))
    assert found == sorted([
        "os", "socket", "typing", "asyncio", "time", "__import__",
        "tunnel.common.proto.link", "tunnel.common.server"])
