"""The embedded HTTP server: snapshots as files, byte for byte, and nothing outside them.

    /NAME/...                 the current snapshot of NAME
    /snapshots/NAME/ID/...    one snapshot, immutable
    /pins/PIN/...             the snapshot pinned as PIN
    /  /status  /metrics      for operators

Every served path is a regular file of one snapshot, as the store resolves it
(FileStore.served_file: no link followed but the snapshot's own); anything else
is a 404 (apt falls back from InRelease to Release only on a 404). The common request (a
plain or conditional GET or HEAD of a file up to SMALL_FILE) is answered on the event loop
from memory (QuickFiles); ranges and larger files go through aiohttp's FileResponse. Neither
ever swaps a file for a pre-compressed sibling: what upstream signed is what is sent.

The fleet's server must be fast (issue 10: InRelease at 0.3x nginx's requests/s or better):
one handler routes without aiohttp's router, middleware or signals, the loop is uvloop's, and
`--workers N` runs N processes, each accepting on its own SO_REUSEPORT socket (Workers).

`aptguard nginx-config` renders an nginx config (example: nginx/aptguard.conf) serving the same URLs from the same folder for production; see
the README, "Serving a fleet".

Operator pages (/, /status, /metrics) are built in a worker thread from small per-snapshot
summaries (summary.py), never from a manifest parsed per request, so they cannot slow files.

Clients that hold connections without finishing a request cannot starve the others
(ConnectionGuard): a request's headers must arrive within HEADER_TIMEOUT, a kept-alive
connection may wait IDLE_TIMEOUT for its next request (a response still queued for it then is
dropped with it), a file's reader may take nothing for at most SEND_TIMEOUT (SendfileLoop),
and at most MAX_CONNECTIONS are open;
past it, the connection that has waited longest for a request is closed to admit the new one
(or the new one, when every open connection is busy). The soft limit of open files is raised
to the hard limit at start, so the bound is reached long before the file limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import os
import re
import resource
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar, cast

import uvloop
from aiohttp import hdrs, web
from aiohttp.abc import AbstractAccessLogger, AbstractStreamWriter
from multidict import CIMultiDict

from aptguard import metrics, page, summary
from aptguard.config import Config
from aptguard.ondemand import OnDemand
from aptguard.status import status
from aptguard.store import FileStore, ObjectMissing
from aptguard.twin import die_with_parent

HEADER_TIMEOUT = 10.0  # a request's headers, from the connection's start or the request's first byte
IDLE_TIMEOUT = 15.0  # a kept-alive connection waiting for its next request
SEND_TIMEOUT = 60.0  # a response's reader that takes no byte for this long is cut (nginx's send_timeout)
MAX_CONNECTIONS = 1000  # open client connections (fewer if the open-files limit is low)
REDIRECT_SECONDS = 300  # pool = "redirect": how long a presigned URL is valid
SMALL_FILE = 1 << 20  # files up to this size are answered from memory once read (indices, InRelease)
BODY_CACHE = 64 << 20  # bytes of small files kept in memory per server process
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


def _pool_file(parts: list[str]) -> bool:
    """A package or source file (pool = "redirect" sends these to the store), not an index:
    anything outside dists/, and packages inside it (Docker keeps its pool under dists/)."""
    return parts[0] != "dists" or parts[-1].endswith((".deb", ".udeb", ".ddeb"))


def _not_found() -> web.Response:
    return web.Response(status=404, text=_NOT_FOUND)


_FAILED = {
    404: _NOT_FOUND,
    502: "502 the upstream's file failed verification against its signed index: not served, not stored\n",
    504: "504 the upstream did not answer (or too slowly) for this on-demand file\n",
}


def _failed(status: int) -> web.Response:
    return web.Response(status=status, text=_FAILED.get(status, f"{status}\n"))


# Requests the quick path leaves to FileResponse (ranges and preconditions: rare, and subtle).
_FILE_RESPONSE_HEADERS = (hdrs.RANGE, hdrs.IF_RANGE, hdrs.IF_MATCH, hdrs.IF_UNMODIFIED_SINCE)
_OCTETS = "application/octet-stream"  # as nginx/aptguard.conf sends every file


class _Known:
    """What the quick path keeps of one file: its identity, validators and, when small, its bytes."""

    __slots__ = ("identity", "etag", "mtime", "headers", "body")

    def __init__(self, st: os.stat_result) -> None:
        self.identity = (st.st_ino, st.st_mtime_ns, st.st_size)
        self.etag = f"{st.st_mtime_ns:x}-{st.st_size:x}"  # FileResponse's, so both paths agree
        self.mtime = st.st_mtime
        probe = web.StreamResponse()  # aiohttp's own HTTP date (rounded up), as FileResponse sends it
        probe.last_modified = st.st_mtime
        self.headers = {
            hdrs.CONTENT_TYPE: _OCTETS,
            hdrs.ETAG: f'"{self.etag}"',
            hdrs.LAST_MODIFIED: probe.headers[hdrs.LAST_MODIFIED],
            hdrs.ACCEPT_RANGES: "bytes",
        }
        self.body: bytes | None = None  # read on the first plain GET of a small file


class QuickFiles:
    """Answers the common request for a snapshot file on the event loop, without a thread hop.

    A plain GET or HEAD, or one with If-None-Match or If-Modified-Since (apt's update), is
    answered here: a 304, or the bytes of a small file from memory. Every answer starts with a
    stat of the file, and what is remembered of it counts only while its inode, mtime and size
    are the same, so a file gc removed or anything else replaced is never answered from memory.
    A small file is read once, in a thread; larger files and ranges go out with sendfile.
    """

    def __init__(self, budget: int = BODY_CACHE) -> None:
        self.budget = budget
        self.used = 0
        self.known: OrderedDict[str, _Known] = OrderedDict()  # least recently used first

    async def answer(self, request: web.BaseRequest, path: str) -> web.StreamResponse | None:
        """The response, or None when FileResponse must answer (a range, a large file)."""
        headers = request.headers
        if any(name in headers for name in _FILE_RESPONSE_HEADERS):
            return None
        try:
            st = os.stat(path)
        except OSError:
            return _not_found()
        known = self.known.get(path)
        if known is None or known.identity != (st.st_ino, st.st_mtime_ns, st.st_size):
            known = self._remember(path, _Known(st))
        else:
            self.known.move_to_end(path)
        if hdrs.IF_NONE_MATCH in headers:
            tags = request.if_none_match or ()
            if any(tag.value in (known.etag, "*") for tag in tags):
                return self._not_modified(known)
        elif hdrs.IF_MODIFIED_SINCE in headers:
            since = request.if_modified_since
            if since is not None and known.mtime <= since.timestamp():
                return self._not_modified(known)
        if st.st_size > SMALL_FILE:
            return None
        if known.body is None:
            body = await asyncio.get_running_loop().run_in_executor(None, _read_if_same, path, known.identity)
            if body is None:
                return None  # changed under us: FileResponse answers with what is there now
            if known.body is None and self.known.get(path) is known:  # not read by another request meanwhile
                known.body = body
                self.used += len(body)
                self._trim()
            return web.Response(body=body, headers=known.headers)
        return web.Response(body=known.body, headers=known.headers)

    @staticmethod
    def _not_modified(known: _Known) -> web.Response:
        return web.Response(
            status=304,
            headers={hdrs.ETAG: known.headers[hdrs.ETAG], hdrs.LAST_MODIFIED: known.headers[hdrs.LAST_MODIFIED]},
        )

    def _remember(self, path: str, known: _Known) -> _Known:
        old = self.known.pop(path, None)
        if old is not None and old.body is not None:
            self.used -= len(old.body)
        self.known[path] = known
        self.used += 256  # the entry itself
        self._trim()
        return known

    def _trim(self) -> None:
        while self.used > self.budget and len(self.known) > 1:
            _, old = self.known.popitem(last=False)
            self.used -= 256 + (len(old.body) if old.body is not None else 0)


def _read_if_same(path: str, identity: tuple[int, int, int]) -> bytes | None:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if (st.st_ino, st.st_mtime_ns, st.st_size) != identity:
            return None
        body = f.read()
    return body if len(body) == identity[2] else None


class Mirror:
    """Maps URLs to files of the data folder, refusing every path that leaves a snapshot.

    `handle` is the whole request path: no router, middleware or signal, since a server of a
    fleet answers InRelease and indices thousands of times a second and each layer costs."""

    def __init__(self, config: Config, store: FileStore, counters: metrics.ServerMetrics) -> None:
        self.config = config
        self.store = store
        self.counters = counters
        # The s3 backend: pointers, manifests and cached objects of this process (store_s3.Serving).
        self.view = store.serving() if store.remote else None  # type: ignore[attr-defined]
        self.redirects: dict[str, tuple[float, str]] = {}  # sha256 -> (until, presigned URL)
        on_demand = any(up.policy == "on-demand" for up in config.upstreams.values())
        self.on_demand = OnDemand(config, store, counters.fetched) if on_demand else None
        # Operator pages are built here, off the event loop; not in the default executor, which
        # aiohttp's FileResponse uses to open files: a flood of /status must not queue files.
        self.pages = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aptguard-pages")
        self.quick = QuickFiles()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _not_found()  # as nginx/aptguard.conf answers them
        path = request.path
        if path == "/":
            return await self.index(request)
        if path == "/status":
            return await self.status_json()
        if path == "/metrics":
            return await self.metrics()
        words = path[1:].split("/", 3)
        if words[0] == "snapshots" and len(words) == 4:
            return await self.file(request, "snapshot", (words[1], words[2]), words[3])
        words = path[1:].split("/", 2)
        if words[0] == "pins" and len(words) == 3:
            return await self.file(request, "pin", (words[1],), words[2])
        words = path[1:].split("/", 1)
        if len(words) == 2:
            return await self.file(request, "current", (words[0],), words[1])
        return _not_found()

    async def file(self, request: web.BaseRequest, where: str, key: tuple[str, ...], tail: str) -> web.StreamResponse:
        if not all(_WORD.match(k) for k in key) or _RAW_REFUSED.search(request.raw_path.partition("?")[0]):
            return _not_found()
        parts = _safe_parts(tail)
        if parts is None:
            return _not_found()
        if self.view is not None:
            return await self.stored_file(request, where, key, parts)
        path = self.store.served_file(where, key, parts)
        if path is None and self.on_demand is not None:
            answer = await self.on_demand.answer(where, key, parts)
            if answer != 200:
                return _failed(answer)
            path = self.store.served_file(where, key, parts)
        if path is None:
            return _not_found()
        return await self.send(request, path)

    async def send(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        quick = await self.quick.answer(request, path)
        if quick is not None:
            return quick
        return SignedFile(path, chunk_size=1 << 20, headers={hdrs.CONTENT_TYPE: _OCTETS})

    async def stored_file(
        self, request: web.BaseRequest, where: str, key: tuple[str, ...], parts: list[str]
    ) -> web.StreamResponse:
        """A file of a snapshot in the object store: from this server's cache, fetched (and
        checked) on a miss, or a 302 to a presigned URL for pool files with pool = "redirect"."""
        view = self.view
        assert view is not None
        found = view.lookup(where, key, parts)
        if found is None and where != "snapshot":
            # Behind a load balancer a client may have read the new InRelease from a server that
            # refreshed first: look at the pointers now (at most every MISS_REFRESH) before a 404.
            await view.store.arun_on_loop(view.refresh_soon())
            found = view.lookup(where, key, parts)
            if found is None and _pool_file(parts):
                found = view.sibling(where, key, parts)
        if found is None and not view.refreshed:  # the store never answered this server: it knows nothing
            return web.Response(status=503, text="503 the object store is unreachable\n")
        if found is None:
            return _not_found()
        sha256, path = found if found is not view.UNKNOWN else (None, None)
        try:
            if sha256 is None:
                sha256 = await view.store.arun_on_loop(view.resolve(where, key, parts))
                if sha256 is None:
                    return _not_found()
            if self.config.storage.pool == "redirect" and _pool_file(parts):
                return await self.redirect(sha256)
            if path is None:
                path = await self.fetch_stored(view, where, key, parts, sha256)
                if isinstance(path, web.Response):
                    return path
        except OSError as exc:  # the store is unreachable and this server never held the file
            print(f"aptguard: {'/'.join(parts)}: {exc}", file=sys.stderr, flush=True)
            return web.Response(status=503, text="503 the object store is unreachable\n")
        return await self.send(request, path)

    async def fetch_stored(
        self, view: Any, where: str, key: tuple[str, ...], parts: list[str], sha256: str
    ) -> str | web.Response:
        """The local copy of an object; an on-demand file the store lacks is fetched first."""
        try:
            return await view.store.arun_on_loop(view.fetch(sha256))
        except ObjectMissing:
            if self.on_demand is None:
                raise
        answer = await self.on_demand.answer(where, key, parts)
        if answer != 200:
            return _failed(answer)
        return await view.store.arun_on_loop(view.fetch(sha256))

    async def redirect(self, sha256: str) -> web.StreamResponse:
        """302 to a presigned GET of the object, valid REDIRECT_SECONDS (reused for half of that)."""
        assert self.view is not None
        now = time.monotonic()
        known = self.redirects.get(sha256)
        if known is None or known[0] < now:
            url = await self.view.store.arun_on_loop(self.view.presigned(sha256, REDIRECT_SECONDS))
            if len(self.redirects) > 10_000:
                self.redirects.clear()
            known = self.redirects[sha256] = (now + REDIRECT_SECONDS / 2, url)
        return web.Response(status=302, headers={hdrs.LOCATION: known[1], hdrs.CACHE_CONTROL: "no-store"})

    async def report(self, build: Callable[..., _T], *args: Any) -> _T:
        """Run `build` (which reads state files and snapshot summaries) in a worker thread, once
        the summaries of the current snapshots are in memory (computed off this process if not)."""
        if self.view is None:  # the s3 store keeps the manifests it parsed: no child needed
            current = [(name, snap_id) for name in self.config.upstreams if (snap_id := self.store.current(name))]
            await summary.prepare(self.store, current)
        return await asyncio.get_running_loop().run_in_executor(self.pages, build, *args)

    async def status_json(self) -> web.Response:
        view = self.view
        if view is not None and view.unreachable_since is not None:  # at once, no store call
            report: dict[str, Any] = {"error": view.error}
        else:
            try:
                report = await self.report(status, self.config, self.store)
            except OSError as exc:
                if view is None:
                    raise
                report = {"error": str(exc)}  # the s3 store went away meanwhile
        if view is not None:  # whether the store answers, and what this server serves
            report["storage"] = view.health()
        if self.on_demand is not None:  # this server's fetches for clients (this worker's, with --workers)
            report["on_demand"] = self.on_demand.report()
        return web.Response(text=json.dumps(report, indent=1), content_type="application/json")

    async def index(self, request: web.BaseRequest) -> web.Response:
        view = self.view
        if view is not None and view.unreachable_since is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.unreachable_since))
            body = (
                f"<!doctype html><title>aptguard</title><h1>aptguard</h1><p>The object store {view.store} has not "
                f"answered since {since}: this server serves what it holds.</p><p>{html.escape(view.error)}</p>"
            )
            return web.Response(text=body, content_type="text/html", status=503)
        body = await self.report(page.render, self.config, self.store, f"{request.scheme}://{request.host}")
        return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-cache"})

    async def metrics(self) -> web.Response:
        body, content_type = await self.report(metrics.exposition, self.config, self.store, self.counters)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def close(self) -> None:
        self.pages.shutdown(wait=False, cancel_futures=True)
        if self.on_demand is not None:
            await self.on_demand.close()


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's request handler inside, the guard's deadlines around it."""

    def __init__(self, guard: ConnectionGuard, handler: asyncio.Protocol) -> None:
        self.guard = guard
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.waiting_since: float | None = None  # None while a request is being answered
        self.headers_since: float | None = None  # when the request now awaited began to arrive

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        transport = self.transport
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
        if self.headers_since is None and self.waiting_since is not None:
            self.headers_since = self.guard.loop.time()
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()


