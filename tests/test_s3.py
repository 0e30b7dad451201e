"""Many servers, one truth (SPEC guarantee 10): the s3 backend on a real S3 API (moto's server).

A signed upstream on 127.0.0.1, synced by the real `aptguard sync` into a bucket; three real
`aptguard serve` processes, each with its own data folder (caches only) on the same bucket;
real apt-get clients spread over them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fixtures.apt import AptClient
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from fixtures.s3 import MotoServer
from fixtures.upstream import Upstream
from tests.mirror import Mirror, free_port
from tests.servers import update_storm

SUITE = "stable"
NAME = "example"
REFRESH = 0.5  # refresh_seconds of the servers


class Fleet:
    """A signed upstream, a bucket, a syncer's config and `servers` servers of the bucket."""

    def __init__(
        self,
        workdir: Path,
        key: SigningKey,
        deb_cache: Path,
        moto: MotoServer,
        *,
        servers: int = 3,
        big: int = 0,
        **server: Any,
    ) -> None:
        self.workdir = workdir
        self.key = key
        self.moto = moto
        self.repo = Repo(workdir / "upstream", deb_cache)
        self.repo.add(SUITE, "main", "amd64", "hello", "1.0-1")
        if big:
            self.repo.add(SUITE, "main", "amd64", "bigpkg", "1.0-1", size=big)
        self.version = 1
        self.publish()
        self.upstream = Upstream(self.repo.root).start()
        self.keyring = write_keyring(workdir / "keys" / "example.asc", [key])
        self.bucket = moto.new_bucket()
        self.server_settings = {"refresh_seconds": REFRESH, **server}
        self.syncer = self.node("syncer")
        self.servers = [self.node(f"server{i}") for i in range(servers)]

    def node(self, label: str, **top: Any) -> Mirror:
        """A machine of the fleet: its own folder (caches), the shared bucket."""
        storage = {
            "backend": "s3",
            "endpoint": self.moto.endpoint,
            "bucket": self.bucket,
            "prefix": "mirror/",
        }
        upstream = {
            "url": self.upstream.url,
            "suites": [SUITE],
            "components": ["main"],
            "architectures": ["amd64"],
            "keyring": self.keyring,
        }
        return Mirror(self.workdir / label, {NAME: upstream}, storage=storage, server=dict(self.server_settings), **top)

    def publish(self) -> None:
        self.repo.publish(SUITE, [self.key], by_hash=True, compressions=("", "xz", "gz"))

    def sync(self) -> str:
        run = self.syncer.sync()
        assert run.returncode == 0, run.output
        current = self.syncer.current(NAME)
        assert current is not None
        return current

    def new_version(self) -> str:
        self.version += 1
        self.repo.add(SUITE, "main", "amd64", "hello", f"{self.version}.0-1")
        self.publish()
        return self.sync()

    def start(self) -> None:
        for server in self.servers:
            server.start_server()

    def close(self) -> None:
        for server in self.servers:
            server.stop_server()
        self.upstream.stop()


@pytest.fixture
def fleet(tmp_path: Path, keys, deb_cache: Path, moto: MotoServer) -> Iterator[Fleet]:
    made = Fleet(tmp_path, keys("s3-fleet"), deb_cache, moto)
    made.sync()
    made.start()
    yield made
    made.close()


def _served_release(server: Mirror) -> bytes:
    status, body = server.get(f"/{NAME}/dists/{SUITE}/InRelease")
    assert status == 200, status
    return body


def _wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until `predicate()` held; fails after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s")


def test_a_sync_into_the_bucket_is_served_byte_for_byte_by_every_server(fleet: Fleet) -> None:
    upstream_release = (fleet.repo.root / "dists" / SUITE / "InRelease").read_bytes()
    for server in fleet.servers:
        assert _served_release(server) == upstream_release
    files = fleet.servers[0].served(NAME)
    assert any(path.endswith(".deb") for path in files)
    for server in fleet.servers[1:]:
        assert server.served(NAME) == files
    # Nothing of the snapshot is in a server's folder but its cache.
    for server in fleet.servers:
        assert not (server.data / "snapshots").exists() and not (server.data / "objects").exists()


