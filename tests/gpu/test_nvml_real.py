"""GPU telemetry against a real NVIDIA GPU: NVML through ``nvidia-ml-py``, no fake.

Every other telemetry test feeds known values (a fake ``pynvml``, or a telemetry file); these
check that the readings a researcher sees on the status page are the GPU's own. They skip
where NVML finds no GPU (CI has none) and run on a GPU box with ``pytest -m gpu tests/gpu``.

The cross-check is ``nvidia-smi`` (a separate NVML client, so the two must agree), and a load
that the test itself puts on the GPU with PyTorch (where installed): memory the load allocates
and the utilisation it causes must show up in the samples, so a reading stuck at a constant
(or read from the wrong device) fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.children import end_by_stdin
from tests.dashboard.test_api import dashboard_config, launch, metric, new_password, poll
from tests.e2e.harness import ALPHA_TOKEN, free_ports, start_client, wait_tunnel
from tunnel.client.telemetry import STATUS_OK, NvmlGpus, SystemTelemetry

pytestmark = pytest.mark.gpu

MIB = 1024 * 1024
GIB = 1024 * MIB
LOAD_BYTES = 4 * GIB
"""What the load process allocates on GPU 0: far above any other process's churn."""
LOAD_SECONDS = 60.0
"""Upper bound on the load process's life; it stops earlier when its stdin closes."""
LOAD_READY_TIMEOUT = 120.0
"""CUDA start-up (context creation, first kernels) can take tens of seconds on a cold box."""
SAMPLES_UNDER_LOAD = 20
SAMPLE_GAP = 0.25
MEMORY_SLACK = 0.02
"""nvidia-smi and NVML's v1 memory call may round or reserve differently; 2 % is far from
any wrong-device or wrong-unit error (a factor of 1024 or more)."""
SMI_USED_SLACK_MIB = 64
"""Two reads a moment apart on a GPU nobody else uses: any difference is another process."""
BUSY_PERCENT = 50
"""A GPU running back-to-back matrix products reads near 100 %; idle reads near 0."""

LOAD_SCRIPT = """
import sys, time, torch
x = torch.empty({nbytes}, dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
deadline = time.monotonic() + {seconds}
import select
while time.monotonic() < deadline:
    for _ in range(8):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    if select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
        break
print("done", float(a[0, 0]) + float(x[0]), flush=True)
"""


def _real_gpus() -> list[dict[str, object]]:
    nvml = NvmlGpus()
    try:
        gpus, status = nvml.sample()
    finally:
        nvml.close()
    if not gpus:
        pytest.skip(f"NVML finds no GPU here: {status}")
    return gpus