class ConnectionGuard:
    """Deadlines and a bound for client connections, so slow or idle clients cannot starve others.

    A connection is either answering a request (from the moment aiohttp dispatches it to the
    handler `wrap` made, until its response has gone out, when aiohttp calls its access logger)
    or waiting for the next one. A waiting connection is closed once it has waited `idle`
    seconds, or `headers` seconds after its request began to arrive (a new connection: after it
    opened), whichever comes first: nginx's keepalive_timeout and client_header_timeout. Past
    `limit` open connections, the one that has waited longest is closed for the newcomer; when
    none waits, the newcomer is. Connections busy answering are never cut by the guard.

    Deadlines are checked by one sweep a second over the waiting connections, not by a timer
    per request (arming and cancelling one cost more than answering InRelease from memory), so
    a connection may outlive its deadline by up to SWEEP seconds, never be cut before it.
    """

    SWEEP = 1.0

    def __init__(
        self,
        limit: int,
        *,
        headers: float = HEADER_TIMEOUT,
        idle: float = IDLE_TIMEOUT,
        sent: Callable[[web.BaseRequest, web.StreamResponse], None] | None = None,
    ) -> None:
        self.limit = limit
        self.headers = headers
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        self.open: dict[asyncio.BaseTransport, _Connection] = {}
        self.waiting: OrderedDict[_Connection, None] = OrderedDict()  # longest waiting first
        self.sweeper = self.loop.call_later(self.SWEEP, self.sweep)
        guard = self

        class ResponseSent(AbstractAccessLogger):
            """aiohttp calls an access logger once a response has gone out: the connection waits again."""

            def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
                if sent is not None:
                    sent(request, response)
                guard.request_done(request.transport)

        self.access_log_class = ResponseSent

    def protocol_factory(self, handlers: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Connection(self, handlers())

    def wrap(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """`handler`, marking its connection busy while it answers."""

        async def answering(request: web.BaseRequest) -> web.StreamResponse:
            conn = self.open.get(request.transport) if request.transport is not None else None
            if conn is not None:
                self._stop_waiting(conn)
            return await handler(request)

        return answering

    def admit(self, conn: _Connection) -> bool:
        if len(self.open) >= self.limit:
            if not self.waiting:
                return False
            self.close(next(iter(self.waiting)))
        assert conn.transport is not None
        self.open[conn.transport] = conn
        self._wait(conn, headers_since=self.loop.time())
        return True

    def forget(self, conn: _Connection) -> None:
        if conn.transport is not None:
            self.open.pop(conn.transport, None)
        self._stop_waiting(conn)

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self.open.get(transport) if transport is not None else None
        if conn is not None:
            self._wait(conn, headers_since=None)

    def _wait(self, conn: _Connection, headers_since: float | None) -> None:
        conn.waiting_since = self.loop.time()
        conn.headers_since = headers_since
        self.waiting[conn] = None
        self.waiting.move_to_end(conn)

    def _stop_waiting(self, conn: _Connection) -> None:
        self.waiting.pop(conn, None)
        conn.waiting_since = conn.headers_since = None

    def sweep(self) -> None:
        """Close every waiting connection past its deadline; runs every SWEEP seconds."""
        now = self.loop.time()
        expired = []
        for conn in self.waiting:
            assert conn.waiting_since is not None
            deadline = conn.waiting_since + self.idle
            if conn.headers_since is not None:
                deadline = min(deadline, conn.headers_since + self.headers)
            if deadline <= now:
                expired.append(conn)
        for conn in expired:
            self.close(conn)
        self.sweeper = self.loop.call_later(self.SWEEP, self.sweep)

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
        self.sweeper.cancel()
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


def listen(host: str, port: int, copies: int = 1) -> list[list[socket.socket]]:
    """Listening sockets for HOST:PORT (one per address family the host has), `copies` sets of them.

    One set serves one process. Several sets are bound with SO_REUSEPORT, so the kernel spreads
    new connections evenly over the workers (with one shared socket, whichever worker wakes
    first takes a burst of them, and the busiest sets everyone's p99). They are made before any
    worker starts, after a plain bind of the same address proved the port free: a port in use is
    an error at start, never a port silently shared with another server that set SO_REUSEPORT."""
    addresses = []
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        if (family, kind, proto, address) not in addresses:
            addresses.append((family, kind, proto, address))
    shared = copies > 1
    sets: list[list[socket.socket]] = [[] for _ in range(copies)]
    try:
        for family, kind, proto, address in addresses:
            if shared:  # the proof that no one else listens there; also the port chosen for port 0
                with _socket(family, kind, proto, reuse_port=False) as probe:
                    probe.bind(address)
                    address = probe.getsockname()
            for found in sets:
                sock = _socket(family, kind, proto, reuse_port=shared)
                found.append(sock)
                sock.bind(address)
                address = sock.getsockname()
                sock.listen(1024)
                sock.setblocking(False)
    except OSError:
        for found in sets:
            for sock in found:
                sock.close()
        raise
    return sets


def _socket(family: int, kind: int, proto: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


@contextlib.asynccontextmanager
async def serving(config: Config, store: FileStore, sockets: list[socket.socket]) -> AsyncIterator[None]:
    """Answer requests on `sockets` inside the block; close connections gracefully after it."""
    loop = asyncio.get_running_loop()
    counters = metrics.ServerMetrics()
    guard = ConnectionGuard(connection_limit(raise_open_files_limit()), sent=counters.count)
    mirror = Mirror(config, store, counters)
    server = web.Server(
        guard.wrap(mirror.handle), access_log_class=guard.access_log_class, keepalive_timeout=IDLE_TIMEOUT
    )
    refresher = None
    if mirror.view is not None:  # the s3 backend: the pointers now, then every refresh_seconds
        view = mirror.view
        await store.arun_on_loop(view.refresh())  # type: ignore[attr-defined]
        every = config.storage.refresh_seconds
        refresher = asyncio.ensure_future(store.arun_on_loop(view.refresh_forever(every)))  # type: ignore[attr-defined]
    listeners = [await loop.create_server(guard.protocol_factory(server), sock=sock) for sock in sockets]
    try:
        yield
    finally:
        if refresher is not None:
            refresher.cancel()
        for listener in listeners:
            listener.close()
        guard.stop()
        await server.shutdown(5.0)
        await mirror.close()


async def serve(config: Config, store: FileStore, sockets: list[socket.socket]) -> None:
    """Serve on `sockets` until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serving(config, store, sockets):
        await stop.wait()


def run(config: Config, store: FileStore, sockets: list[list[socket.socket]]) -> None:
    """Serve on `sockets` (from `listen`): in this process for one set and no [schedule], else
    in one forked worker per set, plus the syncer of [schedule] in a worker of its own."""
    host, port = sockets[0][0].getsockname()[:2]
    where = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    limit = connection_limit(raise_open_files_limit())
    jobs = [lambda own=own: _run_loop(serve(config, store, own)) for own in sockets]
    interval = config.sync_interval
    if interval is None and len(jobs) == 1:
        print(f"aptguard: serving {store} on {where} (at most {limit} connections)", flush=True)
        jobs[0]()
        return
    also = ""
    if interval is not None:
        jobs.append(lambda: scheduled_syncs(config, store, interval))
        also = f", syncing every upstream every {_duration(interval)}"
    print(
        f"aptguard: serving {store} on {where} in {len(sockets)} worker(s) (at most {limit} connections each){also}",
        flush=True,
    )
    Workers(jobs).run()


def scheduled_syncs(config: Config, store: FileStore, interval: float) -> None:
    """[schedule]: sync every upstream, then gc (as the timer of contrib/systemd does), at start
    and every `interval` after; a round that overruns skips the starts it missed.

    This runs in a worker of its own, so the imports and start-up of a sync are paid once, and
    a sync never competes with requests for a worker's event loop. Each upstream's sync takes
    its lease like `aptguard sync` does, so a sync started by hand waits for it or it for that
    one. SIGTERM ends it at once, which the sync's crash safety allows (guarantee 1)."""
    from aptguard.cli import report_results
    from aptguard.gc import collect
    from aptguard.progress import Progress
    from aptguard.sync import sync_all

    due = time.monotonic()
    while True:
        print(f"aptguard: scheduled sync of {', '.join(config.upstreams) or 'no upstream'}", flush=True)
        progress = Progress()
        try:
            results = asyncio.run(
                sync_all(config.upstreams.values(), store, limits=config.limits, log=progress.log, progress=progress)
            )
        finally:
            progress.close()
        report_results(results, store, "text")
        try:
            collect(config, store, log=lambda message: print(f"gc: {message}", flush=True))
        except Exception as exc:  # noqa: BLE001 - the next round tries again; serving goes on
            print(f"aptguard: gc after the scheduled sync failed: {exc}", file=sys.stderr, flush=True)
        now = time.monotonic()
        while due <= now:
            due += interval
        time.sleep(due - now)


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n) or "0s"


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop's event loop (libuv's): 1.7x the requests/s of asyncio's own."""
    with asyncio.Runner(loop_factory=SendfileLoop) as runner:
        runner.run(main)


class SendfileLoop(uvloop.Loop):  # type: ignore[misc]
    """uvloop's loop with asyncio's `sendfile`, which uvloop lacks.

    aiohttp's FileResponse sends with `loop.sendfile` and, where it raises NotImplementedError,
    copies the file through Python in chunks: on uvloop a 20 MB .deb went at 0.4x the rate of
    sendfile(2). This is the kernel's sendfile on a duplicate of the connection's descriptor
    (uvloop refuses a writer callback on a descriptor its transport owns), once the transport
    has sent what it holds (the headers), waiting for the socket to drain whenever it is full.
    """

    async def sendfile(  # type: ignore[override]
        self, transport: asyncio.WriteTransport, file: Any, offset: int = 0, count: int | None = None, **_: Any
    ) -> int:
        sock = transport.get_extra_info("socket")
        if sock is None:
            raise NotImplementedError
        queued, since = transport.get_write_buffer_size(), self.time()
        while queued:  # the headers, or a pipelined answer, still queued
            if transport.is_closing():
                raise ConnectionResetError("the client went away")
            await asyncio.sleep(0.002)
            left = transport.get_write_buffer_size()
            if left < queued:
                queued, since = left, self.time()
            elif self.time() - since > SEND_TIMEOUT:
                _cut(transport)
        if count is None:
            count = os.fstat(file.fileno()).st_size - offset
        fd = os.dup(sock.fileno())
        sent = 0
        try:
            while sent < count:
                try:
                    n = os.sendfile(fd, file.fileno(), offset + sent, count - sent)
                except BlockingIOError:
                    if not await self._writable(fd):
                        _cut(transport)
                    continue
                if n == 0:  # the file is shorter than it was
                    break
                sent += n
        finally:
            os.close(fd)
        file.seek(offset + sent)
        return sent

    async def _writable(self, fd: int) -> bool:
        """Wait until the socket takes more bytes; False if it took none for SEND_TIMEOUT."""
        ready = self.create_future()
        self.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, SEND_TIMEOUT)
            return True
        except TimeoutError:
            return False
        finally:
            self.remove_writer(fd)


