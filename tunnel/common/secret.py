"""A wrapper that keeps secrets out of logs, reprs and tracebacks.

Tokens travel through config loading, CLI parsing and auth; any of those may end up in a log
line or an exception message by accident. Wrapping the value makes the accident print
``Secret('***')`` instead of the token (rathole's ``MaskedString`` does the same).
"""

from __future__ import annotations

import hmac
from typing import Any

__all__ = ["Secret"]


class Secret:
    """An opaque secret string; call :meth:`reveal` only where the raw value is needed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def reveal_bytes(self) -> bytes:
        return self._value.encode("utf-8")

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # Constant time, so equality checks on secrets never leak a prefix length.
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self.reveal_bytes(), other.reveal_bytes())

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise TypeError("secrets are not picklable")