def test_apt_get_installs_through_any_server(fleet: Fleet, tmp_path: Path) -> None:
    for n, server in enumerate(fleet.servers):
        client = AptClient(tmp_path / f"client{n}")
        client.set_sources([client.source_line(f"{server.url}/{NAME}", SUITE, ["main"], fleet.keyring)])
        result = client.update()
        assert result.ok, result.output
        assert client.available("hello") == "1.0-1"
        download = client.download("hello")
        assert download.ok, download.output


def test_a_promotion_and_a_rollback_reach_every_server_within_refresh_seconds(fleet: Fleet) -> None:
    first = fleet.syncer.current(NAME)
    old_release = _served_release(fleet.servers[0])
    fleet.version += 1
    fleet.repo.add(SUITE, "main", "amd64", "hello", f"{fleet.version}.0-1")
    fleet.publish()
    assert fleet.syncer.sync("--no-promote").returncode == 0
    second = fleet.syncer.snapshots(NAME)[0]["id"]
    assert second != first
    new_release = (fleet.repo.root / "dists" / SUITE / "InRelease").read_bytes()
    assert new_release != old_release and _served_release(fleet.servers[0]) == old_release  # not promoted yet
    run = fleet.syncer.run("promote", NAME, second)
    assert run.returncode == 0, run.output
    for server in fleet.servers:
        took = _wait_for(lambda s=server: _served_release(s) == new_release, 10 * REFRESH + 5, "the promotion")
        print(f"{server.workdir.name}: promotion served after {took:.2f} s")
        assert took <= REFRESH + 1.0, f"{server.workdir.name} switched after {took:.1f} s"
    run = fleet.syncer.run("rollback", NAME)
    assert run.returncode == 0, run.output
    for server in fleet.servers:
        took = _wait_for(lambda s=server: _served_release(s) == old_release, 10 * REFRESH + 5, "the rollback")
        print(f"{server.workdir.name}: rollback served after {took:.2f} s")
        assert took <= REFRESH + 1.0, f"{server.workdir.name} rolled back after {took:.1f} s"
    # Every server answers for either snapshot by id, immutable.
    for server in fleet.servers:
        assert server.get(f"/snapshots/{NAME}/{second}/dists/{SUITE}/InRelease") == (200, new_release)


def _store(mirror: Mirror) -> Any:
    return _store_of(mirror.config)


def test_two_concurrent_promotes_exactly_one_wins(fleet: Fleet) -> None:
    """Two operators on two machines promote different snapshots at once. The test holds the
    upstream's lease while both start, so both decide on the same current and then race for the
    lease: exactly one promotes, the other exits 1 naming what current became."""
    first = fleet.syncer.current(NAME)
    second = fleet.new_version()
    third = fleet.new_version()
    operators = [fleet.node("operator-a"), fleet.node("operator-b")]
    wanted = [first, second]
    assert third not in wanted and fleet.syncer.current(NAME) == third
    logs = [operator.workdir / "promote.log" for operator in operators]
    with _store(fleet.syncer).lease(NAME):
        procs = []
        for n, operator in enumerate(operators):
            with open(logs[n], "wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "aptguard",
                            "--config",
                            str(operator.config),
                            "promote",
                            NAME,
                            wanted[n],
                        ],
                        cwd=operator.workdir,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        for log in logs:  # both have read current and wait for the lease
            _wait_for(lambda log=log: b"waiting" in log.read_bytes(), 60, "both operators waiting")
    codes = [proc.wait(timeout=60) for proc in procs]
    outputs = [log.read_text() for log in logs]
    assert sorted(codes) == [0, 1], outputs
    winner = wanted[codes.index(0)]
    loser = outputs[codes.index(1)]
    assert fleet.syncer.current(NAME) == winner
    assert f"to {winner}" in loser and "nothing was changed" in loser, loser


def test_of_racing_pointer_writes_exactly_one_wins(fleet: Fleet) -> None:
    """The conditional write itself: eight writers that read the same current, at once."""
    from aptguard.store import PointerMoved

    current = fleet.syncer.current(NAME)
    second = fleet.new_version()
    fleet.syncer.run("rollback", NAME)
    assert fleet.syncer.current(NAME) == current
    stores = [_store(fleet.syncer) for _ in range(8)]
    barrier = threading.Barrier(8)

    def swap(store: Any) -> bool:
        barrier.wait()
        try:
            store.set_current(NAME, second, expect=current)
        except PointerMoved:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(swap, stores))
    assert won.count(True) == 1, won


