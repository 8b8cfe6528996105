"""State and secret files: never opened through a link, 0600 files in 0700 directories.

Every file either program creates or rewrites goes through here: the relay's lease and
history databases, its TLS key and certificate, the config, clients and password files that
``tunnel-server init``/``add-client`` write, and the settings ``tunnel-client join`` writes.
The rules hold for all of them:

* a new file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, so a link
  planted in its place, dangling or not, is refused and nothing is written through it;
* an existing file is opened with ``O_NOFOLLOW`` and must be a regular file owned by the
  effective user; a looser mode is tightened to 0600;
* a state directory (``state_dir``, ``state_dir/tls``) is created 0700, must be a real
  directory owned by the effective user (checked with ``lstat``, so a link is refused) and
  is tightened to 0700; missing ancestors of any file are created 0700;
* anything else raises :class:`StateFileError`, which names the path, what is there and what
  was expected.

A check and the open that follows it are two system calls. They cannot be raced because the
directory is private: once it is 0700 and ours, nobody else can plant a link between them.
Paths *above* the last component (the directories a user names with ``--dir``, ``--config``
or ``state_dir``) may contain links: the user chose them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from tunnel.common.errors import TunnelError

__all__ = [
    "SQLITE_COMPANIONS",
    "STATE_DIR_MODE",
    "STATE_FILE_MODE",
    "StateFileError",
    "check_replaceable",
    "create_private_file",
    "ensure_private_dir",
    "make_parent_dirs",
    "open_private_file",
    "prepare_sqlite_file",
    "regular_file_exists",
    "write_private",
]

STATE_FILE_MODE = 0o600
STATE_DIR_MODE = 0o700
#: Files SQLite creates next to a database; it opens them by name, following links.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: O_NONBLOCK keeps an open of a FIFO planted in a file's place from hanging; fstat refuses it.
_OPEN_FLAGS = os.O_RDWR | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
_POSIX = os.name == "posix"
_EXPECT_FILE = ("a regular file owned by this user; move it away (state and secret files "
                "are never written through a link)")
_EXPECT_DIR = "a real directory owned by this user, not a link"
_EXPECT_NEW = "nothing there, since this file is always created new"


class StateFileError(TunnelError):
    """A state or secret file (or its directory) is not what this program would create.

    The message names the path, what was found there and what was expected, so the operator
    knows which file to move away.
    """

    def __init__(self, path: Path, found: str, expected: str) -> None:
        self.path = Path(path)
        self.found = found
        self.expected = expected
        super().__init__(f"{path}: {found}; expected {expected}")


# ----------------------------------------------------------------------------- describing


def _link_target(path: Path) -> str:
    try:
        return f" to {os.readlink(path)}"
    except OSError:
        return ""


def _what_is(path: Path, st: os.stat_result) -> str:
    """A short description of something that is not a regular file or a directory."""
    if stat.S_ISLNK(st.st_mode):
        return f"is a symbolic link{_link_target(path)}"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if stat.S_ISREG(st.st_mode):
        return "is a regular file"
    return "is a special file (device, FIFO or socket)"


def _check_owner(path: Path, st: os.stat_result, expected: str) -> None:
    if _POSIX and st.st_uid != os.geteuid():
        raise StateFileError(path, f"is owned by uid {st.st_uid}, not by this user "
                             f"(uid {os.geteuid()})", expected)


def _tighten(fd: int, st: os.stat_result, mode: int) -> None:
    if _POSIX and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)


# ----------------------------------------------------------------------------- directories


def make_parent_dirs(path: Path) -> None:
    """Create the missing directories above ``path`` with mode 0700; existing ones (which
    the user chose) are left as they are."""
    missing: list[Path] = []
    parent = Path(path).parent
    while not os.path.lexists(parent):
        missing.append(parent)
        if parent.parent == parent:
            break
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile: checked by the caller
            os.mkdir(directory, STATE_DIR_MODE)


def ensure_private_dir(path: Path) -> None:
    """Make ``path`` a 0700 directory of ours: created if missing, refused if it is a link,
    not a directory or someone else's, tightened if its mode is looser."""
    path = Path(path)
    make_parent_dirs(path)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, STATE_DIR_MODE)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StateFileError(path, _what_is(path, st), _EXPECT_DIR)
    _check_owner(path, st, _EXPECT_DIR)
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_DIRECTORY", 0))
    try:
        _tighten(fd, os.fstat(fd), STATE_DIR_MODE)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files


def _refuse_existing(path: Path, expected: str = _EXPECT_FILE) -> StateFileError:
    """The error for a name found taken by something unexpected (or gone meanwhile)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return StateFileError(path, "vanished while it was being opened", expected)
    found = "already exists" if stat.S_ISREG(st.st_mode) else _what_is(path, st)
    return StateFileError(path, found, expected)


def create_private_file(path: Path) -> int:
    """Create ``path`` (which must not exist, not even as a dangling link) as a 0600 file
    and return a descriptor open for reading and writing."""
    path = Path(path)
    try:
        fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, STATE_FILE_MODE)
    except FileExistsError:
        raise _refuse_existing(path, _EXPECT_NEW) from None
    try:
        if _POSIX:
            os.fchmod(fd, STATE_FILE_MODE)  # the umask may have removed bits; be exact
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file(path: Path, *, create: bool = True) -> int:
    """Open ``path`` for reading and writing without following a link: created 0600 when
    missing (if ``create``), else checked to be a regular file of ours and tightened to 0600.
    Returns the descriptor; the caller closes it."""
    path = Path(path)
    if create:
        try:
            return create_private_file(path)
        except StateFileError:
            pass  # something is there: open it below, which says what it is
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
            raise _refuse_existing(path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(path, _what_is(path, st), _EXPECT_FILE)
        _check_owner(path, st, _EXPECT_FILE)
        _tighten(fd, st, STATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def regular_file_exists(path: Path) -> bool:
    """Whether a regular file is at ``path``, without following a link: ``False`` when
    nothing is there, :class:`StateFileError` for a link (dangling or not), a directory or
    anything else, so "missing" never silently means "a link whose target is missing"."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise StateFileError(path, _what_is(path, st), _EXPECT_FILE)
    return True


def check_replaceable(path: Path) -> None:
    """Refuse to write ``path`` by rename when a link, directory or special file is there.

    A rename replaces a link rather than writing through it, so this is about the error,
    not the safety: the operator learns that the file they linked is not the one updated."""
    regular_file_exists(path)


def prepare_sqlite_file(path: Path) -> None:
    """Make ``path`` safe to hand to ``sqlite3.connect``: its directory a private state
    directory, the database a 0600 regular file of ours (created here, since SQLite would
    only honour the umask), and no link or directory where SQLite puts its -wal, -shm or
    -journal file. SQLite gives those the database's mode when it creates them."""
    path = Path(path)
    ensure_private_dir(path.parent)
    os.close(open_private_file(path))
    for suffix in SQLITE_COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if regular_file_exists(companion):
            os.close(open_private_file(companion, create=False))


def write_private(path: Path, text: str, mode: int = STATE_FILE_MODE) -> None:
    """Write atomically with ``mode`` from the first byte: a file holding a secret is never
    briefly world-readable, and a crash never leaves it half written. A link, directory or
    special file at ``path`` is refused by name (:func:`check_replaceable`); missing parent
    directories are created 0700."""
    make_parent_dirs(path)
    check_replaceable(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