def _smi() -> list[dict[str, str]]:
    """nvidia-smi's view of every GPU, or skip where the tool is missing."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed")
    fields = ["index", "name", "memory.total", "memory.used", "temperature.gpu"]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(fields, (v.strip() for v in line.split(",")), strict=True))
            for line in out.strip().splitlines()]


def _record(name: str, value: Any) -> None:
    """Keep the readings for the team: ``TUNNEL_GPU_RECORD`` names a folder to write into."""
    folder = os.environ.get("TUNNEL_GPU_RECORD")
    if folder:
        Path(folder, f"{name}.json").write_text(json.dumps(value, indent=1), encoding="utf-8")


def _number(gpu: dict[str, object], key: str) -> float:
    value = gpu[key]
    assert isinstance(value, int | float), (key, gpu)
    return float(value)


def test_nvml_matches_nvidia_smi() -> None:
    gpus = _real_gpus()
    smi = _smi()
    _record("nvml_vs_smi", {"nvml": gpus, "smi": smi})
    assert [g["index"] for g in gpus] == [int(s["index"]) for s in smi]
    for gpu, view in zip(gpus, smi, strict=True):
        assert gpu["name"] == view["name"]
        total_mib = _number(gpu, "memory_total") / MIB
        assert abs(total_mib - float(view["memory.total"])) <= MEMORY_SLACK * total_mib, gpu
        assert 0 <= _number(gpu, "memory_used") <= _number(gpu, "memory_total")
        # Used as nvidia-smi counts it (the driver's reservation apart), on a quiet GPU.
        used_mib = _number(gpu, "memory_used") / MIB
        assert abs(used_mib - float(view["memory.used"])) <= SMI_USED_SLACK_MIB, gpu
        assert 0 <= _number(gpu, "utilization") <= 100
        assert abs(_number(gpu, "temperature") - float(view["temperature.gpu"])) <= 5
        assert 0 < _number(gpu, "power_watts") < 2000


def test_system_sample_carries_the_gpus() -> None:
    """The message the client really sends: status ok and the same list NVML gives."""
    expected = _real_gpus()
    telemetry = SystemTelemetry()
    try:
        telemetry.sample()
        time.sleep(SAMPLE_GAP)  # a second sample so cpu_percent has a value
        body = telemetry.sample()
    finally:
        telemetry.close()
    _record("system_sample", body)
    assert body["gpu_status"] == STATUS_OK
    gpus = body["gpus"]
    assert isinstance(gpus, list)
    assert [(g["index"], g["name"], g["memory_total"]) for g in gpus] == [
        (g["index"], g["name"], g["memory_total"]) for g in expected]
    assert isinstance(body["cpu_percent"], float)


@contextlib.contextmanager
def _gpu_load() -> Iterator[subprocess.Popen[str]]:
    """A process keeping GPU 0 busy with ``LOAD_BYTES`` allocated, ended on exit."""
    if importlib.util.find_spec("torch") is None:  # not imported here: only the load uses it
        pytest.skip("the GPU load needs PyTorch")
    script = LOAD_SCRIPT.format(nbytes=LOAD_BYTES, seconds=LOAD_SECONDS)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    try:
        assert proc.stdout is not None
        line = _read_line(proc, LOAD_READY_TIMEOUT)
        if "ready" not in line:
            pytest.skip(f"the GPU load did not start: {line!r}")
        yield proc
    finally:
        end_by_stdin(proc, timeout=30)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The load's next output line, or ``""`` if it ends or says nothing within ``timeout``."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_samples_follow_a_real_gpu_load() -> None:
    idle = _real_gpus()[0]
    nvml = NvmlGpus()
    loaded: list[dict[str, object]] = []
    try:
        with _gpu_load():
            for _ in range(SAMPLES_UNDER_LOAD):
                time.sleep(SAMPLE_GAP)
                gpus, status = nvml.sample()
                assert status == STATUS_OK
                loaded.append(gpus[0])
        after = nvml.sample()[0][0]
    finally:
        nvml.close()
    _record("under_load", {"idle": idle, "loaded": loaded, "after": after})
    grew = max(_number(g, "memory_used") for g in loaded) - _number(idle, "memory_used")
    assert grew >= 0.9 * LOAD_BYTES, f"memory_used grew by {grew / GIB:.2f} GiB only"
    assert max(_number(g, "utilization") for g in loaded) >= BUSY_PERCENT
    assert max(_number(g, "power_watts") for g in loaded) > _number(idle, "power_watts")
    assert _number(after, "memory_used") < max(_number(g, "memory_used") for g in loaded)


async def test_status_page_shows_the_real_gpu(tmp_path: Path) -> None:
    """Real relay and client processes; the client reads NVML itself (no telemetry file)."""
    expected = _real_gpus()
    (port,) = free_ports(1)
    relay = await launch(tmp_path, dashboard_config(tmp_path, [port], new_password()))
    client = await start_client(relay.url, ALPHA_TOKEN, [f"127.0.0.1:9:fixed-{port}"],
                                env={"TUNNEL_TELEMETRY_INTERVAL": "0.5"})
    assert await wait_tunnel(client, "127.0.0.1:9", mode="fixed") == port
    alpha = await poll(lambda: relay.client("alpha"),
                       lambda c: c["telemetry"] is not None and bool(c["telemetry"]["gpus"]),
                       "alpha's GPU telemetry", timeout=30.0)
    shown = alpha["telemetry"]
    _record("status_page_client", alpha)
    assert shown["gpu_status"] == STATUS_OK
    assert [(g["name"], g["memory_total"]) for g in shown["gpus"]] == [
        (g["name"], g["memory_total"]) for g in expected]
    text = (await relay.get("/metrics")).text
    for gpu in expected:
        labels = f'client="alpha",gpu="{gpu["index"]}"'
        assert metric(text, "tunnel_client_gpu_memory_total_bytes", labels) == gpu[
            "memory_total"]
        assert 0 <= metric(text, "tunnel_client_gpu_utilization_percent", labels) <= 100
        assert metric(text, "tunnel_client_gpu_power_watts", labels) > 0
    await asyncio.sleep(0)  # the relay and client are ended by the e2e clean-up fixture
