"""Guarantee 5: kill -9 of `sync` or `gc` at any instant leaves every served URL intact.

A repository large enough that a sync takes a couple of seconds is synced and collected again
and again; each run is killed with SIGKILL at a random instant. After every kill the served
InRelease is the one served before or the complete new one, the real apt-get updates cleanly
from the embedded server, and `fsck` exits 0. Then an uninterrupted sync and gc complete and
discard every leftover.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.apt import AptClient
from fixtures.keys import write_keyring
from fixtures.repo import Repo, build_deb
from tests.mirror import Mirror

SUITE = "bookworm"
PACKAGES = 200  # x 64 KiB, in three variants: each sync downloads a whole variant again
SIZE = 64 * 1024
VARIANTS = 3
# Kills that must land while the command runs (a kill after it ended does not count).
MID_RUN = {"sync": 14, "gc": 6}


@pytest.fixture(scope="session")
def big_debs(deb_cache: Path) -> None:
    """Build every variant's packages once per session (build_deb caches them)."""
    for variant in range(VARIANTS):
        for i in range(PACKAGES):
            build_deb(deb_cache, f"bulk{i:03d}", f"1.{variant}", size=SIZE)


def _publish(repo: Repo, key, generation: int, variant: int) -> bytes:
    """Generation g (its Date rises with g) lists `variant` of every package; returns its InRelease."""
    for i in range(PACKAGES):
        repo.add(SUITE, "main", "amd64", f"bulk{i:03d}", f"1.{variant}", size=SIZE)
    date = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2) + dt.timedelta(seconds=generation)
    repo.publish(SUITE, [key], date=date)
    return repo.path(f"dists/{SUITE}/InRelease").read_bytes()


def _start(mirror: Mirror, *args: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.Popen(
        [sys.executable, "-m", "aptguard", "--config", str(mirror.config), *args],
        cwd=mirror.workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _timed(mirror: Mirror, *args: str) -> float:
    started = time.monotonic()
    run = mirror.run(*args)
    assert run.returncode == 0, run.output
    return time.monotonic() - started


@pytest.mark.slow
def test_kill_9_of_sync_and_gc_at_random_instants_leaves_served_urls_and_fsck_clean(
    tmp_path: Path, keys, repo, serve, big_debs
) -> None:
    rng = random.Random(os.environ.get("APTGUARD_CRASH_SEED", "aptguard"))
    key = keys("crash")
    keyring = write_keyring(tmp_path / "crash.asc", [key])
    r = repo()
    upstream = serve(r)
    mirror = Mirror.single(
        tmp_path / "mirror", upstream.url, keyring, suites=[SUITE], top={"retention": {"keep_last": 1, "keep_days": 0}}
    )
    mirror.start_server()
    client = AptClient(tmp_path / "client")
    client.set_sources([AptClient.source_line(f"{mirror.url}/up", SUITE, ["main"], keyring)])
    inrelease = f"/up/dists/{SUITE}/InRelease"
    try:
        # Calibrate: start-up, a full sync (one whole variant downloaded) and a gc with work to do.
        startup = _timed(mirror, "snapshots", "up")
        sync_time = 0.0
        for generation in range(VARIANTS):
            _publish(r, key, generation, generation)
            sync_time = max(sync_time, _timed(mirror, "sync"))
        gc_time = _timed(mirror, "gc")
        current, previous = VARIANTS - 1, VARIANTS - 2  # the variants served and kept for rollback
        leftovers = 0
        killed_running = {"sync": 0, "gc": 0}
        kill = 0
        while any(killed_running[c] < n for c, n in MID_RUN.items()):
            assert kill < 50, f"too few kills landed while a command ran: {killed_running}"
            kill += 1
            wanted = [c for c, n in MID_RUN.items() if killed_running[c] < n]
            command = "gc" if wanted == ["gc"] or (kill % 3 == 0 and "gc" in wanted) else "sync"
            # The variant that neither the current nor the rollback target holds: once a
            # complete gc has removed the rest, a sync of it downloads every package again.
            variant = next(v for v in range(VARIANTS) if v not in (current, previous))
            generation += 1
            if command == "sync":
                assert mirror.run("gc").returncode == 0
            new = _publish(r, key, generation, variant)
            if command == "gc":  # a promotion first, so that the gc has a snapshot to remove
                assert mirror.sync().returncode == 0
                current, previous = variant, current
            before = mirror.get(inrelease)[1]
            proc = _start(mirror, command)
            time.sleep(rng.uniform(startup * 0.8, sync_time if command == "sync" else gc_time))
            if proc.poll() is None:
                killed_running[command] += 1
            proc.send_signal(signal.SIGKILL)
            proc.wait()

            status, served = mirror.get(inrelease)
            where = f"kill {kill} of {command}"
            assert status == 200 and served in (before, new), f"{where}: served InRelease is neither old nor new"
            if command == "sync" and served == new:
                current, previous = variant, current
            result = client.update()
            assert result.ok, f"{where}: apt-get update: {result.output}"
            fsck = mirror.run("fsck")
            assert fsck.returncode == 0, f"{where}: {fsck.output}"
            leftovers += "leftovers of interrupted runs" in fsck.stdout

        print(
            f"crash test: start-up {startup:.2f} s, sync {sync_time:.2f} s, gc {gc_time:.2f} s; {kill} kills, "
            f"{killed_running} mid-run, {leftovers} left leftovers"
        )

        # The next runs complete and discard what the killed ones left.
        generation += 1
        variant = next(v for v in range(VARIANTS) if v not in (current, previous))
        new = _publish(r, key, generation, variant)
        run = mirror.sync()
        assert run.returncode == 0 and "promoted" in run.stdout, run.output
        assert mirror.get(inrelease)[1] == new
        run = mirror.run("gc")
        assert run.returncode == 0, run.output
        assert not [p for p in (mirror.data / "tmp").iterdir()], "leftovers survived a complete sync and gc"
        fsck = mirror.run("fsck")
        assert fsck.returncode == 0 and "leftovers" not in fsck.stdout, fsck.output
        result = client.update()
        assert result.ok, result.output
        assert client.available("bulk000") == f"1.{variant}"
    finally:
        mirror.stop_server()
