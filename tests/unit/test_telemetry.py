"""Client telemetry: message shape, the file and host providers, NVML through a fake pynvml."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.client import telemetry
from tunnel.client.telemetry import (
    MAX_GPUS,
    MAX_TEXT,
    NVML_RETRY_SECONDS,
    TELEMETRY_FILE_ENV,
    TELEMETRY_INTERVAL,
    TELEMETRY_INTERVAL_ENV,
    TELEMETRY_KEYS,
    FileTelemetry,
    GpuSample,
    NvmlGpus,
    SystemTelemetry,
    cpu_times,
    memory_usage,
    normalize,
    telemetry_interval,
    telemetry_provider,
)

HAS_PROC = Path("/proc/stat").exists() and Path("/proc/meminfo").exists()
MIB = 1 << 20
GIB = 1 << 30
EMPTY_GPU = {"index": 0, "name": None, "utilization": None, "memory_used": None,
             "memory_total": None, "temperature": None, "power_watts": None}


# --- normalize ----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("hostname", "gpu-box", "gpu-box"),
    ("hostname", 42, None),
    ("hostname", None, None),
    ("hostname", "h" * 10_000, "h" * MAX_TEXT),
    ("os", ["Linux"], None),
    ("gpu_status", "ok", "ok"),
    ("gpu_status", b"ok", None),
    ("cpu_percent", 12.5, 12.5),
    ("cpu_percent", 0, 0.0),
    ("cpu_percent", 100, 100.0),
    ("cpu_percent", 100.5, None),
    ("cpu_percent", -1.0, None),
    ("cpu_percent", True, None),
    ("cpu_percent", "12", None),
    ("cpu_percent", math.nan, None),
    ("cpu_percent", math.inf, None),
    ("cpu_percent", 10**400, None),
    ("memory_used", 3 * GIB, 3 * GIB),
    ("memory_used", 0, 0),
    ("memory_used", -1, None),
    ("memory_used", False, None),
    ("memory_used", 1024.0, 1024),
    ("memory_used", 1024.5, None),
    ("memory_total", -math.inf, None),
    ("memory_total", "16G", None),
    ("gpus", "none", []),
    ("gpus", {"index": 0}, []),
    ("gpus", None, []),
])
def test_normalize_field(key: str, value: object, expected: object) -> None:
    assert normalize({key: value})[key] == expected


def test_normalize_always_gives_every_key_and_drops_unknown_ones() -> None:
    out = normalize({"type": "telemetry", "secret": "x", "hostname": "h"})
    assert tuple(out) == TELEMETRY_KEYS
    assert out == {"hostname": "h", "os": None, "cpu_percent": None, "memory_used": None,
                   "memory_total": None, "gpus": [], "gpu_status": None}


def test_normalize_gpu_entry_types() -> None:
    gpu = {"index": 1, "name": "NVIDIA H100 80GB HBM3", "utilization": 87, "memory_used": 5 * GIB,
           "memory_total": 80 * GIB, "temperature": 61, "power_watts": 312.5, "uuid": "GPU-x"}
    assert normalize({"gpus": [gpu]})["gpus"] == [{
        "index": 1, "name": "NVIDIA H100 80GB HBM3", "utilization": 87.0,
        "memory_used": 5 * GIB, "memory_total": 80 * GIB, "temperature": 61.0,
        "power_watts": 312.5,
    }]


def test_normalize_gpu_entry_bad_values_become_none() -> None:
    gpu = {"index": True, "name": "n" * 1000, "utilization": 101, "memory_used": -5,
           "memory_total": "80G", "temperature": math.nan, "power_watts": -1.0}
    assert normalize({"gpus": [gpu]})["gpus"] == [{
        "index": 0, "name": "n" * MAX_TEXT, "utilization": None, "memory_used": None,
        "memory_total": None, "temperature": None, "power_watts": None,
    }]


def test_normalize_caps_gpus_and_drops_entries_that_are_not_objects() -> None:
    gpus: list[object] = ["junk", 3, None, *({"index": i} for i in range(MAX_GPUS + 10))]
    out = normalize({"gpus": gpus})["gpus"]
    assert isinstance(out, list)
    assert len(out) == MAX_GPUS
    assert [g["index"] for g in out] == list(range(MAX_GPUS))


def test_normalize_bad_index_falls_back_to_position() -> None:
    out = normalize({"gpus": [{"index": 7}, {"index": "x"}, {}]})["gpus"]
    assert out == [{**EMPTY_GPU, "index": 7}, {**EMPTY_GPU, "index": 1}, {**EMPTY_GPU, "index": 2}]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=5),
    max_leaves=15,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from([*TELEMETRY_KEYS, "other"]), _json)
       | st.fixed_dictionaries({"gpus": st.lists(st.dictionaries(
           st.sampled_from(["index", "name", "utilization", "memory_used", "power_watts"]),
           _json), max_size=MAX_GPUS + 2)}))
def test_normalize_never_raises_and_output_is_strict_json(raw: dict[str, object]) -> None:
    out = normalize(raw)
    assert tuple(out) == TELEMETRY_KEYS
    json.dumps(out, allow_nan=False)


# --- FileTelemetry ------------------------------------------------------------------------


def test_file_telemetry_rereads_the_file_on_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"hostname": "a", "cpu_percent": 10, "gpus": [{"index": 0}]}))
    provider = FileTelemetry(path)
    first = provider.sample()
    path.write_text(json.dumps({"hostname": "b", "cpu_percent": 20, "gpu_status": "ok"}))
    second = provider.sample()
    assert (first["hostname"], first["cpu_percent"], first["gpus"]) == ("a", 10.0, [EMPTY_GPU])
    assert (second["hostname"], second["cpu_percent"], second["gpus"]) == ("b", 20.0, [])
    assert second["gpu_status"] == "ok"
    provider.close()


@pytest.mark.parametrize("content", [None, b"", b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe",
                                     b"[" * 100_000])
def test_file_telemetry_survives_a_missing_or_garbage_file(tmp_path: Path,
                                                           content: bytes | None) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_bytes(content)
    out = FileTelemetry(path).sample()
    assert out["gpu_status"] == "telemetry file unreadable"
    assert tuple(out) == TELEMETRY_KEYS


def test_file_telemetry_refuses_an_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"hostname": "x" * (telemetry.MAX_FILE_BYTES + 1)}))
    assert FileTelemetry(path).sample()["gpu_status"] == "telemetry file unreadable"


def test_file_telemetry_json_nan_becomes_none(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"cpu_percent": NaN, "memory_total": Infinity}')
    out = FileTelemetry(path).sample()
    assert (out["cpu_percent"], out["memory_total"]) == (None, None)


def test_file_telemetry_recovers_when_the_file_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    provider = FileTelemetry(path)
    assert provider.sample()["gpu_status"] == "telemetry file unreadable"
    path.write_text('{"gpu_status": "ok"}')
    assert provider.sample()["gpu_status"] == "ok"


# --- /proc parsing and SystemTelemetry ----------------------------------------------------


MEMINFO = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"


def stat(user: int, system: int, idle: int, iowait: int = 0) -> str:
    """A /proc/stat with the aggregate line plus noise that must be ignored."""
    return (f"cpu  {user} 0 {system} {idle} {iowait} 0 0 0 50 50\n"
            f"cpu0 {user} 0 {system} {idle} {iowait} 0 0 0 0 0\n"
            "intr 12345 0 0\nctxt 999\n")


def test_cpu_times_counts_idle_and_iowait_as_not_busy_and_ignores_guest() -> None:
    assert cpu_times(stat(user=30, system=10, idle=50, iowait=10)) == (40, 100)


@pytest.mark.parametrize("text", ["", "intr 1 2\n", "cpu  a b c d e\n", "cpu  1 2 3\n"])
def test_cpu_times_unreadable(text: str) -> None:
    assert cpu_times(text) is None


def test_memory_usage_is_total_minus_available() -> None:
    assert memory_usage(MEMINFO) == (4_000_000 * 1024, 16_000_000 * 1024)


def test_memory_usage_without_available_reports_only_total() -> None:
    assert memory_usage("MemTotal: 2048 kB\n") == (None, 2048 * 1024)
    assert memory_usage("") == (None, None)


class FakeGpus:
    def __init__(self, result: GpuSample) -> None:
        self.result = result
        self.closed = False

    def sample(self) -> GpuSample:
        return self.result

    def close(self) -> None:
        self.closed = True


class FakeProc:
    """Serves /proc files from memory; each read of /proc/stat takes the next given text."""

    def __init__(self, stats: list[str], meminfo: str = MEMINFO) -> None:
        self._stats: Iterator[str] = iter(stats)
        self._meminfo = meminfo

    def __call__(self, path: str) -> str:
        if path == telemetry.PROC_STAT:
            return next(self._stats)
        if path == telemetry.PROC_MEMINFO:
            return self._meminfo
        raise FileNotFoundError(path)


def test_system_telemetry_with_fed_proc_values() -> None:
    gpus = FakeGpus(([{"index": 0, "name": "H100", "utilization": 50}], "ok"))
    proc = FakeProc([stat(100, 100, 800), stat(125, 125, 850), stat(125, 125, 850)])
    host = SystemTelemetry(read_text=proc, gpus=gpus, hostname=lambda: "gpu-box")
    first, second, third = host.sample(), host.sample(), host.sample()
    assert first["cpu_percent"] is None
    assert second["cpu_percent"] == 50.0  # 50 busy jiffies out of 100
    assert third["cpu_percent"] is None  # no tick elapsed: unknown, not 0 %
    assert second["hostname"] == "gpu-box"
    assert (second["memory_used"], second["memory_total"]) == (4_096_000_000, 16_384_000_000)
    assert second["gpus"] == [{**EMPTY_GPU, "name": "H100", "utilization": 50.0}]
    assert second["gpu_status"] == "ok"
    host.close()
    assert gpus.closed


def test_system_telemetry_without_proc_reports_unknowns() -> None:
    def missing(path: str) -> str:
        raise FileNotFoundError(path)

    def no_hostname() -> str:
        raise OSError("no name")

    host = SystemTelemetry(read_text=missing, gpus=FakeGpus(([], "no GPU")), hostname=no_hostname)
    host.sample()
    out = host.sample()
    assert out["hostname"] is None
    assert (out["cpu_percent"], out["memory_used"], out["memory_total"]) == (None, None, None)
    assert out["gpu_status"] == "no GPU"


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")
def test_system_telemetry_on_this_machine() -> None:
    host = SystemTelemetry()
    try:
        first = host.sample()
        assert first["cpu_percent"] is None
        assert isinstance(first["hostname"], str) and first["hostname"]
        assert isinstance(first["os"], str) and first["os"]
        total, used = first["memory_total"], first["memory_used"]
        assert isinstance(total, int) and total > 0
        assert isinstance(used, int) and 0 <= used <= total
        assert str(first["gpu_status"]).startswith(("no GPU", "ok", "NVML error"))
        json.dumps(first, allow_nan=False)
        # The second sample has a value once a clock tick has passed (about 10 ms), no sleep.
        second = host.sample()
        for _ in range(1_000_000):
            if second["cpu_percent"] is not None:
                break
            second = host.sample()
        cpu = second["cpu_percent"]
        assert isinstance(cpu, float) and 0.0 <= cpu <= 100.0
    finally:
        host.close()


# --- NvmlGpus with a fake pynvml ----------------------------------------------------------


class FakeNvmlError(Exception):
    """Stands for ``pynvml.NVMLError``, the base of every NVML failure."""


class NVMLError_NotSupported(FakeNvmlError):
    def __str__(self) -> str:
        return "Not Supported"


class NVMLError_DriverNotLoaded(FakeNvmlError):
    def __str__(self) -> str:
        return "Driver Not Loaded"


class NVMLError_GpuIsLost(FakeNvmlError):
    def __str__(self) -> str:
        return "GPU is lost"


class FakePynvml:
    """The part of pynvml that NvmlGpus uses; each device is a dict of readings.

    A reading given as an exception class is raised instead, as NVML does for unsupported ones.
    """

    NVMLError = FakeNvmlError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, devices: list[dict[str, object]],
                 init_error: FakeNvmlError | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.count_error: FakeNvmlError | None = None
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise self.count_error
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, object]:
        return self.devices[index]

    def _read(self, handle: dict[str, object], key: str) -> object:
        value = handle[key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value

    def nvmlDeviceGetName(self, handle: dict[str, object]) -> object:
        return self._read(handle, "name")

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, object]) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._read(handle, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, object]) -> SimpleNamespace:
        mem = self._read(handle, "mem")
        assert isinstance(mem, tuple)
        used, total = mem
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(self, handle: dict[str, object], sensor: int) -> object:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._read(handle, "temp")

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, object]) -> object:
        return self._read(handle, "power_mw")


class NVMLError_FunctionNotFound(FakeNvmlError):
    def __str__(self) -> str:
        return "Function Not Found"


RESERVED = 600 * MIB
"""What a driver reserves for itself: counted as used by NVML's v1 call, apart by v2."""


