"""On-demand upstreams (SPEC §5): indices verified at sync time, pool files fetched, verified and
stored at a client's first request, never served unverified.

A real signed upstream on 127.0.0.1, the real `aptguard sync` and `aptguard serve`, real apt-get.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fixtures.apt import AptClient
from fixtures.keys import write_keyring
from fixtures.repo import Repo
from fixtures.s3 import MotoServer
from fixtures.upstream import Upstream
from tests.mirror import Mirror

SUITE = "stable"
PACKAGES = ("hello", "world", "tool")


class OnDemandSite:
    """A signed upstream with a few packages (and optionally a big one), an on-demand mirror of it."""

    def __init__(self, workdir: Path, key: Any, deb_cache: Path, *, big: int = 0, top: dict[str, Any] | None = None):
        self.repo = Repo(workdir / "upstream", deb_cache)
        for n, name in enumerate(PACKAGES):
            self.repo.add(SUITE, "main", "amd64", name, f"1.{n}-1", size=4096)
        if big:
            self.repo.add(SUITE, "main", "amd64", "bigpkg", "1.0-1", size=big)
        self.repo.publish(SUITE, [key], by_hash=True)
        self.upstream = Upstream(self.repo.root).start()
        self.keyring = write_keyring(workdir / "keys" / "up.asc", [key])
        self.mirror = Mirror.single(
            workdir / "mirror", self.upstream.url, self.keyring, suites=[SUITE], policy="on-demand", top=top
        )
        run = self.mirror.sync()
        assert run.returncode == 0, run.output
        self.mirror.start_server()

    def deb(self, name: str) -> str:
        return self.repo.deb_path(SUITE, "main", "amd64", name).relative_to(self.repo.root).as_posix()

    def client(self, workdir: Path) -> AptClient:
        client = AptClient(workdir)
        client.set_sources([client.source_line(f"{self.mirror.url}/up", SUITE, ["main"], self.keyring)])
        return client

    def object_of(self, path: str) -> Path:
        sha256 = hashlib.sha256((self.repo.root / path).read_bytes()).hexdigest()
        return self.mirror.data / "objects" / sha256[:2] / sha256

    def close(self) -> None:
        self.mirror.stop_server()
        self.upstream.stop()


@pytest.fixture
def site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[OnDemandSite]:
    made = OnDemandSite(tmp_path, keys("on-demand"), deb_cache)
    yield made
    made.close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_sync_fetches_no_pool_file_and_apt_installs_through_the_mirror(site: OnDemandSite, tmp_path: Path) -> None:
    assert site.upstream.count("pool/*") == 0, "the sync fetched pool files"
    listing = site.mirror.snapshots("up")[0]
    assert listing["on_demand"]["files"] == len(PACKAGES), listing
    assert "on demand" in site.mirror.run("snapshots", "up").stdout
    status = site.mirror.status()["upstreams"]["up"]
    assert status["cached"]["files"] < status["listed"]["files"], status
    for n in range(2):  # two hosts: the second gets what the first made the mirror fetch
        client = site.client(tmp_path / f"client{n}")
        result = client.update()
        assert result.ok, result.output
        for name in PACKAGES:
            download = client.download(name)
            assert download.ok, download.output
    for name in PACKAGES:
        assert site.upstream.count(site.deb(name)) == 1, name  # each crossed the upstream once
        assert site.object_of(site.deb(name)).read_bytes() == (site.repo.root / site.deb(name)).read_bytes()
    status = site.mirror.status()["upstreams"]["up"]
    assert status["cached"] == status["listed"], status
    fsck = site.mirror.run("fsck", "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["files"] == status["listed"]["files"], fsck.output
    held = site.object_of(site.deb("tool"))
    held.chmod(0o644)
    held.write_bytes(b"\0" * held.stat().st_size)  # damage behind aptguard's back
    fsck = site.mirror.run("fsck")
    assert fsck.returncode == 1 and site.deb("tool") in fsck.output, fsck.output
    page = _get(f"{site.mirror.url}/")[1].decode()
    assert f"On demand: {status['cached']['files']} of {status['listed']['files']} files held" in page
    # Held files are now ordinary files of the snapshot: a restarted server (no memory) serves them.
    site.mirror.stop_server()
    site.upstream.stop()
    site.mirror.start_server()
    assert _get(f"{site.mirror.url}/up/{site.deb('hello')}")[1] == (site.repo.root / site.deb("hello")).read_bytes()


def test_a_corrupted_pool_file_is_a_502_stores_nothing_and_serves_once_mended(site: OnDemandSite) -> None:
    path = site.deb("world")
    good = (site.repo.root / path).read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    (site.repo.root / path).write_bytes(bytes(bad))
    assert _get(f"{site.upstream.url}{path}") == (200, bytes(bad))  # the upstream really serves the corrupt file
    status, body = _get(f"{site.mirror.url}/up/{path}")
    assert status == 502 and bytes(bad) not in body
    for content in (good, bytes(bad)):  # nothing stored
        sha256 = hashlib.sha256(content).hexdigest()
        assert not (site.mirror.data / "objects" / sha256[:2] / sha256).exists()
    report = json.loads(_get(f"{site.mirror.url}/status")[1])["on_demand"]["up"]
    assert report["mismatches"] == 1 and "world" in report["last_error"], report
    metrics = _get(f"{site.mirror.url}/metrics")[1].decode()
    assert 'aptguard_on_demand_fetches_total{outcome="mismatch",upstream="up"} 1.0' in metrics, metrics
    (site.repo.root / path).write_bytes(good)  # mended
    assert _get(f"{site.mirror.url}/up/{path}") == (200, good)


def test_with_the_upstream_stopped_updates_and_held_packages_work_and_a_missing_one_is_504(
    site: OnDemandSite, tmp_path: Path
) -> None:
    client = site.client(tmp_path / "client")
    assert client.update().ok
    assert client.download("hello").ok  # now held
    site.upstream.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(site.upstream.url, timeout=5)  # the upstream really is down
    fresh = site.client(tmp_path / "fresh")
    result = fresh.update()
    assert result.ok, result.output
    assert fresh.download("hello").ok
    status, _body = _get(f"{site.mirror.url}/up/{site.deb('tool')}")
    assert status == 504


def test_twenty_clients_asking_at_once_cause_one_upstream_download(tmp_path: Path, keys, deb_cache: Path) -> None:
    made = OnDemandSite(tmp_path, keys("on-demand"), deb_cache, big=20_000_000)
    try:
        path = made.deb("bigpkg")
        whole = (made.repo.root / path).read_bytes()
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _n: _get(f"{made.mirror.url}/up/{path}"), range(20)))
        assert all(answer == (200, whole) for answer in answers), [a[0] for a in answers]
        assert made.upstream.count(path) == 1
    finally:
        made.close()


def test_an_upstream_404_is_a_404(site: OnDemandSite) -> None:
    path = site.deb("tool")
    (site.repo.root / path).unlink()  # published, then gone upstream
    assert _get(f"{site.upstream.url}{path}")[0] == 404
    assert _get(f"{site.mirror.url}/up/{path}")[0] == 404
    assert _get(f"{site.mirror.url}/up/pool/main/n/nothing/nothing_1_amd64.deb")[0] == 404  # not listed


def test_on_demand_on_the_s3_backend(tmp_path: Path, keys, deb_cache: Path, moto: MotoServer) -> None:
    storage = {"backend": "s3", "endpoint": moto.endpoint, "bucket": moto.new_bucket(), "prefix": "mirror/"}
    made = OnDemandSite(tmp_path, keys("on-demand"), deb_cache, top={"storage": storage})
    try:
        assert made.upstream.count("pool/*") == 0
        path = made.deb("hello")
        whole = (made.repo.root / path).read_bytes()
        assert _get(f"{made.mirror.url}/up/{path}") == (200, whole)
        assert _get(f"{made.mirror.url}/up/{path}") == (200, whole)
        assert made.upstream.count(path) == 1
        sha256 = hashlib.sha256(whole).hexdigest()
        head = moto.client().head_object(Bucket=storage["bucket"], Key=f"mirror/objects/{sha256[:2]}/{sha256}")
        assert head["ContentLength"] == len(whole)  # stored in the bucket: every server of it has it
        status = made.mirror.status()["upstreams"]["up"]
        assert status["cached"]["files"] == status["listed"]["files"] - len(PACKAGES) + 1
        # Another server of the bucket (its own cache folder) serves it without asking the upstream.
        other = Mirror(tmp_path / "other", dict(made.mirror.upstreams), storage=storage)
        other.start_server()
        try:
            assert _get(f"{other.url}/up/{path}") == (200, whole)
        finally:
            other.stop_server()
        assert made.upstream.count(path) == 1
    finally:
        made.close()


def test_prefetch_keeps_a_pinned_snapshot_whole_after_the_upstream_drops_old_versions(
    tmp_path: Path, keys, deb_cache: Path
) -> None:
    """prefetch of `hello` takes what it depends on (`world`, or of `tool | nothing`, `tool`)
    and nothing else; once the upstream drops those versions, the pin still serves them."""
    key = keys("on-demand")
    made = OnDemandSite(tmp_path, key, deb_cache)
    try:
        made.repo.add(SUITE, "main", "amd64", "hello", "1.0-1", size=4096, depends="world (>= 1.0), nothing | tool")
        made.repo.add(SUITE, "main", "amd64", "extra", "1.0-1", size=4096)
        made.repo.publish(SUITE, [key], by_hash=True)
        assert made.mirror.sync().returncode == 0
        snap = made.mirror.current("up")
        assert made.mirror.run("pin", "ci", "up", snap).returncode == 0
        run = made.mirror.run("prefetch", "up", "--snapshot", snap, "hello", "--json")
        assert run.returncode == 0, run.output
        report = json.loads(run.stdout)
        assert report["fetched"] == 3 and report["failed"] == {}, report
        wanted = [made.deb(n) for n in ("hello", "world", "tool")]
        for path in wanted:
            assert made.upstream.count(path) == 1, path
        assert made.upstream.count(made.deb("extra")) == 0
        bodies = {path: (made.repo.root / path).read_bytes() for path in [*wanted, made.deb("extra")]}
        for path in bodies:  # the upstream drops these versions
            (made.repo.root / path).unlink()
        made.repo.add(SUITE, "main", "amd64", "hello", "2.0-1", size=4096)
        made.repo.publish(SUITE, [key], by_hash=True)
        for path in wanted:
            assert _get(f"{made.mirror.url}/pins/ci/{path}") == (200, bodies[path]), path
        assert _get(f"{made.mirror.url}/pins/ci/{made.deb('extra')}")[0] == 404
        unknown = made.mirror.run("prefetch", "up", "no-such-package")
        assert unknown.returncode == 2 and "no-such-package" in unknown.stderr, unknown.output
    finally:
        made.close()


def test_nginx_serves_held_files_and_passes_misses_to_aptguard(site: OnDemandSite, tmp_path: Path) -> None:
    from tests.servers import Nginx

    nginx = Nginx(site.mirror, tmp_path / "nginx").start()
    try:
        path = site.deb("hello")
        whole = (site.repo.root / path).read_bytes()
        assert _get(f"{nginx.url}/up/{path}") == (200, whole)  # a miss: through aptguard, verified, held
        assert site.upstream.count(path) == 1
        bad = site.deb("world")
        (site.repo.root / bad).write_bytes(b"x" * len((site.repo.root / bad).read_bytes()))
        assert _get(f"{nginx.url}/up/{bad}")[0] == 502  # aptguard's verdict passes through
        assert _get(f"{nginx.url}/up/pool/main/n/none/none_1_amd64.deb")[0] == 404
        site.mirror.stop_server()  # from now on only nginx answers
        assert _get(f"{nginx.url}/up/{path}") == (200, whole)
        assert _get(f"{nginx.url}/up/dists/{SUITE}/InRelease")[0] == 200
        assert site.upstream.count(path) == 1
    finally:
        nginx.stop()
