"""``python -m bench``: start the target and the contenders, drive the load, print the table."""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import contenders as ct
from bench import loadgen, report
from bench.procs import Proc, cpu_seconds, rss_kib

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_FRP = ROOT / ".cache" / "frp" / "bin"
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Plan:
    reps: int
    bulk1_size: int
    bulk64_size: int
    ping1_count: int
    ping1_seconds: float
    ping32_per_conn: int
    ping32_seconds: float
    short_seconds: float
    short_max: int
    idle_counts: tuple[int, ...]
    settle: float


QUICK = Plan(reps=3, bulk1_size=32 * MiB, bulk64_size=1 * MiB, ping1_count=2000,
             ping1_seconds=1.0, ping32_per_conn=100, ping32_seconds=2.0, short_seconds=0.5,
             short_max=20_000, idle_counts=(1000,), settle=0.2)
FULL = Plan(reps=3, bulk1_size=256 * MiB, bulk64_size=8 * MiB, ping1_count=10_000,
            ping1_seconds=3.0, ping32_per_conn=400, ping32_seconds=5.0, short_seconds=2.0,
            short_max=50_000, idle_counts=(1000, 5000), settle=0.5)


class Failure(Exception):
    """A contender lost or corrupted data, stalled or died: it does not score."""


class LoadGen:
    """The load-generator process (spawned), one job at a time, each bounded in time."""

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=loadgen.worker_main, args=(child,), daemon=True,
                                name="bench-loadgen")
        self.proc.start()
        child.close()

    def run(self, name: str, limit: float, **kwargs: Any) -> dict[str, Any]:
        self.conn.send((name, kwargs))
        if not self.conn.poll(limit):
            self.restart()
            raise Failure(f"load generator job {name} did not finish within {limit:.0f} s")
        result: dict[str, Any] = self.conn.recv()
        return result

    def restart(self) -> None:
        self.stop()
        self._start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def _raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(frp_bindir: Path, frp_available: bool) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    import tunnel

    status = _git("status", "--porcelain")
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_mib": mem,
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "python": sys.version.split()[0],
        "python_impl": platform.python_implementation(),
        "websockets": _version("websockets"),
        "uvloop": _version("uvloop"),
        "tunnel": getattr(tunnel, "__version__", None),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": len(status.splitlines()) if status is not None else None,
        "frp": ct.frp_version(frp_bindir) if frp_available else None,
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "loadavg_start": os.getloadavg(),
    }


