"""The README's first command must keep working: the demo serves a page through a tunnel."""

from __future__ import annotations

import asyncio
import sys


async def test_demo_once_fetches_page_through_tls_tunnel() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunnel.demo", "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    text = out.decode()
    assert process.returncode == 0, text + err.decode()
    assert "tunnel demo: open http://127.0.0.1:" in text
    assert "relay wss://" in text  # TLS by default, even on loopback
    assert "through the tunnel: OK" in text
    assert "Traceback" not in err.decode()