class FakePynvmlV2(FakePynvml):
    """Bindings with ``nvmlMemory_v2``; ``v2_error`` stands for a driver without the call."""

    nvmlMemory_v2 = 0x2000028

    def __init__(self, devices: list[dict[str, object]],
                 v2_error: FakeNvmlError | None = None) -> None:
        super().__init__(devices)
        self.v2_error = v2_error

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, object],
                                version: object = None) -> SimpleNamespace:
        if version is None:  # v1: the reservation counts as used
            v1 = super().nvmlDeviceGetMemoryInfo(handle)
            return SimpleNamespace(used=v1.used + RESERVED, total=v1.total, free=v1.free)
        assert version == self.nvmlMemory_v2
        if self.v2_error is not None:
            raise self.v2_error
        v2 = super().nvmlDeviceGetMemoryInfo(handle)
        return SimpleNamespace(used=v2.used, total=v2.total, free=v2.free, reserved=RESERVED)


def test_nvml_memory_used_is_counted_as_nvidia_smi_does() -> None:
    """v2 where the bindings have it: an idle GPU reads 0 used, not the driver's reservation."""
    gpus, _ = NvmlGpus(FakePynvmlV2([device(mem=(0, 80 * GIB))])).sample()
    assert (gpus[0]["memory_used"], gpus[0]["memory_total"]) == (0, 80 * GIB)


