"""Exception hierarchy of the tunnel.

One root, so callers can catch everything the project raises on purpose::

    TunnelError
    ├── ConfigError            a config file, flag or environment value is wrong (exit 2)
    ├── ProtocolError          the wire was misused
    │   ├── LocalProtocolError     we misused the core API (a bug on our side)
    │   └── RemoteProtocolError    the peer misbehaved: the link is closed, never the process
    │       └── FrameError         bytes that do not decode as a frame
    ├── AuthError              login refused (one generic reason, never which part was wrong)
    ├── ClaimRefused           a port claim that cannot be met (names the port and why)
    ├── FingerprintMismatch    the relay presented another certificate than the pinned one
    └── TlsFilesError          key, certificate or CA files that cannot be used

Following h11, local misuse and remote misbehaviour are kept apart: the first is a bug to
fix, the second is hostile or broken input that only ever costs the offending link.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AuthError",
    "ClaimRefused",
    "ConfigError",
    "FingerprintMismatch",
    "FrameError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "TlsFilesError",
    "TunnelError",
]


class TunnelError(Exception):
    """Root of every exception the project raises deliberately."""


class ConfigError(TunnelError):
    """A configuration value is invalid.

    The message always names where the value came from (file or flag), the key path and what
    is allowed, so the user can fix it without reading code.
    """

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {message}")


class ProtocolError(TunnelError):
    """The tunnel protocol was violated."""


class LocalProtocolError(ProtocolError):
    """Our own code used the protocol core incorrectly."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the link must be closed."""


class FrameError(RemoteProtocolError):
    """Bytes on the link that are not a valid frame."""


class AuthError(TunnelError):
    """Authentication failed; deliberately says nothing about why."""


class ClaimRefused(TunnelError):
    """A port claim was refused; carries the port (if any) and a human reason."""

    def __init__(self, port: int | None, reason: str) -> None:
        self.port = port
        self.reason = reason
        label = f"port {port}" if port is not None else "auto port"
        super().__init__(f"{label} refused: {reason}")


class FingerprintMismatch(TunnelError):
    """The relay's certificate is not the pinned one: possibly a man in the middle."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"the relay's certificate fingerprint is {actual}, expected {expected}")


class TlsFilesError(TunnelError):
    """TLS key, certificate or CA files are unusable; names the files, never their contents."""

    def __init__(self, paths: Sequence[Path], reason: str) -> None:
        self.paths = tuple(paths)
        self.reason = reason
        names = ", ".join(str(p) for p in self.paths)
        super().__init__(f"{names}: {reason}")
