"""The embedded server under abusive clients: operator pages polled in a loop, and slow connections.

A mirror of a real signed upstream is synced with the real CLI. The page test runs the server's
own application in process, to count what each request reads. The connection tests start the
real `aptguard serve` with the soft open-files limit most systems give a service (1,024), open
more slow connections than the server's bound from raw sockets on 127.0.0.1, and check that a
normal client is still answered at once and that the slow ones are closed at the header deadline.
"""

from __future__ import annotations

import asyncio
import json
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aptguard import serve, summary
from aptguard.config import load_config
from aptguard.records import Manifest
from aptguard.store import FileStore
from fixtures.keys import write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror
from tests.servers import raw_get

SUITE = "stable"
INRELEASE = f"/up/dists/{SUITE}/InRelease"
DEFAULT_SOFT_NOFILE = 1024  # what systemd and login sessions give a process unless told otherwise
SLOW_CONNECTIONS = serve.MAX_CONNECTIONS + 100


def synced_mirror(workdir: Path, key: Any, deb_cache: Path) -> tuple[Mirror, Repo, Upstream]:
    repo = Repo(workdir / "upstream", deb_cache)
    repo.add(SUITE, "main", "amd64", "hello", "1.0-1")
    repo.publish(SUITE, [key])
    upstream = Upstream(repo.root).start()
    keyring = write_keyring(workdir / "keys" / "up.asc", [key])
    mirror = Mirror.single(workdir / "mirror", upstream.url, keyring, suites=[SUITE])
    run = mirror.sync()
    assert run.returncode == 0, run.output
    return mirror, repo, upstream


# -- operator pages: a summary per snapshot, never the manifest per request ------------------


async def _fetch_pages(url: str, rounds: int) -> dict[str, list[bytes]]:
    """Every operator page `rounds` times, the three pages requested concurrently each round."""
    bodies: dict[str, list[bytes]] = {"/status": [], "/": [], "/metrics": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(path: str) -> None:
            async with session.get(url + path) as resp:
                assert resp.status == 200, path
                bodies[path].append(await resp.read())

        for _ in range(rounds):
            await asyncio.gather(*(one(path) for path in bodies))
    return bodies


def test_operator_pages_parse_no_manifest_per_request(
    tmp_path: Path, keys, deb_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/status, / and /metrics, requested again and again, parse no manifest in the server process
    and have a child process summarize each current snapshot once; a promotion is seen at once."""
    mirror, repo, upstream = synced_mirror(tmp_path, keys("abuse-pages"), deb_cache)
    try:
        config = load_config(mirror.config)
        store = FileStore(config.data_dir)
        in_process: list[tuple[str, str]] = []
        in_child: list[tuple[str, str]] = []
        read_manifest, compute_in_child = FileStore.read_manifest, summary._compute_in_child

        def counting_read(self: FileStore, name: str, snap_id: str) -> Manifest:
            in_process.append((name, snap_id))
            return read_manifest(self, name, snap_id)

        async def counting_child(key: tuple[str, str, str]) -> None:
            in_child.append(key[1:])
            await compute_in_child(key)

        monkeypatch.setattr(FileStore, "read_manifest", counting_read)
        monkeypatch.setattr(summary, "_compute_in_child", counting_child)

        async def scenario() -> tuple[dict[str, list[bytes]], dict[str, list[bytes]], str]:
            [sockets] = serve.listen("127.0.0.1", 0)
            async with serve.serving(config, store, sockets):
                url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
                before = await _fetch_pages(url, 10)
                repo.add(SUITE, "main", "amd64", "hello", "2.0-1")
                repo.publish(SUITE, [keys("abuse-pages")])
                run = await asyncio.to_thread(mirror.sync)
                assert run.returncode == 0, run.output
                after = await _fetch_pages(url, 10)
                return before, after, store.current("up") or ""

        first = store.current("up")
        before, after, second = asyncio.run(scenario())
    finally:
        upstream.stop()
    assert in_process == [], "the server parsed a manifest in process"
    assert in_child == [("up", first), ("up", second)], in_child
    cli = mirror.status()["upstreams"]["up"]  # the CLI, from the manifest itself
    manifest = read_manifest(store, "up", second).to_json()
    for body in after["/status"]:
        served = json.loads(body)["upstreams"]["up"]
        assert served["current"] == second == cli["current"]
        assert {s: (i["date"], i["valid_until"]) for s, i in served["suites"].items()} == {
            s: (i["date"], i["valid_until"]) for s, i in cli["suites"].items()
        }
    assert all(json.loads(body)["upstreams"]["up"]["current"] == first for body in before["/status"])
    assert all(second.encode() in body for body in after["/"])
    assert (
        f'aptguard_current_snapshot_bytes{{upstream="up"}} {float(manifest["bytes"])}'.encode() in after["/metrics"][-1]
    )


# -- slow clients --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, keys, deb_cache: Path) -> Iterator[tuple[Mirror, bytes]]:
    """A synced mirror served by `aptguard serve` started with a soft limit of 1,024 open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < SLOW_CONNECTIONS + 200:
        pytest.skip(f"the hard open-files limit ({hard}) cannot hold {SLOW_CONNECTIONS} test connections")
    if soft != resource.RLIM_INFINITY and soft < SLOW_CONNECTIONS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, SLOW_CONNECTIONS + 1000), hard))  # this process's own
    mirror, repo, upstream = synced_mirror(tmp_path_factory.mktemp("abuse"), keys("abuse"), deb_cache)
    mirror.start_server(soft_nofile=DEFAULT_SOFT_NOFILE)
    yield mirror, (repo.root / f"dists/{SUITE}/InRelease").read_bytes()
    mirror.stop_server()
    upstream.stop()


