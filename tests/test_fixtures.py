"""The fixtures are real: the real apt-get accepts what they publish and refuses, in its
own words, each fault that aptguard must refuse before a client ever sees it."""

from __future__ import annotations

import datetime as dt
import http.client
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fixtures.apt import AptClient, AptResult
from fixtures.keys import multi_clearsign, verify_status, write_keyring
from fixtures.repo import Repo, build_deb
from fixtures.upstream import Upstream

SUITE = "stable"
NOW = dt.datetime.now(dt.UTC)


def small_repo(repo: Repo, **publish: object) -> Repo:
    """One package in main/amd64, published with `publish` (keys= required)."""
    repo.add(SUITE, "main", "amd64", "hello", "1.0-1")
    repo.publish(SUITE, **publish)  # type: ignore[arg-type]
    return repo


def update_with(client: AptClient, upstream: Upstream, key_path: Path, suite: str = SUITE) -> AptResult:
    client.set_sources([client.source_line(upstream.url, suite, ["main"], key_path)])
    return client.update()


def assert_refused(result: AptResult, *words: str) -> None:
    """apt refused, and said so with these words."""
    assert not result.ok, result.output
    for word in words:
        assert word in result.output, result.output


# -- keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expired", "revoked", "status"),
    [(False, False, "GOODSIG"), (True, False, "EXPKEYSIG"), (False, True, "REVKEYSIG")],
)
def test_keys_give_the_intended_gpg_status(keys, tmp_path, expired, revoked, status) -> None:
    key = keys(f"k-{status.lower()}", expired=expired, revoked=revoked)
    ring = write_keyring(tmp_path / "ring.asc", [key])
    data = b"Origin: Example\n"
    for signed, plain in ((key.clearsign(data), None), (key.detach_sign(data), data)):
        lines = verify_status(ring, signed, plain)
        assert any(line.startswith(f"{status} ") for line in lines), lines
        assert any(line.startswith(f"VALIDSIG {key.fingerprint} ") for line in lines), lines


def test_multi_signature_carries_one_signature_per_key(keys, tmp_path) -> None:
    good, old = keys("good"), keys("old", expired=True)
    lines = verify_status(
        write_keyring(tmp_path / "ring.gpg", [good, old], armored=False), multi_clearsign(b"x\n", [old, good])
    )
    assert [line.split()[0] for line in lines if line.split()[0] in ("GOODSIG", "EXPKEYSIG")] == [
        "EXPKEYSIG",
        "GOODSIG",
    ]


# -- packages and repositories ------------------------------------------------------------


def test_build_deb_is_a_real_cached_package(deb_cache) -> None:
    deb = build_deb(deb_cache, "cached", "1:2.0-1", size=5000)
    assert deb.name == "cached_2.0-1_amd64.deb" and 5000 <= deb.stat().st_size < 6000
    assert build_deb(deb_cache, "cached", "1:2.0-1", size=5000) == deb
    assert build_deb(deb_cache, "cached", "1:2.0-1", size=5000, salt="x").read_bytes() != deb.read_bytes()
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Package", "Version"], capture_output=True, text=True, check=True
    ).stdout
    assert fields == "Package: cached\nVersion: 1:2.0-1\n"


def test_debian_style_repository_updates_and_downloads(keys, repo, serve, apt_client) -> None:
    r = repo()
    for comp in ("main", "contrib"):
        for arch in ("amd64", "arm64"):
            r.add(SUITE, comp, arch, f"tool-{comp}", "1.0-1")
    r.add(SUITE, "main", "amd64", "libthing1", "2:3.1-4")
    r.publish(SUITE, [keys("debian")])
    up = serve(r, prefix="/debian/")
    client = apt_client()
    client.set_sources([client.source_line(up.url, SUITE, ["main", "contrib"], keys("debian").public_path)])
    result = client.update()
    assert result.ok, result.output
    assert up.count("dists/stable/main/binary-amd64/by-hash/SHA512/*") == 1  # apt used by-hash
    assert client.available("libthing1") == "2:3.1-4"
    got = client.download("libthing1")
    assert got.ok and [f.read_bytes() for f in got.files] == [
        r.deb_path(SUITE, "main", "amd64", "libthing1").read_bytes()
    ]
    assert r.path("pool/main/libt/libthing1/libthing1_3.1-4_amd64.deb").is_file()
    assert not r.path("dists/stable/main/binary-amd64/Packages").exists()  # listed, absent: as Debian

    r.add(SUITE, "contrib", "amd64", "tool-contrib", "1.1-1")
    r.publish(SUITE, [keys("debian")])
    assert client.update().ok and client.available("tool-contrib") == "1.1-1"


