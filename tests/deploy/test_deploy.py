"""The files under ``deploy/``: example configs validate, units/images/compose files say what
the README promises, nginx accepts its server block, and the link really works through nginx
with TLS terminated there (real programs and a real nginx, on 127.0.0.1 only)."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.e2e.harness import (
    ALPHA_TOKEN,
    BETA_TOKEN,
    CLIENT_MODULE,
    SERVER_MODULE,
    Proc,
    free_ports,
    server_config,
    start_proc,
    start_server,
    url_port,
    wait_tunnel,
)
from tests.e2e.services import EchoService, close_writer, echo_check
from tunnel.client.cli import EXIT_CONFIG, EXIT_REFUSED
from tunnel.client.settings import resolve_client_settings
from tunnel.common.config.credentials import generate_keypair
from tunnel.common.proto.portset import PortSet
from tunnel.server.config import load_server_config
from tunnel.server.tls import cert_file_fingerprint, generate_self_signed

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
NGINX_DIR = DEPLOY / "nginx"
NGINX_CONF = NGINX_DIR / "tunnel.conf"

MIB = 1024 * 1024
NGINX_READY_TIMEOUT = 15.0  # nginx prints nothing when ready: its port is polled until then
NGINX_STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
LINK_PATH = "/t/link"  # a non-default path, to exercise "the path is configurable"
CHECK_TIMEOUT = 60

SERVER_EXAMPLES = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name.startswith("server"))
EXPECTED_SERVER_EXAMPLES = {
    "examples/server.yaml",
    "nginx/server.yaml",
    "docker/config/server.yaml",
}


def _rel(path: Path) -> str:
    return path.relative_to(DEPLOY).as_posix()


# ----------------------------------------------------------------------------- example configs


@dataclass
class PreparedConfig:
    path: Path
    env: dict[str, str]
    data: dict[str, Any]


def _secret_references(data: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], str]]:
    """(mapping, key prefix) for every place that may hold ``PREFIX_env``/``PREFIX_file``:
    the top level and every client (token), and the dashboard (password)."""
    yield data, "token"
    clients = data.get("clients")
    if isinstance(clients, dict):
        yield from ((v, "token") for v in clients.values() if isinstance(v, dict))
    dashboard = data.get("dashboard")
    if isinstance(dashboard, dict):
        yield dashboard, "password"


def _prepare_copy(src: Path, dest_dir: Path) -> PreparedConfig:
    """Copy a config into ``dest_dir`` and provide the secrets it references.

    Every ``token_env``/``password_env`` gets a distinct variable, every relative
    ``token_file``/``password_file`` a distinct secret file (mode 600) next to the copy, so
    the example validates exactly as written.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)
    data = yaml.safe_load(src.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{src}: top level is not a mapping"
    env: dict[str, str] = {}
    for entry, prefix in _secret_references(data):
        if f"{prefix}_env" in entry:
            env[str(entry[f"{prefix}_env"])] = secrets.token_urlsafe(24)
        if f"{prefix}_file" in entry:
            secret_file = Path(str(entry[f"{prefix}_file"]))
            assert not secret_file.is_absolute(), (
                f"{src}: examples should use a {prefix}_file relative to the config"
            )
            target = dest_dir / secret_file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
            target.chmod(0o600)
    return PreparedConfig(dest, env, data)


def test_all_server_examples_are_found() -> None:
    assert {_rel(p) for p in SERVER_EXAMPLES} >= EXPECTED_SERVER_EXAMPLES


@pytest.mark.parametrize("example", SERVER_EXAMPLES, ids=_rel)
def test_server_example_validates(example: Path, tmp_path: Path) -> None:
    prepared = _prepare_copy(example, tmp_path)
    config = load_server_config(prepared.path, prepared.env)
    assert config.ports, "an example must offer public ports"
    assert config.path.startswith("/")
    # Every example advertises where clients connect (join strings need it).
    assert config.public_url is not None
    assert urlsplit(config.public_url).path == config.path
    if config.tls.mode == "off":
        # Plain ws:// is only acceptable on loopback, behind a TLS proxy on the same host.
        assert config.listen_host in ("127.0.0.1", "::1", "localhost"), (
            f"{_rel(example)}: tls: off with listen {config.listen_host}"
        )
        assert config.public_url.startswith("wss://")


@pytest.mark.parametrize("example", SERVER_EXAMPLES, ids=_rel)
def test_server_example_passes_check(example: Path, tmp_path: Path) -> None:
    """``tunnel-server --config F --check`` accepts the example (state kept in tmp_path)."""
    prepared = _prepare_copy(example, tmp_path)
    data = dict(prepared.data)
    data["state_dir"] = str(tmp_path / "state")  # never touch /var/lib/tunnel or /state
    prepared.path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    env.update(prepared.env)
    result = subprocess.run(
        [sys.executable, "-m", SERVER_MODULE, "--config", str(prepared.path), "--check"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=CHECK_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"--check failed:\n{result.stdout}\n{result.stderr}"


def test_example_server_documents_every_key() -> None:
    """The full example shows every top-level key, each preceded by a comment."""
    example = DEPLOY / "examples" / "server.yaml"
    text = example.read_text(encoding="utf-8")
    lines = text.splitlines()
    keys = ("listen", "path", "public_host", "public_url", "ports", "state_dir", "tls",
            "clients_file", "heartbeat_interval", "heartbeat_timeout", "log_level", "clients")
    for key in keys:
        index = next((i for i, ln in enumerate(lines) if ln.startswith(f"{key}:")), None)
        assert index is not None, f"examples/server.yaml lacks {key}"
        assert index > 0 and lines[index - 1].lstrip().startswith("#"), (
            f"examples/server.yaml: {key} has no comment above it"
        )
    data = yaml.safe_load(text)
    credentials = {k for spec in data["clients"].values() for k in spec}
    assert {"public_key", "token_env", "token_file", "ports"} <= credentials
    assert "token:" in text  # the inline form is at least shown (commented out)


@pytest.mark.parametrize("example", SERVER_EXAMPLES, ids=_rel)
def test_public_url_is_accepted_by_the_client(
    example: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a relay advertises (join strings) must be an address the client takes as is."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # no default client.yaml
    prepared = _prepare_copy(example, tmp_path)
    config = load_server_config(prepared.path, prepared.env)
    assert config.public_url is not None
    settings = resolve_client_settings(server=config.public_url, token=ALPHA_TOKEN,
                                       exposes=["8888"], config_path=None, env={})
    assert urlsplit(settings.server_url).path == config.path
    assert settings.server_url.startswith("wss://")


def test_client_example_resolves(tmp_path: Path) -> None:
    prepared = _prepare_copy(DEPLOY / "examples" / "client.yaml", tmp_path)
    settings = resolve_client_settings(server=None, token=None, exposes=[],
                                       config_path=str(prepared.path), env=prepared.env)
    assert settings.server_url == prepared.data["server"]
    assert settings.server_url.startswith("wss://")
    assert [spec.target for spec in settings.exposes] == [
        "127.0.0.1:8888", "127.0.0.1:6006", "127.0.0.1:22"]
    assert settings.fingerprint == prepared.data["fingerprint"]
    assert settings.token is not None and settings.private_key is None


def test_client_example_with_a_key_resolves(tmp_path: Path) -> None:
    """The same file as ``tunnel-client join`` writes it: an ``ed25519:`` key, no token."""
    private, _ = generate_keypair()
    source = (DEPLOY / "examples" / "client.yaml").read_text(encoding="utf-8")
    text, count = re.subn(r"^token_file:.*$", f"key: {private.reveal()}", source, flags=re.M)
    assert count == 1
    path = tmp_path / "client.yaml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    settings = resolve_client_settings(server=None, token=None, exposes=[],
                                       config_path=str(path), env={})
    assert settings.private_key is not None and settings.token is None
    assert settings.fingerprint is not None


# ----------------------------------------------------------------------------- systemd


def _read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None,
                                          comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def _words(value: str) -> set[str]:
    return set(value.split())


def _exec_words(value: str) -> list[str]:
    words = shlex.split(value)
    assert words and words[0].startswith("/"), f"ExecStart needs an absolute path: {value!r}"
    return [Path(words[0]).name, *words[1:]]


def test_server_unit() -> None:
    path = SYSTEMD / "tunnel-server.service"
    unit = _read_unit(path)
    assert "network-online.target" in _words(unit["Unit"]["After"])
    assert "network-online.target" in _words(unit["Unit"]["Wants"])
    service = unit["Service"]
    assert _exec_words(service["ExecStart"]) == [
        "tunnel-server", "--config", "/etc/tunnel/server.yaml"]
    assert service["User"] == "tunnel"
    assert service["Restart"] == "always"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["LimitNOFILE"] == "65536"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert _words(service["ReadWritePaths"]) >= {"/var/lib/tunnel", "/etc/tunnel"}
    # Binding ports < 1024 is an opt-in, shown but commented out.
    assert "AmbientCapabilities" not in service
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^#\s*AmbientCapabilities=CAP_NET_BIND_SERVICE\s*$", text, re.M)
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_client_template_unit() -> None:
    path = SYSTEMD / "tunnel-client@.service"
    unit = _read_unit(path)
    assert "network-online.target" in _words(unit["Unit"]["After"])
    assert "network-online.target" in _words(unit["Unit"]["Wants"])
    service = unit["Service"]
    assert _exec_words(service["ExecStart"]) == [
        "tunnel-client", "--config", "/etc/tunnel/client-%i.yaml"]
    assert service["Restart"] == "always"
    # Flat: growing delays (RestartSteps=, RestartMaxDelaySec=) need systemd 254.
    assert service["RestartSec"] == "30"
    assert not {"RestartSteps", "RestartMaxDelaySec"} & set(service)
    # A config error (2) cannot heal by restarting; a refusal (3) can, once fixed on the relay.
    assert _words(service["RestartPreventExitStatus"]) == {"2"}
    assert unit["Unit"]["StartLimitIntervalSec"] == "0"  # never give up restarting
    text = path.read_text(encoding="utf-8").lower()
    assert "retries forever" in text or "reconnects forever" in text
    assert "exit codes" in text and "refused" in text
    # NVML (GPU telemetry) opens /dev/nvidiactl and /dev/nvidia*: nothing may hide them,
    # neither a private /dev nor a device allow-list (ProtectClock= implies one).
    assert service.get("PrivateDevices", "no") == "no"
    assert not {"DeviceAllow", "DevicePolicy", "ProtectClock"} & set(service)


#: The systemd version that introduced each unit key younger than 229 (from systemd's NEWS),
#: and the keys that are older. A key in neither fails the test below: look its version up
#: before using it, so the oldest supported systemd stays true.
KEY_SINCE = {
    "StartLimitIntervalSec": 230, "ReadWritePaths": 231, "RestrictRealtime": 231,
    "ProtectSystem": 232, "ProtectKernelTunables": 232, "ProtectKernelModules": 232,
    "ProtectControlGroups": 232, "RestrictNamespaces": 233, "LockPersonality": 235,
    "StateDirectory": 235, "StateDirectoryMode": 235, "ProtectHostname": 242,
    "RestrictSUIDSGID": 242, "ProtectKernelLogs": 244, "ProtectClock": 245,
}
KEYS_BEFORE_229 = {
    "Description", "After", "Wants", "Type", "User", "Group", "ExecStart", "ExecReload",
    "Restart", "RestartSec", "RestartPreventExitStatus", "KillSignal", "TimeoutStopSec",
    "LimitNOFILE", "WorkingDirectory", "NoNewPrivileges", "ProtectHome", "PrivateTmp",
    "PrivateDevices", "RestrictAddressFamilies", "UMask", "WantedBy",
}
#: ProtectSystem=strict came with 232 (ProtectSystem= itself is older).
OLDEST_SYSTEMD = 245
UNITS = sorted(SYSTEMD.glob("*.service"))
VERIFY_TIMEOUT = 60


def test_oldest_supported_systemd_knows_every_key() -> None:
    since: dict[str, int] = {}
    for path in UNITS:
        unit = _read_unit(path)
        for section in unit.sections():
            for key in unit[section]:
                assert key in KEY_SINCE or key in KEYS_BEFORE_229, (
                    f"{path.name}: [{section}] {key}: add the systemd version that introduced "
                    "it to KEY_SINCE (or KEYS_BEFORE_229)")
                since[key] = KEY_SINCE.get(key, 0)
    assert max(since.values()) == OLDEST_SYSTEMD, since
    for doc in (DEPLOY / "README.md", *UNITS):
        assert re.search(rf"\bsystemd(?: |: ){OLDEST_SYSTEMD} or newer\b",
                         doc.read_text(encoding="utf-8")), f"{doc.name} does not state it"


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (.ci/run installs Debian's systemd)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def _executable(name: str, tmp_path: Path) -> Path:
    """The console script next to this python (installed by pip), else a stand-in."""
    script = Path(sys.executable).parent / name
    if os.access(script, os.X_OK):
        return script
    stand_in = tmp_path / "bin" / name
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    stand_in.chmod(0o755)
    return stand_in


@pytest.mark.parametrize(("unit", "instance"), [
    ("tunnel-server.service", "tunnel-server.service"),
    ("tunnel-client@.service", "tunnel-client@gpu.service"),
])
def test_systemd_analyze_verify(unit: str, instance: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` prints nothing: no unknown key, no bad value, and the
    programs exist (the copy points ExecStart at the installed scripts, nothing else)."""
    analyze = _systemd_analyze()
    text = (SYSTEMD / unit).read_text(encoding="utf-8")
    for name in ("tunnel-server", "tunnel-client"):
        text = text.replace(f"/opt/tunnel/venv/bin/{name} ", f"{_executable(name, tmp_path)} ")
    assert "/opt/tunnel/venv/bin/tunnel-" not in "\n".join(
        ln for ln in text.splitlines() if ln.startswith("Exec"))
    copy = tmp_path / instance
    copy.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                            text=True, check=False, timeout=VERIFY_TIMEOUT, cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, (
        f"systemd-analyze verify {unit} (rc {result.returncode}):\n{output}")


# ----------------------------------------------------------------------------- docker


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions(DOCKER / "Dockerfile")
    by_name: dict[str, list[str]] = {}
    for name, args in instructions:
        by_name.setdefault(name, []).append(args)
    assert instructions[0] == ("FROM", "python:3.11-slim")
    # Installs the project from the build context (the repository root).
    for args in by_name["COPY"]:
        for source in args.split()[:-1]:
            if not source.startswith("--"):
                assert (REPO / source).exists(), f"COPY source {source} not in the repo root"
    assert any("pip install" in args for args in by_name["RUN"])
    assert any(re.search(r"--uid 10001\b", args) for args in by_name["RUN"])
    # Runs as the non-root user from the last USER on.
    user = by_name["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user in ("tunnel", "10001")
    assert instructions.index(("USER", by_name["USER"][-1])) < instructions.index(
        ("ENTRYPOINT", by_name["ENTRYPOINT"][-1]))
    assert set(json.loads(by_name["VOLUME"][-1])) == {"/config", "/state"}
    assert "7000" in by_name["EXPOSE"][-1].split()
    assert json.loads(by_name["ENTRYPOINT"][-1]) == ["tunnel-server"]
    assert json.loads(by_name["CMD"][-1]) == ["--config", "/config/server.yaml"]


def test_dockerignore_keeps_what_the_image_needs() -> None:
    # BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile for a root context.
    lines = (DOCKER / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    rules = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!tunnel/"} <= set(rules)


def test_compose(tmp_path: Path) -> None:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    relay = data["services"]["relay"]
    build = relay["build"]
    assert (DOCKER / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in relay["volumes"]}
    assert set(mounts) == {"/config", "/state"}
    named = {src for src in mounts.values() if not src.startswith((".", "/"))}
    assert named <= set(data.get("volumes") or {}), "named volumes must be declared"
    assert "7000:7000" in relay["ports"]
    assert "6000-6009:6000-6009" in relay["ports"]
    # The config dir mounted at /config holds a server.yaml that matches what is published
    # (its dashboard password file is the operator's to write: a stand-in here).
    config_dir = (DOCKER / mounts["/config"]).resolve()
    prepared = _prepare_copy(config_dir / "server.yaml", tmp_path)
    config = load_server_config(prepared.path, prepared.env)
    assert config.listen_port == 7000 and config.listen_host == "0.0.0.0"
    assert config.ports == PortSet([(6000, 6009)])
    assert str(config.state_dir) == "/state"
    # The status page listens on the container's network and is published on the host's
    # loopback only (plain HTTP: reached through ssh -L or a TLS proxy).
    assert config.dashboard is not None
    assert (config.dashboard.listen_host, config.dashboard.listen_port) == ("0.0.0.0", 7500)
    assert f"127.0.0.1:{config.dashboard.listen_port}:7500" in relay["ports"]
    assert not any(str(p).split(":")[-1] == "7500" and not str(p).startswith("127.0.0.1:")
                   for p in relay["ports"])
    assert "network_mode: host" in (DOCKER / "compose.yaml").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- nginx


def _nginx_path() -> str:
    path = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip("nginx is not installed (CI installs it: apt-get install nginx-light)")
    return path


@pytest.fixture
def nginx_bin() -> str:
    return _nginx_path()


def _nginx_build_info(nginx: str) -> str:
    result = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=False,
                            timeout=CHECK_TIMEOUT)
    return result.stdout + result.stderr


def _location_path(conf_text: str) -> str:
    match = re.search(r"^\s*location\s+(?:=\s*)?(\S+)\s*\{", conf_text, re.M)
    assert match is not None, "no location block in tunnel.conf"
    return match.group(1)


def _proxy_pass(conf_text: str) -> str:
    match = re.search(r"^\s*proxy_pass\s+(\S+);", conf_text, re.M)
    assert match is not None, "no proxy_pass in tunnel.conf"
    return match.group(1)


def render_nginx(
    prefix: Path,
    nginx: str,
    *,
    port: int,
    cert: Path,
    key: Path,
    path: str | None = None,
    upstream_port: int | None = None,
) -> Path:
    """A complete nginx.conf in ``prefix`` around deploy/nginx/tunnel.conf.

    The server block is used as shipped except for what cannot work in a test: its listen
    lines become one loopback listener on ``port``, the certificate paths point to ``cert``
    and ``key``, and optionally the location path and the upstream port are replaced. Every
    file nginx writes (pid, logs, temp dirs, lock) lives under ``prefix``.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    text = NGINX_CONF.read_text(encoding="utf-8")
    listens = list(re.finditer(r"^([ \t]*)listen\s[^;]*;[^\n]*\n", text, re.M))
    assert listens, "tunnel.conf has no listen directive"
    assert all(re.search(r"\bssl\b", m.group(0)) for m in listens), "listen without ssl"
    assert any(re.search(r"\b443\b", m.group(0)) for m in listens), "not on 443"
    first = listens[0]
    head, tail = text[: first.start()], text[first.start():]
    tail = re.sub(r"^[ \t]*listen\s[^;]*;[^\n]*\n", "", tail, flags=re.M)
    text = f"{head}{first.group(1)}listen 127.0.0.1:{port} ssl;\n{tail}"
    text, n_cert = re.subn(r"(^\s*ssl_certificate)\s+[^;]+;", rf"\g<1> {cert};", text,
                           flags=re.M)
    text, n_key = re.subn(r"(^\s*ssl_certificate_key)\s+[^;]+;", rf"\g<1> {key};", text,
                          flags=re.M)
    assert n_cert == 1 and n_key == 1, "expected one ssl_certificate and one ssl_certificate_key"
    if path is not None:
        old = _location_path(text)
        assert f"location {old} " in text
        text = text.replace(f"location {old} ", f"location {path} ", 1)
    if upstream_port is not None:
        old_pass = _proxy_pass(text)
        new_pass = re.sub(r":\d+", f":{upstream_port}", old_pass, count=1)
        text = text.replace(f"proxy_pass {old_pass};", f"proxy_pass {new_pass};", 1)
    site = prefix / "tunnel.conf"
    site.write_text(text, encoding="utf-8")

    info = _nginx_build_info(nginx)
    temp_dirs = []
    for directive, module in (("client_body_temp_path", None), ("proxy_temp_path", "proxy"),
                              ("fastcgi_temp_path", "fastcgi"), ("uwsgi_temp_path", "uwsgi"),
                              ("scgi_temp_path", "scgi")):
        if module is None or f"--without-http_{module}_module" not in info:
            temp_dirs.append(f"    {directive} {prefix / directive.removesuffix('_path')};")
    # As root, nginx would run its workers as nobody, who cannot enter the 0700 tmp_path.
    root_only = "user root root;\n" if os.geteuid() == 0 else ""
    main = prefix / "nginx.conf"
    main.write_text(
        f"{root_only}"
        "worker_processes 1;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"lock_file {prefix / 'nginx.lock'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "worker_shutdown_timeout 2s;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {prefix / 'access.log'};\n"
        + "\n".join(temp_dirs) + "\n"
        f"    include {site};\n"
        "}\n",
        encoding="utf-8",
    )
    return main


def _nginx_args(nginx: str, conf: Path) -> list[str]:
    prefix = conf.parent
    return [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = generate_self_signed(tmp_path / "tls", ["127.0.0.1"])
    return cert, key


def test_nginx_pair_is_consistent() -> None:
    """nginx's location and upstream match the relay config shipped next to it."""
    text = NGINX_CONF.read_text(encoding="utf-8")
    config = load_server_config(NGINX_DIR / "server.yaml", {})
    assert config.tls.mode == "off"
    assert config.listen_host == "127.0.0.1"
    assert _location_path(text) == config.path
    upstream = urlsplit(_proxy_pass(text))
    assert (upstream.scheme, upstream.hostname, upstream.port, upstream.path) == (
        "http", config.listen_host, config.listen_port, "")
    assert config.public_url is not None and urlsplit(config.public_url).path == config.path
    for directive in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                      'proxy_set_header Connection "upgrade";', "proxy_set_header Host $host;",
                      "proxy_read_timeout 3600s;", "proxy_send_timeout 3600s;",
                      "proxy_buffering off;", "ssl_protocols TLSv1.2 TLSv1.3;"):
        assert re.search(r"\s+".join(map(re.escape, directive.split())), text), directive


def test_nginx_accepts_server_block(tmp_path: Path, nginx_bin: str) -> None:
    cert, key = _self_signed(tmp_path)
    (port,) = free_ports(1)
    conf = render_nginx(tmp_path / "nginx", nginx_bin, port=port, cert=cert, key=key)
    result = subprocess.run([*_nginx_args(nginx_bin, conf), "-t"], capture_output=True,
                            text=True, check=False, timeout=CHECK_TIMEOUT)
    assert result.returncode == 0, f"nginx -t failed:\n{result.stdout}\n{result.stderr}"
    assert "test is successful" in result.stderr


class Nginx:
    """A foreground nginx master started by this test; stopped by its pid."""

    def __init__(self, process: asyncio.subprocess.Process, prefix: Path) -> None:
        self.process = process
        self.prefix = prefix

    def log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    async def wait_ready(self, port: int, timeout: float = NGINX_READY_TIMEOUT) -> None:
        """nginx prints nothing when ready: poll its port, bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / POLL_INTERVAL) + 1):
            if self.process.returncode is not None:
                break
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), POLL_INTERVAL * 20)
            except (OSError, TimeoutError):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(POLL_INTERVAL)
                continue
            await close_writer(writer)
            return
        raise AssertionError(f"nginx (rc={self.process.returncode}) not accepting on port "
                             f"{port} within {timeout} s\n{self.log()}")

    async def stop(self) -> None:
        """Graceful SIGQUIT, then SIGKILL if it lingers."""
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            if self.process.returncode is not None:
                return
            self.process.send_signal(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), NGINX_STOP_TIMEOUT)


StartNginx = Callable[[Path], Awaitable[Nginx]]


@pytest.fixture
async def run_nginx(nginx_bin: str) -> AsyncIterator[StartNginx]:
    started: list[Nginx] = []

    async def start(conf: Path) -> Nginx:
        with open(conf.parent / "nginx.stderr", "wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *_nginx_args(nginx_bin, conf), "-g", "daemon off;",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr)
        nginx = Nginx(process, conf.parent)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        await nginx.stop()


async def _start_client(tmp_path: Path, args: list[str]) -> Proc:
    """A client that cannot see the user's ~/.config/tunnel/client.yaml (read without
    --config), so the test runs the same on a developer's machine as in CI."""
    return await start_proc("tunnel-client", CLIENT_MODULE, args,
                            env={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})


async def _relay_behind_nginx(
    tmp_path: Path, nginx_bin: str, run_nginx: StartNginx, path: str | None
) -> tuple[Proc, int, int, Path]:
    """A relay (tls: off, loopback) behind nginx (TLS); returns (relay, nginx port,
    public port, nginx certificate). ``path`` None keeps the shipped location."""
    cert, key = _self_signed(tmp_path)
    link_path = path or _location_path(NGINX_CONF.read_text(encoding="utf-8"))
    (public_port,) = free_ports(1)
    relay, relay_url = await start_server(
        tmp_path, server_config(tmp_path, [public_port], path=link_path))
    assert urlsplit(relay_url).path == link_path
    (nginx_port,) = free_ports(1)
    conf = render_nginx(tmp_path / "nginx", nginx_bin, port=nginx_port, cert=cert, key=key,
                        path=path, upstream_port=url_port(relay_url))
    nginx = await run_nginx(conf)
    await nginx.wait_ready(nginx_port)
    return relay, nginx_port, public_port, cert


@pytest.mark.parametrize("path", [None, LINK_PATH], ids=["shipped-path", "custom-path"])
async def test_link_through_nginx_with_tls(
    tmp_path: Path, nginx_bin: str, run_nginx: StartNginx, path: str | None
) -> None:
    """Client --wss, pinned--> nginx (TLS) --ws--> relay (tls: off, loopback) --> echo."""
    relay, nginx_port, public_port, cert = await _relay_behind_nginx(
        tmp_path, nginx_bin, run_nginx, path)
    link_path = path or _location_path(NGINX_CONF.read_text(encoding="utf-8"))
    echo = EchoService()
    await echo.start()
    client = await _start_client(tmp_path, [
        "--server", f"wss://127.0.0.1:{nginx_port}{link_path}",
        "--fingerprint", cert_file_fingerprint(cert),
        "--token", ALPHA_TOKEN,
        "--expose", f"{echo.target}:fixed-{public_port}",
    ])
    port = await wait_tunnel(client, echo.target, mode="fixed")
    assert port == public_port
    await echo_check(port, 4 * MIB, seed=0xD3)
    await echo_check(port, 256 * 1024, seed=0xD4)  # a second stream over the same link

    assert await client.terminate() == 0, client.describe()
    assert relay.returncode is None


async def test_wrong_pin_through_nginx_exits_refused(
    tmp_path: Path, nginx_bin: str, run_nginx: StartNginx
) -> None:
    """Another key behind nginx: the client sends nothing and exits 3, which the systemd
    unit restarts (harmless: the pin is checked again before any credential is sent)."""
    _, nginx_port, public_port, _ = await _relay_behind_nginx(
        tmp_path, nginx_bin, run_nginx, LINK_PATH)
    _, other_cert = generate_self_signed(tmp_path / "other-tls", ["127.0.0.1"])
    client = await _start_client(tmp_path, [
        "--server", f"wss://127.0.0.1:{nginx_port}{LINK_PATH}",
        "--fingerprint", cert_file_fingerprint(other_cert),
        "--token", ALPHA_TOKEN,
        "--expose", f"8888:fixed-{public_port}",
    ])
    assert await client.wait_exit() == EXIT_REFUSED, client.describe()
    assert "fingerprint" in client.stderr.lower()
    assert not client.stdout_lines


async def test_untrusted_certificate_through_nginx_exits_3(
    tmp_path: Path, nginx_bin: str, run_nginx: StartNginx
) -> None:
    """No pin and a certificate no CA vouches for: refused (exit 3), which the client unit
    restarts, so a certificate renewed on the relay heals the box without a visit."""
    _, nginx_port, public_port, _ = await _relay_behind_nginx(
        tmp_path, nginx_bin, run_nginx, LINK_PATH)
    client = await _start_client(tmp_path, [
        "--server", f"wss://127.0.0.1:{nginx_port}{LINK_PATH}",
        "--token", ALPHA_TOKEN,
        "--expose", f"8888:fixed-{public_port}",
    ])
    assert await client.wait_exit() == EXIT_REFUSED, client.describe()
    assert "not trusted" in client.stderr
    assert not client.stdout_lines


async def test_client_config_error_exits_2(tmp_path: Path) -> None:
    """The premise of RestartPreventExitStatus=2 in tunnel-client@.service."""
    source = (DEPLOY / "examples" / "client.yaml").read_text(encoding="utf-8")
    text, count = re.subn(r"^fingerprint:.*$", "fingerprint: sha256:not-hex", source,
                          flags=re.M)
    assert count == 1
    path = tmp_path / "client-broken.yaml"
    path.write_text(text, encoding="utf-8")
    client = await _start_client(tmp_path, ["--config", str(path)])
    assert await client.wait_exit() == EXIT_CONFIG, client.describe()


async def test_sighup_reloads_clients(tmp_path: Path) -> None:
    """The premise of ExecReload=/bin/kill -HUP $MAINPID: the relay survives SIGHUP and
    applies the clients file (as add-client writes it) without a restart."""
    alpha_port, beta_port = free_ports(2)
    config = server_config(tmp_path, [alpha_port, beta_port],
                           clients={"alpha": {"token": ALPHA_TOKEN}},
                           clients_file="clients.yaml")
    relay, url = await start_server(tmp_path, config)
    echo = EchoService()
    await echo.start()
    # A served login also proves the relay's loop is past installing its signal handlers.
    alpha = await _start_client(tmp_path, [
        "--server", url, "--token", ALPHA_TOKEN,
        "--expose", f"{echo.target}:fixed-{alpha_port}",
    ])
    assert await wait_tunnel(alpha, echo.target, mode="fixed") == alpha_port

    since = len(relay.stderr_lines)
    relay.send_signal(signal.SIGHUP)
    await relay.wait_for_line(r"configuration reloaded: 1 clients", since=since,
                              stream="stderr")
    assert relay.returncode is None
    await echo_check(alpha_port, 256 * 1024, seed=0xD5)  # an unchanged client is untouched

    (tmp_path / "clients.yaml").write_text(
        yaml.safe_dump({"beta": {"token": BETA_TOKEN}}), encoding="utf-8")
    since = len(relay.stderr_lines)
    relay.send_signal(signal.SIGHUP)
    await relay.wait_for_line(r"configuration reloaded: 2 clients", since=since,
                              stream="stderr")
    beta = await _start_client(tmp_path, [
        "--server", url, "--token", BETA_TOKEN,
        "--expose", f"{echo.target}:fixed-{beta_port}",
    ])
    assert await wait_tunnel(beta, echo.target, mode="fixed") == beta_port
    await echo_check(beta_port, 256 * 1024, seed=0xD6)
