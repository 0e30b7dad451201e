"""The two servers of SPEC §4 over one data folder: `aptguard serve` and nginx with the rendered config.

Tests parametrize over both, so the embedded server and production's nginx answer the same
URLs the same way. nginx runs as a private instance (its own prefix, pid, logs and temp
paths, a free 127.0.0.1 port), started with the config `aptguard nginx-config` prints.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
from aiohttp import web

from fixtures.apt import AptClient, AptResult
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror, free_port, stop_process

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Nginx:
    """nginx serving `mirror`'s data folder, proxying /, /status, /metrics to its embedded server."""

    def __init__(self, mirror: Mirror, workdir: Path) -> None:
        self.mirror = mirror
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        assert self.mirror.port is not None, "start the embedded server first (nginx proxies / to it)"
        run_dir = self.workdir / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        rendered = self.mirror.run(
            "nginx-config",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--backend",
            f"127.0.0.1:{self.mirror.port}",
            "--runtime-dir",
            str(run_dir),
            "--user",
            "root",
        )
        assert rendered.returncode == 0, rendered.output
        conf = self.workdir / "nginx.conf"
        conf.write_text(rendered.stdout)
        check = subprocess.run(
            [NGINX, "-t", "-p", str(run_dir), "-c", str(conf)], capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(run_dir), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {(run_dir / 'error.log').read_text(errors='replace')}") from None
                time.sleep(0.05)
        raise RuntimeError("nginx did not listen within 15 s")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


def raw_get(url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """One request with `path` sent exactly as given (no client-side normalization): status, headers, body."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        parsed[key.strip().lower()] = value.strip()
    if parsed.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(status_line.split()[1]), parsed, body


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (zombies excluded)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def wait_for(condition, seconds: float = 10.0) -> bool:  # noqa: ANN001 - a predicate
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_http(url: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Site:
    """A signed upstream, a mirror of it synced once, and both servers over its data folder."""

    SUITE = "stable"
    NAME = "example"

    def __init__(
        self,
        workdir: Path,
        key: SigningKey,
        deb_cache: Path,
        *,
        by_hash: bool = True,
        big: int = 0,
        workers: int = 1,
        publish: dict[str, object] | None = None,
    ) -> None:
        """`publish`: the mirror serves a published view ([upstreams.NAME.publish] settings)."""
        self.workdir = workdir
        self.key = key
        self.by_hash = by_hash
        self.repo = Repo(workdir / "upstream", deb_cache)
        self.repo.add(self.SUITE, "main", "amd64", "hello", "1.0-1")
        if big:
            self.repo.add(self.SUITE, "main", "amd64", "bigpkg", "1.0-1", size=big)
        self.version = 1
        self.publish()
        self.upstream = Upstream(self.repo.root).start()
        self.keyring = write_keyring(workdir / "keys" / "example.asc", [key])
        self.mirror = Mirror(
            workdir / "mirror",
            {
                self.NAME: {
                    "url": self.upstream.url,
                    "suites": [self.SUITE],
                    "components": ["main"],
                    "architectures": ["amd64"],
                    "keyring": self.keyring,
                    **({"publish": publish} if publish else {}),
                }
            },
        )
        self.sync()
        self.mirror.start_server(workers=workers)
        self.nginx = Nginx(self.mirror, workdir / "nginx").start()

    def publish(self, **kw: object) -> None:
        # Plain Packages too, beside Packages.gz: a server must not swap one for the other.
        kw.setdefault("compressions", ("", "xz", "gz"))
        self.repo.publish(self.SUITE, [self.key], by_hash=self.by_hash, **kw)  # type: ignore[arg-type]

    def sync(self) -> str:
        run = self.mirror.sync()
        assert run.returncode == 0, run.output
        current = (self.mirror.data / "current" / self.NAME).readlink().name
        return current

    def new_version(self) -> str:
        """Upstream publishes a new hello; the mirror syncs and promotes it. Returns the new snapshot id."""
        self.version += 1
        self.repo.add(self.SUITE, "main", "amd64", "hello", f"{self.version}.0-1")
        self.publish()
        return self.sync()

    def url(self, server: str) -> str:
        return self.mirror.url if server == "embedded" else self.nginx.url

    def close(self) -> None:
        self.nginx.stop()
        self.mirror.stop_server()
        self.upstream.stop()


class SlowLink:
    """A reverse proxy in front of a server that delays every request but the Release files.

    A client on a slow link spends a while between reading InRelease and fetching the indices it
    names: the window in which a promotion can change what /NAME/... serves. Widening it makes
    the promotion race of guarantee 2 happen on every promotion instead of by luck.
    """

    def __init__(self, target: str, delay: float) -> None:
        self.target = target
        self.delay = delay
        self.port = free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.endswith(("/InRelease", "/Release", "/Release.gpg")):
            await asyncio.sleep(self.delay)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED}
        async with self._session.request(request.method, self.target + request.raw_path, headers=headers) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() in _RETURNED}
            return web.Response(status=resp.status, body=body, headers=out)

    def start(self) -> SlowLink:
        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def setup() -> None:
                self._session = aiohttp.ClientSession(auto_decompress=False)
                app = web.Application()
                app.router.add_route("*", "/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None)
                await self._runner.setup()
                await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

            self._loop.run_until_complete(setup())
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def teardown() -> None:
            await self._session.close()
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


_FORWARDED = {"if-modified-since", "if-none-match", "range", "if-range", "user-agent"}
_RETURNED = {"content-type", "last-modified", "etag", "content-range", "accept-ranges"}


def update_storm(
    clients: list[AptClient], promote: Callable[[], object], *, promotions: int, pause: float, max_seconds: float
) -> list[AptResult]:
    """Every client runs `apt-get update` in a loop while `promote()` runs `promotions` times,
    `pause` seconds apart; every result. Even-numbered clients are fresh CI runners (their
    lists removed before each update), odd ones long-lived hosts (If-Modified-Since)."""
    results: list[AptResult] = []
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + max_seconds

    def loop(n: int, client: AptClient) -> None:
        lists = client.workdir / "state" / "lists"
        while not stop.is_set() and time.monotonic() < deadline:
            if n % 2 == 0 and lists.is_dir():
                for old in lists.iterdir():
                    if old.is_file():
                        old.unlink()
            result = client.update()
            with lock:
                results.append(result)

    with ThreadPoolExecutor(len(clients)) as pool:
        futures = [pool.submit(loop, n, c) for n, c in enumerate(clients)]
        time.sleep(1.0)
        for _ in range(promotions):
            promote()
            time.sleep(pause)
        stop.set()
        for future in futures:
            future.result()
    return results
