"""The dashboard's locks: Basic auth, login throttling, Host check, CSRF rule, headers.

The dashboard can disconnect clients and release ports, so every route but ``/healthz``
needs the admin password, and the checks that a browser-based attack would need to get
past are each here in one place:

* **Brute force**: failed logins are counted per source with the relay's own
  :class:`~tunnel.server.guard.Penalties` (a few free failures, then a doubling lock-out).
* **Timing**: user name and password are compared as keyed digests with
  :func:`hmac.compare_digest`, so neither the length nor a prefix leaks. A PBKDF2
  ``password_hash`` costs ~100 ms per check by design; it is verified once, and the keyed
  digest of the password that passed is cached, so a logged-in browser does not burn a
  CPU core. The key is random per process and never leaves memory.
* **DNS rebinding**: a page on ``evil.example`` that re-resolves to 127.0.0.1 still sends
  ``Host: evil.example``; on a loopback listener only loopback names (and ``hosts``) pass.
* **CSRF**: state changes only on POST, and a POST must carry ``X-Tunnel-Request: 1`` (a
  custom header a cross-site form cannot send and a cross-site fetch cannot send without a
  CORS preflight that is never granted) and, when the browser names an ``Origin``, that
  origin must be the dashboard's own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import secrets
from dataclasses import dataclass
from enum import Enum

from tunnel.common.config.base import is_loopback
from tunnel.server.config_dashboard import DashboardSettings
from tunnel.server.dashboard.http import Request, Response
from tunnel.server.guard import Penalties

__all__ = [
    "CSRF_HEADER",
    "MAX_AUTH_HEADER",
    "MAX_CONCURRENT_HASHES",
    "REALM",
    "SECURITY_HEADERS",
    "AuthResult",
    "Authenticator",
    "HostPolicy",
    "csrf_problem",
    "parse_basic",
    "unauthorized",
    "verify_pbkdf2",
]

REALM = "tunnel"
CSRF_HEADER = "x-tunnel-request"
MAX_AUTH_HEADER = 1024  # a Basic credential longer than this is refused unparsed
MAX_CONCURRENT_HASHES = 2  # PBKDF2 checks running at once (each ~100 ms of CPU)

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy",
     "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
)
"""On every response, errors included. ``no-store``: nothing the dashboard serves (live
state, credentials-gated pages) should sit in a shared or disk cache."""

class AuthResult(Enum):
    OK = "ok"
    MISSING = "missing"  # no credentials: a challenge, not a failed login
    DENIED = "denied"
    THROTTLED = "throttled"


def parse_basic(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from ``Authorization: Basic ...``; None when absent or malformed."""
    if header is None or len(header) > MAX_AUTH_HEADER:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


def verify_pbkdf2(encoded: str, password: bytes) -> bool:
    """Check ``password`` against ``pbkdf2_sha256$ITER$SALT_B64$HASH_B64`` (slow on purpose)."""
    try:
        algorithm, iterations, salt, digest = encoded.split("$")
        expected = base64.b64decode(digest, validate=True)
        salt_bytes = base64.b64decode(salt, validate=True)
        rounds = int(iterations)
    except (ValueError, binascii.Error):
        return False
    if algorithm != "pbkdf2_sha256" or rounds <= 0:
        return False
    actual = hashlib.pbkdf2_hmac("sha256", password, salt_bytes, rounds, dklen=len(expected))
    return hmac.compare_digest(actual, expected)


