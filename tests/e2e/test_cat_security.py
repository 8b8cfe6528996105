"""Reliability catalogue (../shared/design/reliability.md §2), section (e) security, by id."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

from tests.e2e.harness import (
    ALPHA_TOKEN,
    CLIENT_MODULE,
    free_ports,
    server_config,
    start_proc,
    start_server,
    wait_tunnel,
)
from tests.e2e.services import (
    EchoService,
    echo_check,
)

MIB = 1024 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


def _secret_forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, raw.hex(), base64.b64encode(raw).decode().rstrip("="),
            base64.urlsafe_b64encode(raw).decode().rstrip("=")]


async def test_S2_no_secret_in_debug_logs_from_any_source(tmp_path: Path) -> None:
    """The token given by flag, environment and file each works, a wrong one is refused, and
    no program output at DEBUG contains the token in raw, hex or base64 form."""
    echo = EchoService()
    await echo.start()
    (port,) = free_ports(1)
    config = server_config(tmp_path, [port], log_level="debug")
    server, url = await start_server(tmp_path, config)
    token_file = tmp_path / "client.yaml"
    token_file.write_text(f"server: {url}\ntoken: {ALPHA_TOKEN}\n", encoding="utf-8")
    token_file.chmod(0o600)
    spec = [f"{echo.target}:fixed-{port}"]
    runs = [
        (["--server", url, "--token", ALPHA_TOKEN], {}),
        (["--server", url], {"TUNNEL_TOKEN": ALPHA_TOKEN}),
        (["--config", str(token_file)], {}),
    ]
    outputs: list[str] = []
    for args, env in runs:
        client = await start_proc("tunnel-client", CLIENT_MODULE,
                                  [*args, "--log-level", "debug",
                                   *[a for s in spec for a in ("--expose", s)]], env=env)
        assert await wait_tunnel(client, echo.target) == port
        await echo_check(port, 64 * 1024)
        assert await client.terminate() == 0
        outputs.append(client.stdout + client.stderr)
    wrong = await start_proc("tunnel-client", CLIENT_MODULE,
                             ["--server", url, "--log-level", "debug", "--expose", spec[0]],
                             env={"TUNNEL_TOKEN": "not-the-alpha-token-0000"})
    assert await wrong.wait_exit() == 3
    outputs.append(wrong.stdout + wrong.stderr)
    outputs.append(server.stdout + server.stderr)
    for form in _secret_forms(ALPHA_TOKEN) + _secret_forms("not-the-alpha-token-0000"):
        for text in outputs:
            assert form not in text, "a secret reached a log"
