"""The telemetry message a client sends and the relay stores: one shape, enforced here.

Both ends call :func:`normalize`: the client so it never sends garbage, the relay because
the values come from another machine and end up on a web page. Every key is always present;
a wrong type, a non-finite number or one out of range becomes ``None``; strings are cut to
``MAX_TEXT`` and ``gpus`` to ``MAX_GPUS`` entries, so a message stays small whatever it held.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["MAX_GPUS", "MAX_TEXT", "PERCENT_MAX", "TELEMETRY_KEYS", "as_count", "as_number",
           "normalize"]

MAX_GPUS = 16
MAX_TEXT = 256
PERCENT_MAX = 100.0
TELEMETRY_KEYS = ("hostname", "os", "cpu_percent", "memory_used", "memory_total", "gpus",
                  "gpu_status")


def normalize(raw: Mapping[str, object]) -> dict[str, object]:
    """Coerce ``raw`` into the outgoing message shape, whatever it holds; never raises.

    Every key is always present. A value of the wrong type (``bool`` is not a number), a
    non-finite number or one out of range becomes ``None``; strings are cut to ``MAX_TEXT``;
    ``gpus`` is always a list of at most ``MAX_GPUS`` entries; unknown keys are dropped.
    """
    return {
        "hostname": _text(raw.get("hostname")),
        "os": _text(raw.get("os")),
        "cpu_percent": _percent(raw.get("cpu_percent")),
        "memory_used": as_count(raw.get("memory_used")),
        "memory_total": as_count(raw.get("memory_total")),
        "gpus": _gpus(raw.get("gpus")),
        "gpu_status": _text(raw.get("gpu_status")),
    }


def _gpus(value: object) -> list[dict[str, object]]:
    """Entries that are not objects are dropped: there is nothing in them to show."""
    if not isinstance(value, list):
        return []
    entries = [entry for entry in value if isinstance(entry, Mapping)]
    return [_gpu(entry, position) for position, entry in enumerate(entries[:MAX_GPUS])]


def _gpu(raw: Mapping[object, object], position: int) -> dict[str, object]:
    """A bad ``index`` falls back to the list position so the page can still tell GPUs apart."""
    index = as_count(raw.get("index"))
    return {
        "index": position if index is None else index,
        "name": _text(raw.get("name")),
        "utilization": _percent(raw.get("utilization")),
        "memory_used": as_count(raw.get("memory_used")),
        "memory_total": as_count(raw.get("memory_total")),
        "temperature": as_number(raw.get("temperature")),
        "power_watts": _non_negative(raw.get("power_watts")),
    }


def _text(value: object) -> str | None:
    return value[:MAX_TEXT] if isinstance(value, str) else None


def as_number(value: object) -> float | None:
    """A finite float; ``bool`` is rejected although Python counts it as an ``int``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _non_negative(value: object) -> float | None:
    number = as_number(value)
    return number if number is not None and number >= 0 else None


def _percent(value: object) -> float | None:
    number = _non_negative(value)
    return number if number is not None and number <= PERCENT_MAX else None


def as_count(value: object) -> int | None:
    """A byte count or index: a non-negative int (an integral float, as JSON may give, is fine)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else None
    number = _non_negative(value)
    return int(number) if number is not None and number.is_integer() else None
