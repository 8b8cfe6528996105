"""Certificate fingerprints as users write them: ``sha256:`` and 64 hex digits.

Kept apart from :mod:`tunnel.common.tls` (which needs ``ssl``) so that pure modules, the
join-string codec among them, can validate a pin without pulling in the TLS stack.
"""

from __future__ import annotations

import re

from tunnel.common.errors import ConfigError

__all__ = ["FINGERPRINT_PREFIX", "MALFORMED_FINGERPRINT", "parse_fingerprint"]

FINGERPRINT_PREFIX = "sha256:"
MALFORMED_FINGERPRINT = "malformed fingerprint: expected sha256: followed by 64 hex digits"
_FINGERPRINT_BODY = re.compile(r"[0-9a-f]{64}|[0-9a-f]{2}(?::[0-9a-f]{2}){31}")
_MAX_FINGERPRINT_INPUT = len(FINGERPRINT_PREFIX) + 32 * 3


def parse_fingerprint(text: str, source: str, key: str = "fingerprint") -> str:
    """Normalize the spellings users paste (upper case, ``AA:BB:…``, no prefix) to one form.

    Malformed input is not echoed: it may be long garbage, or something secret pasted into
    the wrong field.
    """
    candidate = text.strip().lower() if isinstance(text, str) else ""
    if len(candidate) > _MAX_FINGERPRINT_INPUT:
        raise ConfigError(source, key, MALFORMED_FINGERPRINT)
    candidate = candidate.removeprefix(FINGERPRINT_PREFIX)
    if not _FINGERPRINT_BODY.fullmatch(candidate):
        raise ConfigError(source, key, MALFORMED_FINGERPRINT)
    return FINGERPRINT_PREFIX + candidate.replace(":", "")
