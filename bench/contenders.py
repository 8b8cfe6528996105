"""The contenders: each exposes the target's three ports (echo, sink, source) on loopback.

``direct`` is the target itself; ``frp-tls``/``frp-plain`` run frps + frpc (TOML configs in
the run's temp dir); ``tunnel-tls``/``tunnel-plain`` run this project's relay and client as
``sys.executable -m tunnel.server.cli`` / ``-m tunnel.client.cli``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from bench.procs import Proc, echo_ok, wait_accepting
from tests.e2e.ports import free_ports

ALL = ("direct", "frp-tls", "frp-plain", "tunnel-tls", "tunnel-plain")
SERVICES = ("echo", "sink", "source")
TOKEN = "bench-token-0123456789abcdef"
START_TIMEOUT = 30.0


class Contender:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports: dict[str, int] = {}
        self.procs: list[Proc] = []
        self.info: dict[str, str] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, target: dict[str, int]) -> None:
        raise NotImplementedError

    def check_alive(self) -> str | None:
        for proc in self.procs:
            if not proc.alive():
                return (f"{self.name}: {proc.name} (pid {proc.pid}) exited with code "
                        f"{proc.popen.returncode}\n{proc.errors()}")
        return None

    def stop(self) -> None:
        for proc in reversed(self.procs):  # clients first, then servers
            proc.stop()

    def _verify(self) -> None:
        for service in SERVICES:
            wait_accepting(self.ports[service], START_TIMEOUT)
        echo_ok(self.ports["echo"], START_TIMEOUT)


class Direct(Contender):
    def start(self, target: dict[str, int]) -> None:
        self.ports = dict(target)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_")}
    return env | (extra or {})


class Tunnel(Contender):
    def __init__(self, name: str, workdir: Path, tls: bool) -> None:
        super().__init__(name, workdir)
        self.tls = tls
        self.env = _child_env()

    def start(self, target: dict[str, int]) -> None:
        public = free_ports(len(SERVICES))
        config = self.workdir / "server.yaml"
        ports = ", ".join(str(p) for p in public)
        config.write_text(
            "listen: 127.0.0.1:0\n"
            "path: /tunnel\n"
            "public_host: 127.0.0.1\n"
            f"ports: [{ports}]\n"
            f"state_dir: {self.workdir / 'state'}\n"
            f"tls: {'auto' if self.tls else 'off'}\n"
            "log_level: warning\n"
            # Idle-memory runs hold 5000 visitors on one client (the default cap is 256).
            "max_streams: 8192\n"
            # The connection-rate phases open thousands a second from 127.0.0.1; the relay's
            # default (200/s per address, against Rapid Reset floods) would refuse most.
            # frp has no such limit, so the comparison raises ours out of the way.
            "open_rate: {per_source: 1000000, per_port: 1000000}\n"
            f"clients:\n  bench:\n    token: {TOKEN}\n", encoding="utf-8")
        server = Proc(f"{self.name}-server", [sys.executable, "-m", "tunnel.server.cli",
                                              "--config", str(config)],
                      self.workdir, env=self.env)
        self.procs.append(server)
        url = server.wait_line(r"^tunnel-server: listening on (wss?://\S+)$",
                               START_TIMEOUT).group(1)
        args = [sys.executable, "-m", "tunnel.client.cli", "--server", url, "--token", TOKEN,
                "--log-level", "warning"]
        if self.tls:
            fp = server.wait_line(r"^tunnel-server: tls fingerprint (sha256:[0-9a-f]{64})$",
                                  START_TIMEOUT).group(1)
            args += ["--fingerprint", fp]
            self.info["fingerprint"] = fp
        for service, port in zip(SERVICES, public, strict=True):
            args += ["--expose", f"127.0.0.1:{target[service]}:fixed-{port}"]
        client = Proc(f"{self.name}-client", args, self.workdir, env=self.env)
        self.procs.append(client)
        for service, port in zip(SERVICES, public, strict=True):
            client.wait_line(rf"127\.0\.0\.1:{target[service]} -> \S+:{port} \(fixed\)\s*$",
                             START_TIMEOUT)
            self.ports[service] = port
        self.info["url"] = url
        self._verify()


class Frp(Contender):
    def __init__(self, name: str, workdir: Path, tls: bool, bindir: Path) -> None:
        super().__init__(name, workdir)
        self.tls = tls
        self.bindir = bindir

    def start(self, target: dict[str, int]) -> None:
        bind, *public = free_ports(1 + len(SERVICES))
        common = (f'auth.method = "token"\nauth.token = "{TOKEN}"\n'
                  'log.to = "console"\nlog.level = "warn"\n')
        frps_toml = self.workdir / "frps.toml"
        frps_toml.write_text(
            f'bindAddr = "127.0.0.1"\nbindPort = {bind}\nproxyBindAddr = "127.0.0.1"\n'
            + common, encoding="utf-8")
        frpc_toml = self.workdir / "frpc.toml"
        # frp's defaults: transport.tcpMux = true, transport.tls.enable = true.
        text = f'serverAddr = "127.0.0.1"\nserverPort = {bind}\nloginFailExit = true\n' + common
        if not self.tls:
            text += "transport.tls.enable = false\n"
        for service, port in zip(SERVICES, public, strict=True):
            text += (f'\n[[proxies]]\nname = "{service}"\ntype = "tcp"\n'
                     f'localIP = "127.0.0.1"\nlocalPort = {target[service]}\n'
                     f"remotePort = {port}\n")
        frpc_toml.write_text(text, encoding="utf-8")
        frps = Proc(f"{self.name}-frps", [str(self.bindir / "frps"), "-c", str(frps_toml)],
                    self.workdir)
        self.procs.append(frps)
        wait_accepting(bind, START_TIMEOUT)
        frpc = Proc(f"{self.name}-frpc", [str(self.bindir / "frpc"), "-c", str(frpc_toml)],
                    self.workdir)
        self.procs.append(frpc)
        self.ports = dict(zip(SERVICES, public, strict=True))
        self._verify()


def make(name: str, workdir: Path, frp_bindir: Path) -> Contender:
    if name == "direct":
        return Direct(name, workdir)
    if name.startswith("tunnel-"):
        return Tunnel(name, workdir, tls=name == "tunnel-tls")
    if name.startswith("frp-"):
        return Frp(name, workdir, tls=name == "frp-tls", bindir=frp_bindir)
    raise ValueError(f"unknown contender {name!r}; known: {', '.join(ALL)}")


def frp_version(bindir: Path) -> str | None:
    import subprocess

    try:
        out = subprocess.run([str(bindir / "frps"), "--version"], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except OSError:
        return None
    return out if re.fullmatch(r"[\w.\-]+", out) else out[:80] or None
