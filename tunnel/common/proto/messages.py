"""Control-plane messages (JSON objects in CONTROL frames on stream 0), one class each.

Each message is a frozen dataclass with a ``TYPE``, one :meth:`to_wire` (the JSON object
sent, ``type`` first, then the fields in a fixed order) and one :meth:`from_wire` (the
checks on a received object). :func:`parse` picks the class by ``type`` among those allowed
at that point of the conversation, so a peer that sends a wrong field type gets a
RemoteProtocolError (its link closes) instead of a KeyError deep in the relay. Extra fields
are ignored so that newer peers can add information without breaking older ones. Adding a
message is one class here, one entry in ``CATALOGUE`` and one row in docs/protocol.md.

Binary values (nonces, proofs, signatures) stay base64 text in the messages: the roles
decode them with :func:`b64decode` at the step of the login where a bad one is judged.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Protocol, Self, TypeVar, overload

from tunnel.common.errors import RemoteProtocolError

__all__ = [
    "CATALOGUE",
    "MAX_TEXT",
    "Auth",
    "Challenge",
    "Error",
    "Expose",
    "ExposeRefused",
    "Exposed",
    "Message",
    "Refused",
    "Telemetry",
    "Welcome",
    "b64decode",
    "b64encode",
    "parse",
]

MAX_TEXT = 1024  # longest required string field accepted from a peer

_M = TypeVar("_M", bound="Message")
_A = TypeVar("_A", bound="Message")
_B = TypeVar("_B", bound="Message")
_C = TypeVar("_C", bound="Message")


class Message(Protocol):
    """What every message class offers (the Link sends any of them)."""

    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]: ...

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self: ...


def _text(obj: Mapping[str, Any], kind: str, name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise RemoteProtocolError(f"{kind}: field {name!r} missing or of wrong type")
    if len(value) > MAX_TEXT:
        raise RemoteProtocolError(f"{kind}: field {name!r} too long")
    return value


def _int(obj: Mapping[str, Any], kind: str, name: str) -> int:
    value = obj.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise RemoteProtocolError(f"{kind}: field {name!r} missing or of wrong type")
    return value


def _opt_int(obj: Mapping[str, Any], kind: str, name: str) -> int | None:
    """An int or null; a missing field reads as null."""
    if obj.get(name) is None:
        return None
    return _int(obj, kind, name)


def _number(obj: Mapping[str, Any], kind: str, name: str) -> float:
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RemoteProtocolError(f"{kind}: field {name!r} missing or of wrong type")
    return value


def _optional_text(obj: Mapping[str, Any], name: str) -> str | None:
    """A field whose wrong type counts as absent (the caller decides what absent means)."""
    value = obj.get(name)
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Challenge:
    """relay -> client, first message: the protocol version and a fresh nonce."""

    TYPE: ClassVar[str] = "challenge"
    version: int
    nonce: str  # base64
    server_version: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "version": self.version, "nonce": self.nonce,
                "server_version": self.server_version}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        return cls(_int(obj, kind, "version"), _text(obj, kind, "nonce"),
                   _text(obj, kind, "server_version"))


@dataclass(frozen=True, slots=True)
class Auth:
    """client -> relay: proof over the nonces, by token (``proof``) or key (``key_id`` and
    ``signature``). A credential of the wrong type counts as none: the login is refused like
    one with a wrong credential, never told apart (reliability S-1)."""

    TYPE: ClassVar[str] = "auth"
    nonce: str  # base64
    client_version: str
    proof: str | None = None  # base64
    key_id: str | None = None
    signature: str | None = None  # base64

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.TYPE, "nonce": self.nonce,
                                "client_version": self.client_version}
        if self.key_id is not None:
            wire["key_id"] = self.key_id
        if self.signature is not None:
            wire["signature"] = self.signature
        if self.proof is not None:
            wire["proof"] = self.proof
        return wire

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        return cls(_text(obj, kind, "nonce"), _text(obj, kind, "client_version"),
                   proof=_optional_text(obj, "proof"), key_id=_optional_text(obj, "key_id"),
                   signature=_optional_text(obj, "signature"))


@dataclass(frozen=True, slots=True)
class Welcome:
    """relay -> client: authenticated, with the link settings. A ``max_streams`` that is
    not an int counts as absent (the client keeps its default)."""

    TYPE: ClassVar[str] = "welcome"
    client: str
    heartbeat_interval: float
    heartbeat_timeout: float
    max_streams: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "client": self.client,
                "heartbeat_interval": self.heartbeat_interval,
                "heartbeat_timeout": self.heartbeat_timeout, "max_streams": self.max_streams}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        streams = obj.get("max_streams")
        if not isinstance(streams, int) or isinstance(streams, bool):
            streams = None
        return cls(_text(obj, kind, "client"), _number(obj, kind, "heartbeat_interval"),
                   _number(obj, kind, "heartbeat_timeout"), streams)


@dataclass(frozen=True, slots=True)
class Refused:
    """relay -> client: login refused (one generic reason); the link closes with 1008."""

    TYPE: ClassVar[str] = "refused"
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(_text(obj, cls.TYPE, "reason"))


@dataclass(frozen=True, slots=True)
class Expose:
    """client -> relay: claim a public port (``fixed``, or ``auto``: null) for a target."""

    TYPE: ClassVar[str] = "expose"
    id: int
    target: str
    mode: str
    port: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "target": self.target, "mode": self.mode,
                "port": self.port}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        return cls(_int(obj, kind, "id"), _text(obj, kind, "target"), _text(obj, kind, "mode"),
                   _opt_int(obj, kind, "port"))


@dataclass(frozen=True, slots=True)
class Exposed:
    """relay -> client: the tunnel ``id`` is live on ``port``."""

    TYPE: ClassVar[str] = "exposed"
    id: int
    port: int
    mode: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "port": self.port, "mode": self.mode}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        return cls(_int(obj, kind, "id"), _int(obj, kind, "port"), _text(obj, kind, "mode"))


@dataclass(frozen=True, slots=True)
class ExposeRefused:
    """relay -> client: the claim of tunnel ``id`` is refused, with the reason."""

    TYPE: ClassVar[str] = "expose_refused"
    id: int
    port: int | None
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "port": self.port, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        kind = cls.TYPE
        return cls(_int(obj, kind, "id"), _opt_int(obj, kind, "port"),
                   _text(obj, kind, "reason"))


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: a fatal problem; the link closes next."""

    TYPE: ClassVar[str] = "error"
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "message": self.message}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(_text(obj, cls.TYPE, "message"))


