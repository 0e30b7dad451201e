"""Guarantee 2 under load: real apt-get clients updating in a loop while syncs promote new snapshots.

For a suite with `Acquire-By-Hash: yes` no client may fail: one that read the old InRelease
just before a promotion fetches its indices by hash, and every retained snapshot's by-hash
entries are in the new tree. For a suite without by-hash, a client that read the old
InRelease and then gets the new Packages sees "Hash Sum mismatch" until its next update; the
rate is measured and printed (it cannot be zero without re-signing the Release).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.apt import AptClient, AptResult
from tests.servers import Site, SlowLink, update_storm

CLIENTS = 20
PROMOTIONS = 4
PACKAGES = 40  # a bigger index widens the window between InRelease and the index fetch


def build(tmp_path: Path, keys, deb_cache: Path, *, by_hash: bool, publish: dict[str, object] | None = None) -> Site:
    # The embedded server as a fleet runs it: two workers, each holding InRelease and indices in
    # memory, must both follow every promotion.
    site = Site(tmp_path / "site", keys("concurrency"), deb_cache, by_hash=by_hash, workers=2, publish=publish)
    for i in range(PACKAGES):
        site.repo.add(Site.SUITE, "main", "amd64", f"filler{i:03d}", "1.0-1", size=512)
    site.new_version()
    return site


@pytest.fixture
def by_hash_site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[Site]:
    site = build(tmp_path, keys, deb_cache, by_hash=True)
    yield site
    site.close()


@pytest.fixture
def plain_site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[Site]:
    site = build(tmp_path, keys, deb_cache, by_hash=False)
    yield site
    site.close()


@pytest.fixture
def published_site(tmp_path: Path, keys, deb_cache: Path) -> Iterator[Site]:
    """An upstream without by-hash whose mirror serves a view re-signed with the mirror's key."""
    mirror_key = keys("concurrency-mirror")
    secret = mirror_key.secret_file(tmp_path / "mirror.key")
    site = build(tmp_path, keys, deb_cache, by_hash=False, publish={"sign_with": [str(secret)]})
    site.keyring = mirror_key.public_path  # what the clients trust: the mirror's key alone
    yield site
    site.close()


DELAY = 0.3  # seconds each index request takes on the clients' slow link


def storm(site: Site, server: str, tmp_path: Path, max_seconds: float = 45) -> tuple[list[AptResult], list[AptClient]]:
    """CLIENTS apt-get update loops against `server` while PROMOTIONS syncs promote; all results.

    Half the clients are fresh CI runners (no lists: every update reads InRelease and then its
    indices), half are long-lived hosts (If-Modified-Since, indices only after a promotion).
    All reach the server over a slow link, so some are always between InRelease and the indices.
    """
    link = SlowLink(site.url(server), DELAY).start()
    clients = [AptClient(tmp_path / server / f"c{i:02d}") for i in range(CLIENTS)]
    for client in clients:
        client.set_sources([client.source_line(f"{link.url}/example", Site.SUITE, ["main"], site.keyring)])
    try:
        results = update_storm(clients, site.new_version, promotions=PROMOTIONS, pause=DELAY, max_seconds=max_seconds)
    finally:
        link.stop()
    for client in clients:  # afterwards, straight to the server
        client.set_sources([client.source_line(f"{site.url(server)}/example", Site.SUITE, ["main"], site.keyring)])
    return results, clients


@pytest.mark.slow
@pytest.mark.parametrize("server", ["embedded", "nginx"])
def test_by_hash_suite_updates_never_fail_during_promotions(by_hash_site: Site, server: str, tmp_path: Path) -> None:
    results, clients = storm(by_hash_site, server, tmp_path)
    failures = [r.output for r in results if not r.ok]
    print(f"\nby-hash, {server}: {len(results)} updates, {len(failures)} failed")
    assert len(results) >= 2 * CLIENTS
    assert failures == [], f"{len(failures)} of {len(results)} updates failed; first:\n{failures[0]}"
    # The clients did follow the promotions: their lists end on the last version.
    final = f"{by_hash_site.version}.0-1"
    assert all(c.update().ok for c in clients[:3])
    assert {c.available("hello") for c in clients[:3]} == {final}


@pytest.mark.slow
def test_suite_without_by_hash_fails_only_transiently(plain_site: Site, tmp_path: Path) -> None:
    """Measured, not zero: the old InRelease names the old Packages, and /NAME/... now serves the new one."""
    results, clients = storm(plain_site, "embedded", tmp_path)
    failed = [r for r in results if not r.ok]
    rate = len(failed) / len(results)
    mismatches = sum("Hash Sum mismatch" in r.output or "File has unexpected size" in r.output for r in failed)
    report = {"updates": len(results), "failed": len(failed), "hash_mismatch": mismatches, "rate": round(rate, 4)}
    print(f"\nwithout by-hash: {json.dumps(report)}")
    (tmp_path / "no-by-hash-rate.json").write_text(json.dumps(report))
    assert all(r.ok or "Hash Sum mismatch" in r.output or "unexpected size" in r.output for r in results), [
        r.output for r in failed if "mismatch" not in r.output
    ][:1]
    # Once promotions stop, every client recovers on its next update.
    recovered = [c.update() for c in clients]
    assert all(r.ok for r in recovered), [r.output for r in recovered if not r.ok][:1]
    assert {c.available("hello") for c in clients} == {f"{plain_site.version}.0-1"}


@pytest.mark.slow
@pytest.mark.parametrize("server", ["embedded", "nginx"])
def test_a_published_view_of_a_suite_without_by_hash_never_fails_during_promotions(
    published_site: Site, server: str, tmp_path: Path
) -> None:
    """The same upstream as above (no by-hash), served as a published view: the mirror's Release
    has by-hash, so the failures measured above drop to none."""
    upstream = (published_site.repo.root / f"dists/{Site.SUITE}/InRelease").read_bytes()
    assert b"Acquire-By-Hash" not in upstream  # the upstream really has no by-hash
    results, clients = storm(published_site, server, tmp_path)
    failures = [r.output for r in results if not r.ok]
    print(f"\npublished view of a suite without by-hash, {server}: {len(results)} updates, {len(failures)} failed")
    assert len(results) >= 2 * CLIENTS
    assert failures == [], f"{len(failures)} of {len(results)} updates failed; first:\n{failures[0]}"
    final = f"{published_site.version}.0-1"
    assert all(c.update().ok for c in clients[:3])
    assert {c.available("hello") for c in clients[:3]} == {final}
