"""The page's files: ``/`` is ``index.html``, ``/static/NAME`` a file of the same folder.

Only plain names (``[A-Za-z0-9._-]+``, no leading dot) of regular files directly in the
folder are served, with a content type from a short whitelist: no directory traversal, no
symlink leaving the folder, no dotfiles, nothing the browser would have to guess about.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tunnel.server.dashboard.http import Response

__all__ = ["CONTENT_TYPES", "MAX_STATIC_BYTES", "STATIC_DIR", "StaticFiles"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_STATIC_BYTES = 4 * 1024 * 1024
NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
    ".map": "application/json; charset=utf-8",
}


class StaticFiles:
    def __init__(self, root: Path = STATIC_DIR) -> None:
        self.root = root.resolve()

    def _path(self, name: str) -> Path | None:
        if not NAME_RE.fullmatch(name):
            return None
        path = (self.root / name).resolve()
        if path.parent != self.root or path.suffix.lower() not in CONTENT_TYPES:
            return None
        return path

    async def serve(self, name: str) -> Response:
        path = self._path(name)
        data = await asyncio.to_thread(_read_small, path) if path is not None else None
        if data is None or path is None:
            return Response.text(404, "not found\n")
        return Response(200, data, CONTENT_TYPES[path.suffix.lower()])


def _read_small(path: Path) -> bytes | None:
    """The file's bytes; None when it is missing, not a regular file, or too large."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_STATIC_BYTES:
            return None
        return path.read_bytes()[:MAX_STATIC_BYTES]
    except OSError:
        return None
