"""The embedded HTTP server: snapshots as files, byte for byte, and nothing outside them.

    /NAME/...                 the current snapshot of NAME
    /snapshots/NAME/ID/...    one snapshot, immutable
    /pins/PIN/...             the snapshot pinned as PIN
    /  /status  /metrics      for operators

Every served path resolves to a regular file inside one snapshot tree of data/snapshots/,
reached through no symlink but the current/NAME or pins/PIN pointer itself; anything else
is a 404 (apt falls back from InRelease to Release only on a 404). Files go out with
sendfile (aiohttp's FileResponse: GET, HEAD, Range, ETag, Last-Modified, 304), never read
into memory, and never swapped for a pre-compressed sibling: what upstream signed is what
is sent.

`aptguard nginx-config` renders an nginx config (example: nginx/aptguard.conf) serving the same URLs from the same folder for production; see
the README, "Serving a fleet".
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from aptguard import metrics, page
from aptguard.config import Config
from aptguard.status import status
from aptguard.store import FileStore

# One path word: what verify.check_path lets into a snapshot, minus a leading dot.
_WORD = re.compile(r"^[A-Za-z0-9_+~:%@=,-][A-Za-z0-9_.+~:%@=,-]*$")
_NOT_FOUND = "404 not found\n"
# Refused as sent, before decoding: encoded slashes, backslashes, dots and NULs, and dot-files or
# dot segments (nginx/aptguard.conf refuses the same, so both servers answer alike).
_RAW_REFUSED = re.compile(r"%2f|%5c|%2e|%00|/\.", re.IGNORECASE)


def _safe_parts(tail: str) -> list[str] | None:
    """The path words of a request, or None when any could climb out, hide or smuggle something."""
    if not tail or len(tail) > 1024:
        return None
    parts = tail.split("/")
    if not all(_WORD.match(part) for part in parts):
        return None
    return parts


class SignedFile(web.FileResponse):
    """A FileResponse that sends the file asked for, never a pre-compressed sibling.

    aiohttp answers `Packages` with `Packages.gz` and Content-Encoding: gzip when the client
    accepts gzip and both exist: not the bytes upstream signed under that name. It only looks
    when Accept-Encoding asks, so the header is hidden from it.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if hdrs.ACCEPT_ENCODING in request.headers:
            headers = CIMultiDict(request.headers)
            headers.popall(hdrs.ACCEPT_ENCODING)
            request = request.clone(headers=headers)
        return await super().prepare(request)


def _not_found() -> web.Response:
    return web.Response(status=404, text=_NOT_FOUND)


class Mirror:
    """Maps URLs to files of the data folder, refusing every path that leaves a snapshot."""

    def __init__(self, config: Config, store: FileStore) -> None:
        self.config = config
        self.store = store
        self.snapshots_root = os.path.realpath(store.root / "snapshots")

    def resolve(self, base: Path, tail: str) -> str | None:
        """The real path of `tail` inside the snapshot tree `base` names, or None.

        `base` may be a pointer (current/NAME, pins/PIN); it must land on a snapshot tree,
        snapshots/NAME/ID, and nothing below it may be a symlink.
        """
        parts = _safe_parts(tail)
        if parts is None:
            return None
        tree = os.path.realpath(base)
        rel = os.path.relpath(tree, self.snapshots_root).split(os.sep)
        if len(rel) != 2 or rel[0] in ("..", ".") or not all(_WORD.match(p) for p in rel):
            return None
        wanted = os.path.join(tree, *parts)
        if os.path.realpath(wanted) != wanted or not os.path.isfile(wanted):
            return None
        return wanted

    async def file(self, request: web.Request, base: Path, tail: str) -> web.StreamResponse:
        path = None if _RAW_REFUSED.search(request.raw_path.partition("?")[0]) else self.resolve(base, tail)
        if path is None:
            return _not_found()
        return SignedFile(path, chunk_size=256 * 1024)

    async def current(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not _WORD.match(name):
            return _not_found()
        return await self.file(request, self.store.root / "current" / name, request.match_info["tail"])

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        name, snap_id = request.match_info["name"], request.match_info["id"]
        if not _WORD.match(name) or not _WORD.match(snap_id):
            return _not_found()
        return await self.file(request, self.store.root / "snapshots" / name / snap_id, request.match_info["tail"])

    async def pin(self, request: web.Request) -> web.StreamResponse:
        pin = request.match_info["pin"]
        if not _WORD.match(pin):
            return _not_found()
        return await self.file(request, self.store.root / "pins" / pin, request.match_info["tail"])

    async def status_json(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.config, self.store), dumps=lambda o: json.dumps(o, indent=1))

    async def index(self, request: web.Request) -> web.Response:
        body = page.render(self.config, self.store, base_url=f"{request.scheme}://{request.host}")
        return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.exposition(self.config, self.store, request.app[metrics.SERVER_KEY])
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def catch_all(self, request: web.Request) -> web.Response:
        return _not_found()


def make_app(config: Config, store: FileStore) -> web.Application:
    mirror = Mirror(config, store)
    app = web.Application()
    metrics.instrument(app)
    app.add_routes(
        [
            web.get("/", mirror.index),
            web.get("/status", mirror.status_json),
            web.get("/metrics", mirror.metrics),
            web.get(r"/snapshots/{name}/{id}/{tail:.*}", mirror.snapshot),
            web.get(r"/pins/{pin}/{tail:.*}", mirror.pin),
            web.get(r"/{name}/{tail:.*}", mirror.current),
            web.get(r"/{any:.*}", mirror.catch_all),
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
