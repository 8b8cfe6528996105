"""Small host helpers shared by both programs: private files and loopback checks."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
from pathlib import Path

from tunnel.common.config.statefiles import check_replaceable, make_parent_dirs

__all__ = ["PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE", "is_loopback", "write_private"]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def write_private(path: Path, text: str, mode: int = PRIVATE_FILE_MODE) -> None:
    """Write atomically with ``mode`` from the first byte: a file holding a secret is never
    briefly world-readable, and a crash never leaves it half written. A link, directory or
    special file at ``path`` is refused by name (:mod:`.statefiles`); missing parent
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


def is_loopback(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1 (no name resolution)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