def test_a_server_killed_mid_download_leaves_the_others_serving(
    tmp_path: Path, keys, deb_cache: Path, moto: MotoServer
) -> None:
    """kill -9 of a server while it sends an 8 MB package: the client's retry on another server
    (a Range for the rest, as apt resumes) completes it byte for byte, and apt works on the others."""
    fleet = Fleet(tmp_path, keys("s3-fleet"), deb_cache, moto, big=8_000_000)
    try:
        fleet.sync()
        fleet.start()
        deb = next(p for p in fleet.syncer.served_paths(NAME) if "bigpkg" in p)
        whole = (fleet.repo.root / deb).read_bytes()
        victim, *others = fleet.servers
        assert victim.server is not None
        response = urllib.request.urlopen(f"{victim.url}/{NAME}/{deb}", timeout=10)
        got = response.read(256 * 1024)
        os.kill(victim.server.pid, signal.SIGKILL)
        victim.server.wait()
        victim.server = None
        try:
            while chunk := response.read(1 << 20):  # the kernel's buffers drain, then the cut shows
                got += chunk
        except (OSError, http.client.HTTPException):
            pass
        assert len(got) < len(whole), "the download was not cut: the fault is not real"
        request = urllib.request.Request(f"{others[0].url}/{NAME}/{deb}", headers={"Range": f"bytes={len(got)}-"})
        with urllib.request.urlopen(request, timeout=30) as rest:
            assert rest.status == 206
            got += rest.read()
        assert got == whole
        for n, server in enumerate(others):
            client = AptClient(tmp_path / f"after-kill{n}")
            client.set_sources([client.source_line(f"{server.url}/{NAME}", SUITE, ["main"], fleet.keyring)])
            result = client.update()
            assert result.ok, result.output
            assert client.download("bigpkg").ok
    finally:
        fleet.close()


def test_a_server_keeps_serving_what_it_holds_when_the_store_is_gone(tmp_path: Path, keys, deb_cache: Path) -> None:
    own = MotoServer(tmp_path / "own-moto.log").start()  # a store of this test's own, to stop
    fleet = Fleet(tmp_path / "fleet", keys("s3-fleet"), deb_cache, own, servers=1)
    try:
        fleet.sync()
        fleet.start()
        server = fleet.servers[0]
        files = server.served(NAME)  # everything fetched once: now in the server's cache
        release = _served_release(server)
        own.stop()
        with pytest.raises(OSError):
            urllib.request.urlopen(own.endpoint + "/", timeout=2)  # the store really is gone
        # A refresh fails only after the client's retries (botocore's standard mode: 3 attempts,
        # random backoff of up to 1 + 2 s): wait for the server to say so, then check it serves.
        deadline = time.monotonic() + 30
        while True:
            status, body = server.get("/status")
            assert status == 200
            store = json.loads(body)["storage"]
            if store["reachable"] is False or time.monotonic() > deadline:
                break
            time.sleep(REFRESH)
        assert store["reachable"] is False and store["unreachable_since"], store
        assert _served_release(server) == release
        for path, body in files.items():
            assert server.get(f"/{NAME}/{path}") == (200, body), path
        status, metrics = server.get("/metrics")
        assert status == 200 and b"aptguard_store_reachable 0.0" in metrics
    finally:
        fleet.close()
        own.stop()


def test_redirect_mode_sends_pool_files_to_presigned_urls(
    tmp_path: Path, keys, deb_cache: Path, moto: MotoServer
) -> None:
    fleet = Fleet(tmp_path, keys("s3-fleet"), deb_cache, moto, servers=1, pool="redirect")
    try:
        fleet.sync()
        fleet.start()
        server = fleet.servers[0]
        deb = next(p for p in fleet.syncer.served_paths(NAME) if p.endswith(".deb"))

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kw: Any) -> None:
                return None

        opener = urllib.request.build_opener(NoRedirect)
        with pytest.raises(urllib.error.HTTPError) as answer:
            opener.open(f"{server.url}/{NAME}/{deb}", timeout=10)
        assert answer.value.code == 302
        location = answer.value.headers["Location"]
        assert location.startswith(moto.endpoint) and "Signature" in location
        with urllib.request.urlopen(location, timeout=10) as response:
            assert response.read() == (fleet.repo.root / deb).read_bytes()
        # Indices are served by the server itself, and apt follows the redirect for packages.
        assert _served_release(server) == (fleet.repo.root / "dists" / SUITE / "InRelease").read_bytes()
        client = AptClient(tmp_path / "client")
        client.set_sources([client.source_line(f"{server.url}/{NAME}", SUITE, ["main"], fleet.keyring)])
        assert client.update().ok
        download = client.download("hello")
        assert download.ok, download.output
    finally:
        fleet.close()


