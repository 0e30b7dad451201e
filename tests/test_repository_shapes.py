"""The repository shapes real upstreams publish, mirrored and then used by the real apt client.

Flat repositories (Kubernetes), source packages, translations and Contents, a Release listing
files nobody fetches (Docker), a package re-uploaded under the same file name (Docker, 2023),
and a stale Release.gpg next to a good InRelease (a Debian mirror caught mid-sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.apt import AptClient
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror

SUITE = "bookworm"


@pytest.fixture
def key(keys: Callable[..., SigningKey]) -> SigningKey:
    return keys("shapes")


@pytest.fixture
def keyring(tmp_path: Path, key: SigningKey) -> Path:
    return write_keyring(tmp_path / "keys" / "up.asc", [key])


@pytest.fixture
def mirror(tmp_path: Path, keyring: Path) -> Iterator[Callable[..., Mirror]]:
    """mirror(url, name="m", **upstream options): a Mirror of one upstream called "up"."""
    made: list[Mirror] = []

    def make(url: str, name: str = "m", **options: Any) -> Mirror:
        settings = {"url": url, "architectures": ["amd64"], "keyring": keyring, **options}
        if "suites" not in settings:
            settings["suites"] = [SUITE]
        if "components" not in settings and not any(s.endswith("/") for s in settings["suites"]):
            settings["components"] = ["main"]
        m = Mirror(tmp_path / name, {"up": settings})
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop_server()


def client(tmp_path: Path, name: str, lines: list[str], **options: str) -> AptClient:
    c = AptClient(tmp_path / "apt" / name, options=options or None)
    c.set_sources(lines)
    return c


def synced(m: Mirror, outcome: str = "promoted") -> None:
    run = m.sync()
    assert run.returncode == 0, run.output
    assert m.last_sync("up")["outcome"] == outcome, run.output


def refused(m: Mirror, reason: str, *words: str) -> str:
    run = m.sync()
    assert run.returncode == 1, run.output
    last = m.last_sync("up")
    assert (last["outcome"], last["reason"]) == ("rejected", reason), last
    for word in words:
        assert word in last["detail"], (word, last["detail"])
    return str(last["detail"])


def same_as_upstream(served: dict[str, bytes], repo: Repo) -> None:
    """Every served file is byte for byte the upstream's file of the same path."""
    for rel, body in served.items():
        if "/by-hash/" not in rel:
            assert body == repo.path(rel).read_bytes(), rel


# ---------------------------------------------------------------- flat repositories


@pytest.mark.parametrize("folder", ["/", "stable/"])
def test_flat_repository_is_mirrored_and_apt_installs_from_it(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring, folder: str
) -> None:
    r = repo()
    r.add(folder, "", "amd64", "kubeadm", "1.30.2-1.1", pool="flat")
    r.add(folder, "", "amd64", "kubectl", "1.30.2-1.1", pool="flat")
    r.publish_flat([key], folder)
    up = serve(r)
    m = mirror(up.url, suites=[folder])
    synced(m)
    m.start_server()

    served = m.served("up")
    at = folder.lstrip("/")
    for name in ("InRelease", "Release", "Release.gpg", "Packages", "Packages.xz", "Packages.gz"):
        assert f"{at}{name}" in served, sorted(served)
    assert f"{at}amd64/kubeadm_1.30.2-1.1_amd64.deb" in served, sorted(served)
    same_as_upstream(served, r)

    c = client(tmp_path, "flat", [f"deb [signed-by={keyring}] {m.url}/up/ {folder}"])
    update = c.update()
    assert update.ok, update.output
    assert c.available("kubectl") == "1.30.2-1.1"
    got = c.download("kubeadm")
    assert got.returncode == 0 and got.files, got.output
    assert got.files[0].read_bytes() == r.deb_path(folder, "", "amd64", "kubeadm").read_bytes()

    stanza = m.run("sources", "up", "--base-url", m.url)  # what an operator hands to clients
    assert stanza.returncode == 0 and "Components" not in stanza.stdout, stanza.output
    deb822 = AptClient(tmp_path / "apt" / "deb822")
    deb822.set_sources_deb822(stanza.stdout)
    update = deb822.update()
    assert update.ok and deb822.available("kubeadm") == "1.30.2-1.1", (stanza.stdout, update.output)


def test_flat_repository_with_corrupt_packages_is_refused_and_old_served(
    repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key
) -> None:
    r = repo()
    r.add("/", "", "amd64", "kubeadm", "1.30.2-1.1", pool="flat")
    r.publish_flat([key])
    m = mirror(serve(r).url, suites=["/"])
    synced(m)
    m.start_server()
    before = m.served("up")

    r.add("/", "", "amd64", "kubeadm", "1.30.3-1.1", pool="flat")
    r.publish_flat([key])
    r.corrupt("Packages.xz")
    refused(m, "index-mismatch", "Packages.xz")
    assert m.served("up") == before


