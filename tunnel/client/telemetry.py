"""Host telemetry the client sends to the relay so its status page can show how the box is doing.

A provider's ``sample()`` returns one message body (the caller adds ``"type": "telemetry"``)::

    {"hostname", "os", "cpu_percent", "memory_used", "memory_total", "gpus": [...], "gpu_status"}

Telemetry is cosmetic: nothing here may ever take the tunnel down, so every reading that fails
becomes ``None`` (or an empty GPU list with a reason in ``gpu_status``) instead of an exception.
Every provider's output goes through :func:`normalize`, the one place the message shape is
enforced, so the relay can trust types and sizes whatever the host (or a test file) produced.

Readings come from ``/proc`` (no psutil) and from NVML through ``pynvml``, which is optional and
loaded lazily. NVML calls can block for milliseconds, so callers on an event loop should run
``sample()`` in a thread (``asyncio.to_thread``); a provider is meant for one caller at a time.

Run ``python -m tunnel.client.telemetry`` on a GPU box to print one real sample.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import platform
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from tunnel.common.proto.telemetry import (
    MAX_GPUS,
    MAX_TEXT,
    PERCENT_MAX,
    TELEMETRY_KEYS,
    as_number,
    normalize,
)

__all__ = [
    "MAX_GPUS",
    "MAX_TEXT",
    "NVML_RETRY_SECONDS",
    "TELEMETRY_FILE_ENV",
    "TELEMETRY_INTERVAL",
    "TELEMETRY_INTERVAL_ENV",
    "TELEMETRY_KEYS",
    "FileTelemetry",
    "GpuSource",
    "NvmlGpus",
    "SystemTelemetry",
    "TelemetryProvider",
    "normalize",
    "telemetry_interval",
    "telemetry_provider",
]

log = logging.getLogger("tunnel.client.telemetry")

TELEMETRY_INTERVAL = 5.0
"""Seconds between samples: fresh enough for a status page, negligible load on host and relay."""
TELEMETRY_INTERVAL_ENV = "TUNNEL_TELEMETRY_INTERVAL"
MIN_INTERVAL = 0.2
"""Below this the samples would cost more than they tell (and CPU deltas get too coarse)."""
MAX_INTERVAL = 3600.0
TELEMETRY_FILE_ENV = "TUNNEL_TELEMETRY_FILE"
MAX_FILE_BYTES = 1 << 20
"""A telemetry file larger than this is treated as unreadable rather than parsed."""
NVML_RETRY_SECONDS = 60.0
"""How often a failed NVML start is retried, so a driver loaded after the client is picked up."""
MAX_REASON = 80
"""Longest error text put into ``gpu_status``; enough to recognise the error, short on a page."""
MW_PER_WATT = 1000.0
KIB = 1024

GPU_KEYS = ("index", "name", "utilization", "memory_used", "memory_total", "temperature",
            "power_watts")

STATUS_OK = "ok"
STATUS_NO_GPU = "no GPU"
STATUS_FILE_UNREADABLE = "telemetry file unreadable"

PROC_STAT = "/proc/stat"
PROC_MEMINFO = "/proc/meminfo"
_CPU_IDLE_FIELDS = (3, 4)
"""``idle`` and ``iowait`` among the ``cpu`` line's counters: time the CPUs were not busy."""
_CPU_COUNTED_FIELDS = 8
"""user..steal; ``guest`` and ``guest_nice`` are already included in ``user``/``nice``."""

Clock = Callable[[], float]
TextReader = Callable[[str], str]
GpuSample = tuple[list[dict[str, object]], str]
_T = TypeVar("_T")