@dataclass(frozen=True, slots=True)
class Telemetry:
    """client -> relay: host CPU, memory and GPU figures. Every figure is optional and
    carried as sent: the receiver coerces them (tunnel.common.proto.telemetry.normalize)."""

    TYPE: ClassVar[str] = "telemetry"
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.figures}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls({name: value for name, value in obj.items() if name != "type"})


#: Every message class by its ``type``.
CATALOGUE: Final[Mapping[str, type[Message]]] = {
    cls.TYPE: cls for cls in (Challenge, Auth, Welcome, Refused, Expose, Exposed,
                              ExposeRefused, Error, Telemetry)
}


@overload
def parse(obj: Mapping[str, Any], a: type[_A], /) -> _A: ...
@overload
def parse(obj: Mapping[str, Any], a: type[_A], b: type[_B], /) -> _A | _B: ...
@overload
def parse(obj: Mapping[str, Any], a: type[_A], b: type[_B], c: type[_C], /) -> _A | _B | _C: ...


def parse(obj: Mapping[str, Any], *allowed: type[Message]) -> Message:
    """The message in ``obj``, whose ``type`` must be one of the classes ``allowed`` here."""
    kind = obj.get("type")
    for cls in allowed:
        if kind == cls.TYPE:
            return cls.from_wire(obj)
    raise RemoteProtocolError(f"unexpected control message {str(kind)[:32]!r}")


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise RemoteProtocolError(f"{what} is not base64") from exc
