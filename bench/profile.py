"""``python -m bench.profile``: CPU per GiB of chosen contenders on one bulk connection, and
optionally a py-spy profile of the relay and the client while they move it.

Why: on a shared 2-core machine throughput swings with the neighbours' load; the CPU the
tunnel's own processes spend per GiB moves much less, so comparisons of the data path are
made on it, alternating contenders within each repetition. ``--py-spy DIR`` writes each
process's collapsed stacks and prints the functions with the most samples (self and
inclusive).

    .venv/bin/python -m bench.profile --contenders tunnel-plain,tunnel-tls --reps 5
    .venv/bin/python -m bench.profile --contenders tunnel-plain --py-spy /tmp/prof
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import contenders as ct
from bench import loadgen
from bench.procs import Proc, cpu_seconds
from bench.run import DEFAULT_FRP, ROOT

GIB = 1 << 30
MIB = 1 << 20


def _transfer(port_up: int, port_down: int, size: int, seed: int) -> float:
    """Upload then download ``size`` bytes on one connection each; total seconds."""
    took = 0.0
    for port, direction in ((port_up, "up"), (port_down, "down")):
        result = loadgen.bulk(port, 1, size, direction, seed, 300.0)
        if result["errors"]:
            raise RuntimeError(f"{direction}: {result['errors']}")
        took += result["seconds"]
    return took


def _py_spy(pid: int, out: Path, duration: int, native: bool) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    extra = ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate",
                             "250" if native else "500", "--duration", str(duration), *extra,
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize(path: Path, top: int = 15) -> str:
    """Top functions of a py-spy raw (collapsed) file by self and inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        frames = frames[1:] if frames and frames[0].startswith("process ") else frames
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            incl[frame] += count
    lines = [f"{path.name}: {total} samples", "  self:"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in incl.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--contenders", default="tunnel-plain,tunnel-tls")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--py-spy", type=Path, default=None, help="write py-spy profiles here")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    args = p.parse_args()
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    size = args.size_mib * MIB
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-profile-"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    target = Proc("target", [sys.executable, "-m", "bench.target"], workdir, env=env,
                  stdin_pipe=True)
    live: list[ct.Contender] = []
    try:
        match = target.wait_line(r"^bench-target: echo=(\d+) sink=(\d+) source=(\d+)$")
        ports = dict(zip(ct.SERVICES, map(int, match.groups()), strict=True))
        for name in names:
            contender = ct.make(name, workdir / name, DEFAULT_FRP)
            contender.start(ports)
            live.append(contender)
        loadgen.prepare([(7, size)])
        cpu: dict[str, list[float]] = {n: [] for n in names}
        rate: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(args.reps):
            for contender in live if rep % 2 == 0 else live[::-1]:
                spies = []
                if args.py_spy is not None and rep == args.reps - 1:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    spies = [_py_spy(proc.pid, args.py_spy / f"{proc.name}.txt", 600, args.native)
                             for proc in contender.procs]
                    time.sleep(1.0)
                before = cpu_seconds(contender.pids)
                seconds = _transfer(contender.ports["sink"], contender.ports["source"], size, 7)
                used = cpu_seconds(contender.pids) - before
                for spy in spies:
                    spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                    spy.wait(30)
                cpu[contender.name].append(used / (2 * size / GIB))
                rate[contender.name].append(2 * size / seconds / 1e6)
                print(f"rep {rep + 1} {contender.name}: {cpu[contender.name][-1]:.2f} CPU-s/GiB,"
                      f" {rate[contender.name][-1]:.0f} MB/s", flush=True)
        print("\nmedians (upload + download, 1 connection):")
        for name in names:
            print(f"  {name:18s} {statistics.median(cpu[name]):.2f} CPU-s/GiB  "
                  f"{statistics.median(rate[name]):.0f} MB/s")
        if args.py_spy is not None:
            for path in sorted(args.py_spy.glob("*.txt")):
                print(summarize(path))
    finally:
        for contender in live:
            contender.stop()
        target.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