def _ids(mirror: Mirror) -> list[str]:
    return [s["id"] for s in mirror.snapshots(NAME)]


def test_commands_give_the_same_answers_on_both_backends(fleet: Fleet) -> None:
    second = fleet.new_version()
    run = fleet.syncer.run("pin", "ci", NAME, second)
    assert run.returncode == 0, run.output
    assert fleet.syncer.run("pin", "ci", NAME, second).returncode in (0, 1)
    status = fleet.syncer.status()
    assert status["upstreams"][NAME]["current"] == second
    assert len(_ids(fleet.syncer)) == 2
    for server in fleet.servers:
        _wait_for(lambda s=server: s.get(f"/pins/ci/dists/{SUITE}/InRelease")[0] == 200, 10 * REFRESH + 5, "the pin")
    fsck = fleet.syncer.run("fsck")
    assert fsck.returncode == 0, fsck.output
    gc = fleet.syncer.run("gc", "--json")
    assert gc.returncode == 0, gc.output
    unpin = fleet.syncer.run("unpin", "ci")
    assert unpin.returncode == 0, unpin.output
    for server in fleet.servers:
        _wait_for(lambda s=server: s.get(f"/pins/ci/dists/{SUITE}/InRelease")[0] == 404, 10 * REFRESH + 5, "unpin")


CLIENTS = 20
PROMOTIONS = 4


def test_clients_looping_updates_through_promotions_see_no_failure(fleet: Fleet, tmp_path: Path) -> None:
    """20 apt-get clients, spread over the three servers, update in a loop while four promotions
    land; the suite has by-hash, so none may fail, whichever server switched first."""
    for i in range(30):
        fleet.repo.add(SUITE, "main", "amd64", f"filler{i:03d}", "1.0-1", size=512)
    fleet.new_version()
    clients = [AptClient(tmp_path / f"c{i:02d}") for i in range(CLIENTS)]
    for n, client in enumerate(clients):
        server = fleet.servers[n % len(fleet.servers)]
        client.set_sources([client.source_line(f"{server.url}/{NAME}", SUITE, ["main"], fleet.keyring)])
    results = update_storm(clients, fleet.new_version, promotions=PROMOTIONS, pause=2 * REFRESH, max_seconds=120)
    failures = [r.output for r in results if not r.ok]
    print(f"\ns3, three servers: {len(results)} updates, {len(failures)} failed")
    assert len(results) >= 2 * CLIENTS
    assert failures == [], f"{len(failures)} of {len(results)} updates failed; first:\n{failures[0]}"
    final = f"{fleet.version}.0-1"
    for client in clients[: len(fleet.servers)]:
        assert client.update().ok
        assert client.available("hello") == final


def test_gc_while_servers_serve_never_removes_a_listed_file(fleet: Fleet) -> None:
    """Promotions and gc with keep_last = 1 while every server fetches every file its current
    snapshot lists: no 404, since gc keeps what a server may still serve (2 x refresh_seconds)."""
    fleet.syncer.top["retention"] = {"keep_last": 1, "keep_days": 0}
    fleet.syncer.write_config()
    misses: list[str] = []
    fetched = [0]
    stop = threading.Event()

    def fetch_all(server: Mirror) -> None:
        while not stop.is_set():
            status, body = server.get("/status")
            serving = json.loads(body)["storage"]["serving"].get(f"current/{NAME}", "")
            snap_id = serving.split("/")[-1]
            for path in fleet.syncer.store_paths(NAME, snap_id, carried=False):
                code, _ = server.get(f"/{NAME}/{path}")
                fetched[0] += 1
                if code == 404:
                    misses.append(f"{server.workdir.name} {snap_id} {path}")

    with ThreadPoolExecutor(len(fleet.servers)) as pool:
        futures = [pool.submit(fetch_all, server) for server in fleet.servers]
        removed = 0
        for _ in range(4):
            fleet.new_version()
            gc = fleet.syncer.run("gc", "--json")
            assert gc.returncode == 0, gc.output
            removed += len(json.loads(gc.stdout)["removed"])
        stop.set()
        for future in futures:
            future.result()
    assert removed >= 2, "gc removed nothing: the test proves nothing"
    assert fetched[0] > 50
    assert misses == [], misses[:5]


