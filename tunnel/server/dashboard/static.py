"""The page's files: ``/`` is ``index.html``, ``/static/PATH`` a file under the same folder.

``PATH`` is one to :data:`MAX_DEPTH` plain names (``[A-Za-z0-9._-]+``, no leading dot)
joined by ``/``, naming a regular file with a content type from a short whitelist. The
request target is not percent-decoded, so ``%2e%2e`` is just an unusual name that matches
nothing; no segment may start with a dot, so ``..`` never reaches the file system; and the
resolved path must be the literal one, so a symlink (to a file or a folder, inside the
folder or out of it) is refused: no directory traversal, no dotfiles, nothing the browser
would have to guess about.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from tunnel.server.dashboard.http import Response

__all__ = ["CONTENT_TYPES", "MAX_DEPTH", "MAX_STATIC_BYTES", "STATIC_DIR", "StaticFiles"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_STATIC_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 4  # segments of a static path: js/panels/clients.js is 3
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
        segments = name.split("/")
        if len(segments) > MAX_DEPTH or not all(NAME_RE.fullmatch(s) for s in segments):
            return None
        literal = self.root.joinpath(*segments)
        if literal.suffix.lower() not in CONTENT_TYPES:
            return None
        try:
            resolved = literal.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, unreadable, a symlink loop
            return None
        if resolved != literal:  # a symlink somewhere on the way
            return None
        return resolved

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
