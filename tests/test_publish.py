"""Published views (SPEC §7): the upstream synced and verified as always, then served re-signed
with the mirror's own key, filtered with the dependencies apt needs, with by-hash.

A real signed upstream on 127.0.0.1, the real `aptguard sync` and `aptguard serve`, real gpg and
gpgv, and real apt-get clients that trust only the mirror's key.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import json
import lzma
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aptguard.config import load_config
from aptguard.records import Manifest
from aptguard.store import open_store
from aptguard.sync import sync_upstream
from fixtures.apt import AptClient
from fixtures.keys import SigningKey, make_key, write_keyring
from fixtures.repo import Repo
from fixtures.s3 import MotoServer
from fixtures.upstream import Upstream
from tests.mirror import Mirror

SUITE = "stable"
INRELEASE = f"dists/{SUITE}/InRelease"


def packages_of(text: bytes) -> set[tuple[str, str]]:
    """(Package, Version) of every stanza of a Packages index."""
    found = set()
    for stanza in text.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if "Package" in fields:
            found.add((fields["Package"], fields["Version"]))
    return found


class PublishSite:
    """An upstream without by-hash (Docker-style pool under dists/), its mirror publishing a view."""

    def __init__(
        self,
        workdir: Path,
        upstream_key: SigningKey,
        mirror_keys: list[SigningKey],
        deb_cache: Path,
        *,
        top: dict[str, Any] | None = None,
        **publish: Any,
    ) -> None:
        self.workdir = workdir
        self.upstream_key = upstream_key
        self.repo = Repo(workdir / "upstream", deb_cache)
        add = self.repo.add
        add(SUITE, "stable", "amd64", "app", "1.0-1", pool="docker")
        add(
            SUITE,
            "stable",
            "amd64",
            "app",
            "2.0-1",
            pool="docker",
            keep_older=True,
            depends="libfoo (>= 2) | libalt, web-server",
            fields={"Pre-Depends": "base-files"},
        )
        add(SUITE, "stable", "amd64", "libfoo", "1.0-1", pool="docker")
        add(SUITE, "stable", "amd64", "libfoo", "2.0-1", pool="docker", keep_older=True)
        add(SUITE, "stable", "amd64", "libalt", "1.0-1", pool="docker")
        add(SUITE, "stable", "amd64", "httpd", "1.0-1", pool="docker", fields={"Provides": "web-server"})
        add(SUITE, "stable", "amd64", "base-files", "12.4", pool="docker")
        add(SUITE, "stable", "amd64", "extra", "1.0-1", pool="docker")
        self.publish_upstream()
        self.upstream = Upstream(self.repo.root).start()
        self.keyring = write_keyring(workdir / "keys" / "upstream.asc", [upstream_key])
        self.keys_dir = workdir / "keys"
        self.settings: dict[str, Any] = {"sign_with": self.key_files(mirror_keys), **publish}
        self.mirror = Mirror.single(
            workdir / "mirror",
            self.upstream.url,
            self.keyring,
            suites=[SUITE],
            components=["stable"],
            publish=self.settings,
            top=top,
        )

    def key_files(self, keys: list[SigningKey]) -> list[str]:
        return [str(k.secret_file(self.keys_dir / f"{k.name or k.fingerprint}.key")) for k in keys]

    def publish_upstream(self) -> None:
        self.repo.publish(SUITE, [self.upstream_key], by_hash=False, compressions=("", "gz"))

    def configure(self, **publish: Any) -> None:
        self.settings.update(publish)
        self.mirror.upstreams["up"]["publish"] = self.settings
        self.mirror.write_config()

    def client(self, workdir: Path, key: Path) -> AptClient:
        client = AptClient(workdir)
        client.set_sources([client.source_line(f"{self.mirror.url}/up", SUITE, ["stable"], key)])
        return client

    def served_index(self) -> bytes:
        return self.mirror.get(f"/up/dists/{SUITE}/stable/binary-amd64/Packages.gz")[1]

    def close(self) -> None:
        self.mirror.stop_server()
        self.upstream.stop()


@pytest.fixture
def mirror_key(keys) -> SigningKey:
    return keys("mirror-a")


@pytest.fixture
def site(tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path) -> Iterator[PublishSite]:
    made = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, packages=["app"])
    yield made
    made.close()


def _gpgv(keyring: Path, signature: bytes, data: bytes, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    binary = tmp / "keyring.gpg"
    binary.write_bytes(subprocess.run(["gpg", "--dearmor"], input=keyring.read_bytes(), capture_output=True).stdout)
    (tmp / "sig").write_bytes(signature)
    (tmp / "data").write_bytes(data)
    return subprocess.run(["gpgv", "--keyring", str(binary), str(tmp / "sig"), str(tmp / "data")], capture_output=True)


def test_apt_trusting_only_the_mirror_key_installs_a_filtered_package_with_what_it_needs(
    site: PublishSite, mirror_key: SigningKey, tmp_path: Path
) -> None:
    run = site.mirror.sync("--log-format", "json")
    assert run.returncode == 0, run.output
    site.mirror.start_server()
    # The upstream has no by-hash and is signed by its own key; the view is the mirror's.
    upstream_inrelease = (site.repo.root / INRELEASE).read_bytes()
    assert b"Acquire-By-Hash" not in upstream_inrelease
    status, inrelease = site.mirror.get(f"/up/{INRELEASE}")
    assert status == 200 and inrelease != upstream_inrelease
    assert b"Acquire-By-Hash: yes" in inrelease and b"Valid-Until:" in inrelease
    assert b"Origin: Example" in inrelease and b"Codename: " in inrelease
    # gpgv: the mirror's public key alone verifies the published Release; the upstream's does not.
    release = site.mirror.get(f"/up/dists/{SUITE}/Release")[1]
    signature = site.mirror.get(f"/up/dists/{SUITE}/Release.gpg")[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _gpgv(mirror_key.public_path, signature, release, tmp_path / "a").returncode == 0
    assert _gpgv(site.keyring, signature, release, tmp_path / "b").returncode != 0
    # The filter: app (both versions), the first satisfiable alternative at its newest satisfying
    # version, the provider of a virtual package, the Pre-Depends; nothing else.
    view = packages_of(gzip.decompress(site.served_index()))
    assert view == {
        ("app", "1.0-1"),
        ("app", "2.0-1"),
        ("libfoo", "2.0-1"),
        ("httpd", "1.0-1"),
        ("base-files", "12.4"),
    }, view
    # Every index is served by hash too, under each hash type the Release lists.
    for line in release.decode().split("SHA512:")[1].splitlines()[1:]:
        digest, _size, name = line.split()
        folder = name.rsplit("/", 1)[0] + "/" if "/" in name else ""
        assert site.mirror.get(f"/up/dists/{SUITE}/{folder}by-hash/SHA512/{digest}")[0] == 200, name
    # A real apt-get trusting only the mirror's key.
    client = site.client(tmp_path / "client", mirror_key.public_path)
    update = client.update()
    assert update.ok, update.output
    install = client.run("-s", "install", "app")
    assert install.returncode == 0, install.output
    for name, version in (("app", "2.0-1"), ("libfoo", "2.0-1"), ("httpd", "1.0-1"), ("base-files", "12.4")):
        assert f"Inst {name} ({version}" in install.output, install.output
    assert "libalt" not in install.output
    absent = client.run("-s", "install", "extra")
    assert absent.returncode != 0 and "Unable to locate package extra" in absent.output, absent.output
    download = client.download("libfoo")
    assert download.ok, download.output
    pool_file = site.repo.deb_path(SUITE, "stable", "amd64", "libfoo=2.0-1")
    assert download.files[0].read_bytes() == pool_file.read_bytes()  # the upstream's file, unchanged
    # A client trusting the upstream's key only is refused: the Release is the mirror's now.
    stranger = site.client(tmp_path / "stranger", site.keyring)
    refused = stranger.update()
    assert not refused.ok and "NO_PUBKEY" in refused.output, refused.output
    # The same view under /snapshots/ and /pins/.
    snap = site.mirror.current("up")
    assert site.mirror.run("pin", "ci", "up", snap).returncode == 0
    assert site.mirror.get(f"/snapshots/up/{snap}/{INRELEASE}")[1] == inrelease
    assert site.mirror.get(f"/pins/ci/{INRELEASE}")[1] == inrelease
    # `aptguard sources` embeds the mirror's key: a client made from its output alone verifies.
    stanza = site.mirror.run("sources", "up", "--base-url", site.mirror.url)
    assert stanza.returncode == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in stanza.stdout, stanza.output
    fresh = AptClient(tmp_path / "fresh")
    fresh.set_sources_deb822(stanza.stdout)
    assert fresh.update().ok
    assert fresh.available("app") == "2.0-1"
    # Status shows the signing key; an unchanged upstream makes no new view.
    status_json = site.mirror.status()["upstreams"]["up"]
    assert [k["fingerprint"] for k in status_json["signing_keys"]] == [mirror_key.fingerprint]
    again = site.mirror.sync()
    assert again.returncode == 0 and site.mirror.last_sync("up")["outcome"] == "unchanged", again.output
    assert len(site.mirror.snapshots("up")) == 1
    assert site.mirror.snapshots("up")[0]["published"]["packages"] == 5
    assert "published view of 5 packages" in site.mirror.run("snapshots", "up").stdout
    fsck = site.mirror.run("fsck")
    assert fsck.returncode == 0, fsck.output
    # The manifest (format 3) reads back and writes the same record.
    raw = json.loads((site.mirror.data / "meta" / "up" / f"{snap}.json").read_text())
    assert raw["format"] == 3 and raw["published"]["keys"][0]["fingerprint"] == mirror_key.fingerprint
    assert Manifest.from_json(raw).to_json() == raw
    assert f"dists/{SUITE}/InRelease" in raw["source"] and f"dists/{SUITE}/InRelease" in raw["files"]
    assert raw["source"][f"dists/{SUITE}/InRelease"] != raw["files"][f"dists/{SUITE}/InRelease"]


def test_keep_versions_keeps_the_newest_of_each_package(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path
) -> None:
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, keep_versions=1)
    try:
        assert site.mirror.sync().returncode == 0
        site.mirror.start_server()
        view = packages_of(gzip.decompress(site.served_index()))
        assert ("app", "2.0-1") in view and ("app", "1.0-1") not in view
        assert ("libfoo", "2.0-1") in view and ("libfoo", "1.0-1") not in view
        assert ("extra", "1.0-1") in view and ("libalt", "1.0-1") in view  # no filter: every package
    finally:
        site.close()


def test_an_unsatisfiable_dependency_is_publish_failed_and_the_served_view_is_unchanged(
    site: PublishSite, tmp_path: Path
) -> None:
    assert site.mirror.sync().returncode == 0
    site.mirror.start_server()
    before = site.mirror.served("up")
    # Upstream now publishes an app whose dependency it does not have.
    site.repo.add(SUITE, "stable", "amd64", "app", "3.0-1", pool="docker", keep_older=True, depends="libgone (>= 3)")
    site.publish_upstream()
    index = (site.repo.root / f"dists/{SUITE}/stable/binary-amd64/Packages").read_text()
    assert "Depends: libgone (>= 3)" in index and "Package: libgone" not in index  # the fault is real
    run = site.mirror.sync()
    assert run.returncode == 1, run.output
    last = site.mirror.last_sync("up")
    assert last["reason"] == "publish-failed", last
    assert "app 3.0-1" in last["detail"] and "libgone (>= 3)" in last["detail"], last
    assert site.mirror.served("up") == before
    assert len(site.mirror.snapshots("up")) == 1


@pytest.mark.parametrize("problem", ["expired", "public-only", "deleted"])
def test_a_signing_key_that_cannot_sign_is_publish_failed_and_the_served_view_is_unchanged(
    site: PublishSite, keys, problem: str
) -> None:
    assert site.mirror.sync().returncode == 0
    site.mirror.start_server()
    before = site.mirror.served("up")
    if problem == "expired":
        expired = keys("mirror-expired", expired=True)
        files = site.key_files([expired])
        listing = subprocess.run(
            ["gpg", "--homedir", str(expired.home), "--with-colons", "--list-keys", expired.fingerprint],
            capture_output=True,
            text=True,
        ).stdout
        pub = next(line.split(":") for line in listing.splitlines() if line.startswith("pub:"))
        assert pub[1] == "e", listing  # gpg itself calls the key expired
        site.configure(sign_with=files)
        run = site.mirror.sync()
        words = "expired"
    elif problem == "public-only":
        site.configure(sign_with=[str(site.keyring)])
        run = site.mirror.sync()
        words = "no secret key"
    else:
        # The file disappears after the config was read (a long-running `serve` with [schedule]
        # read it at start; the CLI's own config check is test_config_errors_name_the_key's).
        path = Path(site.settings["sign_with"][0])
        site.configure(valid_days=3)  # a settings change: the next sync republishes
        config = load_config(site.mirror.config)
        path.rename(path.with_suffix(".gone"))
        try:
            result = asyncio.run(sync_upstream(config.upstreams["up"], open_store(config), limits=config.limits))
        finally:
            path.with_suffix(".gone").rename(path)
        assert result.reason == "publish-failed" and "cannot be read" in result.detail, result
        assert site.mirror.last_sync("up")["reason"] == "publish-failed"
        assert site.mirror.served("up") == before
        return
    assert run.returncode == 1, run.output
    last = site.mirror.last_sync("up")
    assert last["reason"] == "publish-failed" and words in last["detail"], last
    assert site.mirror.served("up") == before


def test_key_rotation_walks_a_client_from_the_old_key_to_the_new_without_a_failed_update(
    tmp_path: Path, keys, deb_cache: Path
) -> None:
    old, new = keys("mirror-old"), keys("mirror-new")
    site = PublishSite(tmp_path, keys("upstream-a"), [old], deb_cache)
    try:
        assert site.mirror.sync().returncode == 0
        site.mirror.start_server()
        client = site.client(tmp_path / "client", old.public_path)
        steps = []
        steps.append(client.update())
        site.configure(sign_with=site.key_files([old, new]))  # both sign
        assert site.mirror.sync().returncode == 0 and site.mirror.last_sync("up")["outcome"] == "promoted"
        inrelease = site.mirror.get(f"/up/{INRELEASE}")[1]
        assert inrelease.count(b"-----BEGIN PGP SIGNATURE-----") == 1
        steps.append(client.update())  # still trusting only the old key
        client.set_sources([client.source_line(f"{site.mirror.url}/up", SUITE, ["stable"], new.public_path)])
        steps.append(client.update())  # now trusting only the new key
        site.configure(sign_with=site.key_files([new]))  # the old key dropped
        assert site.mirror.sync().returncode == 0
        steps.append(client.update())
        assert all(step.ok for step in steps), [s.output for s in steps if not s.ok]
        # The rotation is real: a client still trusting only the old key is refused now.
        late = site.client(tmp_path / "late", old.public_path)
        assert not late.update().ok
    finally:
        site.close()


def test_valid_until_is_refreshed_once_half_of_valid_days_passed(site: PublishSite, tmp_path: Path) -> None:
    site.configure(valid_days=12 / 86400)  # twelve seconds: half of it leaves room for a slow machine
    assert site.mirror.sync().returncode == 0
    first = site.mirror.snapshots("up")[0]["published"]
    assert site.mirror.sync().returncode == 0 and site.mirror.last_sync("up")["outcome"] == "unchanged"
    half = dt.datetime.fromisoformat(first["date"]) + dt.timedelta(seconds=6.5)
    time.sleep(max(0.0, (half - dt.datetime.now(dt.UTC)).total_seconds()))
    run = site.mirror.sync()
    assert run.returncode == 0 and site.mirror.last_sync("up")["outcome"] == "promoted", run.output
    assert "Valid-Until in" in run.output
    snapshots = site.mirror.snapshots("up")
    assert len(snapshots) == 2
    second = snapshots[0]["published"]
    assert second["date"] > first["date"] and second["valid_until"] > first["valid_until"]
    site.mirror.start_server()
    release = site.mirror.get(f"/up/dists/{SUITE}/Release")[1].decode()
    line = next(ln for ln in release.splitlines() if ln.startswith("Valid-Until: "))
    served = dt.datetime.strptime(line[13:], "%a, %d %b %Y %H:%M:%S UTC").replace(tzinfo=dt.UTC)
    assert served == dt.datetime.fromisoformat(second["valid_until"])


def test_a_signing_key_expiring_soon_is_a_warning_in_status_and_metrics(tmp_path: Path, keys, deb_cache: Path) -> None:
    soon = make_key(tmp_path / "soon", "mirror-soon", expires_in=dt.timedelta(days=10))
    site = PublishSite(tmp_path, keys("upstream-a"), [soon], deb_cache)
    try:
        assert site.mirror.sync().returncode == 0
        warnings = site.mirror.status()["upstreams"]["up"]["warnings"]
        assert any(soon.fingerprint in w and "signing key" in w for w in warnings), warnings
        site.mirror.start_server()
        metrics = site.mirror.get("/metrics")[1].decode()
        line = next(ln for ln in metrics.splitlines() if ln.startswith("aptguard_signing_key_expiry_seconds{"))
        assert soon.fingerprint in line and 8 * 86400 < float(line.split()[-1]) < 11 * 86400, line
    finally:
        site.close()
        soon.close()


def test_config_errors_name_the_key(tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path) -> None:
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache)
    try:
        for settings, words in (
            ({"sign_with": []}, "sign_with: expected a non-empty list"),
            ({"sign_with": ["nope.key"]}, "does not exist"),
            ({"packages": ["app | other"]}, "packages"),
            ({"keep_versions": -1}, "keep_versions"),
            ({"valid_days": 0}, "valid_days"),
            ({"colour": "blue"}, "unknown key 'colour'"),
        ):
            saved = dict(site.settings)
            site.configure(**settings)
            run = site.mirror.sync()
            assert run.returncode == 2 and words in run.output and "publish" in run.output, (settings, run.output)
            site.settings = saved
            site.settings.pop("colour", None)
            site.configure()
        site.mirror.upstreams["up"]["sources"] = True
        site.mirror.write_config()
        run = site.mirror.sync()
        assert run.returncode == 2 and "sources" in run.output, run.output
    finally:
        site.close()


def test_json_log_carries_the_published_view(site: PublishSite) -> None:
    run = site.mirror.sync("--log-format", "json")
    assert run.returncode == 0, run.output
    result = next(r for r in map(json.loads, run.stdout.splitlines()) if r.get("event") == "result")
    assert result["published"]["packages"] == 5, result
    assert "publish" in result["steps"], result


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_gc_keeps_the_upstream_files_a_view_is_republished_from(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """The upstream's signed files and indices are in no served tree, only in the manifest's
    `source`: gc must keep them, or a republish of the unchanged upstream could not be made."""
    top: dict[str, Any] = {"retention": {"keep_last": 1, "keep_days": 0}}
    if backend == "s3":
        moto: MotoServer = request.getfixturevalue("moto")
        top |= {
            "storage": {"backend": "s3", "endpoint": moto.endpoint, "bucket": moto.new_bucket(), "prefix": "m/"},
            "server": {"refresh_seconds": 0.5},
        }
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, top=top, packages=["app"])
    try:
        assert site.mirror.sync().returncode == 0
        first = site.mirror.current("up")
        indices = f"dists/{SUITE}/stable/binary-amd64/Packages*"
        fetched = site.upstream.count(indices)
        for days in (3, 4, 5):  # the upstream unchanged, the settings changed: a new view each time
            site.configure(valid_days=days)
            run = site.mirror.sync()
            assert run.returncode == 0 and site.mirror.last_sync("up")["outcome"] == "promoted", run.output
            gc = site.mirror.run("gc")
            assert gc.returncode == 0, gc.output
        kept = [s["id"] for s in site.mirror.snapshots("up")]
        assert first not in kept and len(kept) == 2, kept  # current and its rollback target
        assert site.upstream.count(indices) == fetched  # republished from the stored indices
        fsck = site.mirror.run("fsck")
        assert fsck.returncode == 0, fsck.output
        site.mirror.start_server()
        client = site.client(tmp_path / "client", mirror_key.public_path)
        assert client.update().ok
        install = client.run("-s", "install", "app")
        assert install.returncode == 0 and "Inst httpd" in install.output, install.output
    finally:
        site.close()


def test_dependencies_another_upstream_satisfies_are_resolved_with_it_and_not_copied(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path
) -> None:
    """A Docker-like upstream whose package needs a library of the distribution's archive: with
    `resolve_with`, the view holds the package and what its own upstream provides; the library
    stays the distribution's, and apt installs from the two sources together."""
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, packages=["engine"])
    distro = Repo(tmp_path / "distro", deb_cache)
    distro.add("bookworm", "main", "amd64", "libc6", "2.36-9")
    distro.publish("bookworm", [keys("upstream-b")])
    distro_up = Upstream(distro.root).start()
    try:
        site.repo.add(SUITE, "stable", "amd64", "engine", "1.0-1", pool="docker", depends="libc6 (>= 2.36), app")
        site.publish_upstream()
        distro_keyring = write_keyring(tmp_path / "keys" / "distro.asc", [keys("upstream-b")])
        site.mirror.upstreams = {  # the view first in the file: it is synced after what it resolves with
            "up": site.mirror.upstreams["up"],
            "distro": {
                "url": distro_up.url,
                "suites": ["bookworm"],
                "components": ["main"],
                "architectures": ["amd64"],
                "keyring": distro_keyring,
            },
        }
        site.mirror.write_config()
        run = site.mirror.sync()
        assert run.returncode == 1 and "libc6 (>= 2.36)" in run.output, run.output  # not within the upstream
        assert site.mirror.last_sync("up")["reason"] == "publish-failed"
        site.configure(resolve_with=["distro"])
        run = site.mirror.sync()
        assert run.returncode == 0, run.output
        site.mirror.start_server()
        view = packages_of(gzip.decompress(site.served_index()))
        assert {p for p, _ in view} == {"engine", "app", "libfoo", "httpd", "base-files"}, view
        client = AptClient(tmp_path / "client")
        client.set_sources(
            [
                client.source_line(f"{site.mirror.url}/up", SUITE, ["stable"], mirror_key.public_path),
                client.source_line(f"{site.mirror.url}/distro", "bookworm", ["main"], distro_keyring),
            ]
        )
        assert client.update().ok
        install = client.run("-s", "install", "engine")
        assert install.returncode == 0 and "Inst libc6 (2.36-9" in install.output, install.output
    finally:
        site.close()
        distro_up.stop()