def test_nvml_memory_falls_back_to_v1_on_old_drivers() -> None:
    nvml = FakePynvmlV2([device(mem=(GIB, 80 * GIB))], v2_error=NVMLError_FunctionNotFound())
    gpus, status = NvmlGpus(nvml).sample()
    assert status == "ok"
    assert (gpus[0]["memory_used"], gpus[0]["memory_total"]) == (GIB + RESERVED, 80 * GIB)


def device(name: object = "NVIDIA H100 80GB HBM3", **readings: object) -> dict[str, object]:
    values: dict[str, object] = {"name": name, "util": 87, "mem": (5 * GIB, 80 * GIB),
                                 "temp": 61, "power_mw": 312_500}
    return {**values, **readings}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_nvml_no_gpu_when_init_fails() -> None:
    nvml = FakePynvml([], init_error=NVMLError_DriverNotLoaded())
    assert NvmlGpus(nvml).sample() == ([], "no GPU (NVML: Driver Not Loaded)")


def test_nvml_no_gpu_when_pynvml_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> object:
        raise ModuleNotFoundError("No module named 'pynvml'")

    monkeypatch.setattr(telemetry, "_load_pynvml", missing)
    assert NvmlGpus().sample() == ([], "no GPU (NVML: No module named 'pynvml')")


