"""Every file either program creates is made without following a link, 0600 in 0700 dirs.

The class, walked through the programs' own entry points: for each state or secret file
(leases, history, TLS key and certificate, the files ``tunnel-server init`` writes, the
clients file ``add-client`` rewrites, the settings ``tunnel-client join`` writes) a dangling
link, a link to a real file outside, and a directory in its place each give an error that
names the path, and nothing is written through the link. A normal run creates 0600 files in
0700 directories even under a permissive umask.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tunnel.client.join import join_main
from tunnel.common.config.credentials import JoinInfo, encode_join, generate_keypair
from tunnel.common.config.statefiles import (
    StateFileError,
    create_private_file,
    ensure_private_dir,
    open_private_file,
    prepare_sqlite_file,
    write_private,
)
from tunnel.common.errors import TunnelError
from tunnel.server import admin
from tunnel.server.history import HistoryStore
from tunnel.server.leases import LeaseStoreError, SqliteLeaseStore
from tunnel.server.tls import ensure_self_signed

OUTSIDE_TEXT = "{}  # outside the state directory: must stay as it is\n"
PUBLIC_URL = "wss://relay.example:7000/tunnel"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture(autouse=True)
def _permissive_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A umask of 022 would leave SQLite's and mkdir's defaults world-readable."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TUNNEL_SERVER_CONFIG", raising=False)
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _cli(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a command line entry point; a failure becomes an exception carrying its stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"exit {code}: {err.getvalue()}")


def _init(root: Path) -> None:
    _cli(admin.main, ["init", "--public-host", "relay.example", "--dir", str(root / "conf")])


def _add_client(root: Path) -> None:
    """``add-client`` on an initialised relay whose clients file was planted after init."""
    _cli(admin.main, ["add-client", "box", "--config", str(root / "conf" / "server.yaml")])


def _join(root: Path) -> None:
    private, _ = generate_keypair()
    join = encode_join(JoinInfo(PUBLIC_URL, None, "box", private))
    _cli(join_main, [join, "--config", str(root / "client" / "client.yaml")])


def _leases(root: Path) -> None:
    asyncio.run(SqliteLeaseStore(root / "state" / "leases.sqlite3").close())


def _history(root: Path) -> None:
    HistoryStore(root / "state" / "history.sqlite3").close()


def _tls(root: Path) -> None:
    ensure_self_signed(root / "state" / "tls", ["relay.example"])


@dataclass(frozen=True)
class StateFile:
    """One file a program writes: where it lives and the real entry point that writes it."""

    name: str
    relative: str
    write: Callable[[Path], None]
    #: Run first, for files that are rewritten by a later command (clients by add-client).
    setup: Callable[[Path], None] | None = None


STATE_FILES = [
    StateFile("leases", "state/leases.sqlite3", _leases),
    StateFile("history", "state/history.sqlite3", _history),
    StateFile("tls key", "state/tls/key.pem", _tls),
    StateFile("tls cert", "state/tls/cert.pem", _tls),
    StateFile("init config", "conf/server.yaml", _init),
    StateFile("init clients", "conf/clients.yaml", _init),
    StateFile("init password", "conf/admin-password", _init),
    StateFile("add-client clients", "conf/clients.yaml", _add_client, setup=_init),
    StateFile("join settings", "client/client.yaml", _join),
]
IDS = [f.name for f in STATE_FILES]


def _plant(path: Path, kind: str, outside: Path) -> Path:
    """Put a dangling link, a link to a real outside file, or a directory at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    target = outside / f"{kind}-{path.name}"
    if kind == "dangling":
        path.symlink_to(target)
    elif kind == "link":
        target.write_text(OUTSIDE_TEXT, encoding="utf-8")
        path.symlink_to(target)
    else:
        path.mkdir()
    return target


@pytest.mark.parametrize("kind", ["dangling", "link", "directory"])
@pytest.mark.parametrize("state", STATE_FILES, ids=IDS)
def test_a_planted_link_or_directory_is_refused_by_name(tmp_path: Path, state: StateFile,
                                                         kind: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    if state.setup is not None:
        state.setup(root)
    path = root / state.relative
    target = _plant(path, kind, outside)
    with pytest.raises((TunnelError, RuntimeError)) as caught:
        state.write(root)
    message = str(caught.value)
    what = "directory" if kind == "directory" else "symbolic link"
    assert str(path) in message and what in message.lower(), message
    assert "Traceback" not in message
    if kind == "dangling":
        assert path.is_symlink() and not os.path.lexists(target), "written through the link"
    elif kind == "link":
        assert path.is_symlink() and target.read_text(encoding="utf-8") == OUTSIDE_TEXT
    else:
        assert path.is_dir() and not any(path.iterdir())


@pytest.mark.parametrize("state", STATE_FILES, ids=IDS)
def test_created_files_are_0600_in_0700_directories(tmp_path: Path, state: StateFile) -> None:
    root = tmp_path / "root"
    if state.setup is not None:
        state.setup(root)
    state.write(root)
    path = root / state.relative
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert _mode(path) == 0o600, oct(_mode(path))
    assert _mode(path.parent) == 0o700, oct(_mode(path.parent))


def test_an_existing_loose_state_dir_and_database_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    path = state / "history.sqlite3"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    HistoryStore(path).close()
    assert _mode(state) == 0o700 and _mode(path) == 0o600
    for companion in state.glob("history.sqlite3-*"):
        assert _mode(companion) == 0o600, companion


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_link_in_place_of_a_sqlite_companion_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "state" / "leases.sqlite3"
    companion = path.with_name(path.name + suffix)
    companion.parent.mkdir()
    companion.symlink_to(tmp_path / "outside")
    with pytest.raises(StateFileError, match=str(companion)):
        SqliteLeaseStore(path)
    assert not os.path.lexists(tmp_path / "outside")


def test_a_linked_state_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "state").symlink_to(real)
    with pytest.raises(StateFileError, match="symbolic link") as caught:
        prepare_sqlite_file(tmp_path / "state" / "leases.sqlite3")
    assert str(tmp_path / "state") in str(caught.value)
    assert not any(real.iterdir())


def test_a_file_in_place_of_the_state_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("x", encoding="utf-8")
    with pytest.raises(StateFileError, match="expected a real directory"):
        ensure_private_dir(tmp_path / "state")


def test_a_fifo_in_place_of_a_state_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "leases.sqlite3"
    os.mkfifo(fifo)
    with pytest.raises(StateFileError, match="special file"):
        os.close(open_private_file(fifo))


def test_the_lease_store_keeps_wrapping_os_errors(tmp_path: Path) -> None:
    """A plain OS failure (here: the parent is a file) still names the lease database."""
    (tmp_path / "file").write_text("x", encoding="utf-8")
    path = tmp_path / "file" / "leases.sqlite3"
    with pytest.raises((LeaseStoreError, StateFileError), match=str(tmp_path / "file")):
        SqliteLeaseStore(path)


def test_write_private_replaces_a_regular_file_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "settings.yaml"
    write_private(path, "one\n")
    write_private(path, "two\n")
    assert path.read_text(encoding="utf-8") == "two\n"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700


def test_an_exclusive_create_names_what_is_already_there(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(StateFileError, match="already exists; expected nothing there"):
        create_private_file(path)
    assert path.read_text(encoding="utf-8") == "old"
