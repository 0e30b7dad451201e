"""The embedded HTTP server: snapshots as files, byte for byte, and nothing outside them.

    /NAME/...                 the current snapshot of NAME
    /snapshots/NAME/ID/...    one snapshot, immutable
    /pins/PIN/...             the snapshot pinned as PIN
    /  /status  /metrics      for operators

Every served path is a regular file of one snapshot, as the store resolves it
(FileStore.served_file: no link followed but the snapshot's own); anything else
is a 404 (apt falls back from InRelease to Release only on a 404). Files go out with
sendfile (aiohttp's FileResponse: GET, HEAD, Range, ETag, Last-Modified, 304), never read
into memory, and never swapped for a pre-compressed sibling: what upstream signed is what
is sent.

`aptguard nginx-config` renders an nginx config (example: nginx/aptguard.conf) serving the same URLs from the same folder for production; see
the README, "Serving a fleet".

Operator pages (/, /status, /metrics) are built in a worker thread from small per-snapshot
summaries (summary.py), never from a manifest parsed per request, so they cannot slow files.

Clients that hold connections without finishing a request cannot starve the others
(ConnectionGuard): a request's headers must arrive within HEADER_TIMEOUT, a kept-alive
connection may wait IDLE_TIMEOUT for its next request, and at most MAX_CONNECTIONS are open;
past it, the connection that has waited longest for a request is closed to admit the new one
(or the new one, when every open connection is busy). The soft limit of open files is raised
to the hard limit at start, so the bound is reached long before the file limit.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter
from multidict import CIMultiDict

from aptguard import metrics, page, summary
from aptguard.config import Config
from aptguard.status import status
from aptguard.store import FileStore

HEADER_TIMEOUT = 10.0  # a request's headers, from the connection's start or the request's first byte
IDLE_TIMEOUT = 15.0  # a kept-alive connection waiting for its next request
MAX_CONNECTIONS = 1000  # open client connections (fewer if the open-files limit is low)
_T = TypeVar("_T")

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
        # Operator pages are built here, off the event loop; not in the default executor, which
        # aiohttp's FileResponse uses to open files: a flood of /status must not queue files.
        self.pages = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aptguard-pages")

    async def file(self, request: web.Request, where: str, key: tuple[str, ...]) -> web.StreamResponse:
        if not all(_WORD.match(k) for k in key) or _RAW_REFUSED.search(request.raw_path.partition("?")[0]):
            return _not_found()
        parts = _safe_parts(request.match_info["tail"])
        path = None if parts is None else self.store.served_file(where, key, parts)
        if path is None:
            return _not_found()
        return SignedFile(path, chunk_size=256 * 1024)

    async def current(self, request: web.Request) -> web.StreamResponse:
        return await self.file(request, "current", (request.match_info["name"],))

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        return await self.file(request, "snapshot", (request.match_info["name"], request.match_info["id"]))

    async def pin(self, request: web.Request) -> web.StreamResponse:
        return await self.file(request, "pin", (request.match_info["pin"],))

    async def report(self, build: Callable[..., _T], *args: Any) -> _T:
        """Run `build` (which reads state files and snapshot summaries) in a worker thread, once
        the summaries of the current snapshots are in memory (computed off this process if not)."""
        current = [(name, snap_id) for name in self.config.upstreams if (snap_id := self.store.current(name))]
        await summary.prepare(self.store, current)
        return await asyncio.get_running_loop().run_in_executor(self.pages, build, *args)

    async def status_json(self, request: web.Request) -> web.Response:
        text = await self.report(lambda: json.dumps(status(self.config, self.store), indent=1))
        return web.Response(text=text, content_type="application/json")

    async def index(self, request: web.Request) -> web.Response:
        body = await self.report(page.render, self.config, self.store, f"{request.scheme}://{request.host}")
        return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def metrics(self, request: web.Request) -> web.Response:
        server = request.app[metrics.SERVER_KEY]
        body, content_type = await self.report(metrics.exposition, self.config, self.store, server)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def catch_all(self, request: web.Request) -> web.Response:
        return _not_found()


def make_app(config: Config, store: FileStore) -> web.Application:
    mirror = Mirror(config, store)
    app = web.Application()
    metrics.instrument(app)

    async def stop_pages(_app: web.Application) -> None:
        mirror.pages.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(stop_pages)
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


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's request handler inside, the guard's deadlines around it."""

    def __init__(self, guard: ConnectionGuard, handler: asyncio.Protocol) -> None:
        self.guard = guard
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.waiting_since: float | None = None  # None while a request is being answered
        self.headers_since: float | None = None  # when the request now awaited began to arrive
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.guard.admit(self):
            transport.abort()
            return
        self.admitted = True
        self.handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        if self.admitted:
            self.handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.waiting_since is not None and self.headers_since is None:
            self.guard.headers_begin(self)
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class ConnectionGuard:
    """Deadlines and a bound for client connections, so slow or idle clients cannot starve others.

    A connection is either answering a request (from the moment aiohttp dispatches it, seen by
    a middleware, until its response has gone out, when aiohttp calls its access logger) or
    waiting for the next one. A waiting connection is closed once it has waited `idle` seconds,
    or `headers` seconds after its request began to arrive (a new connection: after it opened),
    whichever comes first: nginx's keepalive_timeout and client_header_timeout. Past `limit`
    open connections, the one that has waited longest is closed for the newcomer; when none
    waits, the newcomer is. Connections busy answering are never cut by the guard.
    """

    def __init__(self, limit: int, *, headers: float = HEADER_TIMEOUT, idle: float = IDLE_TIMEOUT) -> None:
        self.limit = limit
        self.headers = headers
        self.idle = idle
        self.open: dict[asyncio.BaseTransport, _Connection] = {}
        self.waiting: OrderedDict[_Connection, None] = OrderedDict()  # longest waiting first
        guard = self

        class ResponseSent(AbstractAccessLogger):
            """aiohttp calls an access logger once a response has gone out: the connection waits again."""

            def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
                guard.request_done(request.transport)

        self.access_log_class = ResponseSent

    def protocol_factory(self, handlers: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Connection(self, handlers())

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            self._stop_waiting(conn)
        return await handler(request)

    def admit(self, conn: _Connection) -> bool:
        if len(self.open) >= self.limit:
            if not self.waiting:
                return False
            self.close(next(iter(self.waiting)))
        assert conn.transport is not None
        self.open[conn.transport] = conn
        self._wait(conn, headers_since=asyncio.get_running_loop().time())
        return True

    def forget(self, conn: _Connection) -> None:
        if conn.transport is not None:
            self.open.pop(conn.transport, None)
        self._stop_waiting(conn)

    def headers_begin(self, conn: _Connection) -> None:
        conn.headers_since = asyncio.get_running_loop().time()
        self._arm(conn)

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.open.get(transport) if transport is not None else None
        if conn is not None:
            self._wait(conn, headers_since=None)

    def _wait(self, conn: _Connection, headers_since: float | None) -> None:
        conn.waiting_since = asyncio.get_running_loop().time()
        conn.headers_since = headers_since
        self.waiting[conn] = None
        self.waiting.move_to_end(conn)
        self._arm(conn)

    def _stop_waiting(self, conn: _Connection) -> None:
        self.waiting.pop(conn, None)
        conn.waiting_since = conn.headers_since = None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _arm(self, conn: _Connection) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        assert conn.waiting_since is not None
        deadline = conn.waiting_since + self.idle
        if conn.headers_since is not None:
            deadline = min(deadline, conn.headers_since + self.headers)
        conn.timer = asyncio.get_running_loop().call_at(deadline, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.timer = None
        if conn in self.waiting:
            self.close(conn)

    def close(self, conn: _Connection) -> None:
        """Close a waiting connection now (a response's last bytes still unsent: reset it)."""
        self.forget(conn)
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def stop(self) -> None:
        for conn in list(self.open.values()):
            self._stop_waiting(conn)


def raise_open_files_limit() -> int:
    """Raise the soft limit of open files to the hard one; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(open_files: int) -> int:
    """MAX_CONNECTIONS, or fewer when the open-files limit cannot hold them: a busy connection
    holds a socket and a file, and the process keeps some for itself."""
    return max(16, min(MAX_CONNECTIONS, (open_files - 64) // 2))


async def serve(config: Config, store: FileStore, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close connections gracefully."""
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(connection_limit(raise_open_files_limit()))
    app = make_app(config, store)
    app.middlewares.append(guard.middleware)
    runner = web.AppRunner(app, access_log_class=guard.access_log_class, keepalive_timeout=IDLE_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    listener = await loop.create_server(guard.protocol_factory(runner.server), host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"aptguard: serving {store} on http://{host}:{port}/ (at most {guard.limit} connections)", flush=True)
    try:
        await stop.wait()
    finally:
        listener.close()
        guard.stop()
        await runner.cleanup()


def run(config: Config, store: FileStore, host: str, port: int) -> None:
    asyncio.run(serve(config, store, host, port))
