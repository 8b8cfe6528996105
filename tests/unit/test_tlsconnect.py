"""The client hands websockets the ``ws://`` form of a ``wss://`` relay URL and runs TLS below
it (tunnel/client/tls.py): the form must keep the host, the port and the path."""

from __future__ import annotations

import pytest

from tunnel.client.tls import transport_url


@pytest.mark.parametrize(("url", "expected"), [
    ("wss://vps.example.com/tunnel", ("ws://vps.example.com:443/tunnel", "vps.example.com")),
    ("wss://vps.example.com:8443/t?x=1", ("ws://vps.example.com:8443/t?x=1", "vps.example.com")),
    ("wss://127.0.0.1:7000/tunnel", ("ws://127.0.0.1:7000/tunnel", "127.0.0.1")),
    ("wss://[::1]:7000/tunnel", ("ws://[::1]:7000/tunnel", "::1")),
    ("wss://vps.example.com", ("ws://vps.example.com:443/", "vps.example.com")),
])
def test_the_websockets_url_keeps_host_port_and_path(url: str,
                                                     expected: tuple[str, str]) -> None:
    assert transport_url(url) == expected
