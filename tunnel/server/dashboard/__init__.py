"""The relay's web dashboard (status page, JSON API, Prometheus metrics) and its alerts.

Both are optional and off unless server.yaml has a ``dashboard:`` / ``alerts:`` section.
The relay calls :func:`start_dashboard` and :func:`start_alerts` after binding and
``stop()`` on each at shutdown; neither ever touches the data path, they only read the
relay's registry and counters (see :mod:`.relayview` for exactly what they read).
"""

from __future__ import annotations

from tunnel.server.dashboard.alerts import Alerts, start_alerts
from tunnel.server.dashboard.server import Dashboard, start_dashboard

__all__ = ["Alerts", "Dashboard", "start_alerts", "start_dashboard"]
