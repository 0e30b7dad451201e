"""SPEC §4 over HTTP, against both servers: `aptguard serve` and nginx with `aptguard nginx-config`.

One signed upstream is synced once per module; every test runs against each server over the
same data folder, with raw HTTP (nothing normalized by the client) and with the real apt-get.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from aptguard.store import FileStore
from fixtures.apt import AptClient
from tests.servers import Site, raw_get

SERVERS = ["embedded", "nginx"]
INRELEASE = "/example/dists/stable/InRelease"
PACKAGES_XZ = "/example/dists/stable/main/binary-amd64/Packages.xz"
BIG = 8_000_000  # past the kernel's largest send buffer (tcp_wmem: 4 MiB), so a slow reader fills it


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, keys, deb_cache: Path) -> Iterator[Site]:
    # The embedded server in two workers: the whole of section 4 holds across processes too
    # (test_serve_abuse and the others run it in one).
    made = Site(tmp_path_factory.mktemp("serve"), keys("serve"), deb_cache, big=BIG, workers=2)
    yield made
    made.close()


@pytest.fixture(params=SERVERS)
def url(request: pytest.FixtureRequest, site: Site) -> str:
    return site.url(request.param)


def upstream_bytes(site: Site, rel: str) -> bytes:
    return (site.repo.root / rel).read_bytes()


def big_deb(site: Site) -> str:
    return "/example/" + site.repo.deb_path("stable", "main", "amd64", "bigpkg").relative_to(site.repo.root).as_posix()


# -- GET and HEAD ---------------------------------------------------------------------------


def test_get_serves_upstream_bytes_with_content_length(site: Site, url: str) -> None:
    for path in (INRELEASE, PACKAGES_XZ, big_deb(site)):
        status, headers, body = raw_get(url, path)
        assert status == 200, path
        assert body == upstream_bytes(site, path.removeprefix("/example/")), path
        assert int(headers["content-length"]) == len(body)
        assert "content-encoding" not in headers


def test_gzip_accepting_client_still_gets_the_signed_bytes(site: Site, url: str) -> None:
    """`Packages` must not be swapped for `Packages.gz` with Content-Encoding: gzip."""
    path = "/example/dists/stable/main/binary-amd64/Packages"
    status, headers, body = raw_get(url, path, {"Accept-Encoding": "gzip, br"})
    assert status == 200 and "content-encoding" not in headers
    assert body == upstream_bytes(site, path.removeprefix("/example/"))


def test_head_answers_headers_without_body(site: Site, url: str) -> None:
    path = big_deb(site)
    status, headers, body = raw_get(url, path, method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["content-length"]) == len(upstream_bytes(site, path.removeprefix("/example/")))
    assert headers["etag"] and headers["last-modified"]


def test_by_hash_entries_are_served_for_every_listed_hash_type(site: Site, url: str) -> None:
    data = upstream_bytes(site, "dists/stable/main/binary-amd64/Packages.xz")
    for folder, algo in (("MD5Sum", "md5"), ("SHA1", "sha1"), ("SHA256", "sha256"), ("SHA512", "sha512")):
        path = f"/example/dists/stable/main/binary-amd64/by-hash/{folder}/{hashlib.new(algo, data).hexdigest()}"
        status, _, body = raw_get(url, path)
        assert status == 200 and body == data, path


# -- Range ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bytes=100-199", "bytes=-500", "bytes=SIZE-1000-", "bytes=0-"])
def test_range_answers_206_with_exactly_that_slice(site: Site, url: str, spec: str) -> None:
    path = big_deb(site)
    data = upstream_bytes(site, path.removeprefix("/example/"))
    size = len(data)
    first, last = {
        "bytes=100-199": (100, 199),
        "bytes=-500": (size - 500, size - 1),
        "bytes=SIZE-1000-": (size - 1000, size - 1),
        "bytes=0-": (0, size - 1),
    }[spec]
    status, headers, body = raw_get(url, path, {"Range": spec.replace("SIZE-1000", str(size - 1000))})
    assert status == 206
    assert body == data[first : last + 1]
    assert headers["content-range"] == f"bytes {first}-{last}/{size}"
    assert int(headers["content-length"]) == last - first + 1


def test_range_past_the_end_is_416(site: Site, url: str) -> None:
    path = big_deb(site)
    size = len(upstream_bytes(site, path.removeprefix("/example/")))
    status, headers, _ = raw_get(url, path, {"Range": f"bytes={size}-"})
    assert status == 416
    assert headers["content-range"] == f"bytes */{size}"


# -- conditional requests -------------------------------------------------------------------


def test_etag_and_last_modified_answer_304(site: Site, url: str) -> None:
    status, headers, _ = raw_get(url, INRELEASE)
    assert status == 200
    etag, modified = headers["etag"], headers["last-modified"]
    assert raw_get(url, INRELEASE, {"If-None-Match": etag})[0] == 304
    assert raw_get(url, INRELEASE, {"If-Modified-Since": modified})[0] == 304
    assert raw_get(url, INRELEASE, {"If-None-Match": '"0-0"'})[0] == 200
    older = email.utils.formatdate(email.utils.parsedate_to_datetime(modified).timestamp() - 3600, usegmt=True)
    status, _, body = raw_get(url, INRELEASE, {"If-Modified-Since": older})
    assert status == 200 and body == upstream_bytes(site, "dists/stable/InRelease")


# -- nothing outside a snapshot -------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(site: Site) -> dict[str, str]:
    """Things a served path could reach if a check were missing: symlinks, a dot-file, a symlinked snapshot."""
    data = site.mirror.data
    tree = (data / "current" / "example").resolve()
    (tree / "dists" / "stable" / "leak-etc").symlink_to("/etc/passwd")
    (tree / "dists" / "stable" / "leak-state").symlink_to(data / "state" / "example.json")
    (tree / "dists" / "stable" / "leak-tree").symlink_to("InRelease")
    (tree / "dists" / ".hidden").write_text("secret\n")
    (data / "snapshots" / "example" / "evil").symlink_to("/etc")
    obj = next(p for p in (data / "objects").rglob("*") if p.is_file())
    return {"snap": tree.name, "object": obj.relative_to(data).as_posix()}


ESCAPES = [
    "/example/dists/stable/leak-etc",
    "/example/dists/stable/leak-state",
    "/example/dists/stable/leak-tree",
    "/example/dists/.hidden",
    "/example/dists/%2ehidden",
    "/snapshots/example/evil/passwd",
    "/example/../../state/example.json",
    "/example/dists/../../../meta/example/{snap}.json",
    "/example/%2e%2e/%2e%2e/state/example.json",
    "/example/%2E%2E/%2E%2E/etc/passwd",
    "/example/dists%2fstable%2fInRelease",
    "/example/dists%2Fstable%2FInRelease",
    "/snapshots/example%2f{snap}/dists/stable/InRelease",
    "/example/dists/stable/InRelease%00",
    "/example/dists/stable/In%ffRelease",
    "/example/dists/stable/In%0aRelease",
    "/example/dists\\stable\\InRelease",
    "/example/dists%5cstable%5cInRelease",
    "/example/./dists/stable/InRelease",
    "/example/",
    "/example/dists",
    "/example/dists/",
    "/example",
    "/snapshots/example/{snap}",
    "/snapshots/example/{snap}/",
    "/snapshots/example/",
    "/snapshots/",
    "/state/example.json",
    "/meta/example/{snap}.json",
    "/locks/example.lock",
    "/{object}",
    "/current/example/dists/stable/InRelease",
    "/tmp/",
    "/pins/nope/dists/stable/InRelease",
    "/nothing-here/dists/stable/InRelease",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_nothing_outside_a_snapshot_is_served(site: Site, url: str, planted: dict[str, str], template: str) -> None:
    path = template.format(**planted)
    status, _, body = raw_get(url, path)
    assert status == 404, f"{path}: HTTP {status}"
    assert b"root:" not in body and b"last_sync" not in body and b"PGP" not in body


def test_the_tree_itself_serves_what_the_escapes_try(site: Site, url: str, planted: dict[str, str]) -> None:
    """The escape paths above are 404 for the reason they name: the plain paths work."""
    assert raw_get(url, f"/snapshots/example/{planted['snap']}/dists/stable/InRelease")[0] == 200
    assert raw_get(url, "/example/dists/stable/InRelease")[0] == 200


def test_post_is_refused(url: str) -> None:
    assert raw_get(url, INRELEASE, method="POST")[0] in (404, 405)


# -- routes -------------------------------------------------------------------------------


def test_pins_route_serves_the_pinned_snapshot(site: Site, url: str) -> None:
    snap = (site.mirror.data / "current" / "example").readlink().name
    store = FileStore(site.mirror.data)
    store.set_pin("ci-stable", "example", snap, expect=store.pin_target("ci-stable"))  # the site is shared
    status, _, body = raw_get(url, "/pins/ci-stable/dists/stable/InRelease")
    assert status == 200
    assert body == (site.mirror.data / "snapshots" / "example" / snap / "dists/stable/InRelease").read_bytes()


def test_status_route_is_status_json(site: Site, url: str) -> None:
    import json

    status, headers, body = raw_get(url, "/status")
    assert status == 200 and headers["content-type"].startswith("application/json")
    served = json.loads(body)["upstreams"]["example"]
    cli = site.mirror.status()["upstreams"]["example"]
    assert served["current"] == cli["current"] and served["last_sync"] == cli["last_sync"]


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_route_reports_upstream_health_and_requests(site: Site, url: str) -> None:
    raw_get(url, "/example/no-such-file")
    for method in ("PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND"):  # one label for all, not one each
        assert raw_get(url, INRELEASE, method=method)[0] == 404
    status, _, body = raw_get(url, "/metrics")
    assert status == 200
    m = metric_samples(body.decode())
    up = frozenset({("upstream", "example")})
    assert m[("aptguard_sync_outcomes_total", up | {("outcome", "promoted"), ("reason", "")})] >= 1
    assert m[("aptguard_last_sync_info", up | {("outcome", "promoted"), ("reason", "")})] == 1
    assert m[("aptguard_last_success_timestamp_seconds", up)] > 1.7e9
    assert 0 <= m[("aptguard_current_snapshot_age_seconds", up)] < 3600
    assert m[("aptguard_stored_bytes", frozenset())] >= BIG
    assert m[("aptguard_hold", up)] == 0
    # nginx answers the 404 itself; the embedded server behind it counts only what it answered.
    if url == site.mirror.url:
        assert m[("aptguard_http_requests_total", frozenset({("code", "404"), ("method", "GET")}))] >= 1
        assert m[("aptguard_http_requests_total", frozenset({("code", "404"), ("method", "other")}))] >= 5
        assert not any(("method", "PROPFIND") in labels for _, labels in m)
        assert m[("aptguard_http_sent_bytes_total", frozenset())] > 0


# -- the real apt-get -----------------------------------------------------------------------


def test_apt_get_update_and_download(site: Site, url: str, tmp_path: Path) -> None:
    client = AptClient(tmp_path / "apt", arch="amd64")
    client.set_sources([client.source_line(f"{url}/example", "stable", ["main"], site.keyring)])
    result = client.update()
    assert result.ok, result.output
    again = client.update()  # conditional requests: apt sends If-Modified-Since, the server answers 304
    assert again.ok and "Hit:" in again.output, again.output
    got = client.download("bigpkg")
    assert got.ok, got.output
    assert [f.read_bytes() for f in got.files] == [site.repo.deb_path("stable", "main", "amd64", "bigpkg").read_bytes()]


# -- promotions -----------------------------------------------------------------------------


def test_promotion_is_served_at_once_and_by_hash_of_retained_snapshots_stays(site: Site, tmp_path: Path) -> None:
    """Runs last (it changes the mirror): both servers see each promotion without a restart,
    and the by-hash indices of the first snapshot survive two promotions."""
    first = {s: raw_get(site.url(s), INRELEASE)[2] for s in SERVERS}
    old_packages = upstream_bytes(site, "dists/stable/main/binary-amd64/Packages.xz")
    for _ in range(2):
        site.new_version()
        published = upstream_bytes(site, "dists/stable/InRelease")
        for server in SERVERS:
            assert raw_get(site.url(server), INRELEASE)[2] == published, server
    for server in SERVERS:
        assert first[server] != published
        for folder, algo in (("SHA256", "sha256"), ("MD5Sum", "md5"), ("SHA512", "sha512")):
            digest = hashlib.new(algo, old_packages).hexdigest()
            path = f"/example/dists/stable/main/binary-amd64/by-hash/{folder}/{digest}"
            status, _, body = raw_get(site.url(server), path)
            assert status == 200 and body == old_packages, (server, path)
        client = AptClient(tmp_path / server, arch="amd64")
        client.set_sources([client.source_line(f"{site.url(server)}/example", "stable", ["main"], site.keyring)])
        assert client.update().ok
        assert client.available("hello") == f"{site.version}.0-1"
    assert os.path.exists(site.mirror.data / "meta" / "example" / f"{first_id(site)}.byhash.json")


def first_id(site: Site) -> str:
    return FileStore(site.mirror.data).snapshot_ids("example")[0]


def test_one_keep_alive_connection_serves_many_files(site: Site) -> None:
    """apt pipelines its requests on one connection: every answer must leave it usable."""
    import http.client

    for server in SERVERS:
        port = int(site.url(server).rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for path in [INRELEASE, "/example/missing", PACKAGES_XZ, big_deb(site), INRELEASE] * 2:
                conn.request("GET", path, headers={"Accept-Encoding": "gzip"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200:
                    assert body == upstream_bytes(site, path.removeprefix("/example/")), (server, path)
                else:
                    assert resp.status == 404, (server, path)
        finally:
            conn.close()


def test_a_slow_reader_of_a_large_file_gets_every_byte_and_holds_up_no_one(site: Site, url: str) -> None:
    """The large file goes out with sendfile(2) into a socket that fills up (a small receive
    buffer, a reader that pauses): the server waits for it to drain, meanwhile answers others."""
    import socket
    import time

    path = big_deb(site)
    expected = upstream_bytes(site, path.removeprefix("/example/"))
    host, port = url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    slow.settimeout(20)
    try:
        slow.connect((host, int(port)))
        slow.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = slow.recv(4096)
        time.sleep(1.0)  # the server's send buffer fills; it must not spin or block its loop
        started = time.monotonic()
        for _ in range(8):  # new connections: the embedded server spreads them over its workers
            assert raw_get(url, INRELEASE)[2] == upstream_bytes(site, "dists/stable/InRelease")
        assert time.monotonic() - started < 3.0
        while chunk := slow.recv(65536):
            data += chunk
    finally:
        slow.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == expected


def test_checked_in_nginx_example_is_what_the_command_renders() -> None:
    """nginx/aptguard.conf is `aptguard nginx-config` for /var/lib/aptguard; it must not drift."""
    from aptguard.nginx import render

    root = Path(__file__).resolve().parent.parent
    expected = render(Path("/var/lib/aptguard"), "80", "127.0.0.1:8080", Path("/run/aptguard-nginx"), user="www-data")
    assert (root / "nginx" / "aptguard.conf").read_text() == expected
