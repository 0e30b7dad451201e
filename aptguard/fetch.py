"""Downloads from an upstream: one aiohttp session per sync, bounded, retried, hashed as it streams.

The fetcher reports facts (size and hashes of what arrived, or that it is absent); it never
decides whether they are trustworthy: verify.py does. It does enforce the one limit that must
hold while bytes arrive: nothing is stored past the size the caller declared.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from aptguard.reasons import Rejected

if TYPE_CHECKING:
    import aiohttp

CHUNK = 64 * 1024
# Bytes gathered before they are written and hashed in a worker thread: the hashing (every
# listed algorithm, GIL released) runs on the other core while the loop receives, with one
# thread hop per 256 KiB rather than three per chunk.
FLUSH = 256 * 1024
INLINE = 16 * 1024  # a body this small is cheaper to hash and write than to hand to a thread
REDIRECTS = 5
HASHLIB_NAMES = {"md5": "md5", "sha1": "sha1", "sha256": "sha256", "sha512": "sha512"}


@dataclass(frozen=True)
class Download:
    """A body that arrived whole, in a temporary file the caller adopts or removes."""

    path: Path
    size: int
    hashes: dict[str, str]

    def read(self) -> bytes:
        return self.path.read_bytes()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class _Retry(Exception):
    """A failure that may pass: connection, timeout, 5xx, a body cut short."""


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
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.tmp_dir = tmp_dir
        self.attempts = attempts
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.concurrency = concurrency
        self.on_bytes = on_bytes
        self._slots = asyncio.Semaphore(concurrency)
        self._names = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

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
                headers={"User-Agent": "aptguard"},
            )
        return self._session

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(
        self, rel: str, *, limit: int, algos: Iterable[str] = ("sha256",), light: bool = False
    ) -> Download | None:
        """Download `rel` into a temp file, hashing with `algos`; None when upstream says 404/410.

        `light`: one of the few small files fetched before any bulk (InRelease, Release, Release.gpg),
        fetched with the standard library in a thread so that an unchanged upstream costs no aiohttp.
        Raises Rejected: `too-large` past `limit` bytes, `unreachable` after retries, `storage-error`.
        """
        url = self.base_url + rel
        algos = tuple(sorted(set(algos) | {"sha256"}))
        async with self._slots:
            for attempt in range(1, self.attempts + 1):
                try:
                    if light and self._session is None:
                        return await asyncio.to_thread(self._light_once, url, rel, limit, algos)
                    return await self._once(url, rel, limit, algos)
                except _Retry as exc:
                    if attempt == self.attempts:
                        raise Rejected("unreachable", f"{url}: {exc} (after {self.attempts} attempts)") from None
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable code")

    async def _once(self, url: str, rel: str, limit: int, algos: tuple[str, ...]) -> Download | None:
        import aiohttp

        session = self._open_session()
        self.requests += 1
        try:
            async with session.get(url, max_redirects=REDIRECTS) as resp:
                if not _judge(resp.status, resp.reason, resp.content_length, url, rel, limit):
                    return None
                return await self._stream(resp, rel, limit, algos)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _Retry(_describe(exc)) from None
        except aiohttp.TooManyRedirects:
            raise Rejected("unreachable", f"{url}: too many redirects") from None
        except aiohttp.ClientError as exc:  # redirect to a non-http URL, bad URL, ...
            raise Rejected("unreachable", f"{url}: {_describe(exc)}") from None

    async def _stream(self, resp: aiohttp.ClientResponse, rel: str, limit: int, algos: tuple[str, ...]) -> Download:
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
            # created, written, hashed and closed in one worker-thread call, off the event loop.
            if out is not None or held > INLINE:
                out = await asyncio.to_thread(_absorb, out, path, hashers, pending, close=True)
            else:
                out = _absorb(out, path, hashers, pending, close=True)
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
        import http.client
        import urllib.parse

        self.requests += 1
        for _hop in range(REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise Rejected("unreachable", f"{url}: not an http or https URL")
            kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = kind(parts.hostname, parts.port, timeout=self.connect_timeout)
            try:
                try:
                    conn.connect()
                    assert conn.sock is not None
                    conn.sock.settimeout(self.read_timeout)
                    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                    conn.request("GET", target, headers={"User-Agent": "aptguard", "Accept-Encoding": "identity"})
                    resp = conn.getresponse()
                    if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                        url = urllib.parse.urljoin(url, resp.getheader("Location", ""))
                        continue
                    length = resp.getheader("Content-Length")
                    declared = int(length) if length and length.isdigit() else None
                    if not _judge(resp.status, resp.reason, declared, url, rel, limit):
                        return None
                    body = resp.read(limit + 1)
                    if declared is not None and len(body) < declared:
                        raise _Retry(f"body cut short: {len(body)} of {declared} bytes")
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(_describe(exc)) from None
            finally:
                conn.close()
            if len(body) > limit:
                raise Rejected("too-large", f"{rel}: the body ran past the {limit} bytes declared for it")
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
        raise Rejected("unreachable", f"{url}: too many redirects")


def _judge(status: int, reason: str | None, declared: int | None, url: str, rel: str, limit: int) -> bool:
    """What an HTTP answer means, for both clients: True to read the body, False for absent
    (404/410); raises _Retry for 5xx, Rejected for other statuses and an announced size past `limit`."""
    if status in (404, 410):
        return False
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
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
