"""A large pool is fetched by the sync and a forked twin (aptguard/twin.py), each with half.

What must hold whichever process fetched a file: every file is requested once and served as
upstream has it; a bad file in either half is refused with the reason the sync alone would
give, and nothing of the run stays behind; a twin killed mid-run fails the sync and leaves
nothing; a sync killed mid-run takes its twin with it, and the next sync completes.

The pool files to fetch are taken in index order (by package name here) and dealt out
alternately: the first to the sync itself, the second to the twin, and so on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aptguard.store import FileStore
from aptguard.sync import TWIN_FILES
from fixtures.apt import AptClient
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror

SUITE = "bookworm"
START = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)  # each publish one second later than the one before
MANY = TWIN_FILES + 6  # pool files to fetch: enough for a twin


@dataclass
class Bulk:
    repo: Repo
    up: Upstream
    key: SigningKey
    keyring: Path
    mirror: Mirror
    published: int = 1

    def publish(self) -> None:
        self.repo.publish(SUITE, [self.key], date=START + dt.timedelta(seconds=self.published))
        self.published += 1

    def add_many(self, version: str = "1.0") -> list[str]:
        """MANY packages p000.. listed and published; their pool paths in index order."""
        paths = []
        for i in range(MANY):
            deb = self.repo.add(SUITE, "main", "amd64", f"p{i:03d}", version, size=1500)
            paths.append(str(deb.relative_to(self.repo.root)))
        self.publish()
        return paths

    def sync(self) -> tuple[subprocess.CompletedProcess[str], dict]:
        run = self.mirror.sync("--log-format", "json")
        results = [json.loads(line) for line in run.stdout.splitlines() if '"event": "result"' in line]
        assert len(results) == 1, run.output
        return run, results[0]

    def leftovers(self) -> list[str]:
        return FileStore(self.mirror.data).leftovers()


@pytest.fixture
def bulk(tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve) -> Bulk:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    key = keys("upstream")
    r.publish(SUITE, [key], date=START)
    up = serve(r)
    keyring = write_keyring(tmp_path / "k.asc", [key])
    return Bulk(r, up, key, keyring, Mirror.single(tmp_path / "m", up.url, keyring))


def _twin_of(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The pid of the forked twin of sync process `proc`: a child running the same command line
    (the one it was started with: its own /proc cmdline reads empty until exec has finished, as
    does a child's that has exited) with a thread of its own besides (a child about to exec
    gpgv has the same command line, and one thread)."""
    pid = proc.pid
    cmdline = b"".join(os.fsencode(arg) + b"\0" for arg in proc.args)  # type: ignore[union-attr]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"sync {pid} ended (exit {proc.returncode}) without a twin"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and (entry / "cmdline").read_bytes() == cmdline:
                    threads = int((entry / "status").read_text().split("Threads:", 1)[1].split()[0])
                    if threads > 1:
                        return int(entry.name)
            except (OSError, IndexError, ValueError):
                continue
        time.sleep(0.02)
    raise AssertionError(f"sync {pid} made no twin within {timeout} s")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def _start_sync(mirror: Mirror) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    return subprocess.Popen(
        [sys.executable, "-m", "aptguard", "--config", str(mirror.config), "sync"],
        cwd=mirror.workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_large_pool_is_shared_with_a_twin_and_served_as_upstream_has_it(bulk: Bulk, tmp_path: Path) -> None:
    paths = bulk.add_many()
    run, result = bulk.sync()
    assert run.returncode == 0 and result["outcome"] == "promoted", run.output
    assert result["pool_processes"] == 2, result
    for rel in paths + ["pool/main/h/hello/hello_1.0_amd64.deb"]:
        assert bulk.up.count(rel) == 1, f"{rel} requested {bulk.up.count(rel)} times"
    bulk.mirror.start_server()
    try:
        served = bulk.mirror.served("up")
        for rel in paths:
            assert served[rel] == bulk.repo.path(rel).read_bytes(), rel
        client = AptClient(tmp_path / "client")
        client.set_sources([bulk.mirror.source_line("up", SUITE, ["main"], bulk.keyring)])
        assert client.update().ok
        for name in ("p000", "p001"):  # one from each half
            got = client.download(name)
            assert got.returncode == 0 and got.files, got.output
    finally:
        bulk.mirror.stop_server()
    fsck = bulk.mirror.run("fsck")
    assert fsck.returncode == 0, fsck.output


@pytest.mark.parametrize("position", [0, 1], ids=["sync-half", "twin-half"])
def test_a_corrupt_file_in_either_half_is_refused_and_nothing_is_left(bulk: Bulk, position: int) -> None:
    assert bulk.sync()[1]["outcome"] == "promoted"
    bulk.mirror.start_server()
    try:
        before = bulk.mirror.served("up")
        paths = bulk.add_many()
        bad = paths[position]
        listed = hashlib.sha256(bulk.repo.path(bad).read_bytes()).hexdigest()
        bulk.repo.corrupt(bad)
        assert hashlib.sha256(bulk.repo.path(bad).read_bytes()).hexdigest() != listed  # the fault is real

        run, result = bulk.sync()
        assert run.returncode == 1, run.output
        assert result["reason"] == "package-mismatch" and bad in result["detail"], result
        assert bulk.mirror.served("up") == before, "served bytes changed after a rejected sync"
        assert bulk.leftovers() == []

        bulk.repo.add(SUITE, "main", "amd64", f"p{position:03d}", "1.0", size=1500)  # mended
        bulk.publish()
        run, result = bulk.sync()
        assert run.returncode == 0 and result["outcome"] == "promoted", run.output
        assert bulk.mirror.served("up")[bad] == bulk.repo.path(bad).read_bytes()
    finally:
        bulk.mirror.stop_server()


def test_a_twin_killed_mid_run_fails_the_sync_and_leaves_nothing(bulk: Bulk) -> None:
    assert bulk.sync()[1]["outcome"] == "promoted"
    before_current = bulk.mirror.current("up")
    bulk.add_many()
    bulk.up.fault("pool/main/p/*", "slow", seconds=60)  # both halves wait on their first files
    proc = _start_sync(bulk.mirror)
    twin = _twin_of(proc)
    os.kill(twin, signal.SIGKILL)
    assert proc.wait(timeout=60) == 1
    last = bulk.mirror.last_sync("up")
    assert last["reason"] == "internal-error" and "twin" in last["detail"], last
    assert bulk.mirror.current("up") == before_current
    assert bulk.leftovers() == []
    bulk.up.clear_faults()
    run, result = bulk.sync()
    assert run.returncode == 0 and result["outcome"] == "promoted", run.output


def test_kill_9_of_a_sync_ends_its_twin_and_the_next_sync_completes(bulk: Bulk) -> None:
    paths = bulk.add_many()
    # Both halves wait on their first files: a twin that outlived its sync would wait too, with
    # nothing written to its parent (whose closed pipe would end it).
    bulk.up.fault("pool/main/p/*", "slow", seconds=60)
    proc = _start_sync(bulk.mirror)
    twin = _twin_of(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while not _gone(twin):
        assert time.monotonic() < deadline, f"twin {twin} outlived its sync"
        time.sleep(0.02)
    bulk.up.clear_faults()
    run, result = bulk.sync()
    assert run.returncode == 0 and result["outcome"] == "promoted", run.output
    assert bulk.leftovers() == []
    bulk.mirror.start_server()
    try:
        served = bulk.mirror.served("up")
        assert all(served[rel] == bulk.repo.path(rel).read_bytes() for rel in paths)
    finally:
        bulk.mirror.stop_server()
