"""End-to-end tests of TLS and onboarding: ``init``, ``add-client``, ``join``, revocation.

Everything runs as the real programs on 127.0.0.1: the relay (``tunnel-server``) with the
config that ``init`` wrote, clients configured only by ``join`` (their ``XDG_CONFIG_HOME``
and ``HOME`` are per-test temporary directories). Bytes through tunnels are checked with
SHA-256; what crosses the wire is recorded by :mod:`tests.e2e.tlsproxy`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.harness import (
    ALPHA_TOKEN,
    CLIENT_MODULE,
    EXIT_TIMEOUT,
    SERVER_MODULE,
    Proc,
    free_ports,
    start_proc,
    wait_tunnel,
)
from tests.e2e.services import (
    EchoService,
    assert_closed_quickly,
    both,
    close_writer,
    echo_check,
    open_visitor,
    read_exactly_digest,
)
from tests.e2e.tlsproxy import RecordingProxy, TlsMitm

MIB = 1024 * 1024
COMMAND_TIMEOUT = 30.0  # init / add-client / join / list-clients finish within this
FINGERPRINT = r"sha256:[0-9a-f]{64}"
INIT_FINGERPRINT_RE = re.compile(rf"fingerprint: (?P<fp>{FINGERPRINT})")
INIT_COMMAND_RE = re.compile(r"tunnel-server --config (?P<path>\S+)")
RUN_FINGERPRINT_RE = rf"^tunnel-server: tls fingerprint (?P<fp>{FINGERPRINT})$"
WSS_LISTENING_RE = r"^tunnel-server: listening on (?P<url>wss://\S+)$"
JOIN_RE = re.compile(r"tunnel1_[A-Za-z0-9_-]+")
EXIT_REFUSED = 3
EXIT_CONFIG = 2
REVOKE_WITHIN = 2.0  # s from remove-client's exit until the revoked link is closed
SIGHUP_WITHIN = 1.0  # "kill -HUP reloads immediately"
RELOAD_WITHIN = 5.0  # the relay applies file edits "within 1 s"; margin for a loaded machine
RELOADED_RE = r"configuration reloaded"  # the relay's log line (stderr) after a reload
MARKER = b"<tunnel-e2e-marker:" + b"9f2c" * 11 + b">"
assert len(MARKER) == 64


# ----------------------------------------------------------------------------- helpers


@dataclass
class Relay:
    """A relay directory made by ``init``, and the running relay once started."""

    dir: Path
    config: Path
    fingerprint: str
    listen_port: int
    ports: list[int]
    cwd: Path  # an unrelated working directory: the printed command must work from anywhere
    proc: Proc | None = None
    url: str = ""
    joins: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> Proc:
        assert self.proc is not None, "relay not started"
        return self.proc


@dataclass
class Client:
    name: str
    env: dict[str, str]
    xdg: Path

    @property
    def config_file(self) -> Path:
        return self.xdg / "tunnel" / "client.yaml"


async def _command(
    name: str,
    module: str,
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Run a one-shot command to completion; the caller checks ``returncode``."""
    proc = await start_proc(name, module, args, env=env, cwd=cwd)
    await proc.wait_exit(COMMAND_TIMEOUT)
    return proc


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _init_relay(tmp_path: Path, n_ports: int) -> Relay:
    """``tunnel-server init`` into an empty directory, with loopback-only addresses."""
    listen, *ports = free_ports(n_ports + 1)
    relay_dir = tmp_path / "relay"
    relay_dir.mkdir()
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = await _command(
        "tunnel-server init",
        SERVER_MODULE,
        [
            "init",
            "--public-host", "127.0.0.1",
            "--dir", str(relay_dir),
            "--listen", f"127.0.0.1:{listen}",
            "--ports", ",".join(str(p) for p in ports),
            "--public-bind", "127.0.0.1",
            "--dashboard-listen", "127.0.0.1:0",
        ],
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.describe()
    fp = INIT_FINGERPRINT_RE.search(proc.stdout)
    assert fp is not None, f"init printed no fingerprint line\n{proc.describe()}"
    command = INIT_COMMAND_RE.search(proc.stdout)
    assert command is not None, f"init printed no start command\n{proc.describe()}"
    config = Path(shlex.split(command["path"])[0])
    assert config.resolve() == (relay_dir / "server.yaml").resolve(), proc.describe()
    return Relay(relay_dir, config, fp["fp"], listen, ports, cwd)


async def _start_relay(relay: Relay) -> Proc:
    """Start the relay with the command ``init`` printed; wait for its TLS lines."""
    proc = await start_proc(
        "tunnel-server", SERVER_MODULE, ["--config", str(relay.config)], cwd=relay.cwd
    )
    fp = await proc.wait_for_line(RUN_FINGERPRINT_RE)
    assert fp["fp"] == relay.fingerprint, "the relay serves another key than init printed"
    relay.url = (await proc.wait_for_line(WSS_LISTENING_RE))["url"]
    assert relay.url == f"wss://127.0.0.1:{relay.listen_port}/tunnel", relay.url
    relay.proc = proc
    return proc


async def _add_client(relay: Relay, name: str, ports: list[int]) -> str:
    """``add-client``; returns the join string (printed once, with the join command)."""
    proc = await _command(
        f"add-client {name}",
        SERVER_MODULE,
        ["add-client", name, "--ports", ",".join(str(p) for p in ports),
         "--config", str(relay.config)],
        cwd=relay.cwd,
    )
    assert proc.returncode == 0, proc.describe()
    found: set[str] = set(JOIN_RE.findall(proc.stdout))
    assert len(found) == 1, f"expected one join string, got {len(found)}\n{proc.describe()}"
    (join,) = found
    assert f"tunnel-client join {join}" in proc.stdout, proc.describe()
    for other in relay.joins.values():  # never another client's secret
        assert _body(other) not in proc.stdout + proc.stderr
    relay.joins[name] = join
    return join


def _body(join: str) -> str:
    return join.removeprefix("tunnel1_")


def _client(tmp_path: Path, name: str) -> Client:
    """An empty config home for one client machine."""
    xdg, home = tmp_path / name / "xdg", tmp_path / name / "home"
    xdg.mkdir(parents=True)
    home.mkdir()
    return Client(name, {"XDG_CONFIG_HOME": str(xdg), "HOME": str(home)}, xdg)


async def _join(client: Client, join: str, *extra: str) -> Proc:
    return await _command(f"join {client.name}", CLIENT_MODULE, ["join", join, *extra],
                          env=client.env)


async def _joined(tmp_path: Path, relay: Relay, name: str, ports: list[int]) -> Client:
    client = _client(tmp_path, name)
    join = await _add_client(relay, name, ports)
    proc = await _join(client, join)
    assert proc.returncode == 0, proc.describe()
    assert "joined" in proc.stdout, proc.describe()
    return client


async def _serve(client: Client, *args: str) -> Proc:
    """Run the client with only ``args`` (its server, key and pin come from ``join``)."""
    return await start_proc(client.name, CLIENT_MODULE, list(args), env=client.env)


def _strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string value) pair in a YAML document, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, str(k))
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item, key)
    elif isinstance(node, str):
        yield key, node


