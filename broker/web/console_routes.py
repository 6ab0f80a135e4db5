"""The security console: ``/`` and ``/console/*`` (its own files) and ``/console/player/*`` (the
asciinema player from ``[web] player_dir``).

The console is static files and talks to the JSON API like any client, so this module only
serves bytes: a fixed set of names (no path from the request ever reaches the file system),
each with its content type and an ETag, revalidated on every use (``no-cache``: the files have
no version in their names, and an upgrade must reach the browser at once). Every response here
carries the console's Content-Security-Policy (``api.CONSOLE_CSP``, set by the security headers).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aiohttp import web

from broker.config import WebSettings

CONSOLE_PREFIX = "/console/"
# the player's bundle: one script (global AsciinemaPlayer, its terminal in embedded WebAssembly)
# and its stylesheet; nothing else in that directory is served
PLAYER_FILES = ("asciinema-player.min.js", "asciinema-player.css")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


def default_player_dir() -> Path | None:
    """The bundle scripts/bootstrap installs into a source checkout, when it is there."""
    root = Path(__file__).resolve().parents[2]
    bundle = root / "web" / "node_modules" / "asciinema-player" / "dist" / "bundle"
    return bundle if (bundle / PLAYER_FILES[0]).is_file() else None


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _asset(name: str, body: bytes) -> Asset:
    ctype = TYPES.get(Path(name).suffix, "application/octet-stream")
    return Asset(body, ctype, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


def load_console() -> dict[str, Asset]:
    """The console's own files (package data), read once at start."""
    files: dict[str, Asset] = {}
    pkg = resources.files("broker.web") / "console"
    for entry in pkg.iterdir():
        if entry.is_file() and Path(entry.name).suffix in TYPES:
            files[entry.name] = _asset(entry.name, entry.read_bytes())
    return files


def load_player(player_dir: Path | None) -> dict[str, Asset]:
    """The player's two files, or nothing (the console then says replay is unavailable)."""
    if player_dir is None:
        return {}
    found: dict[str, Asset] = {}
    for name in PLAYER_FILES:
        try:
            found[name] = _asset(name, (player_dir / name).read_bytes())
        except OSError:
            return {}
    return found


def _serve(request: web.Request, asset: Asset | None) -> web.Response:
    if asset is None:
        raise web.HTTPNotFound()
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache"}
    if asset.etag in {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}:
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def add_console_routes(app: web.Application, settings: WebSettings) -> None:
    console = load_console()
    player = load_player(settings.player_dir or default_player_dir())

    async def index(request: web.Request) -> web.StreamResponse:
        resp = _serve(request, console.get("index.html"))
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def console_file(request: web.Request) -> web.StreamResponse:
        return _serve(request, console.get(request.match_info["name"]))

    async def player_file(request: web.Request) -> web.StreamResponse:
        return _serve(request, player.get(request.match_info["name"]))

    app.router.add_get("/", index)
    app.router.add_get(CONSOLE_PREFIX + "player/{name}", player_file)
    app.router.add_get(CONSOLE_PREFIX + "{name}", console_file)
