"""The client's start-up imports, checked in a fresh interpreter (this one has everything
loaded already). The SPKI walk that makes this possible is tested in
tests/unit/test_pinning.py."""

from __future__ import annotations

import subprocess
import sys


def test_client_path_does_not_import_x509() -> None:
    """The point of the walk: the client's modules load without cryptography.x509, YAML or
    the relay's config (run in a fresh interpreter, since this one has them loaded)."""
    probe = ("import sys, tunnel.client.cli; "
             "print(sorted(m for m in ('cryptography.x509', 'yaml', 'tunnel.server.config', "
             "'tunnel.common.config.credentials', 'tunnel.server.tls') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