class Authenticator:
    """Checks Basic credentials against the configured user and password (or hash)."""

    def __init__(self, settings: DashboardSettings, penalties: Penalties) -> None:
        self._key = secrets.token_bytes(32)
        self._user = self._digest(settings.username.encode("utf-8"))
        self._password = (self._digest(settings.password.reveal_bytes())
                          if settings.password is not None else None)
        self._hash = settings.password_hash
        self._verified: bytes | None = None  # keyed digest of the password the hash accepted
        self._hashing = asyncio.Semaphore(MAX_CONCURRENT_HASHES)
        self.penalties = penalties

    def _digest(self, value: bytes) -> bytes:
        return hmac.new(self._key, value, hashlib.sha256).digest()

    async def check(self, header: str | None, source: str) -> AuthResult:
        if self.penalties.retry_after(source) > 0:
            return AuthResult.THROTTLED
        credentials = parse_basic(header)
        if credentials is None:
            if header is None:
                return AuthResult.MISSING
            self.penalties.failed(source)
            return AuthResult.DENIED
        user, password = credentials
        user_ok = hmac.compare_digest(self._digest(user), self._user)
        password_ok = await self._password_ok(password)
        if user_ok and password_ok:
            self.penalties.succeeded(source)
            return AuthResult.OK
        self.penalties.failed(source)
        return AuthResult.DENIED

    async def _password_ok(self, password: bytes) -> bool:
        given = self._digest(password)
        if self._password is not None:
            return hmac.compare_digest(given, self._password)
        if self._verified is not None and hmac.compare_digest(given, self._verified):
            return True
        assert self._hash is not None
        async with self._hashing:
            ok = await asyncio.to_thread(verify_pbkdf2, self._hash, password)
        if ok:
            self._verified = given
        return ok

    def retry_after(self, source: str) -> int:
        return math.ceil(self.penalties.retry_after(source))


def unauthorized(result: AuthResult, retry_after: int) -> Response:
    """401 with the Basic challenge, or 429 while the source is locked out."""
    if result is AuthResult.THROTTLED:
        response = Response.text(429, "too many failed logins; try again later\n")
        response.headers.append(("Retry-After", str(max(1, retry_after))))
        return response
    response = Response.text(401, "authentication required\n")
    response.headers.append(("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'))
    return response


@dataclass(frozen=True)
class HostPolicy:
    """Which ``Host`` header values the dashboard answers (the DNS-rebinding guard).

    On a loopback listener only loopback names pass (``localhost``, ``127.x.x.x``,
    ``[::1]``, bare or with the dashboard's port) plus the configured ``hosts``. On any
    other listener the guard applies only when ``hosts`` is configured; IP literals pass
    then as well (rebinding needs a DNS name). Without ``hosts`` a public listener cannot
    know the names it is reached by, and Basic auth is its defence.
    """

    loopback: bool
    port: int
    hosts: tuple[str, ...]

    @classmethod
    def for_listener(cls, host: str, port: int, hosts: tuple[str, ...]) -> HostPolicy:
        return cls(is_loopback(host), port, tuple(h.lower() for h in hosts))

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return not self.loopback and not self.hosts  # HTTP/1.0 without Host
        name, port = _split_host(host_header.strip().lower())
        if name is None:
            return False
        if name in self.hosts:
            return True
        if self.loopback:
            return is_loopback(name.strip("[]")) and port in (None, self.port)
        if not self.hosts:
            return True
        return _is_ip(name.strip("[]"))


def _split_host(value: str) -> tuple[str | None, int | None]:
    """(name, port) of a Host header value; name None when malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None, None
        name, rest = value[:end + 1], value[end + 1:]
    else:
        colon = value.find(":")
        name, rest = (value, "") if colon < 0 else (value[:colon], value[colon:])
    if rest and (not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6):
        return None, None
    if not name or any(ch.isspace() or ch in "/\\@?#" for ch in name):
        return None, None
    return name, int(rest[1:]) if rest else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True




def csrf_problem(request: Request) -> str | None:
    """Why a state-changing request is refused (403), or None when it may proceed."""
    if request.headers.get(CSRF_HEADER) != "1":
        return "missing X-Tunnel-Request: 1"
    origin = request.headers.get("origin")
    if origin is None:
        return None
    host = request.headers.get("host", "").strip().lower()
    allowed = {f"http://{host}", f"https://{host}"}  # https: behind a TLS-terminating proxy
    if origin.strip().lower() not in allowed:
        return "cross-origin request refused"
    return None
