"""Unit tests of the security rules the S catalogue (docs/reliability.md §2 (e)) relies on.

Weak-token refusal (S-1), escaped display of rejected names (S-10), the identity check on
client messages (S-6), and the dashboard's view of a flapping identity (S-7; the
replacement-rate window itself is tested in tests/e2e/test_cat_security.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dashboard.fakes import sample_relay
from tunnel.common.config.credentials import MAX_SHOWN_NAME, shown_name
from tunnel.common.errors import ConfigError
from tunnel.common.proto.secret import DEFAULT_SECRETS, MIN_SECRET_CHARS, weakness
from tunnel.server.config import CLIENT_NAME_PATTERN, parse_server_config
from tunnel.server.control import IDENTITY_FIELDS, _claimed_identity
from tunnel.server.dashboard.views import client_summary
from tunnel.server.registry import REPLACEMENT_FLAG

# ----------------------------------------------------------------------------- weak tokens


@pytest.mark.parametrize("token", ["", "short", "x" * (MIN_SECRET_CHARS - 1),
                                   "at-least-16-chars-secret", "AT-LEAST-16-CHARS-SECRET",
                                   "abcdefghijklmnopq", "a" * 64, "abababababababababababab",
                                   "0123456789012345678"])
def test_weak_tokens_are_named(token: str) -> None:
    assert weakness(token) is not None


@pytest.mark.parametrize("token", ["alpha-secret-token-0001", "full-yaml-token-ci-runner",
                                   "Zq3_vT9-kP1xR7mW2yB5nC8dF0gH4jL6", "pässwörter-sind-lang-123"])
def test_random_and_long_tokens_pass(token: str) -> None:
    assert weakness(token) is None


def test_weakness_never_repeats_the_token() -> None:
    for token in ["at-least-16-chars-secret", "abcdefghijklmnopq", "tiny-tok"]:
        reason = weakness(token)
        assert reason is not None and token not in reason
    assert all(weakness(d) is not None for d in DEFAULT_SECRETS)


def test_relay_config_refuses_a_default_token() -> None:
    data = {"listen": "127.0.0.1:7000", "ports": [6000],
            "clients": {"alpha": {"token": "at-least-16-chars-secret"}}}
    with pytest.raises(ConfigError) as refused:
        parse_server_config(data, "server.yaml", Path("."), {})
    assert "clients.alpha.token" in str(refused.value)
    assert "at-least-16-chars-secret" not in str(refused.value)


# ----------------------------------------------------------------------------- names


def test_shown_name_escapes_and_cuts() -> None:
    assert shown_name("evil\u202etxt") == "evil\\u202etxt"
    assert shown_name("nul\x00name") == "nul\\x00name"
    long = shown_name("a" * 10240)
    assert len(long) < MAX_SHOWN_NAME + 40 and "10240 characters" in long
    assert shown_name("gpu-box.1") == "gpu-box.1"
    assert CLIENT_NAME_PATTERN == r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


# ----------------------------------------------------------------------------- identity


def test_messages_naming_another_client_are_caught() -> None:
    assert _claimed_identity({"type": "expose", "client": "alpha"}, "beta") == "alpha"
    assert _claimed_identity({"type": "expose", "client": "beta"}, "beta") is None
    assert _claimed_identity({"type": "expose", "target": "alpha:80"}, "beta") is None
    for field in IDENTITY_FIELDS:
        assert _claimed_identity({"type": "telemetry", field: "alpha"}, "beta") == "alpha"
    assert _claimed_identity({"session": "x" * 500}, "beta") == "x" * 64
    assert _claimed_identity({"owner": 7}, "beta") == "7"


# ----------------------------------------------------------------------------- replacements


def test_dashboard_view_flags_a_flapping_identity() -> None:
    relay = sample_relay()
    alpha = relay.registry.clients["alpha"]
    view = client_summary(relay, alpha, 0.0)
    assert view["flapping"] is False and view["replacements_last_minute"] == 0
    alpha.replacements = REPLACEMENT_FLAG
    view = client_summary(relay, alpha, 0.0)
    assert view["flapping"] is True and view["replacements_last_minute"] == REPLACEMENT_FLAG
