"""Every reason code of SPEC §2, provoked by a real upstream broken the way real upstreams break.

Each case follows the same story:
1. the fault is real: the real apt-get, pointed straight at the broken upstream, refuses it
   (where apt would: some faults, such as a replayed Release, apt silently accepts);
2. `aptguard sync` exits 1 with that reason and a detail naming the file, value or key;
3. every URL the mirror serves returns exactly the bytes it returned before;
4. a fresh real apt-get client of the mirror still updates and downloads the old version;
5. once the upstream is mended, the next sync promotes and clients see the new version.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fixtures.apt import AptClient, AptResult
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror

SUITE = "bookworm"
COMPONENTS = ["main", "contrib"]
NOW = dt.datetime.now(dt.UTC)


@dataclass
class Scene:
    """A mirror that promoted one good snapshot of an upstream, a server, and clients of both."""

    repo: Repo
    upstream: Upstream
    mirror: Mirror
    key: SigningKey
    keyring: Path
    keys: Callable[..., SigningKey]
    tmp: Path
    direct: AptClient  # a client of the upstream itself, updated while it was good
    old_deb: bytes  # hello 1.0 as first served
    style: str = "debian"
    before: dict[str, bytes] = field(default_factory=dict)
    clients: int = 0

    def publish(self, keys: list[SigningKey] | None = None, **kw: object) -> None:
        if self.style == "docker":
            kw.setdefault("by_hash", False)
        self.repo.publish(SUITE, [self.key] if keys is None else keys, **kw)  # type: ignore[arg-type]

    def new_release(self, salt: str = "") -> None:
        """The upstream's next good release: hello 2.0."""
        pool = "docker" if self.style == "docker" else "debian"
        self.repo.add(SUITE, "main", "amd64", "hello", "2.0", size=3000, salt=salt, pool=pool)

    def client(self) -> AptClient:
        """A fresh client of the mirror."""
        self.clients += 1
        c = AptClient(self.tmp / f"mirror-client-{self.clients}")
        c.set_sources([self.mirror.source_line("up", SUITE, COMPONENTS, self.keyring)])
        return c

    def assert_rejected(self, reason: str, *details: str) -> None:
        run = self.mirror.sync()
        assert run.returncode == 1, run.output
        assert f"rejected [{reason}]" in run.stdout, run.output
        last = self.mirror.last_sync("up")
        assert last["outcome"] == "rejected" and last["reason"] == reason, last
        for part in details:
            assert part in last["detail"], (part, last["detail"])

    def assert_old_snapshot_served(self) -> None:
        assert self.mirror.served("up") == self.before, "served bytes changed after a rejected sync"
        c = self.client()
        result = c.update()
        assert result.ok, result.output
        assert c.available("hello") == "1.0"
        got = c.download("hello")
        assert got.returncode == 0 and got.files, got.output
        assert got.files[0].read_bytes() == self.old_deb

    def assert_mended(self, *sync_args: str, version: str = "2.0") -> None:
        run = self.mirror.sync(*sync_args)
        assert run.returncode == 0, run.output
        assert self.mirror.last_sync("up")["outcome"] == "promoted", run.output
        c = self.client()
        result = c.update()
        assert result.ok, result.output
        assert c.available("hello") == version


def refused(result: AptResult, pattern: str) -> bool:
    """apt refused: it says `pattern`, and it failed or printed a W:/E:/Err: line."""
    complained = any(line.startswith(("W:", "E:", "Err:")) for line in result.output.splitlines())
    return re.search(pattern, result.output) is not None and (complained or result.returncode != 0)