class TelemetryProvider(Protocol):
    """Anything that can produce a telemetry message body; tests feed known values through it."""

    def sample(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class GpuSource(Protocol):
    """Where :class:`SystemTelemetry` gets its GPU list and status; injectable for tests."""

    def sample(self) -> GpuSample: ...

    def close(self) -> None: ...


# --- NVML ---------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    """One line of at most ``MAX_REASON`` characters naming the error, for ``gpu_status``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:MAX_REASON]


def _field(struct: object, name: str) -> object:
    """A field of an NVML result struct, typed as unknown until ``normalize`` checks it."""
    value: object = getattr(struct, name)
    return value


class _Nvml:
    """Typed face over the ``pynvml`` module (or a test's fake with the same functions).

    pynvml ships no type stubs; keeping every untyped call in here keeps the rest checked.
    """

    def __init__(self, module: object) -> None:
        self._module = module

    def _call(self, name: str, *args: object, **kwargs: object) -> object:
        result: object = getattr(self._module, name)(*args, **kwargs)
        return result

    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def device_count(self) -> int:
        count = self._call("nvmlDeviceGetCount")
        if not isinstance(count, int):
            raise TypeError(f"device count is {type(count).__name__}")
        return count

    def handle(self, index: int) -> object:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def name(self, handle: object) -> str:
        name = self._call("nvmlDeviceGetName", handle)
        if isinstance(name, bytes):  # pynvml before 11.5 returned bytes
            return name.decode("utf-8", "replace")
        return str(name)

    def utilization(self, handle: object) -> object:
        return _field(self._call("nvmlDeviceGetUtilizationRates", handle), "gpu")

    def memory(self, handle: object) -> tuple[object, object]:
        """``(used, total)`` bytes, ``used`` counted as ``nvidia-smi`` counts it.

        NVML's first memory call counts the driver's own reservation as used (about 600 MiB
        on an idle H200 whose ``nvidia-smi`` says 0 MiB); its ``_v2`` form reports that
        reservation apart. A researcher compares the page with ``nvidia-smi``, so v2 is asked
        first, and v1 kept for bindings and drivers without it.
        """
        version = getattr(self._module, "nvmlMemory_v2", None)
        if version is not None:
            try:
                info = self._call("nvmlDeviceGetMemoryInfo", handle, version=version)
                return _field(info, "used"), _field(info, "total")
            except Exception:  # e.g. NVMLError_FunctionNotFound on drivers before 510
                pass
        info = self._call("nvmlDeviceGetMemoryInfo", handle)
        return _field(info, "used"), _field(info, "total")

    def temperature(self, handle: object) -> object:
        sensor = getattr(self._module, "NVML_TEMPERATURE_GPU", 0)
        return self._call("nvmlDeviceGetTemperature", handle, sensor)

    def power_watts(self, handle: object) -> float | None:
        milliwatts = as_number(self._call("nvmlDeviceGetPowerUsage", handle))
        return None if milliwatts is None else milliwatts / MW_PER_WATT


def _attempt(read: Callable[[], _T]) -> _T | None:
    """One optional reading: any failure (typically NVMLError_NotSupported) means "unknown".

    Broad on purpose: pynvml raises its own errors, but old bindings or odd drivers can raise
    anything, and a missing number must never cost the rest of the sample.
    """
    try:
        return read()
    except Exception:
        return None


def _load_pynvml() -> object:
    return importlib.import_module("pynvml")


class NvmlGpus:
    """GPU readings through NVML, started lazily and retried while it is unavailable.

    ``sample()`` returns ``(gpus, gpu_status)`` and never raises. Without pynvml or a driver the
    list is empty and the status says ``no GPU`` (with NVML's reason); a start that failed is
    retried at most every ``NVML_RETRY_SECONDS``, so a driver loaded later is picked up.
    """

    def __init__(self, nvml: object | None = None, *, clock: Clock = time.monotonic) -> None:
        """``nvml`` is the pynvml module or a fake of it; ``None`` imports pynvml on first use."""
        self._module = nvml
        self._clock = clock
        self._api: _Nvml | None = None
        self._retry_at: float | None = None
        self._unavailable = STATUS_NO_GPU

    def sample(self) -> GpuSample:
        api = self._started()
        if api is None:
            return [], self._unavailable
        try:
            gpus = [self._device(api, index) for index in range(api.device_count())]
        except Exception as exc:  # the whole list failed, e.g. the driver went away
            return [], f"NVML error: {_short(exc)}"
        return gpus, STATUS_OK if gpus else STATUS_NO_GPU

    def close(self) -> None:
        """Shut NVML down if it was started; a later ``sample()`` starts it again."""
        api, self._api = self._api, None
        if api is not None:
            _attempt(api.shutdown)

    def _started(self) -> _Nvml | None:
        """The started NVML, starting it if it is not and the retry delay has passed."""
        if self._api is not None:
            return self._api
        now = self._clock()
        if self._retry_at is not None and now < self._retry_at:
            return None
        try:
            api = _Nvml(self._module if self._module is not None else _load_pynvml())
            api.init()
        except Exception as exc:
            self._retry_at = now + NVML_RETRY_SECONDS
            self._unavailable = f"{STATUS_NO_GPU} (NVML: {_short(exc)})"
            return None
        self._api, self._retry_at = api, None
        return api

    @staticmethod
    def _device(api: _Nvml, index: int) -> dict[str, object]:
        """One GPU; the handle must work, each reading after it may fail on its own."""
        handle = api.handle(index)
        used, total = _attempt(lambda: api.memory(handle)) or (None, None)
        return {
            "index": index,
            "name": _attempt(lambda: api.name(handle)),
            "utilization": _attempt(lambda: api.utilization(handle)),
            "memory_used": used,
            "memory_total": total,
            "temperature": _attempt(lambda: api.temperature(handle)),
            "power_watts": _attempt(lambda: api.power_watts(handle)),
        }


# --- /proc --------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="ascii", errors="replace")


def cpu_times(stat: str) -> tuple[int, int] | None:
    """``(busy, total)`` jiffies from ``/proc/stat`` text, or ``None`` if it cannot be read."""
    for line in stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            try:
                counters = [int(field) for field in fields[1:_CPU_COUNTED_FIELDS + 1]]
            except ValueError:
                return None
            if len(counters) <= max(_CPU_IDLE_FIELDS):
                return None
            total = sum(counters)
            return total - sum(counters[i] for i in _CPU_IDLE_FIELDS), total
    return None


def memory_usage(meminfo: str) -> tuple[int | None, int | None]:
    """``(used, total)`` bytes from ``/proc/meminfo``: used is what is not available to programs.

    ``MemAvailable`` (rather than ``MemFree``) counts reclaimable cache as free, which is what
    "how full is this box" means to someone deciding whether a job fits.
    """
    values: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * KIB
    total = values.get("MemTotal")
    available = values.get("MemAvailable")
    if total is None or available is None:
        return None, total
    return max(total - available, 0), total


class SystemTelemetry:
    """Readings of the real host: ``/proc`` for CPU and memory, NVML for GPUs.

    CPU use is the busy share of the jiffies elapsed since the previous sample, so the first
    sample reports ``None``; later ones average over the sending interval, as a page wants.
    """

    def __init__(self, *, read_text: TextReader = _read_text, gpus: GpuSource | None = None,
                 hostname: Callable[[], str] = socket.gethostname) -> None:
        self._read_text = read_text
        self._gpus: GpuSource = gpus if gpus is not None else NvmlGpus()
        self._hostname = hostname
        self._os = f"{platform.system()} {platform.release()} {platform.machine()}"
        self._last_cpu: tuple[int, int] | None = None

    def sample(self) -> dict[str, object]:
        used, total = self._memory()
        gpus, gpu_status = self._gpus.sample()
        return normalize({
            "hostname": _attempt(self._hostname),
            "os": self._os,
            "cpu_percent": self._cpu_percent(),
            "memory_used": used,
            "memory_total": total,
            "gpus": gpus,
            "gpu_status": gpu_status,
        })

    def close(self) -> None:
        self._gpus.close()

    def _read(self, path: str) -> str:
        """The file's text, or ``""`` where it cannot be read (not Linux, no /proc mounted)."""
        try:
            return self._read_text(path)
        except (OSError, ValueError):
            return ""

    def _memory(self) -> tuple[int | None, int | None]:
        return memory_usage(self._read(PROC_MEMINFO))

    def _cpu_percent(self) -> float | None:
        now = cpu_times(self._read(PROC_STAT))
        previous, self._last_cpu = self._last_cpu, now
        if now is None or previous is None:
            return None
        busy, total = now[0] - previous[0], now[1] - previous[1]
        if total <= 0 or busy < 0:  # no tick elapsed, or counters reset
            return None
        return min(busy / total * PERCENT_MAX, PERCENT_MAX)


# --- file provider and selection ----------------------------------------------------------


class FileTelemetry:
    """Telemetry read from a JSON file on every sample, for tests and demos on any machine.

    Re-reading each time lets a test (or a person) change the values while the client runs.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)

    def sample(self) -> dict[str, object]:
        raw = self._load()
        return normalize(raw if raw is not None else {"gpu_status": STATUS_FILE_UNREADABLE})

    def close(self) -> None:
        """Nothing is held open between samples."""

    def _load(self) -> Mapping[str, object] | None:
        try:
            with self._path.open("rb") as file:
                data = file.read(MAX_FILE_BYTES + 1)
            if len(data) > MAX_FILE_BYTES:
                return None
            raw: object = json.loads(data)
        except (OSError, ValueError, RecursionError):
            return None
        return raw if isinstance(raw, dict) else None


def telemetry_provider(env: Mapping[str, str]) -> TelemetryProvider:
    """A file provider when ``TUNNEL_TELEMETRY_FILE`` is set, else the real host."""
    path = env.get(TELEMETRY_FILE_ENV, "").strip()
    return FileTelemetry(path) if path else SystemTelemetry()


def telemetry_interval(env: Mapping[str, str]) -> float:
    """Seconds between samples from ``TUNNEL_TELEMETRY_INTERVAL``, clamped to a sane range.

    A bad value falls back to the default with a warning rather than stopping the client:
    the tunnel matters more than its status page.
    """
    text = env.get(TELEMETRY_INTERVAL_ENV, "").strip()
    if not text:
        return TELEMETRY_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:  # also catches NaN
        log.warning("%s=%r is not a number of seconds > 0; using %s",
                    TELEMETRY_INTERVAL_ENV, text[:MAX_REASON], TELEMETRY_INTERVAL)
        return TELEMETRY_INTERVAL
    return min(max(value, MIN_INTERVAL), MAX_INTERVAL)


def _main() -> None:
    """Print one real sample; two reads a second apart so ``cpu_percent`` has a value."""
    telemetry = SystemTelemetry()
    try:
        telemetry.sample()
        time.sleep(1.0)
        print(json.dumps(telemetry.sample()))
    finally:
        telemetry.close()


if __name__ == "__main__":
    _main()