def _published_mirror(
    tmp_path: Path, repo: Repo, upstream_key: SigningKey, mirror_key: SigningKey, packages: list[str], **settings: Any
) -> tuple[Upstream, Mirror]:
    """The repository served on 127.0.0.1 and a mirror publishing `packages` of it, signed by `mirror_key`."""
    upstream = Upstream(repo.root).start()
    keyring = write_keyring(tmp_path / "keys" / "upstream.asc", [upstream_key])
    secret = mirror_key.secret_file(tmp_path / "keys" / "mirror.key")
    publish = {"sign_with": [str(secret)], "packages": packages}
    return upstream, Mirror.single(tmp_path / "mirror", upstream.url, keyring, publish=publish, **settings)


def test_a_debian_shaped_upstream_publishes_every_component_and_architecture_with_arch_all_folded(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path
) -> None:
    """Two components, two architectures and a separate binary-all, by-hash and xz upstream:
    the view lists arch:all packages in each architecture's index (no binary-all), and apt on
    either architecture resolves a dependency on one."""
    repo = Repo(tmp_path / "upstream", deb_cache)
    for arch in ("amd64", "arm64"):
        repo.add("bookworm", "main", arch, "tool", "1.0-1", depends="tool-data")
        repo.add("bookworm", "contrib", arch, "other", "1.0-1")
    repo.add("bookworm", "main", "all", "tool-data", "1.0-1")
    repo.add("bookworm", "contrib", "all", "unused-doc", "1.0-1")
    repo.publish("bookworm", [keys("upstream-a")], by_hash=True)
    upstream, mirror = _published_mirror(
        tmp_path,
        repo,
        keys("upstream-a"),
        mirror_key,
        ["tool"],
        components=["main", "contrib"],
        architectures=["amd64", "arm64"],
    )
    try:
        assert b"binary-all" in (repo.root / "dists/bookworm/Release").read_bytes()  # upstream has one
        run = mirror.sync()
        assert run.returncode == 0, run.output
        mirror.start_server()
        release = mirror.get("/up/dists/bookworm/Release")[1].decode()
        assert "binary-all" not in release and "No-Support-for-Architecture-all: Packages" in release
        assert "Architectures: amd64 arm64" in release and "Components: main contrib" in release
        for arch in ("amd64", "arm64"):
            main = packages_of(lzma.decompress(mirror.get(f"/up/dists/bookworm/main/binary-{arch}/Packages.xz")[1]))
            assert main == {("tool", "1.0-1"), ("tool-data", "1.0-1")}, (arch, main)
            contrib = mirror.get(f"/up/dists/bookworm/contrib/binary-{arch}/Packages.gz")
            assert contrib[0] == 200 and packages_of(gzip.decompress(contrib[1])) == set()
            client = AptClient(tmp_path / f"client-{arch}", arch=arch)
            client.set_sources(
                [client.source_line(f"{mirror.url}/up", "bookworm", ["main", "contrib"], mirror_key.public_path)]
            )
            updated = client.update()
            assert updated.ok, updated.output
            install = client.run("-s", "install", "tool")
            assert install.returncode == 0 and "Inst tool-data" in install.output, install.output
    finally:
        mirror.stop_server()
        upstream.stop()