def timed_get(mirror: Mirror, path: str) -> tuple[float, int, bytes]:
    """(seconds, status, body) of one GET from a new connection; a timeout counts as 10 s and status 0."""
    started = time.monotonic()
    try:
        status, _, body = raw_get(mirror.url, path)
    except OSError:
        return time.monotonic() - started, 0, b""
    return time.monotonic() - started, status, body


def closed(sock: socket.socket) -> bool:
    """Whether the server closed this connection (it sends nothing else to a request never finished)."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_server_raises_its_soft_open_files_limit_to_the_hard_limit(served: tuple[Mirror, bytes]) -> None:
    mirror, _ = served
    assert mirror.server is not None
    limits = Path(f"/proc/{mirror.server.pid}/limits").read_text()
    soft, hard = next(line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files"))
    assert soft == hard or (hard == "unlimited" and int(soft) >= 1 << 20), limits
    assert int(soft) > DEFAULT_SOFT_NOFILE, limits


def test_slow_connections_past_the_bound_do_not_starve_a_normal_client(served: tuple[Mirror, bytes]) -> None:
    """More connections than the bound, each sending one header line every 3 s: a normal client is
    answered at once, the bound holds (the oldest waiting ones make room), and every slow connection
    is closed at the header deadline, not before and not much after."""
    mirror, inrelease = served
    assert mirror.port is not None
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    ended: dict[socket.socket, float] = {}
    normal: list[tuple[float, int, bytes]] = []
    try:
        give_up = time.monotonic() + 20
        while len(opened) < SLOW_CONNECTIONS and time.monotonic() < give_up:
            sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=2)
            sock.setblocking(False)
            sock.send(b"GET /up/dists/stable/InRelease HTTP/1.1\r\n")
            opened[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_READ)
        assert len(opened) == SLOW_CONNECTIONS, f"only {len(opened)} connections opened in 20 s"
        all_open = time.monotonic()
        line, next_line, next_normal = 0, all_open + 3, all_open + 0.5
        end = all_open + serve.HEADER_TIMEOUT + 6
        while time.monotonic() < end and len(ended) < len(opened):
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if closed(sock):
                    ended[sock] = time.monotonic()
                    selector.unregister(sock)
            now = time.monotonic()
            if now >= next_line:  # one more header line on every slow connection still open
                line += 1
                for sock in opened:
                    if sock not in ended:
                        try:
                            sock.send(f"X-Slow-{line}: {'x' * 20}\r\n".encode())
                        except OSError:
                            pass  # closed: the selector reports it
                next_line = now + 3
            if now >= next_normal and len(normal) < 3:
                if not normal:  # half a second after the burst: the bound held, by closing the oldest
                    assert len(opened) - len(ended) <= serve.MAX_CONNECTIONS, len(opened) - len(ended)
                normal.append(timed_get(mirror, INRELEASE))
                next_normal = now + 3
    finally:
        for sock in opened:
            sock.close()
        selector.close()
    assert len(normal) == 3 and all(status == 200 and body == inrelease for _, status, body in normal), [
        (round(t, 2), s) for t, s, _ in normal
    ]
    assert max(t for t, _, _ in normal) < 2.0, [round(t, 2) for t, _, _ in normal]
    still_open = [s for s in opened if s not in ended]
    assert not still_open, f"{len(still_open)} slow connections still open {end - all_open:.0f} s after the burst"
    early = [i for i, s in enumerate(opened) if ended[s] - opened[s] < serve.HEADER_TIMEOUT - 0.5]
    # Made room for the connections past the bound and the normal client's: the oldest ones only.
    assert len(early) <= SLOW_CONNECTIONS - serve.MAX_CONNECTIONS + len(normal), len(early)
    assert all(i < len(early) + 20 for i in early), early
    lasted = max(ended[s] - opened[s] for s in opened)
    assert lasted < serve.HEADER_TIMEOUT + 4, lasted


def test_deadlines_cut_silent_and_idle_connections_but_not_a_slow_whole_request(
    served: tuple[Mirror, bytes],
) -> None:
    """A new connection that sends nothing is closed at the header deadline; a kept-alive one, at the
    idle deadline after its last answer; a request whose lines arrive over 3 s is answered."""
    mirror, inrelease = served
    assert mirror.port is not None
    silent = socket.create_connection(("127.0.0.1", mirror.port), timeout=5)
    silent_opened = time.monotonic()
    kept = socket.create_connection(("127.0.0.1", mirror.port), timeout=5)
    kept.sendall(f"GET {INRELEASE} HTTP/1.1\r\nHost: mirror\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < len(inrelease):
        chunk = kept.recv(65536)
        assert chunk, answer
        answer += chunk
    answered = time.monotonic()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(inrelease)
    slow = socket.create_connection(("127.0.0.1", mirror.port), timeout=5)
    for part in (
        f"GET {INRELEASE} HTTP/1.1\r\n",
        "Host: mirror\r\n",
        "User-Agent: slow\r\n",
        "Connection: close\r\n\r\n",
    ):
        slow.sendall(part.encode())
        time.sleep(1)
    body = b""
    while chunk := slow.recv(65536):
        body += chunk
    assert body.startswith(b"HTTP/1.1 200") and body.endswith(inrelease), body[:200]
    ends: dict[str, float] = {}
    for sock in (silent, kept):
        sock.setblocking(False)
    give_up = answered + serve.IDLE_TIMEOUT + 6
    while len(ends) < 2 and time.monotonic() < give_up:
        for name, sock in (("silent", silent), ("kept", kept)):
            if name not in ends and closed(sock):
                ends[name] = time.monotonic()
        time.sleep(0.05)
    for sock in (silent, kept, slow):
        sock.close()
    assert set(ends) == {"silent", "kept"}, (
        f"still open {give_up - answered:.0f} s later: {set(ends) ^ {'silent', 'kept'}}"
    )
    assert serve.HEADER_TIMEOUT - 0.5 < ends["silent"] - silent_opened < serve.HEADER_TIMEOUT + 3
    assert serve.IDLE_TIMEOUT - 0.5 < ends["kept"] - answered < serve.IDLE_TIMEOUT + 3


def test_a_reader_that_takes_nothing_is_cut_after_the_send_deadline(
    tmp_path: Path, keys, deb_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that asks for a large file and stops reading loses its connection once the
    socket has taken no byte for SEND_TIMEOUT (nginx's send_timeout), instead of holding its
    slot for ever; the server on the loop `serve` runs (uvloop's, with sendfile)."""
    from tests.servers import Site

    size = 8_000_000  # past the kernel's largest send buffer: the socket fills
    site = Site(tmp_path, keys("abuse-send"), deb_cache, big=size)
    try:
        monkeypatch.setattr(serve, "SEND_TIMEOUT", 1.5)
        config = load_config(site.mirror.config)
        store = FileStore(config.data_dir)
        deb = site.repo.deb_path("stable", "main", "amd64", "bigpkg").relative_to(site.repo.root).as_posix()

        async def scenario() -> tuple[int, float]:
            loop = asyncio.get_running_loop()
            [sockets] = serve.listen("127.0.0.1", 0)
            async with serve.serving(config, store, sockets):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
                client.setblocking(False)
                await loop.sock_connect(client, sockets[0].getsockname())
                await loop.sock_sendall(client, f"GET /example/{deb} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                got = len(await loop.sock_recv(client, 4096))
                stopped = loop.time()
                await asyncio.sleep(serve.SEND_TIMEOUT + 2.0)  # reads nothing
                try:
                    while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10):
                        got += len(chunk)
                except ConnectionResetError:
                    pass
                finally:
                    client.close()
                return got, loop.time() - stopped

        with asyncio.Runner(loop_factory=serve.SendfileLoop) as runner:
            got, lasted = runner.run(scenario())
    finally:
        site.close()
    assert got < size, "the whole file went out: the server waited for the reader"
    assert lasted < serve.SEND_TIMEOUT + 15