def _cut(transport: asyncio.WriteTransport) -> NoReturn:
    """A client that read nothing for SEND_TIMEOUT loses its connection (nginx's send_timeout)."""
    transport.abort()
    raise ConnectionResetError(f"the client read nothing for {SEND_TIMEOUT:g} s")


class Workers:
    """One forked process per job, each replaced (running the same job) when it dies, all
    stopped with this one.

    The supervisor serves nothing itself: it forks (before any thread or event loop exists, so
    nothing a worker inherits is locked), waits, and starts a new worker for one that died. A
    job whose worker keeps dying within STEADY seconds waits before each new start, 1 s, then
    twice as long each time up to MAX_DELAY: a worker that cannot start, or a syncer killed
    (out of memory, say) in the middle of every run, is not restarted in a tight loop. SIGTERM or SIGINT is passed on to every worker, which closes its connections
    gracefully, and the supervisor returns once all have ended. A worker receives SIGTERM when
    the supervisor dies (even by SIGKILL), so no orphan keeps the port from a restarted server.
    """

    STEADY = 60.0  # a worker that lived this long was fine: its next restart waits nothing
    MAX_DELAY = 60.0

    def __init__(self, jobs: list[Callable[[], None]]) -> None:
        self.jobs = jobs
        self.pids: dict[int, tuple[int, float]] = {}  # pid -> its job, when it started
        self.delays = [0.0] * len(jobs)  # per job: the wait before its next start
        self.stopping = False

    def run(self) -> None:
        previous = {signum: signal.signal(signum, self._stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            for n in range(len(self.jobs)):
                self._spawn(n)
            while self.pids:
                pid, status = os.wait()
                ended = self.pids.pop(pid, None)
                if ended is None or self.stopping:
                    continue
                n, started = ended
                if time.monotonic() - started >= self.STEADY:
                    self.delays[n] = 0.0
                else:
                    self.delays[n] = min(self.MAX_DELAY, max(1.0, 2 * self.delays[n]))
                code = os.waitstatus_to_exitcode(status)
                print(
                    f"aptguard: worker {pid} ended ({_ended(code)}); starting another"
                    + (f" in {self.delays[n]:g} s" if self.delays[n] else ""),
                    file=sys.stderr,
                    flush=True,
                )
                self._pause(self.delays[n])
                if not self.stopping:
                    self._spawn(n)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _pause(self, seconds: float) -> None:
        """Sleep, but not past a SIGTERM (a plain sleep() resumes after the signal's handler)."""
        end = time.monotonic() + seconds
        while not self.stopping and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _spawn(self, n: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 70
            try:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(signum, signal.SIG_DFL)
                die_with_parent(parent, signal.SIGTERM)
                self.jobs[n]()
                code = 0
            except BaseException:  # noqa: BLE001 - a worker reports and ends, never returns to the CLI
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pids[pid] = (n, time.monotonic())

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _ended(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit {code}"