@pytest.mark.parametrize("folder", ["/", "stable/"])
def test_a_flat_repository_is_published_with_by_hash_and_apt_installs_from_it(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path, folder: str
) -> None:
    repo = Repo(tmp_path / "upstream", deb_cache)
    repo.add(folder, "", "amd64", "kubeadm", "1.30.2-1.1", pool="flat", depends="kubectl (>= 1.30)")
    repo.add(folder, "", "amd64", "kubectl", "1.30.2-1.1", pool="flat")
    repo.add(folder, "", "amd64", "kubelet", "1.30.2-1.1", pool="flat")
    repo.publish_flat([keys("upstream-a")], folder)
    upstream, mirror = _published_mirror(
        tmp_path, repo, keys("upstream-a"), mirror_key, ["kubeadm"], suites=[folder], components=[]
    )
    try:
        run = mirror.sync()
        assert run.returncode == 0, run.output
        mirror.start_server()
        at = folder.lstrip("/")
        release = mirror.get(f"/up/{at}Release")[1].decode()
        assert "Acquire-By-Hash: yes" in release and "Components" not in release, release
        digest = next(ln.split()[0] for ln in release.split("SHA256:")[1].splitlines() if ln.endswith(" Packages.xz"))
        assert mirror.get(f"/up/{at}by-hash/SHA256/{digest}")[0] == 200
        stanza = mirror.run("sources", "up", "--base-url", mirror.url)
        assert stanza.returncode == 0 and "BEGIN PGP PUBLIC KEY BLOCK" in stanza.stdout, stanza.output
        client = AptClient(tmp_path / "client")
        client.set_sources_deb822(stanza.stdout)
        update = client.update()
        assert update.ok, update.output
        assert client.available("kubectl") == "1.30.2-1.1" and client.available("kubelet") is None
        install = client.run("-s", "install", "kubeadm")
        assert install.returncode == 0 and "Inst kubectl" in install.output, install.output
    finally:
        mirror.stop_server()
        upstream.stop()


