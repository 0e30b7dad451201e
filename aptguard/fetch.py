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

import aiofiles
import aiohttp

from aptguard.reasons import Rejected

CHUNK = 256 * 1024
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
        self.timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self.concurrency = concurrency
        self.on_bytes = on_bytes
        self._slots = asyncio.Semaphore(concurrency)
        self._names = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> Fetcher:
        self._session = aiohttp.ClientSession(
            timeout=self.timeout,
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            auto_decompress=False,  # bytes exactly as upstream signed them
            headers={"User-Agent": "aptguard"},
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, rel: str, *, limit: int, algos: Iterable[str] = ("sha256",)) -> Download | None:
        """Download `rel` into a temp file, hashing with `algos`; None when upstream says 404/410.

        Raises Rejected: `too-large` past `limit` bytes, `unreachable` after retries, `storage-error`.
        """
        url = self.base_url + rel
        algos = tuple(sorted(set(algos) | {"sha256"}))
        async with self._slots:
            for attempt in range(1, self.attempts + 1):
                try:
                    return await self._once(url, rel, limit, algos)
                except _Retry as exc:
                    if attempt == self.attempts:
                        raise Rejected("unreachable", f"{url}: {exc} (after {self.attempts} attempts)") from None
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        raise AssertionError("unreachable code")

    async def _once(self, url: str, rel: str, limit: int, algos: tuple[str, ...]) -> Download | None:
        assert self._session is not None, "use Fetcher as an async context manager"
        self.requests += 1
        try:
            async with self._session.get(url, max_redirects=5) as resp:
                if resp.status in (404, 410):
                    return None
                if resp.status >= 500:
                    raise _Retry(f"HTTP {resp.status} {resp.reason}")
                if resp.status != 200:
                    raise Rejected("unreachable", f"{url}: HTTP {resp.status} {resp.reason}")
                declared = resp.content_length
                if declared is not None and declared > limit:
                    raise Rejected(
                        "too-large", f"{rel}: upstream announces {declared} bytes, more than the {limit} declared"
                    )
                return await self._stream(resp, rel, limit, algos)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            raise _Retry(_describe(exc)) from None
        except aiohttp.TooManyRedirects:
            raise Rejected("unreachable", f"{url}: too many redirects") from None
        except aiohttp.ClientError as exc:  # redirect to a non-http URL, bad URL, ...
            raise Rejected("unreachable", f"{url}: {_describe(exc)}") from None

    async def _stream(self, resp: aiohttp.ClientResponse, rel: str, limit: int, algos: tuple[str, ...]) -> Download:
        hashers = {a: hashlib.new(HASHLIB_NAMES[a]) for a in algos}
        path = self.tmp_dir / f"dl-{os.getpid()}-{next(self._names)}"
        size = 0
        done = False
        try:
            async with aiofiles.open(path, "wb") as out:
                async for chunk in resp.content.iter_chunked(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise Rejected("too-large", f"{rel}: the body ran past the {limit} bytes declared for it")
                    for h in hashers.values():
                        h.update(chunk)
                    await out.write(chunk)
                    if self.on_bytes:
                        self.on_bytes(len(chunk))
            done = True
        except OSError as exc:
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise
            raise Rejected("storage-error", f"{path}: {exc.strerror or exc} while storing {rel}") from None
        finally:
            if not done:
                path.unlink(missing_ok=True)
        return Download(path, size, {a: h.hexdigest() for a, h in hashers.items()})


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