def test_flat_sub_folder_whose_release_names_another_suite_is_refused(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring
) -> None:
    """apt warns "Conflicting distribution" when a flat "stable/" Release says Suite: testing."""
    r = repo()
    r.add("stable/", "", "amd64", "kubeadm", "1.30.2-1.1", pool="flat")
    r.publish_flat([key], "stable/", extra_fields={"Suite": "testing"})
    up = serve(r)
    direct = client(tmp_path, "direct", [f"deb [signed-by={keyring}] {up.url} stable/"])
    assert "Conflicting distribution" in direct.update().output
    refused(mirror(up.url, suites=["stable/"]), "release-mismatch", "testing")


# ---------------------------------------------------------------- source packages


def test_source_packages_are_mirrored_and_apt_get_source_downloads_them(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring
) -> None:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0-1")
    files = r.add_source(SUITE, "main", "hello", "1.0-1")
    r.publish(SUITE, [key])
    m = mirror(serve(r).url, sources=True)
    synced(m)
    m.start_server()
    served = m.served("up")
    assert "dists/bookworm/main/source/Sources.xz" in served
    assert all(f in served for f in files), (files, sorted(served))
    assert [f.rsplit("/", 1)[-1] for f in files] == [
        "hello_1.0-1.dsc",
        "hello_1.0.orig.tar.gz",
        "hello_1.0-1.debian.tar.xz",
    ]
    same_as_upstream(served, r)

    base = f"[signed-by={keyring}] {m.url}/up {SUITE} main"
    c = client(tmp_path, "src", [f"deb {base}", f"deb-src {base}"])
    update = c.update()
    assert update.ok, update.output
    got = c.run("-q", "source", "--download-only", "hello", cwd=c.downloads)
    assert got.returncode == 0, got.output
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        assert (c.downloads / name).read_bytes() == r.path(rel).read_bytes(), name


def test_corrupt_orig_tarball_is_refused_unless_sources_are_not_mirrored(
    repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key
) -> None:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0-1")
    r.add_source(SUITE, "main", "hello", "1.0-1")
    r.publish(SUITE, [key])
    url = serve(r).url
    with_sources, without = mirror(url, "with", sources=True), mirror(url, "without")
    synced(with_sources)
    synced(without)

    files = r.add_source(SUITE, "main", "hello", "2.0-1")
    r.publish(SUITE, [key])
    orig = next(f for f in files if f.endswith(".orig.tar.gz"))
    r.corrupt(orig)
    refused(with_sources, "package-mismatch", "hello_2.0.orig.tar.gz")
    synced(without)  # sources = false: Sources and its files are none of this mirror's business
    assert not (without.data / "current" / "up" / orig).exists()


# ---------------------------------------------------------------- translations and Contents


def test_translations_are_served_to_apt_and_a_corrupt_one_is_refused(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring
) -> None:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.publish(SUITE, [key])
    up = serve(r)
    english, none = mirror(up.url, "en"), mirror(up.url, "none", languages=[])
    synced(english)
    synced(none)
    english.start_server()
    assert "dists/bookworm/main/i18n/Translation-en.bz2" in english.served("up")
    assert not [p for p in (none.data / "current" / "up").rglob("Translation-*")]

    c = client(tmp_path, "en", [english.source_line("up", SUITE, ["main"], keyring)], **{"Acquire::Languages": "en"})
    update = c.update()
    assert update.ok, update.output
    assert "Translation-en" in update.output
    assert [p for p in (c.workdir / "state" / "lists").iterdir() if "Translation-en" in p.name]

    r.add(SUITE, "main", "amd64", "hello", "2.0")
    r.publish(SUITE, [key])
    r.corrupt("dists/bookworm/main/i18n/Translation-en.bz2")
    refused(english, "index-mismatch", "Translation-en.bz2")
    synced(none)


def test_contents_indices_are_mirrored_only_when_asked(
    repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key
) -> None:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.publish(SUITE, [key], contents=True)
    up = serve(r)
    wanted, unwanted = mirror(up.url, "with", contents=True), mirror(up.url, "without")
    synced(wanted)
    synced(unwanted)
    wanted.start_server()
    rel = "dists/bookworm/main/Contents-amd64.gz"
    assert wanted.get(f"/up/{rel}") == (200, r.path(rel).read_bytes())
    assert not (unwanted.data / "current" / "up" / rel).exists()

    r.add(SUITE, "main", "amd64", "hello", "2.0")
    r.publish(SUITE, [key], contents=True)
    r.corrupt(rel)
    refused(wanted, "index-mismatch", "Contents-amd64.gz")
    requests = up.count(rel)
    synced(unwanted)
    assert up.count(rel) == requests, "a mirror without contents = true fetched Contents"