def test_nvml_two_gpus_with_values() -> None:
    nvml = FakePynvml([device(), device(name=b"NVIDIA A100", util=3, mem=(0, 40 * GIB),
                                        temp=35, power_mw=55_000)])
    gpus, status = NvmlGpus(nvml).sample()
    assert status == "ok"
    assert gpus == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization": 87, "memory_used": 5 * GIB,
         "memory_total": 80 * GIB, "temperature": 61, "power_watts": 312.5},
        {"index": 1, "name": "NVIDIA A100", "utilization": 3, "memory_used": 0,
         "memory_total": 40 * GIB, "temperature": 35, "power_watts": 55.0},
    ]
    assert nvml.init_calls == 1


def test_nvml_unsupported_reading_is_none_and_the_rest_stays() -> None:
    nvml = FakePynvml([device(power_mw=NVMLError_NotSupported)])
    [gpu], status = NvmlGpus(nvml).sample()
    assert status == "ok"
    assert gpu["power_watts"] is None
    assert (gpu["utilization"], gpu["temperature"], gpu["memory_total"]) == (87, 61, 80 * GIB)


def test_nvml_every_reading_unsupported_still_lists_the_device() -> None:
    nvml = FakePynvml([device(name=NVMLError_NotSupported, util=NVMLError_NotSupported,
                              mem=NVMLError_NotSupported, temp=NVMLError_NotSupported,
                              power_mw=NVMLError_NotSupported)])
    assert NvmlGpus(nvml).sample() == ([EMPTY_GPU], "ok")


