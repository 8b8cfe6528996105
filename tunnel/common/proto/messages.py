"""Control-plane message catalogue (JSON objects in CONTROL frames on stream 0).

Each message is a flat JSON object with a ``type``. The builders below are the only place
messages are made, and :func:`parse` is the only place they are checked, so a peer that sends
a wrong field type gets a RemoteProtocolError (its link closes) instead of a KeyError deep in
the relay. The full catalogue with examples is in docs/protocol.md.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from tunnel.common.errors import RemoteProtocolError

__all__ = [
    "AUTH",
    "CHALLENGE",
    "ERROR",
    "EXPOSE",
    "EXPOSED",
    "EXPOSE_REFUSED",
    "REFUSED",
    "TELEMETRY",
    "WELCOME",
    "b64decode",
    "b64encode",
    "parse",
]

CHALLENGE: Final = "challenge"  # relay -> client, first message: fresh nonce
AUTH: Final = "auth"  # client -> relay: proof over the nonces
WELCOME: Final = "welcome"  # relay -> client: authenticated, with link settings
REFUSED: Final = "refused"  # relay -> client: login refused (one generic reason)
EXPOSE: Final = "expose"  # client -> relay: claim a public port for a local target
EXPOSED: Final = "exposed"  # relay -> client: the tunnel is live on this port
EXPOSE_REFUSED: Final = "expose_refused"  # relay -> client: claim refused, with the reason
ERROR: Final = "error"  # either way: a fatal problem, the link closes next
TELEMETRY: Final = "telemetry"  # client -> relay: host CPU, memory and GPU figures

_Spec = dict[str, tuple[type, ...]]
_OPT_INT = (int, type(None))

#: Required fields and their JSON types, per message type. Extra fields are ignored so that
#: newer peers can add information without breaking older ones.
SCHEMAS: Final[dict[str, _Spec]] = {
    CHALLENGE: {"version": (int,), "nonce": (str,), "server_version": (str,)},
    # plus either "proof" (token clients) or "key_id" and "signature" (key clients)
    AUTH: {"nonce": (str,), "client_version": (str,)},
    WELCOME: {"client": (str,), "heartbeat_interval": (int, float),
              "heartbeat_timeout": (int, float)},
    REFUSED: {"reason": (str,)},
    EXPOSE: {"id": (int,), "target": (str,), "mode": (str,), "port": _OPT_INT},
    EXPOSED: {"id": (int,), "port": (int,), "mode": (str,)},
    EXPOSE_REFUSED: {"id": (int,), "port": _OPT_INT, "reason": (str,)},
    ERROR: {"message": (str,)},
    TELEMETRY: {},  # every field optional; see tunnel.common.proto.telemetry.normalize
}

MAX_TEXT = 1024  # longest string field accepted from a peer


def parse(message: dict[str, Any], *allowed: str) -> dict[str, Any]:
    """Check a received message against its schema and the types allowed at this point."""
    kind = message.get("type")
    if kind not in allowed:
        raise RemoteProtocolError(f"unexpected control message {str(kind)[:32]!r}")
    for name, types in SCHEMAS[kind].items():
        value = message.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise RemoteProtocolError(f"{kind}: field {name!r} missing or of wrong type")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise RemoteProtocolError(f"{kind}: field {name!r} too long")
    return message


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise RemoteProtocolError(f"{what} is not base64") from exc