# ---------------------------------------------------------------- what Release lists


def test_release_listing_stale_and_unconfigured_files_still_promotes(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring
) -> None:
    """Docker's Release lists files nobody fetches; only what clients of this mirror fetch counts."""
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.add(SUITE, "main", "arm64", "hello", "1.0", pool="docker")
    r.add(SUITE, "test", "amd64", "beta", "0.1")
    r.publish(
        SUITE,
        [key],
        phantom_files={
            "main/binary-amd64/Packages.bz2": b"never published\n",
            "main/i18n/Translation-de.bz2": b"never published\n",
            "main/binary-s390x/Packages.xz": b"never published\n",
        },
    )
    for gone in ("dists/bookworm/main/binary-arm64", "dists/bookworm/test", "dists/bookworm/pool"):
        for path in sorted(r.path(gone).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
    up = serve(r)
    m = mirror(up.url)
    synced(m)
    assert up.count("dists/bookworm/test/*") == 0 and up.count("dists/bookworm/main/binary-arm64/*") == 0
    assert up.count("dists/bookworm/main/i18n/Translation-de*") == 0
    m.start_server()
    assert m.get("/up/dists/bookworm/main/binary-amd64/Packages.bz2")[0] == 404
    c = client(tmp_path, "stale", [m.source_line("up", SUITE, ["main"], keyring)])
    update = c.update()
    assert update.ok, update.output
    got = c.download("hello")
    assert got.returncode == 0 and got.files, got.output


# ---------------------------------------------------------------- same-name re-upload


def test_same_name_reupload_new_snapshot_has_new_bytes_and_old_snapshot_keeps_old(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, keyring, key
) -> None:
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.publish(SUITE, [key])
    m = mirror(serve(r).url)
    synced(m)
    first = m.current("up")
    rel = "pool/main/h/hello/hello_1.0_amd64.deb"
    old = r.path(rel).read_bytes()

    r.add(SUITE, "main", "amd64", "hello", "1.0", salt="re-signed in place")
    r.publish(SUITE, [key])
    new = r.path(rel).read_bytes()
    assert new != old
    synced(m)
    second = m.current("up")
    assert second != first
    m.start_server()
    assert m.get(f"/up/{rel}") == (200, new)
    assert m.get(f"/snapshots/up/{second}/{rel}") == (200, new)
    assert m.get(f"/snapshots/up/{first}/{rel}") == (200, old)

    for name, base, want in (("now", f"{m.url}/up", new), ("then", f"{m.url}/snapshots/up/{first}", old)):
        c = client(tmp_path, name, [f"deb [signed-by={keyring}] {base} {SUITE} main"])
        update = c.update()
        assert update.ok, update.output
        got = c.download("hello")
        assert got.returncode == 0 and got.files, got.output
        assert got.files[0].read_bytes() == want, name


# ---------------------------------------------------------------- stale Release.gpg


def test_stale_release_gpg_beside_a_good_inrelease_is_left_out(
    tmp_path: Path, repo: Callable[..., Repo], serve: Callable[..., Upstream], mirror, key, keyring
) -> None:
    """A Debian mirror caught mid-sync: InRelease and Release are new, Release.gpg is the old
    one. apt reads InRelease and never Release.gpg; the mirror promotes and does not serve it."""
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.publish(SUITE, [key])
    stale = r.path("dists/bookworm/Release.gpg").read_bytes()
    r.add(SUITE, "main", "amd64", "hello", "2.0")
    r.publish(SUITE, [key])
    r.replace_file("dists/bookworm/Release.gpg", stale)
    m = mirror(serve(r).url)
    synced(m)
    m.start_server()
    assert m.get("/up/dists/bookworm/Release.gpg")[0] == 404
    assert m.get("/up/dists/bookworm/InRelease") == (200, r.path("dists/bookworm/InRelease").read_bytes())
    c = client(tmp_path, "c", [m.source_line("up", SUITE, ["main"], keyring)])
    update = c.update()
    assert update.ok, update.output
    assert c.available("hello") == "2.0"
    synced(m, "unchanged")

    # Without InRelease, Release.gpg is the only signature: a stale one is refused.
    r.add(SUITE, "main", "amd64", "hello", "3.0")
    r.publish(SUITE, [key], inrelease=False)
    r.replace_file("dists/bookworm/Release.gpg", stale)
    refused(m, "signature-invalid", "Release.gpg")
