"""Declared ranges of control-message fields: one :class:`FieldSpec` per field.

Each message class in :mod:`tunnel.common.proto.messages` lists its fields' specs in
``FIELDS``; its ``from_wire`` reads every field through them, so a value outside the range
that docs/protocol.md states for it is a RemoteProtocolError (its link closes) and never
reaches a role. The same specs drive the tests that sweep out-of-range values over every
field and compare docs/protocol.md's field table with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tunnel.common.errors import RemoteProtocolError
from tunnel.common.proto.hostport import is_host_port

__all__ = ["ANY_TEXT", "BASE64", "BASE64URL", "CLIENT_NAME", "HOST_PORT", "PRINTABLE", "WORD",
           "FieldSpec", "Shape", "int_field", "number_field", "text_field"]


@dataclass(frozen=True, slots=True)
class Shape:
    """What a text field may hold beyond its length: a name (as docs/protocol.md gives it)
    and the check."""

    name: str
    check: Callable[[str], bool]


def _pattern(name: str, regex: str) -> Shape:
    compiled = re.compile(regex, re.ASCII)
    return Shape(name, lambda text: compiled.fullmatch(text) is not None)


ANY_TEXT = Shape("any text", lambda text: True)
BASE64 = _pattern("base64", r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
BASE64URL = _pattern("base64url", r"[A-Za-z0-9_-]+")
PRINTABLE = _pattern("printable ASCII", r"[\x21-\x7e]+")
WORD = _pattern("lowercase word", r"[a-z][a-z_]*")
CLIENT_NAME = _pattern("client name", r"[A-Za-z0-9][A-Za-z0-9._-]*")
HOST_PORT = Shape("host:port", is_host_port)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field's declared range: what :meth:`read` accepts, and nothing else.

    ``kind`` is ``int`` (a JSON integer, never a boolean), ``number`` (an int or a finite
    float) or ``text``. Ints and numbers lie in ``low`` … ``high``; texts are at most
    ``max_len`` characters of the ``shape``. ``optional``: null or a missing field reads as
    None. ``lenient``: a value of the wrong type also reads as None, where the protocol says
    so (a credential of the wrong type counts as none, reliability S-1); a value of the
    right type out of range is still a protocol error.
    """

    name: str
    kind: str
    low: float = 0
    high: float = 0
    max_len: int = 0
    shape: Shape = ANY_TEXT
    optional: bool = False
    lenient: bool = False

    def describe(self) -> str:
        """The range in the words of docs/protocol.md's field table."""
        if self.kind == "text":
            text = f"{self.shape.name}, 1 … {self.max_len:,} characters"
            if self.shape is ANY_TEXT:
                text = f"any text, at most {self.max_len:,} characters"
        elif self.kind == "int":
            text = f"integer {int(self.low):,} … {int(self.high):,}"
        else:
            text = f"number > {self.low:g} … {self.high:,g}"
        if self.optional:
            text += ", or null"
        if self.lenient:
            text += "; wrong type = absent"
        return text

    def read(self, obj: Mapping[str, Any], kind: str) -> Any:
        """The field's value from ``obj``; RemoteProtocolError if outside the range."""
        value = obj.get(self.name)
        if value is None and self.optional:
            return None
        if not self._typed(value):
            if self.lenient:
                return None
            raise RemoteProtocolError(f"{kind}: field {self.name!r} missing or of wrong type")
        if not self._in_range(value):
            raise RemoteProtocolError(f"{kind}: field {self.name!r} out of range "
                                      f"({self.describe()})")
        return value

    def _typed(self, value: object) -> bool:
        if isinstance(value, bool):
            return False
        if self.kind == "int":
            return isinstance(value, int)
        if self.kind == "number":
            return isinstance(value, int | float)
        return isinstance(value, str)

    def _in_range(self, value: Any) -> bool:
        if self.kind == "text":
            shaped = self.shape is ANY_TEXT or (value != "" and self.shape.check(value))
            return len(value) <= self.max_len and shaped
        if self.kind == "number":
            # An int is compared as it is: a huge one would overflow a float conversion.
            finite = isinstance(value, int) or math.isfinite(value)
            return finite and self.low < value <= self.high
        return bool(self.low <= value <= self.high)


def int_field(name: str, low: int, high: int, *, optional: bool = False,
              lenient: bool = False) -> FieldSpec:
    """A JSON integer (never a boolean) in ``low`` … ``high``."""
    return FieldSpec(name, "int", low, high, optional=optional, lenient=lenient)


def number_field(name: str, above: float, high: float) -> FieldSpec:
    """A finite JSON number greater than ``above`` and at most ``high``."""
    return FieldSpec(name, "number", above, high)


def text_field(name: str, max_len: int, shape: Shape = ANY_TEXT, *, optional: bool = False,
               lenient: bool = False) -> FieldSpec:
    """A string of at most ``max_len`` characters of ``shape`` (not empty unless any text)."""
    return FieldSpec(name, "text", max_len=max_len, shape=shape, optional=optional,
                     lenient=lenient)
