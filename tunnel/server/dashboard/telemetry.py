"""Whitelisting of what clients report about themselves, before it leaves the relay.

A client's telemetry (host name, OS, CPU/memory, GPUs) comes from a machine the relay does
not control. Only known keys survive, strings are cut to a bounded length with control
characters removed, and numbers must be finite (JSON has no NaN, and the metrics would be
garbage). The dashboard page still renders every string as text, never as HTML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_GPUS", "MAX_TEXT", "clean_gpu", "clean_number", "clean_telemetry",
           "clean_text"]

MAX_TEXT = 256
MAX_GPUS = 64
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_TEXT_KEYS = ("hostname", "os", "gpu_status")
_NUMBER_KEYS = ("cpu_percent", "memory_used", "memory_total")
_GPU_NUMBER_KEYS = ("utilization", "memory_used", "memory_total", "temperature", "power_watts")


def clean_text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return _CONTROL_RE.sub("", value[:MAX_TEXT])


def clean_number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def clean_gpu(gpu: object) -> dict[str, Any] | None:
    if not isinstance(gpu, Mapping):
        return None
    index = gpu.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 1 << 16:
        return None
    cleaned: dict[str, Any] = {"index": index, "name": clean_text(gpu.get("name"))}
    for key in _GPU_NUMBER_KEYS:
        cleaned[key] = clean_number(gpu.get(key))
    return cleaned


def clean_telemetry(telemetry: Mapping[str, object] | None,
                    at: float | None) -> dict[str, Any] | None:
    """The telemetry as the API shows it, plus ``at`` (when it was received)."""
    if telemetry is None:
        return None
    cleaned: dict[str, Any] = {"at": at}
    for key in _TEXT_KEYS:
        cleaned[key] = clean_text(telemetry.get(key))
    for key in _NUMBER_KEYS:
        cleaned[key] = clean_number(telemetry.get(key))
    raw_gpus = telemetry.get("gpus")
    gpus = raw_gpus[:MAX_GPUS] if isinstance(raw_gpus, list) else []
    cleaned["gpus"] = [g for g in map(clean_gpu, gpus) if g is not None]
    return cleaned
