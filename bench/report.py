"""Medians, ratios and the Markdown table."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

FRP_PEER = {"tunnel-tls": "frp-tls", "tunnel-plain": "frp-plain"}


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int
    has_direct: bool = True


METRICS = (
    Metric("bulk1_up", "bulk, 1 connection, upload", "MB/s", True, 0),
    Metric("bulk1_down", "bulk, 1 connection, download", "MB/s", True, 0),
    Metric("bulk64_up", "bulk, 64 connections, upload", "MB/s", True, 0),
    Metric("bulk64_down", "bulk, 64 connections, download", "MB/s", True, 0),
    Metric("rtt1_p50", "ping-pong 64 B, 1 connection, p50 RTT", "us", False, 1),
    Metric("rtt1_p99", "ping-pong 64 B, 1 connection, p99 RTT", "us", False, 1),
    Metric("rtt32_p50", "ping-pong 64 B, 32 connections, p50 RTT", "us", False, 1),
    Metric("rtt32_p99", "ping-pong 64 B, 32 connections, p99 RTT", "us", False, 1),
    Metric("conn_seq", "short connections, sequential", "conn/s", True, 0),
    Metric("conn_32", "short connections, 32 concurrent", "conn/s", True, 0),
    Metric("idle_1000", "memory per idle connection, 1000 open", "KiB", False, 1, False),
    Metric("idle_5000", "memory per idle connection, 5000 open", "KiB", False, 1, False),
    Metric("cpu1", "tunnel CPU per GiB, 1 connection (up+down)", "s/GiB", False, 2, False),
    Metric("cpu64", "tunnel CPU per GiB, 64 connections (up+down)", "s/GiB", False, 2, False),
)
BY_KEY = {m.key: m for m in METRICS}


def median(values: list[float | None]) -> float | None:
    good = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(good) if good else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _r(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def summarize(raw: dict[str, dict[str, list[float | None]]],
              contenders: list[str]) -> dict[str, Any]:
    medians: dict[str, dict[str, float | None]] = {}
    ratios: dict[str, dict[str, dict[str, float | None]]] = {}
    for m in METRICS:
        row = raw.get(m.key, {})
        medians[m.key] = {c: median(row.get(c, [])) for c in contenders}
        ratios[m.key] = {}
        for c in contenders:
            value = medians[m.key][c]
            entry: dict[str, float | None] = {}
            if m.has_direct and c != "direct" and "direct" in contenders:
                entry["direct"] = ratio(value, medians[m.key]["direct"])
            peer = FRP_PEER.get(c)
            if peer and peer in contenders:
                entry["frp"] = ratio(value, medians[m.key][peer])
            ratios[m.key][c] = entry
    return {"medians": medians, "ratios": ratios}


def table(summary: dict[str, Any], contenders: list[str],
          notes: dict[str, dict[str, str]], failed: dict[str, str]) -> str:
    medians = summary["medians"]
    ratios = summary["ratios"]
    head = "| workload | unit | " + " | ".join(contenders) + " |"
    lines = [head, "|---|---|" + "---|" * len(contenders)]
    for m in METRICS:
        if all(medians[m.key][c] is None for c in contenders) and not any(
                notes.get(m.key, {}).get(c) for c in contenders):
            continue
        cells = []
        for c in contenders:
            if c in failed:
                cells.append("FAILED")
                continue
            note = notes.get(m.key, {}).get(c)
            value = medians[m.key][c]
            if value is None:
                cells.append(note or "—")
                continue
            text = _fmt(value, m.digits)
            parts = []
            r = ratios[m.key][c]
            if r.get("direct") is not None:
                parts.append(f"{_r(r['direct'])} d")
            if r.get("frp") is not None:
                parts.append(f"{_r(r['frp'])} f")
            if parts:
                text += " (" + ", ".join(parts) + ")"
            if note:
                text += f" [{note}]"
            cells.append(text)
        arrow = "higher is better" if m.higher_is_better else "lower is better"
        lines.append(f"| {m.label} | {m.unit}, {arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_check(summary: dict[str, Any], contenders: list[str]) -> str:
    """performance.md's bar, tunnel vs its frp peer (TLS and plain)."""
    med = summary["medians"]
    pairs = [(t, f) for t, f in FRP_PEER.items() if t in contenders and f in contenders]
    if not pairs:
        return ""
    rows: list[tuple[str, str, list[str]]] = []

    def times(key: str, t: str, f: str) -> float | None:
        return ratio(med[key][t], med[key][f])

    def added(key: str, t: str, f: str) -> float | None:
        d = med[key].get("direct")
        if d is None or med[key][t] is None or med[key][f] is None:
            return None
        return ratio(med[key][t] - d, med[key][f] - d)

    def fmt(value: float | None, goal: float, higher: bool) -> str:
        if value is None:
            return "n/a"
        ok = value >= goal if higher else value <= goal
        return f"{value:.2f} {'met' if ok else 'MISSED'}"

    spec = [
        ("bulk 1 conn upload, x frp", "bulk1_up", times, 2.0, True),
        ("bulk 1 conn download, x frp", "bulk1_down", times, 2.0, True),
        ("bulk 64 conns upload, x frp", "bulk64_up", times, 2.0, True),
        ("bulk 64 conns download, x frp", "bulk64_down", times, 2.0, True),
        ("short conns/s sequential, x frp", "conn_seq", times, 2.0, True),
        ("short conns/s 32 concurrent, x frp", "conn_32", times, 2.0, True),
        ("added RTT p50 1 conn, x frp's", "rtt1_p50", added, 0.6, False),
        ("added RTT p99 1 conn, x frp's", "rtt1_p99", added, 0.6, False),
        ("added RTT p50 32 conns, x frp's", "rtt32_p50", added, 0.6, False),
        ("memory per idle conn (1000), x frp", "idle_1000", times, 1 / 8, False),
        ("memory per idle conn (5000), x frp", "idle_5000", times, 1 / 8, False),
        ("CPU per GiB 1 conn, x frp", "cpu1", times, 0.5, False),
    ]
    for label, key, fn, goal, higher in spec:
        if all(med[key].get(c) is None for c in contenders):
            continue
        goal_text = f"{'>=' if higher else '<='} {goal:g}"
        rows.append((label, goal_text, [fmt(fn(key, t, f), goal, higher) for t, f in pairs]))
    head = "| bar (performance.md) | goal | " + " | ".join(f"{t} vs {f}" for t, f in pairs)
    lines = [head + " |", "|---|---|" + "---|" * len(pairs)]
    for label, goal_text, cells in rows:
        lines.append(f"| {label} | {goal_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
