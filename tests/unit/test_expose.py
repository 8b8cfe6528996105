"""The ``--expose`` grammar, including the ``A:B`` ambiguity rule."""

from __future__ import annotations

import pytest

from tunnel.client.expose import EXPOSE_GRAMMAR, ExposeSpec, parse_expose
from tunnel.common.errors import ConfigError

LOCAL = "127.0.0.1"


@pytest.mark.parametrize(("spec", "expected"), [
    ("6006", ExposeSpec(LOCAL, 6006, "auto", None)),
    ("1", ExposeSpec(LOCAL, 1, "auto", None)),
    ("65535", ExposeSpec(LOCAL, 65535, "auto", None)),
    ("8888:fixed-6000", ExposeSpec(LOCAL, 8888, "fixed", 6000)),
    ("8888:6000", ExposeSpec(LOCAL, 8888, "fixed", 6000)),
    ("8888:auto", ExposeSpec(LOCAL, 8888, "auto", None)),
    ("localhost:8888", ExposeSpec("localhost", 8888, "auto", None)),
    ("127.0.0.1:22:6022", ExposeSpec(LOCAL, 22, "fixed", 6022)),
    ("10.0.0.5:22:fixed-6022", ExposeSpec("10.0.0.5", 22, "fixed", 6022)),
    ("gpu-box.lan:6006:auto", ExposeSpec("gpu-box.lan", 6006, "auto", None)),
    ("[::1]:22", ExposeSpec("::1", 22, "auto", None)),
    ("[::1]:22:6022", ExposeSpec("::1", 22, "fixed", 6022)),
    ("[fe80::1]:8888:fixed-65535", ExposeSpec("fe80::1", 8888, "fixed", 65535)),
])
def test_valid_specs(spec: str, expected: ExposeSpec) -> None:
    assert parse_expose(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "0", "65536", "abc", "8888:fixed-", "8888:fixed-0", "8888:fixed-70000", "8888:bogus",
    "-1", "+8888", "08888", "8888:08000", "8888:fixed-+1", ":8888", "a:b:c:d", "[::1]",
    "[::1]:", "[::1]:0", "[::1", "[nothost]:22", "::1:22", "8888:", "8888:AUTO", " 8888",
    "8888 ", "host name:22", "999.1.1.1:22", "localhost:8888:auto:x", "٨٨٨٨", "8888:fixed-6000x",
    "localhost:auto", "-host:22", "1234:8888:auto",
])
def test_invalid_specs(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_expose(spec)
    assert EXPOSE_GRAMMAR in str(info.value)
    assert str(info.value).startswith("--expose")
    assert info.value.key == spec


def test_source_is_named() -> None:
    with pytest.raises(ConfigError, match=r"^client\.yaml: expose\[0\]: 0: "):
        parse_expose("0", source="client.yaml: expose[0]")


@pytest.mark.parametrize(("spec", "target", "remote"), [
    ("8888:fixed-6000", "127.0.0.1:8888", "fixed-6000"),
    ("8888:6000", "127.0.0.1:8888", "fixed-6000"),
    ("[::1]:22", "[::1]:22", "auto"),
    ("localhost:6006", "localhost:6006", "auto"),
])
def test_target_and_describe_remote(spec: str, target: str, remote: str) -> None:
    parsed = parse_expose(spec)
    assert parsed.target == target
    assert parsed.describe_remote() == remote
