"""A hostile or broken upstream can make a fetch fail, never crash it or hold it (SPEC §1 [limits], §3.9).

Each test runs the Fetcher itself against the fixture upstream on 127.0.0.1, through both of its
clients: aiohttp (indices and packages) and the standard library's http.client in a thread
("light": InRelease, Release, Release.gpg). Each first proves with a plain client that the
fault is really on the wire, then checks the verdict and that it came in bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aptguard.fetch import Download, Fetcher
from aptguard.reasons import Rejected
from fixtures.upstream import Upstream

PATHS = ["aiohttp", "light"]
BODY = b"Package: hello\nVersion: 1.0\n" * 40  # 1080 bytes


@pytest.fixture
def up(tmp_path: Path, serve: Callable[..., Upstream]) -> Upstream:
    root = tmp_path / "root"
    (root / "dists" / "stable").mkdir(parents=True)
    (root / "dists" / "stable" / "Packages").write_bytes(BODY)
    (root / "dists" / "stable" / "Other").write_bytes(b"other\n")
    return serve(root)


def fetch(up: Upstream | str, tmp_path: Path, how: str, rel: str = "dists/stable/Packages", **opts) -> Download | None:
    """One fetch through one of the Fetcher's two clients, as sync.py does it."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    limit = opts.pop("limit", 1_000_000)

    async def run() -> Download | None:
        async with Fetcher(up if isinstance(up, str) else up.url, work, **opts) as fetcher:
            return await fetcher.fetch(rel, limit=limit, light=how == "light")

    return asyncio.run(run())


def refused(
    up: Upstream, tmp_path: Path, how: str, rel: str = "dists/stable/Packages", **opts
) -> tuple[Rejected, float]:
    """The Rejected a fetch ends with, and how long it took to get there."""
    started = time.monotonic()
    with pytest.raises(Rejected) as caught:
        fetch(up, tmp_path, how, rel, **opts)
    return caught.value, time.monotonic() - started