def test_nvml_whole_failure_after_init_is_an_nvml_error() -> None:
    nvml = FakePynvml([device()])
    gpus = NvmlGpus(nvml)
    assert gpus.sample()[1] == "ok"
    nvml.count_error = NVMLError_GpuIsLost()
    assert gpus.sample() == ([], "NVML error: GPU is lost")
    assert nvml.init_calls == 1


def test_nvml_zero_devices_is_no_gpu() -> None:
    assert NvmlGpus(FakePynvml([])).sample() == ([], "no GPU")


def test_nvml_init_is_retried_at_most_every_minute() -> None:
    clock = FakeClock()
    nvml = FakePynvml([device()], init_error=NVMLError_DriverNotLoaded())
    gpus = NvmlGpus(nvml, clock=clock)
    assert gpus.sample() == ([], "no GPU (NVML: Driver Not Loaded)")
    clock.now += NVML_RETRY_SECONDS - 0.1
    assert gpus.sample() == ([], "no GPU (NVML: Driver Not Loaded)")
    assert nvml.init_calls == 1
    nvml.init_error = None  # the driver got loaded
    clock.now += 0.1
    found, status = gpus.sample()
    assert (len(found), status) == (1, "ok")
    assert nvml.init_calls == 2
    gpus.sample()
    assert nvml.init_calls == 2


def test_nvml_close_shuts_down_only_if_started() -> None:
    failing = FakePynvml([], init_error=NVMLError_DriverNotLoaded())
    unused = NvmlGpus(failing)
    unused.sample()
    unused.close()
    assert failing.shutdown_calls == 0

    nvml = FakePynvml([device()])
    gpus = NvmlGpus(nvml)
    gpus.close()
    assert nvml.shutdown_calls == 0
    gpus.sample()
    gpus.close()
    gpus.close()
    assert nvml.shutdown_calls == 1


def test_nvml_output_survives_normalize() -> None:
    nvml = FakePynvml([device(power_mw=NVMLError_NotSupported)])
    gpus, status = NvmlGpus(nvml).sample()
    out = normalize({"gpus": gpus, "gpu_status": status})
    assert out["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "utilization": 87.0,
                            "memory_used": 5 * GIB, "memory_total": 80 * GIB,
                            "temperature": 61.0, "power_watts": None}]


def test_real_nvml_on_this_machine_never_raises() -> None:
    """This machine has no GPU; on one with a driver the sample must still not raise."""
    gpus = NvmlGpus()
    try:
        found, status = gpus.sample()
    finally:
        gpus.close()
    if status.startswith("no GPU"):
        assert found == []
    else:
        assert status == "ok" and found


# --- interval and provider selection ------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (None, TELEMETRY_INTERVAL),
    ("", TELEMETRY_INTERVAL),
    ("   ", TELEMETRY_INTERVAL),
    ("2", 2.0),
    (" 2.5 ", 2.5),
    ("0.2", 0.2),
    ("0.01", 0.2),
    ("3600", 3600.0),
    ("86400", 3600.0),
    ("inf", 3600.0),
    ("1e3", 1000.0),
    ("0", TELEMETRY_INTERVAL),
    ("-5", TELEMETRY_INTERVAL),
    ("nan", TELEMETRY_INTERVAL),
    ("five", TELEMETRY_INTERVAL),
    ("5s", TELEMETRY_INTERVAL),
])
def test_telemetry_interval(value: str | None, expected: float) -> None:
    env = {} if value is None else {TELEMETRY_INTERVAL_ENV: value}
    assert telemetry_interval(env) == expected


def test_bad_telemetry_interval_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="tunnel.client.telemetry"):
        telemetry_interval({TELEMETRY_INTERVAL_ENV: "soon"})
    assert TELEMETRY_INTERVAL_ENV in caplog.text


def test_provider_is_the_file_when_set(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text('{"hostname": "demo"}')
    provider = telemetry_provider({TELEMETRY_FILE_ENV: str(path)})
    assert isinstance(provider, FileTelemetry)
    assert provider.sample()["hostname"] == "demo"


@pytest.mark.parametrize("env", [{}, {TELEMETRY_FILE_ENV: ""}, {TELEMETRY_FILE_ENV: "  "}])
def test_provider_is_the_host_otherwise(env: dict[str, str]) -> None:
    provider = telemetry_provider(env)
    try:
        assert isinstance(provider, SystemTelemetry)
    finally:
        provider.close()