def test_docker_style_repository_updates_and_downloads(keys, repo, serve, apt_client) -> None:
    r = repo()
    r.add("bookworm", "stable", "amd64", "docker-thing", "5:27.0.1-1~debian.12~bookworm", pool="docker")
    r.publish(
        "bookworm",
        [keys("docker")],
        origin="Docker",
        label="Docker CE",
        by_hash=False,
        translations=False,
        compressions=("", "gz"),
        list_uncompressed=False,
    )
    up = serve(r, prefix="/linux/debian/")
    client = apt_client()
    client.set_sources([client.source_line(up.url, "bookworm", ["stable"], keys("docker").public_path)])
    assert (result := client.update()).ok, result.output
    assert "by-hash" not in "".join(up.requests)
    got = client.download("docker-thing")
    assert got.ok, got.output
    assert up.count("dists/bookworm/pool/stable/amd64/docker-thing_27.0.1-1~debian.12~bookworm_amd64.deb") == 1


def test_co_signed_repository_is_accepted_with_one_trusted_key(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("other"), keys("debian")])
    assert (result := update_with(apt_client(), upstream, keys("debian").public_path)).ok, result.output


@pytest.mark.parametrize("state", ["expired", "revoked"])
def test_apt_accepts_a_good_signature_beside_an_expired_or_revoked_one(
    keys, repo, upstream, apt_client, tmp_path, state
) -> None:
    """apt 2.6 counts EXPKEYSIG/REVKEYSIG as worthless, not bad: one good trusted signature is enough."""
    weak = keys(state, expired=state == "expired", revoked=state == "revoked")
    small_repo(repo(), keys=[weak, keys("debian")])
    ring = write_keyring(tmp_path / "both.asc", [weak, keys("debian")])
    assert (result := update_with(apt_client(), upstream, ring)).ok, result.output


def test_release_gpg_only_repository_is_accepted(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("debian")], inrelease=False)
    assert (result := update_with(apt_client(), upstream, keys("debian").public_path)).ok, result.output
    assert upstream.count("dists/stable/Release.gpg") == 1


def test_deb822_sources_and_binary_keyring(keys, repo, upstream, apt_client, tmp_path) -> None:
    small_repo(repo(), keys=[keys("debian")])
    ring = write_keyring(tmp_path / "debian.gpg", [keys("debian")], armored=False)
    client = apt_client()
    client.set_sources_deb822(
        f"Types: deb\nURIs: {upstream.url}\nSuites: {SUITE}\nComponents: main\nSigned-By: {ring}\n"
    )
    assert (result := client.update()).ok, result.output


# -- what apt refuses ------------------------------------------------------------------------


def test_apt_refuses_unknown_key(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("other")])
    result = update_with(apt_client(), upstream, keys("debian").public_path)
    assert_refused(result, "NO_PUBKEY " + keys("other").fingerprint[-16:], "is not signed")


def test_apt_refuses_expired_key(keys, repo, upstream, apt_client) -> None:
    old = keys("old", expired=True)
    small_repo(repo(), keys=[old])
    assert_refused(update_with(apt_client(), upstream, old.public_path), "EXPKEYSIG " + old.fingerprint[-16:])


def test_apt_refuses_revoked_key(keys, repo, upstream, apt_client) -> None:
    gone = keys("gone", revoked=True)
    small_repo(repo(), keys=[gone])
    assert_refused(update_with(apt_client(), upstream, gone.public_path), "REVKEYSIG " + gone.fingerprint[-16:])


def test_apt_refuses_sha1_signature(keys, repo, upstream, apt_client) -> None:
    # apt 2.6 names no reason, only the full fingerprint after "were invalid:" (no EXPKEYSIG-like token).
    small_repo(repo(), keys=[keys("debian")], digest="SHA1")
    result = update_with(apt_client(), upstream, keys("debian").public_path)
    assert_refused(result, "The following signatures were invalid: " + keys("debian").fingerprint)


def test_apt_refuses_text_outside_the_signed_block(keys, repo, upstream, apt_client) -> None:
    r = small_repo(repo(), keys=[keys("debian")])
    inrelease = r.path("dists/stable/InRelease")
    r.replace_file("dists/stable/InRelease", inrelease.read_bytes() + b"Label: Evil\n")
    result = update_with(apt_client(), upstream, keys("debian").public_path)
    assert_refused(result, "InRelease into data and signature failed")


def test_apt_refuses_expired_valid_until(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("debian")], date=NOW - dt.timedelta(days=8), valid_until=NOW - dt.timedelta(days=1))
    assert_refused(update_with(apt_client(), upstream, keys("debian").public_path), "is expired")


def test_apt_refuses_date_in_the_future(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("debian")], date=NOW + dt.timedelta(hours=1))
    assert_refused(update_with(apt_client(), upstream, keys("debian").public_path), "is not valid yet")


def test_apt_refuses_corrupted_index(keys, repo, upstream, apt_client) -> None:
    r = small_repo(repo(), keys=[keys("debian")])
    r.corrupt("dists/stable/main/binary-amd64/Packages.xz")
    assert_refused(update_with(apt_client(), upstream, keys("debian").public_path), "Hash Sum mismatch")