class Bench:
    def __init__(self, names: list[str], plan: Plan, frp_bindir: Path, seed: int,
                 workdir: Path) -> None:
        self.names = names
        self.plan = plan
        self.frp_bindir = frp_bindir
        self.seed = seed
        self.workdir = workdir
        self.raw: dict[str, dict[str, list[float | None]]] = {}
        self.notes: dict[str, dict[str, str]] = {}
        self.jobs: list[dict[str, Any]] = []
        self.failed: dict[str, str] = {}
        self.live: dict[str, ct.Contender] = {}
        self.target: Proc | None = None
        self.target_ports: dict[str, int] = {}
        self.loadgen: LoadGen | None = None
        self.orders: list[list[str]] = []

    # --- setup ----------------------------------------------------------------------
    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.target = Proc("target", [sys.executable, "-m", "bench.target"], self.workdir,
                           env=env, stdin_pipe=True)
        match = self.target.wait_line(r"^bench-target: echo=(\d+) sink=(\d+) source=(\d+)$")
        self.target_ports = dict(zip(ct.SERVICES, map(int, match.groups()), strict=True))
        self.loadgen = LoadGen()
        for name in self.names:
            self._log(f"starting {name}")
            try:
                self.live[name] = self._start_contender(name, name)
            except (RuntimeError, OSError) as exc:
                self.failed[name] = f"did not start: {exc}"
                self._log(f"FAILED {name}: {self.failed[name]}")
        streams = [(0, self.plan.bulk1_size)]
        streams += [(1 + i, self.plan.bulk64_size) for i in range(64)]
        assert self.loadgen is not None
        self.loadgen.run("prepare", 300, streams=streams)

    def _start_contender(self, name: str, label: str) -> ct.Contender:
        contender = ct.make(name, self.workdir / label, self.frp_bindir)
        try:
            contender.start(self.target_ports)
        except BaseException:
            contender.stop()
            raise
        return contender

    def stop(self) -> None:
        for contender in self.live.values():
            contender.stop()
        self.live.clear()
        if self.loadgen is not None:
            self.loadgen.stop()
        if self.target is not None:
            self.target.stop()

    # --- bookkeeping ----------------------------------------------------------------
    @staticmethod
    def _log(text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def _record(self, key: str, contender: str, value: float | None) -> None:
        self.raw.setdefault(key, {}).setdefault(contender, []).append(value)

    def _note(self, key: str, contender: str, text: str) -> None:
        self.notes.setdefault(key, {})[contender] = text

    def _fail(self, contender: str, message: str) -> None:
        if contender not in self.failed:
            self.failed[contender] = message
            self._log(f"FAILED {contender}: {message}")
        dead = self.live.pop(contender, None)
        if dead is not None:
            dead.stop()

    def _job(self, rep: int, contender: ct.Contender, name: str, limit: float,
             **kwargs: Any) -> dict[str, Any]:
        assert self.loadgen is not None
        problem = contender.check_alive()
        if problem:
            raise Failure(problem)
        cpu0 = cpu_seconds(contender.pids)
        t0 = time.monotonic()
        result = self.loadgen.run(name, limit, **kwargs)
        wall = time.monotonic() - t0
        cpu1 = cpu_seconds(contender.pids)
        result = {k: v for k, v in result.items() if k != "traceback"} | {
            "job": name, "rep": rep, "contender": contender.name, "args": kwargs,
            "cpu_s": cpu1 - cpu0, "wall_s": wall}
        self.jobs.append(result)
        problem = contender.check_alive()
        if problem:
            raise Failure(problem)
        return result

    # --- workloads ------------------------------------------------------------------
    def run(self) -> None:
        rng = random.Random(self.seed)
        steps = [self._bulk1, self._bulk64, self._ping1, self._ping32, self._short_seq,
                 self._short_32, self._idle]
        for rep in range(self.plan.reps):
            order = list(self.names)
            rng.shuffle(order)
            self.orders.append(order)
            self._log(f"repetition {rep + 1}/{self.plan.reps}: order {' '.join(order)}")
            for step in steps:
                for name in order:
                    contender = self.live.get(name)
                    if contender is None:  # failed: it does not score any more
                        continue
                    try:
                        step(rep, name, contender)
                    except Failure as exc:
                        self._fail(name, str(exc))
                    time.sleep(self.plan.settle)

    def _bulk_pair(self, rep: int, c: ct.Contender, conns: int, size: int,
                   key: str) -> None:
        cpu = 0.0
        moved = 0
        for direction in ("up", "down"):
            service = "sink" if direction == "up" else "source"
            res = self._job(rep, c, "bulk", 300, port=c.ports[service], conns=conns,
                            size=size, direction=direction, seed0=0 if conns == 1 else 1,
                            timeout=240.0)
            if res.get("n_errors"):
                raise Failure(f"bulk {conns} conn {direction}load lost or corrupted data: "
                              + "; ".join(res.get("errors", [])[:3]))
            self._record(f"{key}_{direction}", c.name, res["mb_s"])
            cpu += res["cpu_s"]
            moved += res["bytes"]
        if c.pids:
            self._record(f"cpu{conns}", c.name, cpu / (moved / GiB))

    def _bulk1(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._bulk_pair(rep, c, 1, self.plan.bulk1_size, "bulk1")

    def _bulk64(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._bulk_pair(rep, c, 64, self.plan.bulk64_size, "bulk64")

    def _ping(self, rep: int, c: ct.Contender, conns: int, per_conn: int,
              seconds: float, key: str) -> None:
        res = self._job(rep, c, "pingpong", seconds + 60, port=c.ports["echo"],
                        conns=conns, per_conn=per_conn, duration=seconds)
        if res.get("n_errors") or res.get("corrupt"):
            raise Failure(f"ping-pong on {conns} connection(s): "
                          + "; ".join(res.get("errors", [])[:3]))
        self._record(f"{key}_p50", c.name, res["p50_us"])
        self._record(f"{key}_p99", c.name, res["p99_us"])

    def _ping1(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._ping(rep, c, 1, self.plan.ping1_count, self.plan.ping1_seconds, "rtt1")

    def _ping32(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._ping(rep, c, 32, self.plan.ping32_per_conn, self.plan.ping32_seconds, "rtt32")

    def _short(self, rep: int, c: ct.Contender, concurrency: int, key: str) -> None:
        res = self._job(rep, c, "shortconn", self.plan.short_seconds + 60,
                        port=c.ports["echo"], concurrency=concurrency,
                        duration=self.plan.short_seconds, max_count=self.plan.short_max)
        if res.get("n_errors") or res.get("corrupt"):
            raise Failure(f"short connections ({concurrency} concurrent): "
                          f"{res.get('n_errors')} failed of {res.get('count', 0)} ok: "
                          + "; ".join(res.get("errors", [])[:3]))
        self._record(key, c.name, res["per_s"])

    def _short_seq(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._short(rep, c, 1, "conn_seq")

    def _short_32(self, rep: int, name: str, c: ct.Contender | None) -> None:
        assert c is not None
        self._short(rep, c, 32, "conn_32")

    def _idle(self, rep: int, name: str, c: ct.Contender | None) -> None:
        """Memory per idle connection, on a fresh instance of the contender each time
        (a process that already held N connections keeps the freed memory)."""
        if name == "direct":
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        for n in self.plan.idle_counts:
            key = f"idle_{n}"
            if n + 500 > soft:
                self._note(key, name, f"skipped: RLIMIT_NOFILE {soft}")
                continue
            fresh = self._start_contender(name, f"{name}-idle{n}-rep{rep + 1}")
            try:
                before = rss_kib(fresh.pids)
                res = self._job(rep, fresh, "idle_open", 180, port=fresh.ports["echo"],
                                n=n, in_flight=64, timeout=120.0)
                time.sleep(1.0)
                after = rss_kib(fresh.pids)
                check = self.loadgen.run("idle_check", 120) if self.loadgen else {}
                self.loadgen.run("idle_close", 60) if self.loadgen else None
                res |= {"rss_before_kib": before, "rss_after_kib": after,
                        "alive_after": check.get("alive")}
                if res.get("corrupt"):
                    raise Failure(f"idle connections: {'; '.join(res['errors'][:3])}")
                held = res["held"]
                alive = check.get("alive", 0)
                if held < n or alive < held:
                    each = f", {(after - before) / held:.1f} KiB each" if held else ""
                    self._note(key, name, f"only {held}/{n} held{each}")
                    res["kib_per_held"] = (after - before) / held if held else None
                    self._log(f"{name}: only {held} of {n} idle connections opened, {alive} "
                              f"still echo: {'; '.join(res.get('errors', [])[:2])}")
                    self._record(key, name, None)
                else:
                    self._record(key, name, (after - before) / n)
            finally:
                fresh.stop()


def _write(out: Path, md: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(md + "\n", encoding="utf-8")
    (out / "latest.json").write_text(json.dumps(data, indent=1, default=str) + "\n",
                                     encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="small sizes, 1000 idle connections only; under 2 minutes")
    p.add_argument("--contenders", default=",".join(ct.ALL),
                   help=f"comma-separated subset of {','.join(ct.ALL)} (direct is always run)")
    p.add_argument("--reps", type=int, help="repetitions (default 3)")
    p.add_argument("--skip-frp", action="store_true", help="leave out frp-tls and frp-plain")
    p.add_argument("--frp-dir", type=Path, default=DEFAULT_FRP,
                   help="directory holding frps and frpc (default .cache/frp/bin)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="where latest.md and latest.json go (default bench/results)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the per-repetition contender shuffle (default: random)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    started = time.monotonic()
    plan = QUICK if args.quick else FULL
    if args.reps is not None:
        if not 1 <= args.reps <= 50:
            print("python -m bench: --reps must be 1..50", file=sys.stderr)
            return 2
        plan = Plan(**(asdict(plan) | {"reps": args.reps}))
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in ct.ALL]
    if unknown:
        print(f"python -m bench: unknown contender(s) {', '.join(unknown)}; "
              f"known: {', '.join(ct.ALL)}", file=sys.stderr)
        return 2
    if "direct" not in names:
        names.insert(0, "direct")
    names = [n for n in ct.ALL if n in names]
    frp_names = [n for n in names if n.startswith("frp-")]
    frp_available = all((args.frp_dir / b).is_file() and os.access(args.frp_dir / b, os.X_OK)
                        for b in ("frps", "frpc"))
    if frp_names and args.skip_frp:
        names = [n for n in names if n not in frp_names]
    elif frp_names and not frp_available:
        print(f"python -m bench: frp binaries not found in {args.frp_dir}: skipping "
              f"{', '.join(frp_names)} (fetch them with ../shared/bench/fetch-frp.sh "
              f"{DEFAULT_FRP.parent.relative_to(ROOT)})", file=sys.stderr)
        names = [n for n in names if n not in frp_names]
    if any(n.startswith("tunnel-") for n in names):
        try:
            import tunnel.client.cli
            import tunnel.server.cli  # noqa: F401
        except ImportError as exc:
            print(f"python -m bench: cannot import the tunnel package ({exc}); run with the "
                  "project's venv: .venv/bin/python -m bench", file=sys.stderr)
            return 2
    nofile = _raise_nofile()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    info = machine_info(args.frp_dir, frp_available and not args.skip_frp)
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    bench = Bench(names, plan, args.frp_dir, seed, workdir)
    Bench._log(f"{'quick' if args.quick else 'full'} run: {', '.join(names)}; "
               f"{plan.reps} reps; RLIMIT_NOFILE {nofile[0]}; logs in {workdir}")
    interrupted = False
    harness_error = None
    try:
        bench.start()
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        Bench._log("interrupted: stopping everything")
    except (RuntimeError, OSError, Failure) as exc:
        harness_error = f"{type(exc).__name__}: {exc}"
        Bench._log(f"harness error: {harness_error}")
    finally:
        contender_info = {n: c.info for n, c in bench.live.items()}
        bench.stop()
        if not args.keep_tmp and not bench.failed and not interrupted and not harness_error:
            shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = os.getloadavg()
    wall = time.monotonic() - started
    summary = report.summarize(bench.raw, names)
    for key in ("bulk1_up", "bulk1_down", "bulk64_up", "bulk64_down"):
        for name, values in bench.raw.get(key, {}).items():
            good = [v for v in values if v is not None]
            mid = summary["medians"][key].get(name)
            if good and mid and min(good) < mid / 2 and name not in bench.notes.get(key, {}):
                slow = sum(1 for v in good if v < mid / 2)
                bench._note(key, name, f"{slow} of {len(good)} reps slow, worst {min(good):.0f}")
    mode = "quick" if args.quick else "full"
    when = time.strftime("%Y-%m-%d %H:%M")
    md = [f"## tunnel benchmark ({mode}, medians of {plan.reps}, {when})",
          "",
          f"{info['cpu_model']}, {info['cores']} cores, {info['kernel'].split()[1]}, Python "
          f"{info['python']}, websockets {info['websockets']}, uvloop {info['uvloop']}, "
          f"frp {info['frp']}; bulk {plan.bulk1_size // MiB} MiB x1 and "
          f"{plan.bulk64_size // MiB} MiB x64 per direction; wall time {wall:.0f} s.",
          "",
          report.table(summary, names, bench.notes, bench.failed),
          "",
          "Cells: median (ratio to direct `d`, ratio to the matching frp `f`: tunnel-tls vs "
          "frp-tls, tunnel-plain vs frp-plain). MB = 10^6 bytes. Throughput is verified "
          "(SHA-256) end to end; RTT ratios are x times direct.",
          ""]
    bar = report.bar_check(summary, names)
    if bar:
        md += [bar, ""]
    if bench.failed:
        md.append("**FAILED** (did not score):")
        md += [f"- {name}: {msg.splitlines()[0] if msg else ''}"
               for name, msg in bench.failed.items()]
        md.append("")
    text = "\n".join(md)
    data = {
        "mode": mode,
        "plan": asdict(plan),
        "contenders": names,
        "contender_info": contender_info,
        "orders": bench.orders,
        "shuffle_seed": seed,
        "machine": info,
        "wall_seconds": wall,
        "raw": bench.raw,
        "medians": summary["medians"],
        "ratios": summary["ratios"],
        "notes": bench.notes,
        "failed": bench.failed,
        "jobs": bench.jobs,
    }
    _write(args.out, text, data)
    print(text)
    print(f"written: {args.out / 'latest.md'}, {args.out / 'latest.json'}")
    if harness_error:
        print(f"python -m bench: the run did not complete: {harness_error}\nlogs kept in "
              f"{workdir}", file=sys.stderr)
        return 1
    if bench.failed:
        print("FAILED: " + "; ".join(f"{n}: {m.splitlines()[0]}" for n, m in
                                     bench.failed.items()), file=sys.stderr)
        print(f"logs kept in {workdir}", file=sys.stderr)
        return 1
    return 130 if interrupted else 0

