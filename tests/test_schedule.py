"""`[schedule] interval`: `aptguard serve` also syncs every upstream, in a worker of its own.

Real parts: a real signed upstream on 127.0.0.1, the CLI's server, raw HTTP and the real
apt-get; nobody runs `aptguard sync` by hand except where a test says so.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.apt import AptClient
from tests.servers import Site, alive, children, raw_get, wait_for

INRELEASE = "/example/dists/stable/InRelease"


@pytest.fixture
def site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[Site]:
    made = Site(tmp_path, keys("schedule"), deb_cache)
    made.mirror.stop_server()
    made.mirror.top["schedule"] = {"interval": "2s"}
    made.mirror.write_config()
    made.mirror.start_server()
    yield made
    made.close()


def published(site: Site) -> bytes:
    return (site.repo.root / "dists/stable/InRelease").read_bytes()


def test_a_new_upstream_release_is_synced_and_served_without_anyone_running_sync(site: Site, tmp_path: Path) -> None:
    url = site.url("embedded")
    before = raw_get(url, INRELEASE)[2]
    assert before == published(site)
    site.version += 1
    site.repo.add(site.SUITE, "main", "amd64", "hello", f"{site.version}.0-1")
    site.publish()
    assert published(site) != before  # the upstream really changed
    assert wait_for(lambda: raw_get(url, INRELEASE)[2] == published(site), 30), "not synced within 30 s"
    client = AptClient(tmp_path / "apt", arch="amd64")
    client.set_sources([client.source_line(f"{url}/example", "stable", ["main"], site.keyring)])
    assert client.update().ok
    assert client.available("hello") == f"{site.version}.0-1"
    status = site.mirror.status()["upstreams"]["example"]
    assert status["last_sync"]["outcome"] in ("promoted", "unchanged")


def test_a_broken_upstream_is_a_rejected_scheduled_sync_and_serving_is_unchanged(site: Site, tmp_path: Path) -> None:
    url = site.url("embedded")
    served = raw_get(url, INRELEASE)[2]
    inrelease = site.repo.root / "dists/stable/InRelease"
    site.repo.replace_file(
        "dists/stable/InRelease", inrelease.read_bytes().replace(b"Label: Example", b"Label: Exampl3")
    )
    direct = AptClient(tmp_path / "direct", arch="amd64")
    direct.set_sources([direct.source_line(site.upstream.url, "stable", ["main"], site.keyring)])
    assert not direct.update().ok  # the fault is real: apt refuses the upstream itself

    def rejected() -> bool:
        last = site.mirror.status()["upstreams"]["example"]["last_sync"]
        return last["outcome"] == "rejected"

    assert wait_for(rejected, 30)
    assert site.mirror.status()["upstreams"]["example"]["last_sync"]["reason"] == "signature-invalid"
    assert raw_get(url, INRELEASE)[2] == served


def test_syncs_run_by_hand_beside_the_schedule_succeed(site: Site) -> None:
    """Each takes the upstream's lease, as the scheduled one does; whether a run had to wait for
    the other is timing, so this asserts only that neither breaks the other."""
    for _ in range(3):
        run = site.mirror.sync()
        assert run.returncode == 0, run.output
    assert raw_get(site.url("embedded"), INRELEASE)[2] == published(site)


def test_sigterm_ends_the_syncer_with_the_server(site: Site) -> None:
    server = site.mirror.server
    assert server is not None
    assert wait_for(lambda: len(children(server.pid)) == 2)  # one server worker, one syncer
    workers = children(server.pid)
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    assert wait_for(lambda: not any(alive(pid) for pid in workers))
    site.mirror.server = None
    log = (site.mirror.workdir / "serve.log").read_text()
    assert "Traceback" not in log, log


@pytest.mark.parametrize("interval", ["0s", "soon", "15", "366d", "99999999999999999999999999999999999999d"])
def test_a_bad_interval_is_refused_naming_the_key(tmp_path: Path, interval: str) -> None:
    config = tmp_path / "aptguard.toml"
    config.write_text(f'data_dir = "data"\n\n[schedule]\ninterval = "{interval}"\n')
    run = subprocess.run(
        [sys.executable, "-m", "aptguard", "--config", str(config), "serve"], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 2
    assert f"{config}: schedule.interval: expected a duration" in run.stderr and repr(interval) in run.stderr


def test_serve_without_a_schedule_never_syncs(tmp_path: Path, keys, deb_cache: Path) -> None:
    made = Site(tmp_path, keys("schedule"), deb_cache)
    try:
        before = raw_get(made.url("embedded"), INRELEASE)[2]
        made.version += 1
        made.repo.add(made.SUITE, "main", "amd64", "hello", f"{made.version}.0-1")
        made.publish()
        time.sleep(4)
        assert raw_get(made.url("embedded"), INRELEASE)[2] == before
    finally:
        made.close()