def test_two_scheduled_syncers_sync_an_upstream_one_at_a_time(
    tmp_path: Path, keys, deb_cache: Path, moto: MotoServer
) -> None:
    """Two servers with [schedule] on one bucket: each upstream's sync holds a lease in the store,
    so their syncs never overlap. The upstream answers InRelease after 1.5 s: overlapping syncs
    would be answered within moments of each other, one at a time at least 1.5 s apart."""
    fleet = Fleet(tmp_path, keys("s3-fleet"), deb_cache, moto, servers=0)
    try:
        fleet.sync()
        fleet.upstream.fault(f"dists/{SUITE}/InRelease", "slow", seconds=1.5)
        fleet.upstream.answered.clear()
        syncers = [fleet.node(f"scheduled{i}", schedule={"interval": "1s"}) for i in range(2)]
        for syncer in syncers:
            syncer.start_server()
        time.sleep(12)
        for syncer in syncers:
            syncer.stop_server()
        releases = [t for t, path in fleet.upstream.answered if path.endswith("/InRelease")]
        assert len(releases) >= 4, releases
        gaps = [b - a for a, b in zip(releases, releases[1:], strict=False)]
        assert min(gaps) >= 1.4, gaps
    finally:
        fleet.close()


def _put_raw(moto: MotoServer, bucket: str, key: str, body: bytes) -> None:
    moto.client().put_object(Bucket=bucket, Key=key, Body=body)


def test_a_damaged_object_is_never_served_and_fsck_names_it(fleet: Fleet, moto: MotoServer) -> None:
    deb = next(p for p in fleet.syncer.served_paths(NAME) if p.endswith(".deb"))
    sha256 = fleet.syncer.record(NAME, deb)["sha256"]
    _put_raw(moto, fleet.bucket, f"mirror/objects/{sha256[:2]}/{sha256}", b"not the package")
    damaged = fleet.servers[0]
    code, body = damaged.get(f"/{NAME}/{deb}")
    assert code == 503 and body != b"not the package"
    fsck = fleet.syncer.run("fsck")
    assert fsck.returncode != 0
    assert deb in fsck.output, fsck.output


def test_an_unreachable_missing_or_denied_store_is_a_storage_error(
    fleet: Fleet, moto: MotoServer, tmp_path: Path
) -> None:
    fleet.new_version()  # the upstream has something new to store
    nowhere = fleet.node("nowhere")
    nowhere.top["storage"] = {**nowhere.top["storage"], "endpoint": f"http://127.0.0.1:{free_port()}"}
    nowhere.write_config()
    missing = fleet.node("missing")
    missing.top["storage"] = {**missing.top["storage"], "bucket": "no-such-bucket"}
    missing.write_config()
    denying = MotoServer(tmp_path / "denying-moto.log", deny=True).start()
    denied = fleet.node("denied")
    denied.top["storage"] = {**denied.top["storage"], "endpoint": denying.endpoint}
    denied.write_config()
    served = fleet.servers[0].served(NAME)
    try:
        with pytest.raises(Exception, match="InvalidAccessKeyId"):
            denying.client().list_objects_v2(Bucket=fleet.bucket)  # the store really denies
        brokens = (nowhere, missing, denied)
        for broken in brokens:
            run = broken.sync("--log-format", "json")
            assert run.returncode == 1, run.output
            assert "storage-error" in run.output, run.output
            promote = broken.run("promote", NAME, "20260101T000000Z")
            assert promote.returncode == 1 and "storage-error" in promote.stderr, promote.output
    finally:
        denying.stop()
    assert fleet.servers[0].served(NAME) == served


