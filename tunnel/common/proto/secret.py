"""A wrapper that keeps secrets out of logs, reprs and tracebacks.

Tokens travel through config loading, CLI parsing and auth; any of those may end up in a log
line or an exception message by accident. Wrapping the value makes the accident print
``Secret('***')`` instead of the token (rathole's ``MaskedString`` does the same).
"""

from __future__ import annotations

import hmac
import math
import string
from typing import Any

__all__ = ["DEFAULT_SECRETS", "MIN_SECRET_BITS", "MIN_SECRET_CHARS", "Secret", "weakness"]

#: A token shorter than this cannot hold 128 bits even as raw bytes.
MIN_SECRET_CHARS = 16
#: What a token's length and alphabet must be able to hold (reliability S-1).
MIN_SECRET_BITS = 128
#: A token drawing on fewer distinct characters is a pattern, not a secret.
MIN_DISTINCT_CHARS = 8
#: Placeholders from our docs and common defaults: published, so not secret at all.
DEFAULT_SECRETS = frozenset({
    "at-least-16-chars-secret", "changeme", "change-me", "changeme-changeme",
    "change-me-change-me", "secret", "password", "token", "default", "example",
    "your-token-here", "replace-me", "0123456789abcdef", "abcdefghijklmnop",
})
_POOLS = ((string.ascii_lowercase, 26), (string.ascii_uppercase, 26), (string.digits, 10))
_OTHER_ASCII = 33  # punctuation and space
_NON_ASCII = 128  # a generous guess; such tokens are rare


def weakness(value: str) -> str | None:
    """Why ``value`` is too weak to be a token, or None.

    The estimate is length x log2(alphabet size), with the alphabet the union of the
    character classes the token uses: right for random tokens (what ``add-client`` writes),
    generous for words, and enough to refuse empty, short, placeholder and one-class short
    tokens. It never says which characters are missing, so it leaks nothing useful.
    """
    if not value:
        return "the token is empty"
    lowered = value.lower().encode("utf-8")
    if any([hmac.compare_digest(lowered, known.encode()) for known in DEFAULT_SECRETS]):
        return "the token is a published example or default; generate one"
    if len(value) < MIN_SECRET_CHARS:
        return f"the token is too short; tokens need at least {MIN_SECRET_CHARS} characters"
    if len(set(value)) < MIN_DISTINCT_CHARS or _estimated_bits(value) < MIN_SECRET_BITS:
        return (f"the token is too weak (under {MIN_SECRET_BITS} bits); use a random one, "
                "e.g. 32 characters from tunnel-server add-client")
    return None


def _estimated_bits(value: str) -> float:
    pool = sum(size for chars, size in _POOLS if any(c in chars for c in value))
    if any(c.isascii() and not c.isalnum() for c in value):
        pool += _OTHER_ASCII
    if any(not c.isascii() for c in value):
        pool += _NON_ASCII
    return len(value) * math.log2(max(pool, 2))


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