def _client_secrets(client: Client) -> list[str]:
    """The secret values in a joined client.yaml: everything long but the URL and the pin."""
    doc = yaml.safe_load(client.config_file.read_text(encoding="utf-8"))
    secrets = [
        value for _, value in _strings(doc)
        if len(value) >= 16 and not re.match(r"(?:wss?://|sha256:)", value)
    ]
    assert secrets, f"no private key found in {client.config_file}"
    return secrets


def _relay_files(relay: Relay) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(relay.dir.rglob("*")) if p.is_file()}


async def _held_visitor(port: int) -> tuple[asyncio.StreamWriter, asyncio.Task[float]]:
    """A visitor whose stream is proven live (one echo); the task ends when it is closed."""
    reader, writer = await open_visitor(port)
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"

    async def closed_at() -> float:
        try:
            data = await reader.read(65536)
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic()
        assert data == b"", f"unexpected bytes on a held visitor: {data[:64]!r}"
        return time.monotonic()

    return writer, asyncio.create_task(closed_at())


async def _echo_bytes(port: int, data: bytes, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        reader, writer = await open_visitor(port)
        try:

            async def send() -> None:
                writer.write(data)
                await writer.drain()

            _, (got_len, got) = await both(send(), read_exactly_digest(reader, len(data)))
        finally:
            await close_writer(writer)
    assert got_len == len(data)
    assert got == hashlib.sha256(data).hexdigest(), "echo through the tunnel corrupted"


def _tunnel_lines(proc: Proc, target: str) -> list[str]:
    return [ln for ln in proc.stdout_lines if f"{target} -> " in ln]


async def _two_clients_serving(
    tmp_path: Path,
) -> tuple[Relay, dict[str, tuple[Client, Proc, EchoService, int]]]:
    """Relay with alpha and beta (each owning one fixed port), both serving an echo."""
    relay = await _init_relay(tmp_path, 2)
    names = ("alpha", "beta")
    clients = {
        n: await _joined(tmp_path, relay, n, [p])
        for n, p in zip(names, relay.ports, strict=True)
    }
    await _start_relay(relay)
    serving: dict[str, tuple[Client, Proc, EchoService, int]] = {}
    for name, port in zip(names, relay.ports, strict=True):
        echo = EchoService()
        await echo.start()
        proc = await _serve(clients[name], "--expose", f"{echo.target}:fixed-{port}")
        assert await wait_tunnel(proc, echo.target, mode="fixed") == port
        await echo_check(port, seed=port)
        serving[name] = (clients[name], proc, echo, port)
    return relay, serving


# ----------------------------------------------------------------------------- tests


async def test_init_add_client_join_expose_from_empty_dirs(tmp_path: Path) -> None:
    relay = await _init_relay(tmp_path, 2)
    server_yaml = yaml.safe_load(relay.config.read_text(encoding="utf-8"))
    assert server_yaml["tls"] == "auto"
    assert server_yaml["clients_file"] == "clients.yaml"
    assert server_yaml["state_dir"] == "state"
    assert server_yaml["public_url"] == f"wss://127.0.0.1:{relay.listen_port}/tunnel"
    assert (relay.dir / "clients.yaml").is_file()
    assert _mode(relay.dir / "admin-password") == 0o600
    assert _mode(relay.dir / "state" / "tls" / "key.pem") == 0o600
    assert (relay.dir / "state" / "tls" / "cert.pem").is_file()

    again = await _command("init again", SERVER_MODULE,
                           ["init", "--public-host", "127.0.0.1", "--dir", str(relay.dir)],
                           cwd=relay.cwd)
    assert again.returncode == EXIT_CONFIG, again.describe()

    await _start_relay(relay)
    echo = EchoService()
    await echo.start()
    port = relay.ports[0]
    client = _client(tmp_path, "alpha")
    reload_mark = len(relay.running.stderr_lines)
    join = await _add_client(relay, "alpha", relay.ports)
    # The running relay picks the new client up from clients.yaml (it watches the file).
    await relay.running.wait_for_line(RELOADED_RE, RELOAD_WITHIN, since=reload_mark,
                                      stream="stderr")
    joined = await _join(client, join)
    assert joined.returncode == 0, joined.describe()
    assert "joined" in joined.stdout, joined.describe()
    assert _mode(client.config_file) == 0o600
    assert _mode(client.config_file.parent) == 0o700
    written = client.config_file.read_bytes()
    assert relay.fingerprint.encode() in written, "client.yaml does not pin the relay key"

    refused = await _join(client, join)  # an existing client.yaml is kept without --force
    assert refused.returncode == EXIT_CONFIG, refused.describe()
    assert client.config_file.read_bytes() == written
    forced = await _join(client, join, "--force")
    assert forced.returncode == 0, forced.describe()

    proc = await _serve(client, "--expose", f"{echo.target}:fixed-{port}")
    assert await wait_tunnel(proc, echo.target, mode="fixed") == port
    await echo_check(port, seed=101)

    # The relay keeps only public keys: no join string, no private key in any of its files.
    secrets = [join, _body(join), *_client_secrets(client)]
    for path, data in _relay_files(relay).items():
        for secret in secrets:
            assert secret.encode() not in data, f"{path} holds a client secret"
            assert secret.split(":")[-1].encode() not in data, f"{path} holds a client secret"
    for name in ("server.yaml", "clients.yaml"):
        text = (relay.dir / name).read_text(encoding="utf-8")
        keyed = [(k, v) for k, v in _strings(yaml.safe_load(text)) if "ed25519:" in v]
        assert all(k == "public_key" for k, _ in keyed), f"{name}: {[k for k, _ in keyed]}"
        assert text.count("ed25519:") == len(keyed), f"{name}: ed25519: outside public_key"
    assert proc.returncode is None


async def test_traffic_is_encrypted_on_the_wire(tmp_path: Path) -> None:
    relay = await _init_relay(tmp_path, 1)
    (port,) = relay.ports
    client = await _joined(tmp_path, relay, "alpha", [port])
    await _start_relay(relay)
    echo = EchoService()
    await echo.start()
    proxy = RecordingProxy(relay.listen_port)
    await proxy.start()
    proc = await _serve(
        client,
        "--server", f"wss://127.0.0.1:{proxy.port}/tunnel",
        "--fingerprint", relay.fingerprint,
        "--expose", f"{echo.target}:fixed-{port}",
    )
    try:
        assert await wait_tunnel(proc, echo.target, mode="fixed") == port
        await _echo_bytes(port, MARKER)
        await _echo_bytes(port, MARKER * (MIB // len(MARKER)))
        await echo_check(port, seed=202)
        assert proc.returncode is None

        assert proxy.recordings, "the client did not connect through the proxy"
        join = relay.joins["alpha"]
        forbidden = [MARKER, MARKER[:24], join.encode(), _body(join).encode(), b"tunnel1_",
                     b"/tunnel", b"GET /", b"HTTP/1.1", b"upgrade", b"websocket"]
        forbidden += [s.encode() for s in _client_secrets(client)]
        for i, rec in enumerate(proxy.recordings):
            for direction, data in (("client->relay", rec.upstream),
                                    ("relay->client", rec.downstream)):
                assert data[:2] == b"\x16\x03", f"#{i} {direction} starts {bytes(data[:8])!r}"
                lowered = bytes(data).lower()
                for needle in forbidden:
                    assert needle.lower() not in lowered, f"#{i} {direction}: {needle!r} in clear"
        assert sum(len(r.upstream) for r in proxy.recordings) > MIB
        assert sum(len(r.downstream) for r in proxy.recordings) > MIB
    finally:
        await proc.stop()
        await proxy.close()


async def test_mitm_with_other_certificate_gets_zero_auth_bytes(tmp_path: Path) -> None:
    relay = await _init_relay(tmp_path, 1)
    (port,) = relay.ports
    client = await _joined(tmp_path, relay, "alpha", [port])
    server = await _start_relay(relay)
    echo = EchoService()
    await echo.start()
    mitm = TlsMitm(relay.listen_port, tmp_path / "mitm")
    await mitm.start()
    assert mitm.fingerprint != relay.fingerprint
    via_mitm = f"wss://127.0.0.1:{mitm.port}/tunnel"
    out_mark, err_mark = len(server.stdout_lines), len(server.stderr_lines)
    try:
        # Pinned on the command line, then by the pin that join wrote to client.yaml.
        for pin in (["--fingerprint", relay.fingerprint], []):
            proc = await _serve(client, "--server", via_mitm, *pin,
                                "--expose", f"{echo.target}:fixed-{port}")
            assert await proc.wait_exit() == EXIT_REFUSED, proc.describe()
            assert "fingerprint" in proc.stderr, proc.describe()
            assert relay.fingerprint in proc.stderr, "expected fingerprint not named"
            assert mitm.fingerprint in proc.stderr, "actual fingerprint not named"
        assert mitm.connections >= 2, "the client never reached the MITM"
        assert mitm.decrypted_from_client == 0
        assert mitm.upstream_connections == 0
        during = server.stdout_lines[out_mark:] + server.stderr_lines[err_mark:]
        assert not [ln for ln in during if "alpha" in ln or "login" in ln], server.describe()

        # Control for the MITM itself: a client pinned to the MITM's key does talk through it.
        fooled = await _serve(client, "--server", via_mitm, "--fingerprint", mitm.fingerprint,
                              "--expose", f"{echo.target}:fixed-{port}")
        await asyncio.wait_for(mitm.got_bytes.wait(), 20)
        assert mitm.decrypted_from_client > 0
        await fooled.stop()
    finally:
        await mitm.close()

    # Control: the same client straight to the relay logs in, and the relay says so.
    proc = await _serve(client, "--expose", f"{echo.target}:fixed-{port}")
    assert await wait_tunnel(proc, echo.target, mode="fixed") == port
    await echo_check(port, seed=303)
    after = server.stdout_lines[out_mark:] + server.stderr_lines[err_mark:]
    assert [ln for ln in after if "alpha" in ln], server.describe()


async def test_revocation_closes_link_within_2s(tmp_path: Path) -> None:
    relay, serving = await _two_clients_serving(tmp_path)
    _, alpha, _, alpha_port = serving["alpha"]
    _, beta, beta_echo, beta_port = serving["beta"]
    writer, closed = await _held_visitor(alpha_port)
    try:
        removed = await _command("remove-client alpha", SERVER_MODULE,
                                 ["remove-client", "alpha", "--config", str(relay.config)],
                                 cwd=relay.cwd)
        revoked_at = time.monotonic()
        assert removed.returncode == 0, removed.describe()
        try:
            closed_at = await asyncio.wait_for(asyncio.shield(closed), REVOKE_WITHIN + 5)
        except TimeoutError:
            raise AssertionError("alpha's link stayed open after remove-client") from None
        assert closed_at - revoked_at <= REVOKE_WITHIN, (
            f"alpha's link closed {closed_at - revoked_at:.2f} s after remove-client")
    finally:
        closed.cancel()
        await asyncio.gather(closed, return_exceptions=True)
        await close_writer(writer)

    assert await alpha.wait_exit() == EXIT_REFUSED, alpha.describe()
    assert "authentication failed" in alpha.stderr, alpha.describe()
    await assert_closed_quickly(alpha_port)
    await echo_check(beta_port, seed=404)
    assert beta.returncode is None
    assert len(_tunnel_lines(beta, beta_echo.target)) == 1, "beta's link was reconnected"
    assert relay.running.returncode is None


def _drop_client(doc: Any, name: str) -> Any:
    """``doc`` without the entry of client ``name`` (a mapping by name or a list of entries)."""
    if isinstance(doc, dict) and name in doc:
        return {k: v for k, v in doc.items() if k != name}
    if isinstance(doc, dict):
        return {k: _drop_client(v, name) for k, v in doc.items()}
    if isinstance(doc, list):
        return [e for e in doc if not (isinstance(e, dict) and e.get("name") == name)]
    return doc


async def test_sighup_reload_applies_config_edit(tmp_path: Path) -> None:
    relay, serving = await _two_clients_serving(tmp_path)
    _, alpha, _, alpha_port = serving["alpha"]
    _, beta, beta_echo, beta_port = serving["beta"]
    clients_file = relay.dir / "clients.yaml"
    doc = yaml.safe_load(clients_file.read_text(encoding="utf-8"))
    edited = _drop_client(doc, "alpha")
    assert edited != doc, f"alpha not found in clients.yaml: {doc!r}"
    writer, closed = await _held_visitor(alpha_port)
    try:
        # Write and rename, as editors do, so the relay never sees a half-written file. The
        # new file keeps the old size (a padding comment) and mtime, so a watcher comparing
        # stat results cannot notice it: only SIGHUP can make the relay apply this edit.
        before = clients_file.stat()
        text = yaml.safe_dump(edited, sort_keys=False)
        padding = before.st_size - len(text.encode("utf-8")) - 3
        assert padding >= 0, "removing an entry made clients.yaml longer"
        text += "# " + "x" * padding + "\n"
        temp = clients_file.with_name(".clients.yaml.edit")
        temp.write_text(text, encoding="utf-8")
        temp.chmod(stat.S_IMODE(before.st_mode))
        os.utime(temp, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(temp, clients_file)
        assert clients_file.stat().st_size == before.st_size
        relay.running.send_signal(signal.SIGHUP)
        hup_at = time.monotonic()
        try:
            closed_at = await asyncio.wait_for(asyncio.shield(closed), SIGHUP_WITHIN + 5)
        except TimeoutError:
            raise AssertionError("alpha's link stayed open after SIGHUP") from None
        assert closed_at - hup_at <= SIGHUP_WITHIN, (
            f"alpha's link closed {closed_at - hup_at:.2f} s after SIGHUP")
    finally:
        closed.cancel()
        await asyncio.gather(closed, return_exceptions=True)
        await close_writer(writer)

    assert await alpha.wait_exit() == EXIT_REFUSED, alpha.describe()
    assert "authentication failed" in alpha.stderr, alpha.describe()
    await echo_check(beta_port, seed=505)
    assert len(_tunnel_lines(beta, beta_echo.target)) == 1, "beta's link was reconnected"
    assert relay.running.returncode is None


async def test_malformed_join_and_fingerprint_are_clear_errors(tmp_path: Path) -> None:
    relay = await _init_relay(tmp_path, 1)
    (port,) = relay.ports
    real = await _add_client(relay, "alpha", [port])
    fresh = _client(tmp_path, "fresh")
    for bad in ("garbage", "tunnel1_", "tunnel1_AAAA", "tunnel1_!!!!", real[: len(real) // 2],
                "tunnel2_" + _body(real)):
        proc = await _join(fresh, bad)
        assert proc.returncode == EXIT_CONFIG, proc.describe()
        err = [ln for ln in proc.stderr_lines if ln.strip()]
        assert len(err) == 1, f"{bad!r}: expected one error line\n{proc.describe()}"
        assert "malformed join string" in err[0], proc.describe()
        assert not fresh.config_file.exists(), f"{bad!r} wrote a client.yaml"

    client = _client(tmp_path, "alpha")
    joined = await _join(client, real)
    assert joined.returncode == 0, joined.describe()
    target = EchoService()  # stands in for a relay: must get no connection at all
    await target.start()
    echo = EchoService()
    await echo.start()
    expose = ["--expose", f"{echo.target}:fixed-{port}"]
    url = f"wss://127.0.0.1:{target.port}/tunnel"
    for args, env in (
        (["--server", url, "--fingerprint", "sha256:xyz", *expose], {}),
        (["--server", url, "--fingerprint", "sha256:" + "0" * 63, *expose], {}),
        (["--server", url, *expose], {"TUNNEL_FINGERPRINT": "not-a-fingerprint"}),
    ):
        proc = await start_proc("bad fingerprint", CLIENT_MODULE, args, env=client.env | env)
        assert await proc.wait_exit() == EXIT_CONFIG, proc.describe()
        assert "fingerprint" in proc.stderr, proc.describe()
    assert target.connections == 0

    # Well-formed but wrong (from the environment): the real relay is refused after TLS.
    server = await _start_relay(relay)
    out_mark, err_mark = len(server.stdout_lines), len(server.stderr_lines)
    wrong = "sha256:" + "0" * 64
    proc = await start_proc("wrong fingerprint", CLIENT_MODULE, expose,
                            env=client.env | {"TUNNEL_FINGERPRINT": wrong})
    assert await proc.wait_exit() == EXIT_REFUSED, proc.describe()
    assert "fingerprint" in proc.stderr, proc.describe()
    assert wrong in proc.stderr, "expected fingerprint not named"
    assert relay.fingerprint in proc.stderr, "actual fingerprint not named"
    during = server.stdout_lines[out_mark:] + server.stderr_lines[err_mark:]
    assert not [ln for ln in during if "alpha" in ln], server.describe()


async def test_plain_ws_to_remote_host_needs_insecure(tmp_path: Path) -> None:
    client = _client(tmp_path, "alpha")
    for server in ("ws://192.0.2.1:7000", "ws://192.0.2.1:7000/tunnel"):
        started = time.monotonic()
        proc = await start_proc(
            "plain ws", CLIENT_MODULE,
            ["--server", server, "--token", ALPHA_TOKEN, "--expose", "127.0.0.1:22:auto"],
            env=client.env,
        )
        code = await proc.wait_exit(EXIT_TIMEOUT)
        elapsed = time.monotonic() - started
        assert code == EXIT_CONFIG, proc.describe()
        assert "--insecure" in proc.stderr, proc.describe()
        assert elapsed < 5.0, f"took {elapsed:.1f} s: did it try to connect?"


async def test_list_clients_shows_no_secrets(tmp_path: Path) -> None:
    relay = await _init_relay(tmp_path, 2)
    alpha_port, beta_port = relay.ports
    alpha = await _joined(tmp_path, relay, "alpha", [alpha_port])
    await _add_client(relay, "beta", [beta_port])  # checks it prints nothing of alpha's
    await _start_relay(relay)
    echo = EchoService()
    await echo.start()
    proc = await _serve(alpha, "--expose", f"{echo.target}:fixed-{alpha_port}")
    assert await wait_tunnel(proc, echo.target, mode="fixed") == alpha_port

    listed = await _command("list-clients", SERVER_MODULE,
                            ["list-clients", "--config", str(relay.config)], cwd=relay.cwd)
    assert listed.returncode == 0, listed.describe()
    out = listed.stdout + "\n" + listed.stderr
    alpha_lines = [ln for ln in listed.stdout_lines if "alpha" in ln]
    beta_lines = [ln for ln in listed.stdout_lines if "beta" in ln]
    assert alpha_lines and beta_lines, listed.describe()
    assert any(str(alpha_port) in ln for ln in alpha_lines), listed.describe()
    assert str(beta_port) in listed.stdout, listed.describe()

    secrets = ["tunnel1_", "PRIVATE KEY", *(_body(j) for j in relay.joins.values()),
               *_client_secrets(alpha),
               (relay.dir / "admin-password").read_text(encoding="utf-8").strip()]
    key_pem = (relay.dir / "state" / "tls" / "key.pem").read_text(encoding="ascii")
    secrets += [ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    for secret in secrets:
        assert secret not in out, f"list-clients printed a secret ({secret[:8]}...)"