def test_gc_keeps_what_a_pointer_named_within_two_refresh_periods(tmp_path: Path, moto: MotoServer) -> None:
    """Three promotions in a row: a server that refreshes every REFRESH seconds may still serve
    the first, so gc keeps it until 2 x refresh_seconds after the pointer left it; then it goes."""
    from aptguard.config import load_config
    from aptguard.gc import keep_reasons
    from aptguard.store import open_store
    from tests.test_storage import _archive, _commit

    bucket = moto.new_bucket()
    config_file = tmp_path / "aptguard.toml"
    config_file.write_text(f'data_dir = "data"\n\n{moto.storage_toml(bucket)}\n[server]\nrefresh_seconds = 1\n')
    store = open_store(load_config(config_file))
    store.ensure()
    for n, snap_id in enumerate(("S1", "S2", "S3")):
        _commit(store, snap_id, _archive(2, str(n)))
    store.set_current("up", "S1", expect=None)
    store.set_current("up", "S2", expect="S1")
    store.set_current("up", "S3", expect="S2")
    store.set_pin("ci", "up", "S1", expect=None)
    store.remove_pin("ci", expect=("up", "S1"))
    now = datetime.now(UTC)
    kept, going = keep_reasons(store, "up", 1, 0, now, refresh_seconds=1)
    for snap_id in ("S1", "S2"):
        assert "served moments ago (a server may not have refreshed yet)" in kept[snap_id]
    assert going == []
    time.sleep(2.1)
    kept, going = keep_reasons(store, "up", 1, 0, datetime.now(UTC), refresh_seconds=1)
    assert going == ["S1", "S2"], kept  # no rollback target: the pointers were set by hand