def test_apt_refuses_truncated_index(keys, repo, upstream, apt_client) -> None:
    r = small_repo(repo(), keys=[keys("debian")], by_hash=False)
    r.truncate("dists/stable/main/binary-amd64/Packages.xz")
    assert_refused(update_with(apt_client(), upstream, keys("debian").public_path), "unexpected size")


def test_apt_refuses_half_published_indices(keys, repo, upstream, apt_client) -> None:
    r = small_repo(repo(), keys=[keys("docker")], by_hash=False)
    r.add(SUITE, "main", "amd64", "newer", "1.0")
    r.publish_indices_only(SUITE, by_hash=False)
    result = update_with(apt_client(), upstream, keys("docker").public_path)
    assert_refused(result, "unexpected size")


def test_apt_refuses_a_changed_label(keys, repo, upstream, apt_client) -> None:
    r = small_repo(repo(), keys=[keys("docker")], label="Docker CE")
    client = apt_client()
    assert update_with(client, upstream, keys("docker").public_path).ok
    r.publish(SUITE, [keys("docker")], label="Docker EE")
    assert_refused(client.update(), "changed its 'Label' value from 'Docker CE' to 'Docker EE'")
    assert client.update("--allow-releaseinfo-change").ok


# -- the upstream's transport faults ------------------------------------------------------


def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_upstream_serves_files_and_404(repo, serve) -> None:
    r = repo()
    r.replace_file("dists/x/file", b"hello")
    up = serve(r, prefix="/sub/")
    assert fetch(up.url + "dists/x/file") == (200, b"hello")
    assert fetch(up.url + "dists/x/file", "HEAD") == (200, b"")
    assert fetch(up.url + "dists/x/missing")[0] == 404
    assert fetch(up.url + "../../etc/passwd")[0] == 404
    assert fetch(up.url.replace("/sub/", "/") + "dists/x/file")[0] == 404
    assert up.count("dists/x/*") == 3


def test_upstream_faults(repo, serve) -> None:
    r = repo()
    r.replace_file("f", b"0123456789")
    up = serve(r)
    up.fault("f", "status", code=503, count=1)
    assert fetch(up.url + "f")[0] == 503 and fetch(up.url + "f") == (200, b"0123456789")
    up.fault("f", "body", data=b"evil", count=1)
    assert fetch(up.url + "f") == (200, b"evil")
    up.fault("f", "truncate", count=1)
    with pytest.raises(http.client.IncompleteRead):
        fetch(up.url + "f")
    up.fault("f", "drop", count=1)
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected)):
        fetch(up.url + "f")
    up.fault("f", "redirect", location="file:///etc/passwd", count=1)
    assert fetch(up.url + "f")[0] == 302  # urllib will not follow http -> file
    up.fault("f", "endless", limit=3 * 1024 * 1024, count=1)
    assert len(fetch(up.url + "f")[1]) == 3 * 1024 * 1024
    up.fault("f", "slow", seconds=0.3, count=1)
    assert fetch(up.url + "f") == (200, b"0123456789")
    up.down()
    with pytest.raises(urllib.error.URLError):
        fetch(up.url + "f")
    up.up()
    assert fetch(up.url + "f") == (200, b"0123456789")


def test_apt_sees_a_5xx_upstream_as_a_failure(keys, repo, upstream, apt_client) -> None:
    small_repo(repo(), keys=[keys("debian")])
    upstream.fault("dists/*/InRelease", "status", code=503)
    assert_refused(update_with(apt_client(), upstream, keys("debian").public_path), "503")
    assert upstream.count("dists/stable/Release*") == 0  # no fallback to Release on a 5xx


def test_apt_exits_0_when_a_fresh_client_cannot_connect(keys, repo, upstream, apt_client) -> None:
    """Why AptResult.ok reads the W: lines: apt exits 0 although it fetched nothing."""
    small_repo(repo(), keys=[keys("debian")])
    upstream.fault("dists/stable/InRelease", "drop")
    result = update_with(apt_client(), upstream, keys("debian").public_path)
    assert result.returncode == 0 and not result.ok
    assert "W: Failed to fetch" in result.output and "Connection failed" in result.output


def test_apt_falls_back_to_release_gpg_on_refused_redirect_or_oversized_inrelease(
    keys, repo, upstream, apt_client
) -> None:
    """Not only a 404 makes apt fall back to Release + Release.gpg: a redirect to file:// and an
    InRelease past apt's 10 MB cap do too. Here both end in success through Release.gpg."""
    small_repo(repo(), keys=[keys("debian")])
    upstream.fault("dists/stable/InRelease", "redirect", location="file:///etc/passwd", count=1)
    upstream.fault("dists/stable/InRelease", "endless", limit=12 * 1024 * 1024, count=1)
    for name in ("redirected", "flooded"):
        result = update_with(apt_client(name), upstream, keys("debian").public_path)
        assert result.ok and "Ign:1" in result.output, result.output
    assert upstream.count("dists/stable/Release.gpg") == 2
