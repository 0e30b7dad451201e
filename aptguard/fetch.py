"""Downloads from an upstream: one aiohttp session per sync, bounded, retried, hashed as it streams.

The fetcher reports facts (size and hashes of what arrived, or that it is absent); it never
decides whether they are trustworthy: verify.py does. It does enforce the limits that must
hold while bytes arrive (SPEC §1 [limits], §3.8, §3.9): nothing is stored past the size the
caller declared, a download slower than `min_rate` over `rate_window` is cut, and nothing runs
past the sync's deadline. Whatever an upstream sends (a redirect anywhere, a malformed header,
a body that trickles) ends as a reason code, never as a traceback or a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import importlib
import io
import ipaddress
import itertools
import os
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from aptguard.config import format_rate
from aptguard.reasons import Rejected

if TYPE_CHECKING:
    import aiohttp

CHUNK = 64 * 1024
# Bytes gathered before they are written and hashed in a worker thread: the hashing (every
# listed algorithm, GIL released) runs on the other core while the loop receives, with one
# thread hop per 256 KiB rather than three per chunk.
FLUSH = 256 * 1024
INLINE = FLUSH  # a body this small is hashed on the loop and held in memory until the caller saves it
REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Requests say which body encoding they take: apt sends no Accept-Encoding, and a CDN that gzips
# on the fly for a client that allows it hands out bytes that match no hash in the Release.
HEADERS = {"User-Agent": "aptguard", "Accept-Encoding": "identity"}
# A DNS name or IPv4 address: labels of 1-63 letters, digits, '-' or '_', no empty label (the
# idna codec under getaddrinfo raises UnicodeError on one); IPv6 comes in brackets.
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)
_PRINTABLE = re.compile(r"[!-~]+")  # printable ASCII, no space: checked in C for every request
HASHLIB_NAMES = {"md5": "md5", "sha1": "sha1", "sha256": "sha256", "sha512": "sha512"}


@dataclass
class Download:
    """A body that arrived whole, in a temporary file the caller adopts or removes. A small body
    is held in memory until save() (creating a file waits on the filesystem journal: the event
    loop must not), which the caller runs in a worker thread."""

    path: Path
    size: int
    hashes: dict[str, str]
    data: bytes | None = None

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else open(self.path, "rb")  # noqa: SIM115

    def save(self) -> Path:
        """The body as a read-only file at `path` (written now if it was held in memory)."""
        if self.data is not None:
            with _create(self.path) as out:
                out.write(self.data)
            self.data = None
        return self.path

    def discard(self) -> None:
        self.data = None
        self.path.unlink(missing_ok=True)


class _Retry(Exception):
    """A failure that may pass: connection, timeout, 5xx, a body cut short."""


def preload() -> None:
    """Start importing aiohttp in a thread, for a sync that will surely need it: a first sync
    fetches the whole pool. The import takes 0.25-0.35 s (2 CPUs), over a third of it loading
    the system's CA certificates into the SSL contexts aiohttp builds at import, which releases
    the GIL; meanwhile the keyring is listed and the Releases are fetched and verified. Whoever
    imports aiohttp next waits for this import (Python's import lock), or makes its own if
    this one failed."""
    if "aiohttp" in sys.modules:
        return

    def load() -> None:
        with contextlib.suppress(Exception):  # whoever needs aiohttp imports it again, and says why
            importlib.import_module("aiohttp")

    threading.Thread(target=load, name="aptguard-preload", daemon=True).start()


class Fetcher:
    """Fetch paths below one upstream URL."""

    def __init__(
        self,
        base_url: str,
        tmp_dir: Path,
        *,
        concurrency: int = 16,
        attempts: int = 4,
        backoff: float = 0.5,
        connect_timeout: float = 15.0,
        read_timeout: float = 60.0,
        on_bytes: Callable[[int], None] | None = None,
        min_rate: int = 1024,
        rate_window: float = 60.0,
        deadline: float | None = None,
    ) -> None:
        """`min_rate` (bytes/s, 0: no minimum) over `rate_window` seconds and `deadline` (a
        time.monotonic() value: the sync's limits.sync_timeout) bound every request of both clients."""
        if rate_window <= 0:
            raise ValueError("rate_window must be more than 0 seconds")
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.tmp_dir = tmp_dir
        self.attempts = attempts
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.concurrency = concurrency
        self.on_bytes = on_bytes
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.deadline = deadline
        self._slots = asyncio.Semaphore(concurrency)
        self._names = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    def sibling(self, *, on_bytes: Callable[[int], None] | None) -> Fetcher:
        """A fetcher with the same settings and its own connections and counters (for the
        sync's twin process, which must not touch its parent's sockets)."""
        twin = copy.copy(self)
        twin.on_bytes = on_bytes
        twin._slots = asyncio.Semaphore(self.concurrency)
        twin._names = itertools.count()
        twin._session = None
        twin.requests = 0
        return twin

    async def __aenter__(self) -> Fetcher:
        return self

    def _open_session(self) -> aiohttp.ClientSession:
        """The aiohttp session, opened at the first bulk fetch: importing aiohttp costs about
        0.1 s (it loads the CA store), and a sync that finds its Release unchanged needs none."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout, sock_read=self.read_timeout),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                read_bufsize=64 * 1024,  # with FLUSH: at most ~0.4 MB held per download (peak RSS)
                auto_decompress=False,  # bytes exactly as upstream signed them
                headers=HEADERS,
            )
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(
        self, rel: str, *, limit: int, algos: Iterable[str] = ("sha256",), light: bool = False
    ) -> Download | None:
        """Download `rel` into a temp file, hashing with `algos`; None when upstream says 404/410.

        `light`: a small file of a sync that fetches few (InRelease, Release, Release.gpg, a small
        index, a handful of small packages), fetched with the standard library in a thread, the
        body in memory, so that such a sync costs no aiohttp import; once aiohttp is in use, it is.
        Raises Rejected: `too-large` past `limit` bytes, `unreachable` after retries, when slower than
        `min_rate` or past the deadline, on a bad URL or redirect or a malformed response; `storage-error`.
        """
        url = self.base_url + rel
        algos = tuple(sorted(set(algos) | {"sha256"}))
        async with self._slots:
            for attempt in range(1, self.attempts + 1):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise _out_of_time(url)
                try:
                    if light and self._session is None:
                        return await asyncio.to_thread(self._light_once, url, rel, limit, algos)
                    return await self._watched(url, rel, limit, algos)
                except _Retry as exc:
                    if attempt == self.attempts:
                        raise Rejected("unreachable", f"{url}: {exc} (after {self.attempts} attempts)") from None
                    pause = self.backoff * 2 ** (attempt - 1)
                    if self.deadline is not None and time.monotonic() + pause >= self.deadline:
                        raise Rejected(
                            "unreachable", f"{url}: {exc}; sync_timeout reached before a retry (limits.sync_timeout)"
                        ) from None
                    await asyncio.sleep(pause)
        raise AssertionError("unreachable code")

    def _pace(self, url: str) -> _Pace:
        return _Pace(url, self.min_rate, self.rate_window, self.deadline)

    async def _watched(self, url: str, rel: str, limit: int, algos: tuple[str, ...]) -> Download | None:
        """One attempt with aiohttp, cut as soon as its pace fails: connecting, waiting for
        headers and receiving the body alike (a trickle never lets sock_read time out).

        A timer asks the pace every pause() seconds; a failing pace cancels this task, and the
        cancellation becomes the pace's verdict, as asyncio.timeout turns its own into a
        TimeoutError (a task and asyncio.wait per request cost 40 us more: 2 s of a cold sync of
        60,000 files)."""
        pace = self._pace(url)
        wait = pace.pause()
        if wait is None:
            return await self._once(url, rel, limit, algos, pace)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        cut: list[Rejected] = []

        def tick() -> None:
            nonlocal timer
            verdict = pace.verdict()
            if verdict is not None:
                cut.append(verdict)
                task.cancel()
                return
            timer = loop.call_later(pace.pause() or 0.0, tick)

        timer = loop.call_later(wait, tick)
        try:
            result = await self._once(url, rel, limit, algos, pace)
        except asyncio.CancelledError:
            if cut and task.uncancel() == 0:
                raise cut[0] from None
            raise
        finally:
            timer.cancel()
        if cut:  # cut as the attempt ended, which kept the cancellation to itself: its result stands
            task.uncancel()
        return result

    async def _once(self, url: str, rel: str, limit: int, algos: tuple[str, ...], pace: _Pace) -> Download | None:
        import aiohttp

        session = self._open_session()
        self.requests += 1
        target = url
        _split(url, url)
        for _hop in range(REDIRECTS + 1):
            try:
                # Redirects are followed here, not by aiohttp, so that both clients judge a
                # Location by the same rules (_follow).
                async with session.get(target, allow_redirects=False) as resp:
                    following = _follow(url, target, resp.status, resp.headers.getall("Location", []))
                    if following is not None:
                        target = following
                        continue
                    declared = _content_length(url, resp.headers.getall("Content-Length", []))
                    if not _judge(resp.status, resp.reason, declared, url, rel, limit):
                        return None
                    return await self._stream(resp, rel, limit, algos, pace)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                raise _Retry(_describe(exc)) from None
            except aiohttp.ClientResponseError as exc:  # aiohttp's parser refused what upstream sent
                raise Rejected("unreachable", f"{url}: malformed HTTP response: {_parser_says(exc)}") from None
            except (aiohttp.ClientError, ValueError) as exc:  # a URL aiohttp or yarl refuses
                raise Rejected("unreachable", f"{url}: {_describe(exc)}") from None
        raise Rejected("unreachable", f"{url}: too many redirects")

    async def _stream(
        self, resp: aiohttp.ClientResponse, rel: str, limit: int, algos: tuple[str, ...], pace: _Pace
    ) -> Download:
        import aiohttp

        hashers = [hashlib.new(HASHLIB_NAMES[a]) for a in algos]
        path = self.tmp_dir / f"dl-{os.getpid()}-{next(self._names)}"
        size = 0
        done = False
        pending: list[bytes] = []
        held = 0
        out: BinaryIO | None = None
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                size += len(chunk)
                pace.add(len(chunk))
                if size > limit:
                    raise Rejected("too-large", f"{rel}: the body ran past the {limit} bytes declared for it")
                pending.append(chunk)
                held += len(chunk)
                if held >= FLUSH:
                    out = await asyncio.to_thread(_absorb, out, path, hashers, pending)
                    pending, held = [], 0
                if self.on_bytes:
                    self.on_bytes(len(chunk))
            # Creating a file waits on the filesystem journal: a body of more than a few KiB is
            # created, written, hashed and closed in one worker-thread call, off the event loop;
            # a smaller one is hashed here and kept in memory until the caller saves it.
            if out is not None or held > INLINE:
                out = await asyncio.to_thread(_absorb, out, path, hashers, pending, close=True)
            else:
                # Hashed whole: one call per algo, not one per chunk. Each call over 2 KiB lets go
                # of the GIL and waits to take it back from the worker threads that store files.
                data = b"".join(pending)
                for h in hashers:
                    h.update(data)
                done = True
                return Download(path, size, {a: h.hexdigest() for a, h in zip(algos, hashers, strict=True)}, data)
            done = True
        except OSError as exc:
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise
            raise Rejected("storage-error", f"{path}: {exc.strerror or exc} while storing {rel}") from None
        finally:
            if not done:
                if out is not None:
                    out.close()
                path.unlink(missing_ok=True)
        return Download(path, size, {a: h.hexdigest() for a, h in zip(algos, hashers, strict=True)})

    def _light_once(self, url: str, rel: str, limit: int, algos: tuple[str, ...]) -> Download | None:
        """One GET with http.client (runs in a thread), with the rules of `_once`."""
        pace = self._pace(url)
        self.requests += 1
        with _Watchdog(pace) as watchdog:
            target = url
            for _hop in range(REDIRECTS + 1):
                following, body = self._light_hop(url, target, rel, limit, pace, watchdog)
                if following is not None:
                    target = following
                    continue
                if body is None:
                    return None
                break
            else:
                raise Rejected("unreachable", f"{url}: too many redirects")
        path = self.tmp_dir / f"dl-{os.getpid()}-{next(self._names)}"
        try:
            with _create(path) as out:
                out.write(body)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise Rejected("storage-error", f"{path}: {exc.strerror or exc} while storing {rel}") from None
        if self.on_bytes:
            self.on_bytes(len(body))
        return Download(path, len(body), {a: hashlib.new(HASHLIB_NAMES[a], body).hexdigest() for a in algos})

    def _light_hop(
        self, url: str, target: str, rel: str, limit: int, pace: _Pace, watchdog: _Watchdog
    ) -> tuple[str | None, bytes | None]:
        """One request: (the URL it redirects to, None), (None, the body), or (None, None) for absent."""
        import http.client

        scheme, host, port, path = _split(url, target)
        kind = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        connect_timeout = self.connect_timeout
        if self.deadline is not None:  # a connect cannot be cut by the watchdog (no socket yet)
            connect_timeout = max(0.001, min(connect_timeout, self.deadline - time.monotonic()))
        conn = kind(host, port or (443 if scheme == "https" else 80), timeout=connect_timeout)
        # The watchdog watches the TCP socket from the moment it connects, before a TLS handshake
        # (which can trickle too); http.client makes every connection through this attribute.
        conn._create_connection = watchdog.connector(conn._create_connection)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
            conn.request("GET", path, headers=HEADERS)
            resp = conn.getresponse()
            following = _follow(url, target, resp.status, resp.headers.get_all("Location") or [])
            if following is not None:
                return following, None
            declared = _content_length(url, resp.headers.get_all("Content-Length") or [])
            if not _judge(resp.status, resp.reason, declared, url, rel, limit):
                return None, None
            chunks: list[bytes] = []
            size = 0
            while chunk := resp.read1(CHUNK):  # one recv at a time: the pace is checked between them
                size += len(chunk)
                pace.add(len(chunk))
                if size > limit:
                    raise Rejected("too-large", f"{rel}: the body ran past the {limit} bytes declared for it")
                chunks.append(chunk)
                watchdog.check()
            watchdog.check()  # an end of body may be the watchdog's cut
            if declared is not None and size < declared:
                raise _Retry(f"body cut short: {size} of {declared} bytes")
            return None, b"".join(chunks)
        except (OSError, http.client.HTTPException) as exc:
            watchdog.check()  # a socket cut by the watchdog: say why it was cut
            raise _Retry(_describe(exc)) from None
        finally:
            watchdog.release(conn)


class _Pace:
    """One fetch against `limits.min_rate` and the sync's deadline (SPEC §1 [limits]).

    Every `window` seconds of a fetch must carry `min_rate` × `window` bytes of body, the wait
    for headers included (a response that has not begun is as slow as one that stopped), and
    nothing runs past `deadline`. Thread-safe: the light client's reader adds, its watchdog asks.
    """

    def __init__(self, url: str, min_rate: int, window: float, deadline: float | None) -> None:
        self.url, self.min_rate, self.window, self.deadline = url, min_rate, window, deadline
        self.started = time.monotonic()
        # Bytes received per slice of window/32 seconds, [slice number, bytes], the recent ones:
        # the last window is judged to a slice's precision, in the download's favour.
        self._slice = window / 32
        self._slices: deque[list[int]] = deque()
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.min_rate <= 0:
            return
        number = int((time.monotonic() - self.started) / self._slice)
        with self._lock:
            if self._slices and self._slices[-1][0] == number:
                self._slices[-1][1] += n
            else:
                self._slices.append([number, n])

    def verdict(self) -> Rejected | None:
        """Why this fetch must stop now, or None."""
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            return _out_of_time(self.url)
        if self.min_rate > 0 and now - self.started >= self.window:
            first = int((now - self.window - self.started) / self._slice)  # the slice the window begins in
            with self._lock:
                while self._slices and self._slices[0][0] < first:
                    self._slices.popleft()
                carried = sum(n for _, n in self._slices)
            if carried < self.min_rate * self.window:
                return Rejected(
                    "unreachable",
                    f"{self.url}: slower than {format_rate(self.min_rate)} for {self.window:g} s (limits.min_rate)",
                )
        return None

    def check(self) -> None:
        verdict = self.verdict()
        if verdict is not None:
            raise verdict

    def pause(self) -> float | None:
        """How long a watcher may wait before asking again; None: there is nothing to watch."""
        waits = []
        if self.deadline is not None:
            waits.append(self.deadline - time.monotonic())
        if self.min_rate > 0:
            waits.append(self.window / 8)
        return min(60.0, max(0.0, min(waits))) if waits else None


class _Watchdog:
    """Cuts the light client's connection when its pace fails. http.client blocks in one recv at
    a time, and a response that trickles (its headers too) never lets a socket timeout fire;
    after the cut, the reading thread raises the pace's verdict, not what http.client makes of
    a dead socket."""

    def __init__(self, pace: _Pace) -> None:
        self.pace = pace
        self.fired: Rejected | None = None
        self._sock: socket.socket | None = None  # a dup of the connection's socket, ours to close
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _Watchdog:
        if self.pace.pause() is not None:
            self._thread = threading.Thread(target=self._run, name="aptguard-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def connector(self, connect: Callable[..., socket.socket]) -> Callable[..., socket.socket]:
        """`connect` (socket.create_connection), watching what it connects. The watchdog keeps a
        duplicate descriptor: shutting it down cuts the connection however http.client or ssl
        wrap, detach or close the original, and no other socket can ever get its number."""

        def connected(*args: Any, **kwargs: Any) -> socket.socket:
            sock = connect(*args, **kwargs)
            with self._lock:
                if self.fired is not None:  # the pace failed while connecting: nothing to cut yet
                    sock.close()
                    raise self.fired
                if self._sock is not None:
                    self._sock.close()
                self._sock = sock.dup()
            return sock

        return connected

    def release(self, conn: Any) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        conn.close()

    def check(self) -> None:
        with self._lock:
            if self.fired is not None:
                raise self.fired
        self.pace.check()

    def _run(self) -> None:
        while (pause := self.pace.pause()) is not None:
            if self._stop.wait(pause):
                return
            verdict = self.pace.verdict()
            if verdict is not None:
                with self._lock:
                    self.fired = verdict
                    if self._sock is not None:  # with no socket yet, `connector` raises once it connects
                        with contextlib.suppress(OSError):
                            self._sock.shutdown(socket.SHUT_RDWR)
                return


def _out_of_time(url: str) -> Rejected:
    return Rejected("unreachable", f"{url}: sync_timeout reached (limits.sync_timeout)")


class _BadURL(ValueError):
    """A URL neither client may be given: why, in words."""


def _split(url: str, target: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path?query) of `target`, checked so that no library raises on it
    later (getaddrinfo's idna codec on an empty label, urllib on a port past 65535, http.client
    on a control character); Rejected `unreachable` naming `url` otherwise."""
    try:
        if not _PRINTABLE.fullmatch(target):
            raise _BadURL("not a URL of printable ASCII characters")
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError as exc:
            raise _BadURL(f"not a URL ({exc})") from None
        if parts.scheme not in ("http", "https"):
            raise _BadURL("not an http or https URL")
        hostport = parts.netloc.rpartition("@")[2]
        if hostport.startswith("["):
            host, closed, rest = hostport[1:].partition("]")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                closed = ""
            if not closed or (rest and not rest.startswith(":")):
                raise _BadURL(f"no valid IPv6 host in {hostport!r}")
            port_text = rest[1:]
        else:
            host, _, port_text = hostport.partition(":")
            if len(host) > 253 or not _HOST_RE.fullmatch(host):
                raise _BadURL(f"no valid host name in {hostport!r}")
        port = None
        if port_text:
            if not (port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536):
                raise _BadURL(f"port {port_text!r} is not in 1-65535")
            port = int(port_text)
    except _BadURL as exc:
        where = "" if target == url else f"redirected to {target!r}: "
        raise Rejected("unreachable", f"{url}: {where}{exc}") from None
    return parts.scheme, host, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _follow(url: str, current: str, status: int, locations: list[str]) -> str | None:
    """The URL a redirect answer leads to, checked by `_split`; None for any other answer."""
    if status not in REDIRECT_STATUSES:
        return None
    if len(set(locations)) != 1 or not locations[0]:
        shown = ", ".join(_printable(repr(v)) for v in locations) or "none"
        raise Rejected("unreachable", f"{url}: HTTP {status} redirect without one Location (got {shown})")
    location = locations[0]
    if not all("!" <= c <= "~" for c in location):
        raise Rejected(
            "unreachable", f"{url}: redirected to {_printable(repr(location))}: not a URL of printable ASCII"
        )
    try:
        absolute = bool(urllib.parse.urlsplit(location).scheme)
        # urljoin would read "http:///x" or "http:x" as a path on the current host
        following = location if absolute else urllib.parse.urljoin(current, location)
    except ValueError as exc:
        raise Rejected("unreachable", f"{url}: redirected to {location!r}: not a URL ({exc})") from None
    _split(url, following)
    return following


def _content_length(url: str, values: list[str]) -> int | None:
    """The declared body size, read as apt reads it: one value of plain ASCII digits below 2**64,
    or the response is refused (apt: "The HTTP server sent an invalid Content-Length header").
    A repeated header is refused too, as aiohttp's parser refuses it."""
    if not values:
        return None
    text = values[0].strip(" \t")
    if len(values) == 1 and text.isascii() and text.isdigit() and len(text.lstrip("0")) <= 20 and int(text) < 2**64:
        return int(text)
    shown = ", ".join(_printable(repr(v[:40])) for v in values)
    raise Rejected("unreachable", f"{url}: malformed Content-Length header ({shown})")


def _judge(status: int, reason: str | None, declared: int | None, url: str, rel: str, limit: int) -> bool:
    """What an HTTP answer means, for both clients: True to read the body, False for absent
    (404/410); raises _Retry for 5xx, Rejected for other statuses and an announced size past `limit`."""
    if status in (404, 410):
        return False
    reason = _printable(str(reason), 80)  # upstream's words
    if status >= 500:
        raise _Retry(f"HTTP {status} {reason}")
    if status != 200:
        raise Rejected("unreachable", f"{url}: HTTP {status} {reason}")
    if declared is not None and declared > limit:
        raise Rejected("too-large", f"{rel}: upstream announces {declared} bytes, more than the {limit} declared")
    return True


def _create(path: Path) -> BinaryIO:
    """A new download file, read-only from birth: stored objects are never written again, and
    the mode costs no chmod when the file is adopted."""
    return open(path, "xb", opener=lambda name, flags: os.open(name, flags, 0o444))


def _absorb(
    out: BinaryIO | None, path: Path, hashers: list[Any], chunks: list[bytes], *, close: bool = False
) -> BinaryIO:
    """Write and hash received chunks in order, creating the file on the first call."""
    if out is None:
        out = _create(path)
    for chunk in chunks:
        out.write(chunk)
        for h in hashers:
            h.update(chunk)
    if close:
        out.close()
    return out


def _describe(exc: BaseException) -> str:
    """An exception in one line of printable text: its message may quote what upstream sent."""
    text = _printable(str(exc)) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _parser_says(exc: BaseException) -> str:
    """aiohttp's parser error in one line: "Invalid character in Content-Length: b'...'"."""
    lines = [line.strip() for line in str(getattr(exc, "message", exc)).splitlines()]
    return _printable(" ".join(line for line in lines if line and set(line) != {"^"})) or _describe(exc)


def _printable(text: str, limit: int = 300) -> str:
    """`text` with anything that is not printable escaped, cut at `limit` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "..."
