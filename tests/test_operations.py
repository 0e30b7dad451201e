"""Operating the mirror (SPEC §2, guarantees 4-7): rollback and hold, pins, diff, gc, fsck,
sources stanzas, progress output and status warnings, through the CLI and the real apt-get."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from aptguard.store import FileStore
from fixtures.apt import AptClient
from fixtures.keys import SigningKey, make_key, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror, Run

SUITE = "bookworm"
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Ops:
    """A mirror of one upstream "up" with a running server; `release(n)` publishes generation n."""

    repo: Repo
    upstream: Upstream
    mirror: Mirror
    key: SigningKey
    keyring: Path
    tmp: Path
    clients: int = 0

    def publish(self, n: int, **kw: object) -> None:
        # Dates rise with n and stay in the past (a future Date is refused).
        self.repo.publish(SUITE, [self.key], date=NOW - dt.timedelta(hours=50 - n), **kw)  # type: ignore[arg-type]

    def release(self, n: int, **kw: object) -> str:
        """Generation n: hello n.0 (content unique to it), then sync; returns the new snapshot id."""
        self.repo.add(SUITE, "main", "amd64", "hello", f"{n}.0", size=3000)
        self.publish(n, **kw)
        run = self.mirror.sync()
        assert run.returncode == 0, run.output
        return self.mirror.snapshots("up")[0]["id"]

    def client(self, url: str | None = None) -> AptClient:
        self.clients += 1
        c = AptClient(self.tmp / f"client-{self.clients}")
        c.set_sources([AptClient.source_line(url or f"{self.mirror.url}/up", SUITE, ["main"], self.keyring)])
        return c

    def version_seen(self, client: AptClient) -> str | None:
        result = client.update()
        assert result.ok, result.output
        return client.available("hello")

    def run(self, *args: str) -> Run:
        return self.mirror.run(*args)

    def hello_object(self) -> Path:
        """The stored object of the hello .deb the upstream lists now."""
        sha = hashlib.sha256(self.repo.deb_path(SUITE, "main", "amd64", "hello").read_bytes()).hexdigest()
        return self.mirror.data / "objects" / sha[:2] / sha


@pytest.fixture
def make_ops(tmp_path: Path, keys, repo, serve) -> Iterator[Callable[..., Ops]]:
    mirrors: list[Mirror] = []

    def make(key: SigningKey | None = None, **top: object) -> Ops:
        key = key or keys("ops")
        keyring = write_keyring(tmp_path / "keys" / "up.asc", [key])
        r = repo()
        r.add(SUITE, "main", "amd64", "base-files", "1.0", size=2500)
        up = serve(r)
        mirror = Mirror.single(tmp_path / "mirror", up.url, keyring, suites=[SUITE], top=top)
        mirrors.append(mirror)
        mirror.start_server()
        return Ops(r, up, mirror, key, keyring, tmp_path)

    yield make
    for m in mirrors:
        m.stop_server()


@pytest.fixture
def ops(make_ops: Callable[..., Ops]) -> Ops:
    return make_ops()


# -- rollback and hold ---------------------------------------------------------------------


def test_rollback_serves_the_previous_snapshot_and_holds_later_syncs(ops: Ops) -> None:
    s1 = ops.release(1)
    s2 = ops.release(2)
    assert ops.version_seen(ops.client()) == "2.0"

    run = ops.run("rollback", "up")
    assert run.returncode == 0, run.output
    st = ops.mirror.status()["upstreams"]["up"]
    assert st["current"] == s1 and st["hold"] is True, st
    assert any("hold" in w for w in st["warnings"]), st["warnings"]
    assert (
        ops.mirror.get(f"/up/dists/{SUITE}/InRelease")[1]
        == ops.mirror.get(f"/snapshots/up/{s1}/dists/{SUITE}/InRelease")[1]
    )
    assert ops.version_seen(ops.client()) == "1.0"

    # An unchanged upstream changes nothing; a newer good release is verified and stored,
    # but not promoted while on hold.
    run = ops.mirror.sync()
    assert run.returncode == 0 and ops.mirror.current("up") == s1, run.output
    ops.repo.add(SUITE, "main", "amd64", "hello", "3.0", size=3000)
    ops.publish(3)
    run = ops.mirror.sync()
    assert run.returncode == 0 and "stored" in run.stdout, run.output
    s3 = ops.mirror.snapshots("up")[0]["id"]
    assert s3 not in (s1, s2)
    assert ops.mirror.last_sync("up")["outcome"] == "stored"
    assert ops.mirror.current("up") == s1
    assert ops.version_seen(ops.client()) == "1.0"

    # promote ends the hold; the next sync promotes again.
    run = ops.run("promote", "up", s3)
    assert run.returncode == 0, run.output
    assert ops.mirror.status()["upstreams"]["up"]["hold"] is False
    assert ops.version_seen(ops.client()) == "3.0"
    s4 = ops.release(4)
    assert ops.mirror.current("up") == s4


def test_rollback_twice_undoes_and_without_a_previous_snapshot_is_refused(ops: Ops) -> None:
    s1 = ops.release(1)
    run = ops.run("rollback", "up")
    assert run.returncode == 1 and "no previous snapshot" in run.stderr, run.output
    assert ops.mirror.current("up") == s1 and not ops.mirror.status()["upstreams"]["up"]["hold"]
    s2 = ops.release(2)
    assert ops.run("rollback", "up").returncode == 0
    assert ops.mirror.current("up") == s1
    assert ops.run("rollback", "up").returncode == 0
    assert ops.mirror.current("up") == s2
    run = ops.run("rollback", "up", "--to", "20000101T000000Z")
    assert run.returncode == 1 and "not a stored snapshot" in run.stderr, run.output


def test_rollback_target_is_right_whichever_side_of_a_kill_the_promotion_stopped(ops: Ops) -> None:
    """A promotion records the rollback target, keyed by the new snapshot, before it swaps
    current/NAME. A kill between the two leaves current on the old snapshot, whose own target
    must still hold (simulated here by putting the pointer back as such a kill leaves it)."""
    s1 = ops.release(1)
    s2 = ops.release(2)
    s3 = ops.release(3)
    assert ops.mirror.status()["upstreams"]["up"]["previous"] == s2
    link = ops.mirror.data / "current" / "up"
    tmp_link = link.with_name(".up.test")
    tmp_link.symlink_to(f"../snapshots/up/{s2}")
    tmp_link.replace(link)
    st = ops.mirror.status()["upstreams"]["up"]
    assert (st["current"], st["previous"]) == (s2, s1), st
    assert ops.run("rollback", "up").returncode == 0
    assert ops.mirror.current("up") == s1
    assert s3 in {s["id"] for s in ops.mirror.snapshots("up")}


def test_apt_keeps_newer_lists_after_a_rollback_until_pointed_at_the_snapshot(ops: Ops) -> None:
    """SPEC §3 note: apt ignores a Release older than the one it has; a snapshot URL moves it back."""
    s1 = ops.release(1)
    ops.release(2)
    client = ops.client()
    assert ops.version_seen(client) == "2.0"
    assert ops.run("rollback", "up").returncode == 0
    client.update()
    assert client.available("hello") == "2.0"  # the already-updated host keeps the newer lists
    client.set_sources([AptClient.source_line(f"{ops.mirror.url}/snapshots/up/{s1}", SUITE, ["main"], ops.keyring)])
    assert ops.version_seen(client) == "1.0"


# -- pins and snapshot URLs ----------------------------------------------------------------


def test_pins_and_snapshot_urls_keep_serving_after_newer_promotions(ops: Ops) -> None:
    s1 = ops.release(1)
    run = ops.run("pin", "ci", "up", s1)
    assert run.returncode == 0 and "/pins/ci/" in run.stdout, run.output
    ops.release(2)
    ops.release(3)
    assert ops.version_seen(ops.client()) == "3.0"
    assert ops.version_seen(ops.client(f"{ops.mirror.url}/pins/ci")) == "1.0"
    pinned = ops.client(f"{ops.mirror.url}/snapshots/up/{s1}")
    assert ops.version_seen(pinned) == "1.0"
    download = pinned.download("hello")
    assert download.ok and download.files, download.output
    listing = {s["id"]: s for s in ops.mirror.snapshots("up")}
    assert listing[s1]["pins"] == ["ci"] and not listing[s1]["current"]

    assert ops.run("pin", "Bad/Name", "up", s1).returncode == 2
    assert ops.run("pin", "ci2", "up", "20000101T000000Z").returncode == 2
    assert ops.run("unpin", "nope").returncode == 2
    run = ops.run("unpin", "ci")
    assert run.returncode == 0, run.output
    assert ops.mirror.get(f"/pins/ci/dists/{SUITE}/InRelease")[0] == 404
    assert ops.mirror.snapshots("up")[-1]["pins"] == []


# -- sources stanzas --------------------------------------------------------------------------


def test_sources_stanza_is_used_verbatim_by_apt_and_fixed_ones_survive_valid_until(ops: Ops) -> None:
    s1 = ops.release(1)
    base = ["--base-url", ops.mirror.url]
    current = ops.run("sources", "up", *base)
    assert current.returncode == 0, current.output
    assert f"URIs: {ops.mirror.url}/up\n" in current.stdout and f"Signed-By: {ops.keyring}\n" in current.stdout
    assert "Check-Valid-Until" not in current.stdout
    client = ops.client()
    client.set_sources_deb822(current.stdout)
    assert ops.version_seen(client) == "1.0"

    # A snapshot whose Release carries a Valid-Until that passes while it stays fixed.
    ops.repo.add(SUITE, "main", "amd64", "hello", "2.0", size=3000)
    valid_until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    ops.publish(2, valid_until=valid_until)
    assert ops.mirror.sync().returncode == 0
    s2 = ops.mirror.snapshots("up")[0]["id"]
    assert ops.run("pin", "ci", "up", s2).returncode == 0
    fixed = ops.run("sources", "up", "--snapshot", s2, *base)
    pinned = ops.run("sources", "up", "--pin", "ci", *base)
    assert "Check-Valid-Until: no\n" in fixed.stdout and "Check-Valid-Until: no\n" in pinned.stdout
    assert f"URIs: {ops.mirror.url}/pins/ci\n" in pinned.stdout
    assert "Check-Valid-Until" not in ops.run("sources", "up", "--snapshot", s1, *base).stdout
    time.sleep(max(0.0, (valid_until - dt.datetime.now(dt.UTC)).total_seconds() + 1))  # now it has passed
    for stanza in (fixed.stdout, pinned.stdout):
        client = ops.client()
        client.set_sources_deb822(stanza)
        assert ops.version_seen(client) == "2.0"
    expired = ops.client()
    expired.set_sources_deb822(fixed.stdout.replace("Check-Valid-Until: no\n", ""))
    result = expired.update()
    assert not result.ok and "expired" in result.output, result.output

    assert ops.run("sources", "up", "--snapshot", s1, "--pin", "ci").returncode == 2
    assert ops.run("sources", "up", "--pin", "nope").returncode == 2


# -- diff ------------------------------------------------------------------------------------


def test_diff_and_sync_summary_compare_versions_like_dpkg(ops: Ops) -> None:
    for name, version in (("keep", "1.0"), ("gone", "1.0"), ("epoch", "2.0"), ("rc", "1.0~rc1"), ("down", "2.0")):
        ops.repo.add(SUITE, "main", "amd64", name, version)
    s1 = ops.release(1)
    ops.repo.remove(SUITE, "main", "amd64", "gone")
    for name, version in (("new", "0.1"), ("epoch", "1:1.0"), ("rc", "1.0"), ("down", "1.9")):
        ops.repo.add(SUITE, "main", "amd64", name, version)
    ops.repo.add(SUITE, "main", "amd64", "hello", "2.0", size=3000)
    ops.publish(2)
    run = ops.mirror.sync()
    assert run.returncode == 0, run.output
    s2 = ops.mirror.snapshots("up")[0]["id"]
    assert f"up:   {SUITE} main/amd64: +1 -1 ^3 v1" in run.stdout, run.stdout

    run = ops.run("diff", "up", s1, s2, "--json")
    assert run.returncode == 0, run.output
    change = json.loads(run.stdout)["suites"][SUITE]["main/amd64"]
    assert change["added"] == [{"package": "new", "version": "0.1"}]
    assert change["removed"] == [{"package": "gone", "version": "1.0"}]
    assert [(c["package"], c["from"], c["to"]) for c in change["upgraded"]] == [
        ("epoch", "2.0", "1:1.0"),
        ("hello", "1.0", "2.0"),
        ("rc", "1.0~rc1", "1.0"),
    ]
    assert change["downgraded"] == [{"package": "down", "from": "2.0", "to": "1.9"}]
    text = ops.run("diff", "up", "current", "previous")
    assert "v rc 1.0 -> 1.0~rc1" in text.stdout and "+ gone 1.0" in text.stdout, text.output
    assert "no package changes" in ops.run("diff", "up", s1, s1).stdout
    assert ops.run("diff", "up", s1, "20000101T000000Z").returncode == 2


# -- gc ----------------------------------------------------------------------------------------


def _hammer(mirror: Mirror, paths: list[str], stop: threading.Event, failures: list[str]) -> None:
    while not stop.is_set():
        for path in paths:
            status, _ = mirror.get(path)
            if status != 200:
                failures.append(f"{path}: HTTP {status}")


def test_gc_keeps_exactly_what_retention_and_references_require_while_serving(make_ops) -> None:
    ops = make_ops(retention={"keep_last": 2, "keep_days": 0})
    ids, objects = [], []
    for n in range(1, 6):
        ids.append(ops.release(n))
        objects.append(ops.hello_object())
        if n == 1:
            assert ops.run("pin", "ci", "up", ids[0]).returncode == 0
    s1, s2, s3, s4, s5 = ids

    def contents(*snaps: str) -> dict[str, int]:
        found = {}
        for snap in snaps:
            manifest = FileStore(ops.mirror.data).read_manifest("up", snap)
            found.update({r["sha256"]: r["size"] for r in manifest.files.values()})
        return found

    kept_files = contents(s1, s4, s5)
    collectable = {sha: size for sha, size in contents(s2, s3).items() if sha not in kept_files}
    assert {p.name for p in objects[1:3]} <= set(collectable)
    (ops.mirror.data / "tmp" / f"sync+up+{2**22}").mkdir()  # a killed sync's leftover

    # keep_days protects every young snapshot.
    ops.mirror.top["retention"] = {"keep_last": 2, "keep_days": 14}
    ops.mirror.write_config()
    run = ops.run("gc", "--dry-run", "--json")
    assert run.returncode == 0 and json.loads(run.stdout)["removed"] == [], run.output
    ops.mirror.top["retention"] = {"keep_last": 2, "keep_days": 0}
    ops.mirror.write_config()

    dry = ops.run("gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.output
    plan = json.loads(dry.stdout)
    assert [(r["upstream"], r["id"]) for r in plan["removed"]] == [("up", s2), ("up", s3)]
    kept = plan["kept"]["up"]
    assert set(kept) == {s1, s4, s5}
    assert "pin ci" in kept[s1] and "rollback target" in kept[s4] and "current" in kept[s5]
    assert plan["objects"] == len(collectable) and plan["bytes"] == sum(collectable.values()), plan
    assert all(p.exists() for p in objects), "a dry run deleted something"

    paths = [
        f"/up/dists/{SUITE}/InRelease",
        f"/pins/ci/dists/{SUITE}/InRelease",
        f"/snapshots/up/{s4}/dists/{SUITE}/Release",
    ]
    stop, failures = threading.Event(), []
    hammer = threading.Thread(target=_hammer, args=(ops.mirror, paths, stop, failures))
    hammer.start()
    try:
        run = ops.run("gc")
    finally:
        stop.set()
        hammer.join()
    assert run.returncode == 0, run.output
    assert not failures, failures[:5]
    assert f"removed snapshot up/{s2}" in run.stdout and f"removed snapshot up/{s3}" in run.stdout, run.stdout
    assert f"removed {len(collectable)} unused stored files; {plan['bytes']} bytes" in run.stdout, run.stdout

    assert [s["id"] for s in ops.mirror.snapshots("up")] == [s5, s4, s1]
    assert [p.exists() for p in objects] == [True, False, False, True, True]
    stored = {p.name for p in (ops.mirror.data / "objects").rglob("*") if p.is_file()}
    assert stored == set(kept_files), "gc kept an unused file or deleted a used one"
    assert ops.mirror.get(f"/snapshots/up/{s2}/dists/{SUITE}/InRelease")[0] == 404
    assert not (ops.mirror.data / "meta" / "up" / f"{s2}.json").exists()
    assert not list((ops.mirror.data / "tmp").iterdir()), "gc left the leftover"
    assert ops.version_seen(ops.client()) == "5.0"
    assert ops.version_seen(ops.client(f"{ops.mirror.url}/pins/ci")) == "1.0"
    assert ops.run("fsck").returncode == 0

    # A second gc has nothing left to do; after unpin the pinned snapshot goes too.
    assert "removed 0 unused stored files; 0 bytes" in ops.run("gc").stdout
    assert ops.run("unpin", "ci").returncode == 0
    run = ops.run("gc")
    assert f"removed snapshot up/{s1}" in run.stdout and not objects[0].exists(), run.output


# -- fsck --------------------------------------------------------------------------------------


def test_fsck_names_every_copy_of_a_flipped_byte_and_a_missing_file(ops: Ops) -> None:
    s1 = ops.release(1)
    ops.repo.add(SUITE, "main", "amd64", "extra", "1.0")
    ops.publish(2)
    assert ops.mirror.sync().returncode == 0
    s2 = ops.mirror.snapshots("up")[0]["id"]
    leftover = ops.mirror.data / "tmp" / f"build+up+{s2}+{2**22}"
    leftover.mkdir()
    run = ops.run("fsck")
    assert run.returncode == 0 and "fsck: clean" in run.stdout, run.output
    assert "leftovers of interrupted runs" in run.stdout and "not damage" in run.stdout, run.stdout

    obj = ops.hello_object()  # hello 1.0: in both snapshots, one object
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x01
    obj.write_bytes(bytes(data))
    rel = ops.repo.deb_path(SUITE, "main", "amd64", "hello").relative_to(ops.repo.root).as_posix()
    run = ops.run("fsck", "up")
    assert run.returncode == 1, run.output
    for snap in (s1, s2):
        assert f"damaged: snapshots/up/{snap}/{rel}: SHA" in run.stdout, run.stdout
    assert run.stdout.count("damaged:") == 2

    (ops.mirror.data / "snapshots" / "up" / s2 / "dists" / SUITE / "Release").unlink()
    run = ops.run("fsck", "--json")
    assert run.returncode == 1
    damaged = {d["path"]: d["problem"] for d in json.loads(run.stdout)["damaged"]}
    assert damaged[f"snapshots/up/{s2}/dists/{SUITE}/Release"].startswith("missing"), damaged


# -- status warnings -----------------------------------------------------------------------


def test_status_warns_before_valid_until_key_expiry_and_stale_syncs(make_ops, tmp_path: Path) -> None:
    key = make_key(tmp_path / "soon-key", "soon", expires_in=dt.timedelta(days=10))
    try:
        ops = make_ops(key)
        ops.repo.add(SUITE, "main", "amd64", "hello", "1.0", size=3000)
        ops.publish(1, valid_until=dt.datetime.now(dt.UTC) + dt.timedelta(hours=24))
        assert ops.mirror.sync().returncode == 0
    finally:
        key.close()

    def warnings() -> list[str]:
        return ops.mirror.status()["upstreams"]["up"]["warnings"]

    found = warnings()
    assert any(w.startswith(f"{SUITE}: the served Release expires in") for w in found), found
    assert any(key.fingerprint in w and "expires in" in w for w in found), found
    assert not any("last successful sync" in w for w in found), found

    ops.mirror.top["warnings"] = {"valid_until_hours": 12, "key_expiry_days": 5, "stale_sync_hours": 0}
    ops.mirror.write_config()
    found = warnings()
    assert len(found) == 1 and found[0].startswith("last successful sync"), found


# -- progress and log formats ------------------------------------------------------------------


def test_sync_without_a_terminal_logs_phase_lines_and_json_for_collectors(ops: Ops) -> None:
    for i in range(8):
        ops.repo.add(SUITE, "main", "amd64", f"pkg{i}", "1.0", size=20000)
    ops.publish(1)
    run = ops.mirror.sync("--log-format", "json")
    assert run.returncode == 0, run.output
    events = [json.loads(line) for line in run.stderr.splitlines()]
    assert events and all("time" in e and "event" in e for e in events), run.stderr
    assert any(e.get("event") == "download" and e.get("files", 0) >= 8 for e in events), events
    assert all(e.get("upstream") == "up" for e in events), events
    result = json.loads(run.stdout)
    assert result["event"] == "result" and result["outcome"] == "promoted", result
    assert result["changes"] == [f"{SUITE} main/amd64: +9 -0 ^0 v0"], result

    ops.repo.add(SUITE, "main", "amd64", "hello", "2.0", size=3000)
    ops.publish(2)
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.__stdout__.write('RICH=%s TYPER=%s\\n' % ('rich' in sys.modules, 'typer' in sys.modules)))\n"
        "from aptguard.cli import main\n"
        f"sys.argv = ['aptguard', '--config', {str(ops.mirror.config)!r}, 'sync']\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ops.mirror.workdir, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Neither the progress bar's library nor typer is imported by a plain sync (start-up is part
    # of every sync), and the atexit handlers still run before the process ends (cli._finish).
    assert "RICH=False TYPER=False" in proc.stdout, proc.stdout
    assert "\x1b[" not in proc.stderr and all(line.startswith("up: ") for line in proc.stderr.splitlines()), proc.stderr
    assert "main/amd64: +1 -0 ^0 v0" in proc.stdout


def test_sync_on_a_terminal_shows_a_progress_bar(ops: Ops) -> None:
    for i in range(12):
        ops.repo.add(SUITE, "main", "amd64", f"pkg{i}", "1.0", size=40000)
    ops.publish(1)
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")} | {
        "COLUMNS": "120",
        "TERM": "xterm",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "aptguard", "--config", str(ops.mirror.config), "sync"],
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=ops.mirror.workdir,
        env=env,
    )
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = screen.decode(errors="replace")
    assert "13/13 files" in text, text  # 12 packages and base-files
    assert "━" in text and "up" in text, text
    assert "/s" in text, text  # the transfer rate column
