"""The embedded HTTP server: snapshots as files, byte for byte, and nothing outside them.

    /NAME/...                 the current snapshot of NAME
    /snapshots/NAME/ID/...    one snapshot, immutable
    /pins/PIN/...             the snapshot pinned as PIN
    /  /status  /metrics      for operators

Every served path resolves to a regular file inside data/snapshots/; anything else is a 404
(apt falls back from InRelease to Release only on a 404).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from aiohttp import web

from aptguard.config import Config
from aptguard.status import status
from aptguard.store import FileStore


def _safe_parts(tail: str) -> list[str] | None:
    """The path words of a request, or None when any could climb out or hide something."""
    if not tail:
        return None
    parts = tail.split("/")
    for part in parts:
        if part in ("", ".", "..") or part.startswith(".") or "\x00" in part or "\\" in part:
            return None
    return parts


class Mirror:
    """Maps URLs to files of the data folder, refusing every path that leaves a snapshot."""

    def __init__(self, config: Config, store: FileStore) -> None:
        self.config = config
        self.store = store
        self.snapshots_root = os.path.realpath(store.root / "snapshots") + os.sep

    def resolve(self, base: Path, tail: str) -> str | None:
        parts = _safe_parts(tail)
        if parts is None:
            return None
        real = os.path.realpath(os.path.join(base, *parts))
        if not real.startswith(self.snapshots_root) or not os.path.isfile(real):
            return None
        return real

    def file(self, request: web.Request, base: Path, tail: str) -> web.StreamResponse:
        path = self.resolve(base, tail)
        if path is None:
            return web.Response(status=404, text="404 not found\n")
        return web.FileResponse(path, chunk_size=256 * 1024)

    async def current(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if _safe_parts(name) is None:
            return web.Response(status=404, text="404 not found\n")
        return self.file(request, self.store.root / "current" / name, request.match_info["tail"])

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        name, snap_id = request.match_info["name"], request.match_info["id"]
        if _safe_parts(name) is None or _safe_parts(snap_id) is None:
            return web.Response(status=404, text="404 not found\n")
        return self.file(request, self.store.root / "snapshots" / name / snap_id, request.match_info["tail"])

    async def pin(self, request: web.Request) -> web.StreamResponse:
        pin = request.match_info["pin"]
        if _safe_parts(pin) is None:
            return web.Response(status=404, text="404 not found\n")
        return self.file(request, self.store.root / "pins" / pin, request.match_info["tail"])

    async def status_json(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.config, self.store), dumps=lambda o: json.dumps(o, indent=1))

    async def index(self, request: web.Request) -> web.Response:
        report = status(self.config, self.store)["upstreams"]
        host = request.host
        rows = []
        for name, st in report.items():
            last = st["last_sync"] or {}
            warn = "".join(f"<li>{html.escape(w)}</li>" for w in st["warnings"])
            rows.append(
                f"<section><h2>{html.escape(name)}</h2><p>current: <code>{html.escape(str(st['current']))}</code>"
                f"{' (on hold)' if st['hold'] else ''}; last sync: {html.escape(str(last.get('outcome')))}"
                f" {html.escape(str(last.get('reason') or ''))} {html.escape(str(last.get('detail') or ''))}</p>"
                f"<ul>{warn}</ul><pre>deb [signed-by=/etc/apt/keyrings/{html.escape(name)}.asc] "
                f"http://{html.escape(host)}/{html.escape(name)} SUITE COMPONENTS</pre></section>"
            )
        body = (
            "<!doctype html><html><head><meta charset='utf-8'><title>aptguard</title></head><body>"
            f"<h1>aptguard</h1>{''.join(rows) or '<p>no upstreams configured</p>'}</body></html>"
        )
        return web.Response(text=body, content_type="text/html")


def make_app(config: Config, store: FileStore) -> web.Application:
    mirror = Mirror(config, store)
    app = web.Application()
    app.add_routes(
        [
            web.get("/", mirror.index),
            web.get("/status", mirror.status_json),
            web.get(r"/snapshots/{name}/{id}/{tail:.*}", mirror.snapshot),
            web.get(r"/pins/{pin}/{tail:.*}", mirror.pin),
            web.get(r"/{name}/{tail:.*}", mirror.current),
        ]
    )
    return app


def run(config: Config, store: FileStore, host: str, port: int) -> None:
    web.run_app(
        make_app(config, store),
        host=host,
        port=port,
        access_log=None,
        print=lambda msg: print(f"aptguard: serving {store.root} on http://{host}:{port}/", flush=True),
    )