def test_an_on_demand_upstream_publishes_a_view_whose_pool_files_are_fetched_at_first_request(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path
) -> None:
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, packages=["app"])
    site.mirror.upstreams["up"]["policy"] = "on-demand"
    site.mirror.write_config()
    try:
        assert site.mirror.sync().returncode == 0
        assert site.upstream.count("dists/*/pool/*") == 0  # no pool file fetched by the sync
        site.mirror.start_server()
        client = site.client(tmp_path / "client", mirror_key.public_path)
        assert client.update().ok
        download = client.download("libfoo")
        assert download.ok, download.output
        assert (
            download.files[0].read_bytes() == site.repo.deb_path(SUITE, "stable", "amd64", "libfoo=2.0-1").read_bytes()
        )
        assert site.upstream.count("dists/*/pool/*") == 1
        extra = site.repo.deb_path(SUITE, "stable", "amd64", "extra").relative_to(site.repo.root).as_posix()
        assert site.mirror.get(f"/up/{extra}")[0] == 404  # outside the view: not fetched for anyone
        assert site.upstream.count("dists/*/pool/*") == 1
    finally:
        site.close()


def _release_date(mirror: Mirror, prefix: str) -> dt.datetime:
    text = mirror.get(f"{prefix}/dists/{SUITE}/Release")[1].decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("Date: "))
    return dt.datetime.strptime(line[6:], "%a, %d %b %Y %H:%M:%S UTC").replace(tzinfo=dt.UTC)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_rollback_reaches_hosts_that_already_updated_because_the_older_view_is_re_signed(
    tmp_path: Path, keys, mirror_key: SigningKey, deb_cache: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """apt ignores a Release older than the one it holds: a rollback to an older view served as
    it was would not reach a host that updated since. A published view's rollback serves a copy
    of it signed again, dated later; /snapshots/NAME/ID/ of the old one stays byte for byte."""
    top: dict[str, Any] = {}
    if backend == "s3":
        moto: MotoServer = request.getfixturevalue("moto")
        top = {
            "storage": {"backend": "s3", "endpoint": moto.endpoint, "bucket": moto.new_bucket(), "prefix": "m/"},
            "server": {"refresh_seconds": 0.2},
        }
    site = PublishSite(tmp_path, keys("upstream-a"), [mirror_key], deb_cache, top=top, packages=["app"])
    request.addfinalizer(site.close)
    settle = 1.0 if backend == "s3" else 0.0  # a server of the bucket sees a new current within refresh_seconds
    assert site.mirror.sync().returncode == 0
    good = site.mirror.current("up")
    site.mirror.start_server()
    good_inrelease = site.mirror.get(f"/snapshots/up/{good}/{INRELEASE}")[1]
    time.sleep(1.1)  # Release Dates are whole seconds
    site.repo.add(SUITE, "stable", "amd64", "app", "3.0-1", pool="docker", keep_older=True, depends="libfoo")
    site.publish_upstream()
    assert site.mirror.sync().returncode == 0
    bad = site.mirror.current("up")
    time.sleep(settle)
    client = site.client(tmp_path / "client", mirror_key.public_path)
    assert client.update().ok and client.available("app") == "3.0-1"
    assert _release_date(site.mirror, f"/snapshots/up/{good}") < _release_date(site.mirror, f"/snapshots/up/{bad}")
    run = site.mirror.run("rollback", "up")
    assert run.returncode == 0, run.output
    time.sleep(settle)
    now = site.mirror.current("up")
    assert now not in (good, bad), run.output  # a copy of the good one
    assert _release_date(site.mirror, "/up") > _release_date(site.mirror, f"/snapshots/up/{bad}")
    assert site.mirror.get(f"/snapshots/up/{good}/{INRELEASE}")[1] == good_inrelease  # unchanged
    assert (
        site.mirror.get("/up/dists/stable/stable/binary-amd64/Packages.gz")[1]
        == site.mirror.get(f"/snapshots/up/{good}/dists/stable/stable/binary-amd64/Packages.gz")[1]
    )
    update = client.update()
    assert update.ok, update.output
    assert client.available("app") == "2.0-1"  # the host that had updated follows the rollback
    assert site.mirror.status()["upstreams"]["up"]["hold"] is True
    # Rolling back the rollback re-signs the bad view in turn: the host follows again.
    assert site.mirror.run("rollback", "up").returncode == 0
    time.sleep(settle)
    assert client.update().ok and client.available("app") == "3.0-1"
    fsck = site.mirror.run("fsck")
    assert fsck.returncode == 0, fsck.output


def test_a_signing_home_left_by_a_killed_process_is_removed_by_the_next_signer(
    tmp_path: Path, mirror_key: SigningKey
) -> None:
    """kill -9 runs no cleanup: the secret keys imported into a signer's home must not stay there."""
    import tempfile

    from aptguard.config import Publish
    from aptguard.signer import HOME_PREFIX, Signer

    dead = subprocess.Popen(["true"])
    dead.wait()
    left = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{dead.pid}-"))
    (left / "private-keys-v1.d").mkdir()
    (left / "private-keys-v1.d" / "key").write_text("secret")
    mine = Path(tempfile.mkdtemp(prefix=f"{HOME_PREFIX}{os.getpid()}-"))  # a live process's: kept
    try:
        with Signer(Publish(sign_with=(mirror_key.secret_file(tmp_path / "m.key"),))) as signer:
            assert signer.home.is_dir()
        assert not left.exists() and mine.is_dir() and not signer.home.exists()
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(left, ignore_errors=True)


def test_turning_publish_off_serves_the_upstream_as_it_signed_it_again(site: PublishSite, tmp_path: Path) -> None:
    assert site.mirror.sync().returncode == 0
    site.mirror.start_server()
    assert site.mirror.get(f"/up/{INRELEASE}")[1] != (site.repo.root / INRELEASE).read_bytes()
    del site.mirror.upstreams["up"]["publish"]
    site.mirror.write_config()
    run = site.mirror.sync()
    assert run.returncode == 0 and site.mirror.last_sync("up")["outcome"] == "promoted", run.output
    assert site.mirror.get(f"/up/{INRELEASE}")[1] == (site.repo.root / INRELEASE).read_bytes()
    extra = site.repo.deb_path(SUITE, "stable", "amd64", "extra")
    assert site.mirror.get(f"/up/{extra.relative_to(site.repo.root).as_posix()}")[1] == extra.read_bytes()
    client = site.client(tmp_path / "client", site.keyring)  # the upstream's key again
    assert client.update().ok and client.available("extra") == "1.0-1"
    assert site.mirror.run("fsck").returncode == 0
    site.configure()  # and on again: the unchanged upstream gets its view back
    run = site.mirror.sync()
    assert run.returncode == 0 and "publish is configured" in run.output, run.output
    assert site.mirror.get(f"/up/{INRELEASE}")[1] != (site.repo.root / INRELEASE).read_bytes()
    assert ("extra", "1.0-1") not in packages_of(gzip.decompress(site.served_index()))


def test_release_fields_the_upstream_chose_carry_no_line_of_their_own_into_the_mirrors_release(
    site: PublishSite,
) -> None:
    """Origin, Label, Suite, Codename, Version and Description are the upstream's words (signed by
    its key, still its choice): a multi-line value must not add a field or a hash line to the
    Release the mirror signs."""
    lines = ["a view", " Valid-Until: Thu, 01 Jan 2099 00:00:00 UTC", " SHA256:", f" {'0' * 64} 1 evil/Packages"]
    site.repo.publish(SUITE, [site.upstream_key], by_hash=False, extra_fields={"Description": "\n".join(lines)})
    upstream = (site.repo.root / f"dists/{SUITE}/Release").read_text()
    assert " Valid-Until: Thu, 01 Jan 2099" in upstream  # the upstream really signed those lines
    assert site.mirror.sync().returncode == 0
    site.mirror.start_server()
    release = site.mirror.get(f"/up/dists/{SUITE}/Release")[1].decode()
    assert "Description: a view\n" in release
    assert "2099" not in release and "evil" not in release, release
    assert sum(ln.startswith("Valid-Until:") for ln in release.splitlines()) == 1