def raw_head(up: Upstream, rel: str) -> bytes:
    """The response head exactly as the upstream sends it."""
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        sock.sendall(f"GET /{rel} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
    return head.partition(b"\r\n\r\n")[0]


# -- Accept-Encoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", PATHS)
def test_cdn_gzipping_on_the_fly_does_not_change_the_bytes(up: Upstream, tmp_path: Path, how: str) -> None:
    """apt sends no Accept-Encoding; a client that allows gzip gets bytes that fail their hash."""
    up.fault("dists/stable/Packages", "gzip")
    asked = urllib.request.Request(up.url + "dists/stable/Packages", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(asked, timeout=5) as resp:
        assert resp.headers["Content-Encoding"] == "gzip" and gzip.decompress(resp.read()) == BODY

    download = fetch(up, tmp_path, how)
    assert download is not None and download.read() == BODY and download.size == len(BODY)


# -- redirects ---------------------------------------------------------------------------------

BAD_LOCATIONS = {
    "port out of range": "http://127.0.0.1:99999/x",
    "port zero": "http://127.0.0.1:0/x",
    "negative port": "http://127.0.0.1:-1/x",
    "empty label": "http://a..b/x",
    "no host": "http:///x",
    "ftp": "ftp://127.0.0.1/x",
    "file": "file:///etc/passwd",
    "unclosed ipv6": "http://[::1/x",
    "space in host": "http://exa mple/x",
    "control character": "http://127.0.0.1/\x01x",
    "non-ascii bytes": b"http://\xc3\xa9\xff../x",
    "empty": "",
}


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("case", list(BAD_LOCATIONS))
def test_redirect_to_a_bad_location_is_unreachable_naming_the_url(
    up: Upstream, tmp_path: Path, how: str, case: str
) -> None:
    location = BAD_LOCATIONS[case]
    up.fault(
        "dists/stable/Packages", "raw", code=302, headers=[("Location", location), ("Content-Length", "0")], data=b""
    )
    sent = location if isinstance(location, bytes) else location.encode()
    assert b"\r\nLocation: " + sent + b"\r\n" in raw_head(up, "dists/stable/Packages") + b"\r\n"

    reason, elapsed = refused(up, tmp_path, how)
    assert reason.reason == "unreachable", reason
    assert reason.detail.startswith(up.url + "dists/stable/Packages: "), reason.detail
    assert "redirect" in reason.detail, reason.detail
    assert elapsed < 10


@pytest.mark.parametrize("how", PATHS)
def test_a_good_redirect_is_followed_and_a_loop_is_cut(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "redirect", location=up.url + "dists/stable/Other", count=1)
    download = fetch(up, tmp_path, how)
    assert download is not None and download.read() == b"other\n"

    up.fault("dists/stable/Packages", "redirect", location="Packages")  # relative, to itself
    reason, elapsed = refused(up, tmp_path, how)
    assert reason.reason == "unreachable" and "too many redirects" in reason.detail, reason
    assert elapsed < 10


# -- Content-Length ----------------------------------------------------------------------------

BAD_LENGTHS: dict[str, list[str | bytes]] = {
    "superscript two (latin-1)": [b"\xb2"],
    "superscript two (utf-8)": ["²"],
    "arabic-indic digits": ["١٢"],
    "negative": ["-1"],
    "exponent": ["1e3"],
    "sign": ["+1080"],
    "underscore": ["1_080"],
    "hex": ["0x438"],
    "empty": [""],
    "two values": ["1080", "7"],
    "a list": ["1080, 7"],
    # RFC 9110 §8.6 would allow one value repeated; aiohttp's parser refuses it, so both clients do.
    "one value twice": ["1080", "1080"],
    "past 2**64": ["18446744073709551616"],
    "thousands of digits": ["9" * 5000],
}


@pytest.mark.parametrize("how", PATHS)
@pytest.mark.parametrize("case", list(BAD_LENGTHS))
def test_malformed_content_length_is_refused_as_apt_does(up: Upstream, tmp_path: Path, how: str, case: str) -> None:
    values = BAD_LENGTHS[case]
    up.fault("dists/stable/Packages", "raw", headers=[("Content-Length", v) for v in values])
    head = raw_head(up, "dists/stable/Packages")
    for value in values:
        assert b"\r\nContent-Length: " + (value if isinstance(value, bytes) else value.encode()) in head + b"\r\n"

    reason, elapsed = refused(up, tmp_path, how)
    assert reason.reason == "unreachable", reason
    assert reason.detail.startswith(up.url + "dists/stable/Packages: "), reason.detail
    assert "Content-Length" in reason.detail, reason.detail
    assert elapsed < 10


# -- limits.min_rate ---------------------------------------------------------------------------


def prove_trickle(up: Upstream, rel: str = "dists/stable/Packages") -> None:
    """A plain client gets the first bytes only one interval apart: the trickle is real."""
    conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=5)
    try:
        conn.request("GET", "/" + rel)
        resp = conn.getresponse()
        started = time.monotonic()
        got = resp.read1(10) + resp.read1(10) + resp.read1(10)
        assert len(got) == 3 and time.monotonic() - started >= 0.8
    finally:
        conn.close()


@pytest.mark.parametrize("how", PATHS)
def test_a_trickling_body_is_cut_after_the_rate_window(up: Upstream, tmp_path: Path, how: str) -> None:
    """One byte every 0.5 s is never idle long enough for a read timeout: only the rate rule ends it."""
    up.fault("dists/stable/Packages", "trickle", interval=0.5, count=1)
    prove_trickle(up)
    up.fault("dists/stable/Packages", "trickle", interval=0.5)

    reason, elapsed = refused(up, tmp_path, how, min_rate=1000, rate_window=1.0)
    assert reason.reason == "unreachable"
    assert reason.detail == f"{up.url}dists/stable/Packages: slower than 1000B/s for 1 s (limits.min_rate)"
    assert 0.9 < elapsed < 10
    assert up.count("dists/stable/Packages") == 2, "a slow download is cut, not retried"


@pytest.mark.parametrize("how", PATHS)
def test_trickling_headers_are_cut_too(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "trickle", interval=0.5, whole=True, count=1)
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        sock.sendall(b"GET /dists/stable/Packages HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        assert sock.recv(100) + sock.recv(100) + sock.recv(100) == b"HTT"
        assert time.monotonic() - started >= 0.8
    up.fault("dists/stable/Packages", "trickle", interval=0.5, whole=True)

    reason, elapsed = refused(up, tmp_path, how, min_rate=1000, rate_window=1.0)
    assert reason.reason == "unreachable" and "slower than 1000B/s for 1 s (limits.min_rate)" in reason.detail
    assert elapsed < 10


@pytest.mark.parametrize("how", PATHS)
def test_a_body_that_stalls_is_cut_after_the_rate_window_not_the_read_timeout(
    up: Upstream, tmp_path: Path, how: str
) -> None:
    up.fault("dists/stable/Packages", "trickle", interval=60, step=100)
    reason, elapsed = refused(up, tmp_path, how, min_rate=1000, rate_window=1.0, read_timeout=30)
    assert reason.reason == "unreachable" and reason.detail.endswith("slower than 1000B/s for 1 s (limits.min_rate)")
    assert elapsed < 10


@pytest.mark.parametrize("how", PATHS)
def test_the_rate_is_judged_over_the_last_window_not_since_the_start(up: Upstream, tmp_path: Path, how: str) -> None:
    """1000 bytes at once, then nothing for 3 s: the average since the start stays above 500 B/s
    until 2 s, but the last 1 s window carried nothing from about 1 s on."""
    up.fault("dists/stable/Packages", "trickle", interval=3.0, step=1000, data=b"x" * 4000)
    reason, elapsed = refused(up, tmp_path, how, min_rate=500, rate_window=1.0)
    assert reason.reason == "unreachable" and reason.detail.endswith("slower than 500B/s for 1 s (limits.min_rate)")
    assert 0.9 < elapsed < 1.8


@pytest.mark.parametrize("how", PATHS)
def test_a_slow_but_steady_download_above_min_rate_completes(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "trickle", interval=0.25, step=400)  # 1600 B/s for ~0.75 s
    download = fetch(up, tmp_path, how, min_rate=1000, rate_window=0.5)
    assert download is not None and download.read() == BODY


@pytest.mark.parametrize("how", PATHS)
def test_min_rate_zero_turns_the_rate_rule_off(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "trickle", interval=0.1, step=200)  # 2000 B/s, under 1 MiB/s
    download = fetch(up, tmp_path, how, min_rate=0, rate_window=0.2)
    assert download is not None and download.read() == BODY


@contextlib.contextmanager
def tls_trickler(interval: float) -> Iterator[int]:
    """A TCP port that answers a TLS client with a record header announcing 16 KiB, then one byte
    every `interval` seconds: a handshake that never completes and never idles."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            data = b"\x16\x03\x03\x40\x00" + b"\x02" * 16384
            for i in range(len(data)):
                try:
                    conn.sendall(data[i : i + 1])
                except OSError:
                    return
                if stop.wait(interval):
                    return

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                threading.Thread(target=trickle, args=(server.accept()[0],), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


@pytest.mark.parametrize("how", PATHS)
def test_a_tls_handshake_that_trickles_is_cut(tmp_path: Path, how: str) -> None:
    with tls_trickler(0.3) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            started = time.monotonic()
            assert sock.recv(10) + sock.recv(10) + sock.recv(10) == b"\x16\x03\x03"
            assert time.monotonic() - started >= 0.5

        url = f"https://127.0.0.1:{port}/"
        reason, elapsed = refused(url, tmp_path, how, min_rate=1000, rate_window=1.0)
    assert reason.reason == "unreachable"
    assert reason.detail == f"{url}dists/stable/Packages: slower than 1000B/s for 1 s (limits.min_rate)"
    assert elapsed < 10


# -- limits.sync_timeout (the deadline) --------------------------------------------------------


@pytest.mark.parametrize("how", PATHS)
def test_the_deadline_cuts_a_request_that_waits_for_its_headers(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "slow", seconds=30)
    reason, elapsed = refused(up, tmp_path, how, deadline=time.monotonic() + 1.0)
    assert reason.reason == "unreachable"
    assert reason.detail == f"{up.url}dists/stable/Packages: sync_timeout reached (limits.sync_timeout)"
    assert elapsed < 10


@pytest.mark.parametrize("how", PATHS)
def test_the_deadline_cuts_a_body_that_trickles_fast_enough(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "trickle", interval=0.2, step=50)  # 250 B/s, above min_rate=100
    reason, elapsed = refused(up, tmp_path, how, min_rate=100, rate_window=0.5, deadline=time.monotonic() + 1.5)
    assert reason.reason == "unreachable" and reason.detail.endswith("sync_timeout reached (limits.sync_timeout)")
    assert 1.0 < elapsed < 10


@pytest.mark.parametrize("how", PATHS)
def test_retries_do_not_run_past_the_deadline(up: Upstream, tmp_path: Path, how: str) -> None:
    up.fault("dists/stable/Packages", "status", code=503)
    reason, elapsed = refused(up, tmp_path, how, attempts=6, backoff=2.0, deadline=time.monotonic() + 1.0)
    assert reason.reason == "unreachable", reason
    assert "HTTP 503" in reason.detail and "sync_timeout reached before a retry (limits.sync_timeout)" in reason.detail
    assert elapsed < 1, "the 2 s backoff must not sleep past the deadline"
    assert up.count("dists/stable/Packages") == 1


@pytest.mark.parametrize("how", PATHS)
def test_a_passed_deadline_sends_no_request(up: Upstream, tmp_path: Path, how: str) -> None:
    reason, _ = refused(up, tmp_path, how, deadline=time.monotonic() - 1)
    assert reason.detail.endswith("sync_timeout reached (limits.sync_timeout)")
    assert up.requests == []


@pytest.mark.parametrize("how", PATHS)
def test_a_well_behaved_upstream_is_fetched_with_the_defaults(up: Upstream, tmp_path: Path, how: str) -> None:
    download = fetch(up, tmp_path, how, deadline=time.monotonic() + 60)
    assert download is not None and download.read() == BODY
    assert fetch(up, tmp_path, how, rel="dists/stable/Missing") is None
    fetcher = Fetcher(up.url, tmp_path)
    assert (fetcher.min_rate, fetcher.rate_window, fetcher.deadline) == (1024, 60.0, None)
