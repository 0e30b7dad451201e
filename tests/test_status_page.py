"""The operators' page at `/`, read by a real browser: Debian's headless chromium, no JavaScript.

Two upstreams: `good` serves a Release that expires soon (a warning) and has a pin; `broken`
was synced once, then its upstream started signing with an unknown key (rejected, reason in
plain words) and it is on hold. The page must say all of it, and the `sources.list` line to
copy must name the address the browser used (nginx's, when nginx proxies the page).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aptguard.reasons import ADVICE
from aptguard.store import FileStore
from fixtures.keys import write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror
from tests.servers import Nginx, raw_get

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="chromium is not installed (make debs)"
)


def chromium(*args: str, workdir: Path) -> subprocess.CompletedProcess[bytes]:
    assert CHROMIUM is not None, "chromium is required in CI (Makefile DEBS)"
    profile = workdir / "profile"
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-javascript",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )


@pytest.fixture(scope="module")
def page_mirror(tmp_path_factory: pytest.TempPathFactory, keys, deb_cache: Path) -> Iterator[tuple[Mirror, Nginx]]:
    work = tmp_path_factory.mktemp("page")
    key, stranger = keys("page"), keys("page-stranger")
    ring = write_keyring(work / "keys" / "page.asc", [key])
    now = dt.datetime.now(dt.UTC)
    repos, servers = {}, []
    for name in ("good", "broken"):
        repo = Repo(work / "repos" / name, deb_cache)
        repo.add("stable", "main", "amd64", f"{name}-tool", "1.0-1")
        repo.publish("stable", [key], valid_until=now + dt.timedelta(hours=20) if name == "good" else None)
        repos[name] = repo
        servers.append(Upstream(repo.root).start())
    mirror = Mirror(
        work / "mirror",
        {
            name: {
                "url": up.url,
                "suites": ["stable"],
                "components": ["main"],
                "architectures": ["amd64"],
                "keyring": ring,
            }
            for name, up in zip(repos, servers, strict=True)
        },
    )
    assert mirror.sync().returncode == 0
    repos["broken"].publish("stable", [stranger], date=now + dt.timedelta(seconds=5))
    assert mirror.sync("broken").returncode == 1
    store = FileStore(mirror.data)
    store.set_pin("ci-good", "good", store.current("good") or "", expect=None)
    state = store.read_state("broken")
    state.hold = True
    store.write_state("broken", state)
    mirror.start_server()
    nginx = Nginx(mirror, work / "nginx").start()
    yield mirror, nginx
    nginx.stop()
    mirror.stop_server()
    for up in servers:
        up.stop()


def test_status_page_says_what_an_operator_must_know(page_mirror, tmp_path: Path) -> None:
    mirror, _ = page_mirror
    store = FileStore(mirror.data)
    run = chromium("--dump-dom", mirror.url + "/", workdir=tmp_path)
    dom = run.stdout.decode()
    assert "<h1>aptguard</h1>" in dom, run.stderr.decode()[-2000:]
    text = " ".join(dom.split())
    for name in ("good", "broken"):
        assert f'id="up-{name}"' in dom
        assert store.current(name) in text
    # broken: rejected, with the reason code, its detail and what to do, on hold
    assert "signature-unknown-key" in text
    assert "refused; clients keep being served the previous snapshot" in text
    assert ADVICE["signature-unknown-key"].replace("&", "&amp;") in text
    assert "on hold" in text
    assert "last sync rejected" in text
    # good: the Valid-Until warning, the pin, and the line to copy
    assert "the served Release expires in" in text
    assert "ci-good" in text and "/pins/ci-good/" in text
    assert f"deb [signed-by=/etc/apt/keyrings/good.asc] {mirror.url}/good stable main" in text
    assert "Trusted keys" in text


def test_status_page_needs_no_javascript(page_mirror) -> None:
    mirror, _ = page_mirror
    status, headers, body = raw_get(mirror.url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<script" not in body.lower() and b"javascript:" not in body.lower()


def test_status_page_through_nginx_shows_nginx_address(page_mirror, tmp_path: Path) -> None:
    mirror, nginx = page_mirror
    dom = chromium("--dump-dom", nginx.url + "/", workdir=tmp_path).stdout.decode()
    assert f"deb [signed-by=/etc/apt/keyrings/good.asc] {nginx.url}/good stable main" in " ".join(dom.split())


def test_status_page_screenshot(page_mirror, tmp_path: Path) -> None:
    mirror, _ = page_mirror
    shot = tmp_path / "status.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1200,900", mirror.url + "/", workdir=tmp_path)
    assert shot.exists(), run.stderr.decode()[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # a rendered page, not a blank one
    if target := os.environ.get("APTGUARD_SCREENSHOT"):
        shutil.copyfile(shot, target)
