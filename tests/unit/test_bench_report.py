"""The benchmark's report (bench/report.py): its ratios and bar verdicts are what the
figures say. The bulk jobs, which need the bench target process, are in
tests/integration/test_bench.py."""

from __future__ import annotations

import pytest

from bench.report import bar_check, summarize, table


def test_report_ratios_and_bar_verdicts() -> None:
    contenders = ["direct", "frp-tls", "tunnel-tls"]
    raw: dict[str, dict[str, list[float | None]]] = {
        "bulk1_up": {"direct": [1000.0, 1200.0, 1100.0], "frp-tls": [400.0, 400.0, 400.0],
                     "tunnel-tls": [900.0, 800.0, None]},
        "rtt1_p50": {"direct": [50.0], "frp-tls": [250.0], "tunnel-tls": [150.0]},
        "idle_1000": {"frp-tls": [80.0], "tunnel-tls": [4.0]},
        "cpu1": {"frp-tls": [3.0], "tunnel-tls": [2.0]},
    }
    summary = summarize(raw, contenders)
    assert summary["medians"]["bulk1_up"] == {"direct": 1100.0, "frp-tls": 400.0,
                                              "tunnel-tls": 850.0}
    assert summary["ratios"]["bulk1_up"]["tunnel-tls"]["frp"] == pytest.approx(2.125)
    text = table(summary, contenders, {}, {})
    assert "| bulk, 1 connection, upload | MB/s, higher is better | 1,100 |" in text
    assert "850 (0.77 d, 2.12 f)" in text
    verdicts = bar_check(summary, contenders)
    assert "| bulk 1 conn upload, x frp | >= 2 | 2.12 met |" in verdicts
    # added RTT: (150 - 50) / (250 - 50) = 0.5 of frp's added time
    assert "| added RTT p50 1 conn, x frp's | <= 0.6 | 0.50 met |" in verdicts
    assert "| memory per idle conn (1000), x frp | <= 0.125 | 0.05 met |" in verdicts
    assert "| CPU per GiB 1 conn, x frp | <= 0.5 | 0.67 MISSED |" in verdicts
    failed = table(summary, contenders, {}, {"tunnel-tls": "lost data"})
    assert "| FAILED |" in failed
