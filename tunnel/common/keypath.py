"""Dotted key paths (``clients.alice.ports[2]``) that config errors use to name a value.

Apart from :mod:`tunnel.common.yamlsafe` because the checks that build these paths also run
on flags alone (a client started without ``--config``), which then need not import PyYAML.
"""

from __future__ import annotations

__all__ = ["child_path", "item_path"]


def child_path(parent: str, key: str) -> str:
    """The dotted key path of ``key`` inside the mapping at ``parent``."""
    return f"{parent}.{key}" if parent else key


def item_path(parent: str, index: int) -> str:
    """The key path of item ``index`` of the sequence at ``parent``."""
    return f"{parent}[{index}]"
