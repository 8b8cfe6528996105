"""Control-plane messages (JSON objects in CONTROL frames on stream 0), one class each.

Each message is a frozen dataclass with a ``TYPE``, one :meth:`to_wire` (the JSON object
sent, ``type`` first, then the fields in a fixed order) and one :meth:`from_wire` (the
checks on a received object). Every class declares the range of each field in ``FIELDS``
(:mod:`tunnel.common.proto.fields`) and ``from_wire`` reads every field through it, so a
value of the wrong type or outside the range docs/protocol.md states (a tunnel id beyond
u32, a target that is not ``host:port``) is a RemoteProtocolError that closes the link
before any role sees it. :func:`parse` picks the class by ``type`` among those allowed at
that point of the conversation. Extra fields are ignored so that newer peers can add
information without breaking older ones. Adding a message is one class here, one entry in
``CATALOGUE``, one row in docs/protocol.md's message table and one per field in its field
table.

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
from tunnel.common.proto.fields import (
    BASE64,
    BASE64URL,
    CLIENT_NAME,
    HOST_PORT,
    PRINTABLE,
    WORD,
    FieldSpec,
    int_field,
    number_field,
    text_field,
)
from tunnel.common.proto.frames import MAX_STREAMS_LIMIT
from tunnel.common.proto.hostport import MAX_TARGET_LENGTH
from tunnel.common.proto.portset import MAX_PORT, MIN_PORT

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

MAX_TEXT = 1024  # longest free-text field (a reason, an error message)
U32_MAX = 2**32 - 1  # tunnel ids: the OPEN frame carries them as a u32
#: Ports as an ``expose`` may ask for them: a signed 32-bit int, so that 0, -1 or 65536
#: reach the claim and get a refusal for that forward alone (reliability B-12).
CLAIM_PORT_MIN, CLAIM_PORT_MAX = -(2**31), 2**31 - 1
MAX_HEARTBEAT_SECONDS = 86_400.0  # a day: longer means a dead link is never noticed
MAX_VERSION_TEXT = 64  # a program version such as "0.1.0"
MAX_BASE64 = 128  # nonces, proofs and signatures: at most 64 bytes, base64 encoded
MAX_KEY_ID = 64
MAX_MODE = 16
MAX_CLIENT_NAME = 63  # tunnel.server.config.CLIENT_NAME_PATTERN

_M = TypeVar("_M", bound="Message")
_A = TypeVar("_A", bound="Message")
_B = TypeVar("_B", bound="Message")
_C = TypeVar("_C", bound="Message")


class Message(Protocol):
    """What every message class offers (the Link sends any of them)."""

    TYPE: ClassVar[str]
    #: The declared range of every field, in the constructor's order (docs/protocol.md).
    FIELDS: ClassVar[tuple[FieldSpec, ...]]

    def to_wire(self) -> dict[str, Any]: ...

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self: ...


def _seconds(name: str) -> FieldSpec:
    return number_field(name, 0, MAX_HEARTBEAT_SECONDS)


_TUNNEL_ID = int_field("id", 0, U32_MAX)
_MODE = text_field("mode", MAX_MODE, WORD)


def _read(cls: type[Message], obj: Mapping[str, Any]) -> list[Any]:
    """Every field of ``cls`` (its ``FIELDS``, in order) read and range-checked."""
    return [spec.read(obj, cls.TYPE) for spec in cls.FIELDS]


@dataclass(frozen=True, slots=True)
class Challenge:
    """relay -> client, first message: the protocol version and a fresh nonce."""

    TYPE: ClassVar[str] = "challenge"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        int_field("version", 0, 255), text_field("nonce", MAX_BASE64, BASE64),
        text_field("server_version", MAX_VERSION_TEXT, PRINTABLE))
    version: int
    nonce: str  # base64
    server_version: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "version": self.version, "nonce": self.nonce,
                "server_version": self.server_version}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Auth:
    """client -> relay: proof over the nonces, by token (``proof``) or key (``key_id`` and
    ``signature``). A credential of the wrong type counts as none: the login is refused like
    one with a wrong credential, never told apart (reliability S-1)."""

    TYPE: ClassVar[str] = "auth"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        text_field("nonce", MAX_BASE64, BASE64),
        text_field("client_version", MAX_VERSION_TEXT, PRINTABLE),
        text_field("proof", MAX_BASE64, BASE64, optional=True, lenient=True),
        text_field("key_id", MAX_KEY_ID, BASE64URL, optional=True, lenient=True),
        text_field("signature", MAX_BASE64, BASE64, optional=True, lenient=True))
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
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Welcome:
    """relay -> client: authenticated, with the link settings. A ``max_streams`` that is
    not an int counts as absent (the client keeps its default)."""

    TYPE: ClassVar[str] = "welcome"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        text_field("client", MAX_CLIENT_NAME, CLIENT_NAME), _seconds("heartbeat_interval"),
        _seconds("heartbeat_timeout"),
        int_field("max_streams", 1, MAX_STREAMS_LIMIT, optional=True, lenient=True))
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
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Refused:
    """relay -> client: login refused (one generic reason); the link closes with 1008."""

    TYPE: ClassVar[str] = "refused"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (text_field("reason", MAX_TEXT),)
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Expose:
    """client -> relay: claim a public port (``fixed``, or ``auto``: null) for a target."""

    TYPE: ClassVar[str] = "expose"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        _TUNNEL_ID, text_field("target", MAX_TARGET_LENGTH, HOST_PORT), _MODE,
        int_field("port", CLAIM_PORT_MIN, CLAIM_PORT_MAX, optional=True))
    id: int
    target: str
    mode: str
    port: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "target": self.target, "mode": self.mode,
                "port": self.port}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Exposed:
    """relay -> client: the tunnel ``id`` is live on ``port``."""

    TYPE: ClassVar[str] = "exposed"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        _TUNNEL_ID, int_field("port", MIN_PORT, MAX_PORT), _MODE)
    id: int
    port: int
    mode: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "port": self.port, "mode": self.mode}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class ExposeRefused:
    """relay -> client: the claim of tunnel ``id`` is refused, with the reason."""

    TYPE: ClassVar[str] = "expose_refused"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (
        _TUNNEL_ID, int_field("port", CLAIM_PORT_MIN, CLAIM_PORT_MAX, optional=True),
        text_field("reason", MAX_TEXT))
    id: int
    port: int | None
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "port": self.port, "reason": self.reason}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Error:
    """Either way: a fatal problem; the link closes next."""

    TYPE: ClassVar[str] = "error"
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = (text_field("message", MAX_TEXT),)
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "message": self.message}

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> Self:
        return cls(*_read(cls, obj))


@dataclass(frozen=True, slots=True)
class Telemetry:
    """client -> relay: host CPU, memory and GPU figures. Every figure is optional and
    carried as sent: the receiver coerces them (tunnel.common.proto.telemetry.normalize)."""

    TYPE: ClassVar[str] = "telemetry"
    #: No fixed fields: every figure is optional and coerced by the receiver, where a
    #: figure out of its range becomes absent (telemetry.normalize holds those ranges).
    FIELDS: ClassVar[tuple[FieldSpec, ...]] = ()
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