@pytest.fixture
def make_scene(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> Iterator[Callable[..., Scene]]:
    """make_scene(style="debian"|"docker"): a Debian-style upstream (by-hash, pool/) or a
    Docker-style one (no by-hash, pool under dists/), mirrored once and served."""
    made: list[Scene] = []

    def make(style: str = "debian") -> Scene:
        good = keys("upstream")
        # The mirror trusts an expired and a revoked key too: the cases below show that expiry and
        # revocation are judged from gpg's status, not from membership of the keyring.
        keyring = write_keyring(
            tmp_path / "keys" / "up.asc",
            [good, keys("expired-key", expired=True), keys("revoked-key", revoked=True)],
        )
        r = repo()
        pool = "docker" if style == "docker" else "debian"
        r.add(SUITE, "main", "amd64", "hello", "1.0", size=3000, pool=pool)
        r.add(SUITE, "main", "amd64", "tool", "1.0", pool=pool)
        r.add(SUITE, "contrib", "amd64", "extra", "0.5", pool=pool)
        up = serve(r)
        mirror = Mirror.single(tmp_path / "mirror", up.url, keyring, suites=[SUITE], components=COMPONENTS)
        direct = AptClient(tmp_path / "direct")
        direct.set_sources([AptClient.source_line(up.url, SUITE, COMPONENTS, keyring)])
        old_deb = r.deb_path(SUITE, "main", "amd64", "hello").read_bytes()
        s = Scene(r, up, mirror, good, keyring, keys, tmp_path, direct, old_deb, style=style)
        s.publish()
        first = mirror.sync()
        assert first.returncode == 0 and "promoted" in first.stdout, first.output
        mirror.start_server()
        assert direct.update().ok
        s.before = mirror.served("up")
        assert "dists/bookworm/InRelease" in s.before and any(p.endswith(".deb") for p in s.before)
        made.append(s)
        return s

    yield make
    for s in made:
        s.mirror.stop_server()


@pytest.fixture
def scene(make_scene: Callable[..., Scene]) -> Scene:
    return make_scene()


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    reason: str
    breaks: Callable[[Scene], None]
    apt: str | None  # what apt says when it refuses the broken upstream; None: apt does not refuse
    details: Callable[[Scene], tuple[str, ...]] = lambda s: ()
    mend: Callable[[Scene], None] = lambda s: (s.upstream.clear_faults(), s.publish())
    apt_download: str | None = None  # apt refuses only when downloading hello
    mend_args: tuple[str, ...] = ()


def _outside_text(s: Scene) -> None:
    s.new_release()
    s.publish()
    inrelease = s.repo.path("dists/bookworm/InRelease").read_bytes()
    s.repo.replace_file("dists/bookworm/InRelease", b"Injected: text\n\n" + inrelease)


def _altered_signed_text(s: Scene) -> None:
    s.new_release()
    s.publish()
    inrelease = s.repo.path("dists/bookworm/InRelease").read_bytes()
    s.repo.replace_file("dists/bookworm/InRelease", inrelease.replace(b"Label: Example", b"Label: Exbmple", 1))


def _new_key(s: Scene) -> None:
    s.new_release()
    s.publish([s.keys("new-upstream-key")])


def _pool(s: Scene, name: str = "hello") -> str:
    return str(s.repo.deb_path(SUITE, "main", "amd64", name).relative_to(s.repo.root))


def _package_gone(s: Scene) -> None:
    s.new_release()
    s.publish()
    s.repo.delete(_pool(s))


def _package_corrupt(s: Scene) -> None:
    s.new_release()
    s.publish()
    s.repo.corrupt(_pool(s))


def _hostile_path(s: Scene) -> None:
    s.new_release()
    s.repo.set_filename(SUITE, "main", "amd64", "hello", "pool/../../../etc/passwd")
    s.publish()


def _mend_hostile(s: Scene) -> None:
    s.new_release()
    s.publish()


def _endless_package(s: Scene) -> None:
    s.new_release()
    s.publish()
    s.upstream.fault(_pool(s), "endless")


def _half_published(s: Scene) -> None:
    """Docker, June 2016: new indices pushed while the signed Release still lists the old ones."""
    s.new_release()
    s.repo.publish_indices_only(SUITE, by_hash=False)


def _indices_gone(s: Scene) -> None:
    s.new_release()
    s.publish()
    for name in ("Packages.xz", "Packages.gz"):
        s.repo.delete(f"dists/bookworm/main/binary-amd64/{name}")


def _index_corrupt(s: Scene) -> None:
    s.new_release()
    s.publish()
    s.repo.corrupt("dists/bookworm/main/binary-amd64/Packages.xz")


CASES = {
    "unreachable-down": Case(
        "unreachable",
        lambda s: (s.new_release(), s.publish(), s.upstream.down()),
        r"Failed to fetch|Could not connect|Connection failed|Connection refused",
        lambda s: (s.upstream.url,),
        mend=lambda s: s.upstream.up(),
    ),
    "unreachable-5xx": Case(
        "unreachable",
        lambda s: (s.new_release(), s.publish(), s.upstream.fault("dists/*", "status", code=503)),
        r"503",
        lambda s: ("HTTP 503", "InRelease"),
    ),
    "signature-missing": Case(
        "signature-missing",
        lambda s: (s.new_release(), s.publish(inrelease=False, release_gpg=False)),
        r"is not signed|NO_PUBKEY|Release.gpg",
        lambda s: ("Release.gpg",),
    ),
    "signature-invalid-outside-text": Case(
        "signature-invalid", _outside_text, r"Splitting up|NOSPLIT|not signed", lambda s: ("InRelease", "before")
    ),
    "signature-invalid-altered": Case(
        "signature-invalid", _altered_signed_text, r"BADSIG|invalid", lambda s: ("InRelease", "bad signature")
    ),
    "signature-invalid-sha1": Case(
        "signature-invalid",
        lambda s: (s.new_release(), s.publish(digest="SHA1")),
        r"signatures were invalid|not signed",
        lambda s: ("SHA1", s.key.fingerprint),
    ),
    "signature-unknown-key": Case(
        "signature-unknown-key",
        _new_key,
        r"NO_PUBKEY",
        lambda s: (s.keys("new-upstream-key").fingerprint,),
    ),
    "signature-key-expired": Case(
        "signature-key-expired",
        lambda s: (s.new_release(), s.publish([s.keys("expired-key", expired=True)])),
        r"EXPKEYSIG",
        lambda s: (s.keys("expired-key", expired=True).fingerprint,),
    ),
    "signature-key-revoked": Case(
        "signature-key-revoked",
        lambda s: (s.new_release(), s.publish([s.keys("revoked-key", revoked=True)])),
        r"REVKEYSIG",
        lambda s: (s.keys("revoked-key", revoked=True).fingerprint,),
    ),
    "release-invalid-no-sha256": Case(
        "release-invalid",
        lambda s: (s.new_release(), s.publish(hashes=("MD5Sum", "SHA1"))),
        r"weak security|not signed|Hash Sum",
        lambda s: ("SHA256",),
    ),
    "release-invalid-no-date": Case(
        "release-invalid",
        lambda s: (s.new_release(), s.publish(extra_fields={"Date": None})),
        None,  # apt 2.6 accepts a Release without Date
        lambda s: ("Date",),
    ),
    "release-mismatch-suite": Case(
        "release-mismatch",
        lambda s: (s.new_release(), s.publish(suite_field="trixie", codename="trixie")),
        r"Conflicting distribution|changed its 'Codename'",
        lambda s: ("trixie", "bookworm"),
    ),
    "release-mismatch-component": Case(
        "release-mismatch",
        lambda s: (s.new_release(), s.publish(components=["main"])),
        r"doesn't have the component 'contrib'",
        lambda s: ("contrib",),
    ),
    "release-changed-label": Case(
        "release-changed",
        lambda s: (s.new_release(), s.publish(label="Other Label")),
        r"changed its 'Label' value",
        lambda s: ("Label", "Example", "Other Label"),
        mend=lambda s: None,
        mend_args=("--allow-release-change",),
    ),
    "release-expired": Case(
        "release-expired",
        lambda s: (s.new_release(), s.publish(valid_until=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))),
        r"is expired",
        lambda s: ("Valid-Until",),
        mend=lambda s: s.publish(valid_until=dt.datetime.now(dt.UTC) + dt.timedelta(days=7)),
    ),
    "release-future": Case(
        "release-future",
        lambda s: (s.new_release(), s.publish(date=dt.datetime.now(dt.UTC) + dt.timedelta(days=1))),
        r"not valid yet",
        lambda s: ("Date", "future"),
    ),
    "index-missing": Case(
        "index-missing",
        _indices_gone,
        r"404|Failed to fetch",
        lambda s: ("main/binary-amd64/Packages",),
    ),
    "index-mismatch-corrupt": Case(
        "index-mismatch",
        _index_corrupt,
        r"Hash Sum mismatch|unexpected size",
        lambda s: ("main/binary-amd64/Packages.xz",),
    ),
    "package-missing": Case(
        "package-missing",
        _package_gone,
        None,
        lambda s: ("hello_2.0_amd64.deb", "404"),
        mend=lambda s: (s.new_release(salt="again"), s.publish()),
        apt_download=r"404",
    ),
    "package-mismatch": Case(
        "package-mismatch",
        _package_corrupt,
        None,
        lambda s: ("hello_2.0_amd64.deb",),
        mend=lambda s: (s.new_release(salt="again"), s.publish()),
        apt_download=r"Hash Sum mismatch|unexpected size",
    ),
    "unsafe-path": Case(
        "unsafe-path",
        _hostile_path,
        None,  # apt would just ask the server for the normalised URL
        lambda s: ("../../../etc/passwd",),
        mend=_mend_hostile,
    ),
    "too-large": Case(
        "too-large",
        _endless_package,
        None,
        lambda s: ("hello_2.0_amd64.deb",),
        apt_download=r"unexpected size|more data than expected|Failed to fetch",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_upstream_is_refused_and_old_snapshot_served(scene: Scene, name: str) -> None:
    case = CASES[name]
    case.breaks(scene)
    # 1. the fault is real: apt itself refuses this upstream
    if case.apt is not None:
        result = scene.direct.update()
        assert refused(result, case.apt), result.output
    if case.apt_download is not None:
        assert scene.direct.update().ok
        got = scene.direct.download("hello", "2.0")
        assert got.returncode != 0 and refused(got, case.apt_download), got.output
    # 2. refused with the reason and a precise detail
    scene.assert_rejected(case.reason, *case.details(scene))
    # 3 + 4. what was served is unchanged; clients still update and download the old version
    scene.assert_old_snapshot_served()
    # 5. mended upstream: the next sync promotes
    case.mend(scene)
    scene.assert_mended(*case.mend_args)


def test_replayed_old_release_is_refused_as_rollback(scene: Scene, tmp_path: Path) -> None:
    """A stale mirror or an attacker serves an older, validly signed Release: release-rollback.

    apt itself takes such a Release without a word from a fresh client, so here the proof that the
    fault is real is that the old files do verify on their own (the first sync promoted them).
    """
    old_tree = tmp_path / "old-tree"
    shutil.copytree(scene.repo.root, old_tree)
    scene.new_release()
    scene.publish(date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2))
    assert scene.mirror.sync().returncode == 0
    scene.before = scene.mirror.served("up")
    shutil.rmtree(scene.repo.root)
    shutil.copytree(old_tree, scene.repo.root)
    scene.assert_rejected("release-rollback", "dists/bookworm/InRelease", "older")
    assert scene.mirror.served("up") == scene.before
    c = scene.client()
    assert c.update().ok and c.available("hello") == "2.0"


def test_disk_failure_is_a_storage_error_and_loses_nothing(scene: Scene) -> None:
    """A full disk (here: a file-size limit on the sync process) is storage-error; nothing served changes."""
    scene.repo.add(SUITE, "main", "amd64", "hello", "2.0", size=400_000)
    scene.publish()
    run = scene.mirror.sync(fsize_limit=200_000)
    assert run.returncode == 1, run.output
    assert "rejected [storage-error]" in run.stdout, run.output
    assert scene.mirror.last_sync("up")["reason"] == "storage-error"
    scene.assert_old_snapshot_served()
    scene.assert_mended()


def test_docker_2016_new_key_then_operator_adds_it(make_scene: Callable[..., Scene]) -> None:
    """The upstream pushes a new signing key: refused until the operator trusts it, then promoted."""
    scene = make_scene("docker")
    new = scene.keys("new-upstream-key")
    _new_key(scene)
    scene.assert_rejected("signature-unknown-key", new.fingerprint)
    scene.assert_old_snapshot_served()
    write_keyring(scene.keyring, [scene.key, new])
    scene.assert_mended()


def test_docker_2016_half_published_never_reaches_clients(make_scene: Callable[..., Scene]) -> None:
    """Docker, June 2016: indices and Release published out of step. Direct clients fail with a
    size or hash mismatch (the repository has no by-hash); clients of aptguard never see it.

    (a) new indices, stale signed Release: aptguard keeps the verified snapshot (unchanged);
    (b) new signed Release, indices not yet updated: refused with index-mismatch;
    then the upstream finishes publishing and the next sync promotes.
    """
    scene = make_scene("docker")
    folder = scene.repo.path("dists/bookworm/main/binary-amd64")
    old_indices = {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("Packages")}

    def fresh_direct(name: str) -> AptClient:
        client = AptClient(scene.tmp / name)
        client.set_sources([AptClient.source_line(scene.upstream.url, SUITE, COMPONENTS, scene.keyring)])
        return client

    _half_published(scene)
    assert refused(fresh_direct("direct-a").update(), r"Hash Sum mismatch|unexpected size")
    run = scene.mirror.sync()
    assert run.returncode == 0 and "unchanged" in run.stdout, run.output
    scene.assert_old_snapshot_served()

    scene.publish()
    for name, data in old_indices.items():
        (folder / name).write_bytes(data)
    assert refused(fresh_direct("direct-b").update(), r"Hash Sum mismatch|unexpected size")
    scene.assert_rejected("index-mismatch", "main/binary-amd64/Packages")
    scene.assert_old_snapshot_served()

    scene.publish()
    scene.assert_mended()
