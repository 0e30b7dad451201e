"""Sync, promote and serve: the happy paths a real apt client sees, and what a sync costs."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from aptguard.store import FileStore, StoredFile
from fixtures.apt import AptClient
from fixtures.keys import SigningKey, verify_status, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror


def debian_like(repo: Repo) -> None:
    """Two suites, two components, two architectures, by-hash, xz + gz, translations."""
    for suite in ("bookworm", "bookworm-updates"):
        for comp in ("main", "contrib"):
            for arch in ("amd64", "arm64"):
                repo.add(suite, comp, arch, f"{comp}-tool", "1.0", size=2500)
        repo.add(suite, "main", "amd64", "hello", "1.0" if suite == "bookworm" else "1.1", size=3000)


def mirror_of(tmp_path: Path, up: Upstream, keyring: Path, **overrides: object) -> Mirror:
    settings = {
        "url": up.url,
        "suites": ["bookworm", "bookworm-updates"],
        "components": ["main", "contrib"],
        "architectures": ["amd64", "arm64"],
        "keyring": keyring,
        **overrides,
    }
    return Mirror(tmp_path / "mirror", {"debian": settings})


def one_suite(tmp_path: Path, up: Upstream, keyring: Path) -> Mirror:
    """A mirror of upstream `d`: bookworm, main, amd64."""
    return Mirror.single(tmp_path / "m", up.url, keyring, name="d")


@dataclass
class Hello:
    """An upstream publishing hello 1.0 in bookworm/main/amd64, and a mirror of it (not synced yet)."""

    repo: Repo
    up: Upstream
    keyring: Path
    mirror: Mirror
    key: SigningKey

    def release(self, version: str, **publish: object) -> None:
        """The upstream publishes hello VERSION."""
        self.repo.add("bookworm", "main", "amd64", "hello", version)
        self.repo.publish("bookworm", [self.key], **publish)  # type: ignore[arg-type]


@pytest.fixture
def hello(tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve) -> Hello:
    r = repo()
    r.add("bookworm", "main", "amd64", "hello", "1.0")
    r.publish("bookworm", [keys("upstream")])
    up = serve(r)
    keyring = write_keyring(tmp_path / "k.asc", [keys("upstream")])
    return Hello(r, up, keyring, one_suite(tmp_path, up, keyring), keys("upstream"))


def debian_upstream(repo: Callable[..., Repo], keys: Callable[..., SigningKey], serve) -> tuple[Repo, Upstream]:
    """debian_like(), both suites published and served."""
    r = repo()
    debian_like(r)
    for suite in ("bookworm", "bookworm-updates"):
        r.publish(suite, [keys("upstream")])
    return r, serve(r)


def test_debian_style_upstream_is_mirrored_and_apt_installs_from_it(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve, apt_client
) -> None:
    r, up = debian_upstream(repo, keys, serve)
    keyring = write_keyring(tmp_path / "debian.asc", [keys("upstream")])
    mirror = mirror_of(tmp_path, up, keyring)
    run = mirror.sync()
    assert run.returncode == 0 and "promoted" in run.stdout, run.output
    mirror.start_server()
    try:
        clients = {}
        for arch in ("amd64", "arm64"):
            client = clients[arch] = apt_client(f"c-{arch}", arch=arch)
            client.set_sources(
                [
                    mirror.source_line("debian", s, ["main", "contrib"], keyring)
                    for s in ("bookworm", "bookworm-updates")
                ]
            )
            result = client.update()
            assert result.ok, result.output
            assert client.available("contrib-tool") == "1.0"
        assert client.available("hello") is None  # hello is amd64 only; the last client was arm64
        amd = clients["amd64"]
        assert amd.available("hello") == "1.1"
        got = amd.download("hello")
        assert got.returncode == 0
        assert got.files[0].read_bytes() == r.deb_path("bookworm-updates", "main", "amd64", "hello").read_bytes()
        # Last-Modified of the signed files is the Release's Date, as upstream (apt compares it)
        with urllib.request.urlopen(f"{mirror.url}/debian/dists/bookworm/InRelease") as resp:
            date = next(
                ln for ln in r.path("dists/bookworm/Release").read_text().splitlines() if ln.startswith("Date:")
            )
            assert email.utils.parsedate_to_datetime(
                resp.headers["Last-Modified"]
            ) == email.utils.parsedate_to_datetime(date.split(":", 1)[1].strip())
        # InRelease, indices and packages are the upstream's bytes, unchanged
        for rel in ("dists/bookworm/InRelease", "dists/bookworm/Release", "dists/bookworm/Release.gpg"):
            assert mirror.get(f"/debian/{rel}") == (200, r.path(rel).read_bytes())
        # an index is also answered by-hash, for each hash type the Release lists
        index = r.path("dists/bookworm/main/binary-amd64/Packages.xz").read_bytes()
        for algo, folder in (("sha256", "SHA256"), ("sha512", "SHA512"), ("md5", "MD5Sum")):
            digest = hashlib.new(algo, index).hexdigest()
            assert mirror.get(f"/debian/dists/bookworm/main/binary-amd64/by-hash/{folder}/{digest}") == (200, index)
    finally:
        mirror.stop_server()


def test_unchanged_upstream_costs_one_request_per_suite_and_no_snapshot(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    r, up = debian_upstream(repo, keys, serve)
    mirror = mirror_of(tmp_path, up, write_keyring(tmp_path / "k.asc", [keys("upstream")]))
    assert mirror.sync().returncode == 0
    before = len(up.requests)
    run = mirror.sync()
    assert run.returncode == 0 and "unchanged" in run.stdout, run.output
    assert len(up.requests) - before == 2, up.requests[before:]
    assert sorted(up.requests[before:]) == ["/dists/bookworm-updates/InRelease", "/dists/bookworm/InRelease"]
    assert len(mirror.snapshots("debian")) == 1
    assert mirror.last_sync("debian")["outcome"] == "unchanged"


def test_an_architecture_added_to_the_config_is_fetched_though_the_upstream_is_unchanged(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    r, up = debian_upstream(repo, keys, serve)
    mirror = mirror_of(tmp_path, up, write_keyring(tmp_path / "k.asc", [keys("upstream")]), architectures=["amd64"])
    assert mirror.sync().returncode == 0
    mirror.start_server()
    try:
        arm64 = "/debian/dists/bookworm/main/binary-arm64/Packages.xz"
        assert mirror.get(arm64)[0] == 404
        mirror.upstreams["debian"]["architectures"] = ["amd64", "arm64"]
        mirror.write_config()
        run = mirror.sync()
        assert run.returncode == 0 and mirror.last_sync("debian")["outcome"] == "promoted", run.output
        assert mirror.get(arm64) == (200, (r.root / arm64.removeprefix("/debian/")).read_bytes())
        deb = r.deb_path("bookworm", "main", "arm64", "main-tool")
        assert mirror.get("/debian/" + deb.relative_to(r.root).as_posix()) == (200, deb.read_bytes())
        assert mirror.sync().returncode == 0 and mirror.last_sync("debian")["outcome"] == "unchanged"
    finally:
        mirror.stop_server()


def test_an_unchanged_package_is_stored_once_across_snapshots(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    r = repo()
    r.add("bookworm", "main", "amd64", "big", "1.0", size=200_000)
    r.add("bookworm", "main", "amd64", "small", "1.0")
    r.publish("bookworm", [keys("upstream")])
    up = serve(r)
    mirror = one_suite(tmp_path, up, write_keyring(tmp_path / "k.asc", [keys("upstream")]))
    assert mirror.sync().returncode == 0
    big_requests = sum(1 for p in up.requests if p.endswith("big_1.0_amd64.deb"))
    r.add("bookworm", "main", "amd64", "small", "2.0")
    r.publish("bookworm", [keys("upstream")])
    run = mirror.sync()
    assert run.returncode == 0 and "promoted" in run.stdout, run.output
    assert sum(1 for p in up.requests if p.endswith("big_1.0_amd64.deb")) == big_requests  # not fetched again
    first, second = (s["id"] for s in reversed(mirror.snapshots("d")))
    rel = r.deb_path("bookworm", "main", "amd64", "big").relative_to(r.root)
    store = FileStore(mirror.data)
    a, b = (store.stored_file("d", snap, rel.as_posix()) for snap in (first, second))
    assert isinstance(a, StoredFile) and isinstance(b, StoredFile)
    assert a.key == b.key  # one stored file, two snapshots


def test_cosigned_release_with_an_unknown_second_key_is_promoted(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    """Debian signs InRelease with several keys; a key the mirror does not know is ignored."""
    r = repo()
    r.add("bookworm", "main", "amd64", "hello", "1.0")
    r.publish("bookworm", [keys("upstream"), keys("stranger")])
    both = write_keyring(tmp_path / "both.asc", [keys("upstream"), keys("stranger")])
    lines = verify_status(both, r.path("dists/bookworm/InRelease").read_bytes())
    assert sum(1 for line in lines if "GOODSIG" in line) == 2, lines  # really two signatures
    up = serve(r)
    mirror = one_suite(tmp_path, up, write_keyring(tmp_path / "k.asc", [keys("upstream")]))
    run = mirror.sync()
    assert run.returncode == 0 and "promoted" in run.stdout, run.output
    assert keys("upstream").fingerprint in run.stderr  # the signer it trusted


def test_no_promote_stores_and_promote_serves_it(tmp_path: Path, hello: Hello) -> None:
    mirror, keyring = hello.mirror, hello.keyring
    assert mirror.sync().returncode == 0
    first = mirror.current("d")
    # The next release is dated later, as a real one is (Dates have whole seconds).
    hello.release("2.0", date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    run = mirror.sync("--no-promote")
    assert run.returncode == 0 and "stored" in run.stdout, run.output
    assert mirror.last_sync("d")["outcome"] == "stored"
    listing = mirror.snapshots("d")
    assert [s["current"] for s in listing] == [False, True]
    newest = listing[0]
    assert set(newest) >= {"id", "created", "current", "pins", "suites", "files", "bytes"}
    assert set(newest["suites"]["bookworm"]) >= {"date", "valid_until"}
    assert mirror.current("d") == first
    mirror.start_server()
    try:
        client = AptClient(tmp_path / "client")
        client.set_sources([mirror.source_line("d", "bookworm", ["main"], keyring)])
        assert client.update().ok and client.available("hello") == "1.0"
        # the stored snapshot is already reachable at its own URL
        assert mirror.get(f"/snapshots/d/{newest['id']}/dists/bookworm/InRelease")[0] == 200
        run = mirror.run("promote", "d", newest["id"])
        assert run.returncode == 0, run.output
        assert mirror.current("d") == newest["id"]
        assert client.update().ok and client.available("hello") == "2.0"
        assert mirror.run("promote", "d", "20000101T000000Z").returncode == 2
    finally:
        mirror.stop_server()


def test_status_json_has_the_documented_shape(hello: Hello) -> None:
    mirror = hello.mirror
    assert mirror.status()["upstreams"]["d"]["current"] is None
    mirror.sync()
    st = mirror.status()["upstreams"]["d"]
    assert st["current"] == mirror.snapshots("d")[0]["id"] and st["hold"] is False
    assert set(st["last_sync"]) >= {"outcome", "reason", "detail", "at"}
    assert st["last_sync"]["outcome"] == "promoted" and st["last_sync"]["reason"] is None
    assert isinstance(st["warnings"], list)
    mirror.start_server()
    try:
        status, body = mirror.get("/status")
        assert status == 200 and json.loads(body)["upstreams"]["d"]["current"] == st["current"]
    finally:
        mirror.stop_server()


def test_one_bad_upstream_does_not_stop_the_others(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    good, bad = repo("good"), repo("bad")
    for r in (good, bad):
        r.add("bookworm", "main", "amd64", "hello", "1.0")
    good.publish("bookworm", [keys("upstream")])
    bad.publish("bookworm", [keys("stranger")])
    keyring = write_keyring(tmp_path / "k.asc", [keys("upstream")])
    common = {"suites": ["bookworm"], "components": ["main"], "architectures": ["amd64"], "keyring": keyring}
    mirror = Mirror(
        tmp_path / "m", {"good": {"url": serve(good).url, **common}, "bad": {"url": serve(bad).url, **common}}
    )
    run = mirror.sync()
    assert run.returncode == 1, run.output
    assert "good: promoted" in run.stdout and "bad: rejected [signature-unknown-key]" in run.stdout
    assert keys("stranger").fingerprint in run.stdout
    assert mirror.current("good") is not None and mirror.current("bad") is None


def test_passing_5xx_is_retried_and_a_redirect_to_a_file_url_is_refused(hello: Hello) -> None:
    mirror, up = hello.mirror, hello.up
    up.fault("pool/*", "status", code=503, count=2)
    run = mirror.sync()
    assert run.returncode == 0 and "promoted" in run.stdout, run.output
    hello.release("2.0")
    up.fault("pool/*", "redirect", location="file:///etc/passwd")
    run = mirror.sync()
    assert run.returncode == 1 and "rejected [unreachable]" in run.stdout, run.output


def test_binary_all_is_fetched_only_when_apt_would_fetch_it(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    """apt reads binary-all when the Release lists "all", unless the Release says arch:all packages
    are already in every architecture's Packages (as Debian's does)."""
    r = repo()
    r.add("bookworm", "main", "amd64", "hello", "1.0")
    r.add("bookworm", "main", "all", "hello-doc", "1.0")
    r.publish("bookworm", [keys("upstream")])
    assert "all" in r.path("dists/bookworm/Release").read_text().split("Architectures:")[1].split("\n")[0]
    up = serve(r)
    mirror = one_suite(tmp_path, up, write_keyring(tmp_path / "k.asc", [keys("upstream")]))
    assert mirror.sync().returncode == 0
    assert any("/binary-all/" in p for p in up.requests)
    r.publish("bookworm", [keys("upstream")], extra_fields={"No-Support-for-Architecture-all": "Packages"})
    before = len(up.requests)
    run = mirror.sync()
    assert run.returncode == 0 and "promoted" in run.stdout, run.output
    assert not any("/binary-all/" in p for p in up.requests[before:]), up.requests[before:]


def test_an_incremental_sync_reading_with_its_parse_memo_stores_what_a_fresh_mirror_stores(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    """The second sync takes unchanged stanzas from the memo the first left: its snapshot lists
    exactly the files, hashes and packages a mirror that never saw the first state lists."""
    r = repo()
    for name in ("alpha", "beta", "gamma"):
        r.add("bookworm", "main", "amd64", name, "1.0")
    r.publish("bookworm", [keys("upstream")])
    up = serve(r)
    keyring = write_keyring(tmp_path / "k.asc", [keys("upstream")])
    seasoned = Mirror.single(tmp_path / "seasoned", up.url, keyring, name="d")
    assert seasoned.sync().returncode == 0
    memo = FileStore(seasoned.data).read_cache("d", "parse-memo")
    assert isinstance(memo, dict) and len(memo["stanzas"]) == 3  # the fault would be real: a memo is kept
    r.add("bookworm", "main", "amd64", "beta", "2.0")
    r.add("bookworm", "main", "amd64", "delta", "1.0")
    r.publish("bookworm", [keys("upstream")])
    assert seasoned.sync().returncode == 0
    fresh = Mirror.single(tmp_path / "fresh", up.url, keyring, name="d")
    assert fresh.sync().returncode == 0

    def listing(m: Mirror) -> tuple[dict[str, object], dict[str, object]]:
        store = FileStore(m.data)
        manifest = store.read_manifest("d", store.current("d") or "")
        return {p: r for p, r in manifest.files.items() if p.startswith("pool/")}, manifest.packages

    assert listing(seasoned) == listing(fresh)
    assert sorted(listing(fresh)[1]["bookworm"]["main/amd64"].items()) == [
        ("alpha", "1.0"),
        ("beta", "2.0"),
        ("delta", "1.0"),
        ("gamma", "1.0"),
    ]
