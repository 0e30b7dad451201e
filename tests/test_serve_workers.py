"""`aptguard serve --workers N`: N processes on one port, supervised, counted as one server.

Real parts: the CLI's server on 127.0.0.1, a real signed upstream synced by the CLI, raw HTTP,
SIGKILL and SIGTERM. The workers are found as the supervisor's child processes in /proc.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Site, alive, children, raw_get, wait_for

INRELEASE = "/example/dists/stable/InRelease"
WORKERS = 3


@pytest.fixture
def site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[Site]:
    made = Site(tmp_path, keys("workers"), deb_cache, workers=WORKERS)
    assert made.mirror.server is not None
    assert wait_for(lambda: len(children(made.mirror.server.pid)) == WORKERS)
    yield made
    made.close()


def requests_counted(url: str) -> int:
    status, _, body = raw_get(url, "/metrics")
    assert status == 200
    found = re.search(rb'^aptguard_http_requests_total\{code="200",method="GET"\} ([0-9.e+]+)$', body, re.M)
    return int(float(found.group(1))) if found else 0


def test_workers_answer_alike_and_every_scrape_counts_them_all(site: Site) -> None:
    """Requests on new connections spread over the workers (SO_REUSEPORT); each answers the
    upstream's bytes; /metrics, whichever worker answers it, sums the requests of all (one
    worker's own count would be about a third)."""
    url = site.url("embedded")
    published = (site.repo.root / "dists/stable/InRelease").read_bytes()
    before = requests_counted(url)
    for _ in range(60):
        status, _, body = raw_get(url, INRELEASE)
        assert status == 200 and body == published
    for _ in range(6):
        assert requests_counted(url) >= before + 60


def test_a_promotion_reaches_every_worker_at_once(site: Site) -> None:
    url = site.url("embedded")
    old = raw_get(url, INRELEASE)[2]
    for _ in range(3 * WORKERS):  # every worker has InRelease in memory now
        assert raw_get(url, INRELEASE)[2] == old
    site.new_version()
    published = (site.repo.root / "dists/stable/InRelease").read_bytes()
    assert published != old
    for _ in range(10 * WORKERS):
        assert raw_get(url, INRELEASE)[2] == published


def test_a_killed_worker_is_replaced_and_no_request_fails(site: Site) -> None:
    server = site.mirror.server
    assert server is not None
    url = site.url("embedded")
    first = children(server.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: not alive(victim))
    # Connections the kernel hands to the dead worker's socket wait for its replacement.
    for _ in range(30):
        assert raw_get(url, INRELEASE)[0] == 200
    assert wait_for(lambda: len(children(server.pid)) == WORKERS)
    now = children(server.pid)
    assert victim not in now and len(now - first) == 1
    log = (site.mirror.workdir / "serve.log").read_text()
    assert f"worker {victim} ended (signal 9); starting another" in log


def test_a_worker_that_keeps_dying_is_restarted_ever_later_and_sigterm_does_not_wait(site: Site) -> None:
    """1 s, 2 s, 4 s before each new start of a job that dies young (no tight restart loop);
    SIGTERM during such a wait ends the server at once."""
    server = site.mirror.server
    assert server is not None
    log = site.mirror.workdir / "serve.log"
    workers = children(server.pid)
    victim = min(workers)
    for delay in (1, 2, 4):
        os.kill(victim, signal.SIGKILL)
        assert wait_for(
            lambda v=victim, d=delay: f"worker {v} ended (signal 9); starting another in {d} s" in log.read_text()
        )
        if delay == 4:
            break
        assert wait_for(lambda: len(children(server.pid)) == WORKERS)
        [victim] = children(server.pid) - workers
        workers = children(server.pid)
    stopped = time.monotonic()
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    assert time.monotonic() - stopped < 3, "the supervisor slept out its wait before stopping"
    site.mirror.server = None


def test_sigterm_ends_every_worker_and_removes_the_shared_counters(site: Site) -> None:
    server = site.mirror.server
    assert server is not None
    workers = children(server.pid)
    # The workers' counters are files they map (prometheus_client's multiprocess mode).
    maps = Path(f"/proc/{min(workers)}/maps").read_text()
    [shared] = {os.path.dirname(line.split()[-1]) for line in maps.splitlines() if "/counter_" in line}
    assert os.path.isdir(shared) and os.path.basename(shared).startswith("aptguard-metrics-")
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    assert not any(alive(pid) for pid in workers)
    assert not os.path.exists(shared)
    site.mirror.server = None


def test_kill_9_of_the_supervisor_ends_its_workers_and_frees_the_port(site: Site) -> None:
    """A worker left behind would keep the port from the restarted server."""
    server = site.mirror.server
    assert server is not None
    workers = children(server.pid)
    server.kill()
    server.wait(timeout=10)
    site.mirror.server = None
    assert wait_for(lambda: not any(alive(pid) for pid in workers)), "a worker outlived its supervisor"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", site.mirror.port))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_a_clear_error(site: Site, workers: int) -> None:
    """Never a second server silently sharing the port (SO_REUSEPORT would allow it)."""
    taken = f"127.0.0.1:{site.mirror.port}"
    run = subprocess.run(
        [sys.executable, "-m", "aptguard", "--config", str(site.mirror.config), "serve", "--listen", taken]
        + ["--workers", str(workers)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2, run.stderr
    assert f"cannot listen on {taken}" in run.stderr and "--listen" in run.stderr, run.stderr
    assert raw_get(site.url("embedded"), INRELEASE)[0] == 200