def _head(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def test_a_local_mirror_moves_into_a_bucket_and_serves_the_same(
    tmp_path: Path, keys, deb_cache: Path, moto: MotoServer
) -> None:
    fleet = Fleet(tmp_path, keys("s3-fleet"), deb_cache, moto, servers=1)
    local = Mirror(tmp_path / "local", dict(fleet.syncer.upstreams))
    try:
        first = local.sync()
        assert first.returncode == 0, first.output
        fleet.repo.add(SUITE, "main", "amd64", "hello", "2.0-1")
        fleet.publish()
        assert local.sync().returncode == 0
        ids = [s["id"] for s in local.snapshots(NAME)]
        assert len(ids) == 2
        assert local.run("pin", "ci", NAME, ids[-1]).returncode == 0
        run = fleet.syncer.run("migrate", "--from", str(local.data))
        assert run.returncode == 0, run.output
        assert "2 snapshots copied" in run.output, run.output
        again = fleet.syncer.run("migrate", "--from", str(local.data), "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["skipped"] == 2, again.output
        assert fleet.syncer.snapshots(NAME) == local.snapshots(NAME)
        assert fleet.syncer.current(NAME) == local.current(NAME)
        # Every command answers the same on both backends (the same JSON).
        for command in (
            ("status", "--json"),
            ("snapshots", NAME, "--json"),
            ("diff", NAME, "previous", "current", "--json"),
            ("gc", "--dry-run", "--json"),
            ("fsck", "--json"),
        ):
            on_local, on_s3 = local.run(*command), fleet.syncer.run(*command)
            assert on_local.returncode == 0 and on_local.stdout.strip(), (command, on_local.output)
            assert (on_s3.returncode, on_s3.stdout) == (0, on_local.stdout), (command, on_s3.output)
        local.start_server()
        fleet.start()
        server = fleet.servers[0]
        oldest, newest = ids[-1], ids[0]  # `snapshots` lists newest first
        served = {f"/{NAME}": newest, "/pins/ci": oldest, f"/snapshots/{NAME}/{oldest}": oldest}
        for prefix, snap_id in served.items():
            for path in local.store_paths(NAME, snap_id, carried=False):
                code, headers, body = _head(f"{local.url}{prefix}/{path}")
                code_s3, headers_s3, body_s3 = _head(f"{server.url}{prefix}/{path}")
                assert (code_s3, body_s3) == (code, body), path
                for name in ("Last-Modified", "ETag"):
                    assert headers_s3.get(name) == headers.get(name), (path, name)
    finally:
        local.stop_server()
        fleet.close()


def test_a_killed_holders_lease_lapses_and_another_machine_takes_it(tmp_path: Path, moto: MotoServer) -> None:
    """A syncer killed (-9) while it holds an upstream's lease: another takes the lease once it
    has expired (LEASE_SECONDS after the last renewal; 2 s here), not before."""
    from aptguard import store_s3

    bucket = moto.new_bucket()
    config_file = tmp_path / "aptguard.toml"
    config_file.write_text(f'data_dir = "data"\n\n{moto.storage_toml(bucket)}')
    script = (
        f"import sys; sys.path[:0] = {sys.path!r}\n"
        "import time\nfrom pathlib import Path\nfrom aptguard import store_s3\n"
        "from aptguard.config import load_config\nfrom aptguard.store import open_store\n"
        "store_s3.LEASE_SECONDS = 2.0\n"
        f"store = open_store(load_config(Path({str(config_file)!r})))\n"
        "with store.lease('up'):\n    print('held', flush=True)\n    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        time.sleep(3)  # renewed meanwhile (every LEASE_SECONDS / 3): still held
        store = _store_of(config_file)
        with pytest.raises(subprocess.TimeoutExpired):
            _in_child_lease(config_file, timeout=1.5)
        holder.kill()
        holder.wait()
        killed = time.monotonic()
        with store.lease("up"):
            waited = time.monotonic() - killed
        assert waited <= 2.0 + 2 * store_s3.LEASE_POLL + 1.0, waited
    finally:
        holder.kill()


def _store_of(config_file: Path) -> Any:
    from aptguard.config import load_config
    from aptguard.store import open_store

    return open_store(load_config(config_file))


def _in_child_lease(config_file: Path, timeout: float) -> None:
    """Take the lease of "up" in a child process (waiting at most `timeout`)."""
    script = (
        f"import sys; sys.path[:0] = {sys.path!r}\n"
        "from pathlib import Path\nfrom aptguard.config import load_config\nfrom aptguard.store import open_store\n"
        f"store = open_store(load_config(Path({str(config_file)!r})))\n"
        "with store.lease('up'):\n    pass\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        child.wait(timeout=timeout)
    finally:
        child.kill()
        child.wait()


def test_gc_discards_an_upload_a_killed_sync_left(fleet: Fleet, moto: MotoServer) -> None:
    """A multipart upload never completed (its syncer killed) is invisible, and gc aborts it."""
    client = moto.client()
    key = "mirror/objects/ab/" + "ab" * 32
    upload = client.create_multipart_upload(Bucket=fleet.bucket, Key=key)
    client.upload_part(Bucket=fleet.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"half")
    assert client.list_multipart_uploads(Bucket=fleet.bucket).get("Uploads")  # the leftover is real
    dry = fleet.syncer.run("gc", "--dry-run", "--json")
    assert dry.returncode == 0 and any(key[len("mirror/") :] in x for x in json.loads(dry.stdout)["leftovers"])
    gc = fleet.syncer.run("gc")
    assert gc.returncode == 0, gc.output
    assert not client.list_multipart_uploads(Bucket=fleet.bucket).get("Uploads")
    assert fleet.servers[0].served(NAME)  # and nothing served went


def test_a_server_started_without_its_store_answers_503_not_404(fleet: Fleet) -> None:
    """A 404 for InRelease would make apt look for Release and fail the update as a repository
    without one; a server that never reached its store says it is unavailable instead."""
    lost = fleet.node("lost")
    lost.top["storage"] = {**lost.top["storage"], "endpoint": f"http://127.0.0.1:{free_port()}"}
    lost.write_config()
    lost.start_server()
    try:
        status, _body = lost.get(f"/{NAME}/dists/{SUITE}/InRelease")
        assert status == 503
        assert json.loads(lost.get("/status")[1])["storage"]["reachable"] is False
    finally:
        lost.stop_server()


def test_an_oversized_pointer_in_the_store_is_refused_not_read_whole(fleet: Fleet, moto: MotoServer) -> None:
    """A pointer object of 2 MiB (damage, or a writer that is not aptguard): commands say
    storage-error instead of holding it in memory, and servers keep serving what they served."""
    release = _served_release(fleet.servers[0])
    key = f"mirror/pointers/current/{NAME}"
    client = moto.client()
    client.put_object(Bucket=fleet.bucket, Key=key, Body=b" " * (2 << 20))
    assert client.head_object(Bucket=fleet.bucket, Key=key)["ContentLength"] == 2 << 20  # the damage is real
    run = fleet.syncer.run("promote", NAME, "20260101T000000Z")
    assert run.returncode == 1 and "storage-error" in run.stderr and "more than" in run.stderr, run.output
    time.sleep(3 * REFRESH)
    for server in fleet.servers:
        assert _served_release(server) == release
        assert json.loads(server.get("/status")[1])["storage"]["reachable"] is True
