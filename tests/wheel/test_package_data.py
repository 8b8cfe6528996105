"""What the wheel is told to ship covers the tree, and the version is written in one place.

Builds nothing: the package-data globs of pyproject.toml are expanded the way setuptools
expands them (relative to the package's folder, ``**`` recursive), so a file added under
``tunnel/`` that no glob matches fails here, in the fast suite. ``.ci/run`` then lists the
real wheel (tests/wheel/build_dists.py) and runs it (tests/wheel/smoke.py).
"""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path
from typing import Any

import pytest

import tunnel
from tunnel.client import cli as client_cli
from tunnel.server import cli as server_cli

CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGE = CHECKOUT / "tunnel"


def _pyproject() -> dict[str, Any]:
    with open(CHECKOUT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def _package_data_matches() -> set[Path]:
    setuptools = _pyproject()["tool"]["setuptools"]
    matched: set[Path] = set()
    for package, patterns in setuptools["package-data"].items():
        folder = CHECKOUT / package.replace(".", "/")
        assert (folder / "__init__.py").is_file(), f"package-data names {package}, no package"
        for pattern in patterns:
            matched.update(Path(p) for p in glob.glob(str(folder / pattern), recursive=True)
                           if Path(p).is_file())
    return matched


def _data_files() -> set[Path]:
    """Every file under tunnel/ that is neither Python source nor bytecode."""
    return {p for p in PACKAGE.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


def test_package_data_covers_every_file_that_is_not_python() -> None:
    data = _data_files()
    assert PACKAGE / "server" / "dashboard" / "static" / "index.html" in data
    missing = sorted(p.relative_to(CHECKOUT).as_posix() for p in data - _package_data_matches())
    assert not missing, f"not in [tool.setuptools.package-data] of pyproject.toml: {missing}"


def test_every_python_folder_is_a_package() -> None:
    """setuptools ships the .py files of packages found under tunnel*, not of bare folders
    that happen to hold a module."""
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include == ["tunnel*"]
    folders = {p.parent for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    bare = sorted(f.relative_to(CHECKOUT).as_posix() for f in folders
                  if not (f / "__init__.py").is_file())
    assert not bare, f"folders with modules but no __init__.py: {bare}"


def test_version_is_written_once() -> None:
    project = _pyproject()["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tunnel.__version__"}


def test_license_is_an_spdx_expression() -> None:
    assert _pyproject()["project"]["license"] == "Apache-2.0"


@pytest.mark.parametrize(("main", "prog"), [(server_cli.main, "tunnel-server"),
                                            (client_cli.main, "tunnel-client")])
def test_version_option(main: Any, prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"{prog} {tunnel.__version__}\n"
