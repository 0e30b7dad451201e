"""A hostile upstream can only fail its own sync (SPEC guarantee 9).

Each case is an attack found in review, replayed end to end: the upstream (or anyone on the
path to it) answers the way the attack needs, without any signing key unless the case says
the upstream's own key vouches for the bytes. Every case checks the same story:
1. the attack is real: the real apt-get, pointed straight at the upstream, refuses it (or,
   where apt accepts it, that the old aptguard did not);
2. `aptguard sync` ends the hostile upstream's sync with a clear reason (no traceback) and
   within its limits;
3. a healthy second upstream, synced in the same run after the hostile one, is promoted;
4. every URL the mirror served is byte for byte unchanged, and a fresh client still updates.
"""

from __future__ import annotations

import base64
import bz2
import os
import resource
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.keys import SigningKey, _armor_signature, forged_clearsign, write_keyring
from fixtures.repo import Repo
from fixtures.upstream import Upstream
from tests.mirror import Mirror
from tests.test_sync_faults import SUITE, Scene, make_scene, refused  # noqa: F401 - make_scene: a fixture

STRANGER = "C0FFEE00" * 5  # a fingerprint no keyring holds


@dataclass
class Neighbour:
    """A healthy upstream `ok` of the same mirror, synced after the hostile `up` in every run."""

    repo: Repo
    upstream: Upstream
    key: SigningKey
    version: int = 1

    def new_release(self) -> None:
        self.version += 1
        self.repo.add(SUITE, "main", "amd64", "calm", f"{self.version}.0")
        self.repo.publish(SUITE, [self.key])


@pytest.fixture
def hostile(
    request: pytest.FixtureRequest, repo: Callable[..., Repo], serve, tmp_path: Path
) -> tuple[Scene, Neighbour]:
    scene = request.getfixturevalue("make_scene")()
    # Every aptguard command from here on gets a temp folder and a home of its own outside the
    # data folder: assert_only_its_own_sync_fails checks that no attack made it write there.
    outside = tmp_path / "outside"
    scene.mirror.env = {k: str(outside / k.lower()) for k in ("TMPDIR", "HOME", "GNUPGHOME")}
    for folder in scene.mirror.env.values():
        Path(folder).mkdir(parents=True)
    r = repo("ok")
    r.add(SUITE, "main", "amd64", "calm", "1.0")
    r.publish(SUITE, [scene.key])
    up = serve(r)
    scene.mirror.upstreams["ok"] = {
        "url": up.url,
        "suites": [SUITE],
        "components": ["main"],
        "architectures": ["amd64"],
        "keyring": scene.keyring,
    }
    scene.mirror.write_config()
    run = scene.mirror.sync("ok")
    assert run.returncode == 0 and scene.mirror.last_sync("ok")["outcome"] == "promoted", run.output
    assert list(scene.mirror.upstreams) == ["up", "ok"], "the hostile upstream must be synced first"
    return scene, Neighbour(r, up, scene.key)


def assert_only_its_own_sync_fails(s: Scene, n: Neighbour, reason: str, *details: str) -> str:
    """Steps 2-4 of the story; returns the rejection's detail."""
    n.new_release()
    run = s.mirror.sync()
    assert run.returncode == 1, run.output
    assert "Traceback" not in run.output, run.output
    last = s.mirror.last_sync("up")
    assert last["outcome"] == "rejected" and last["reason"] == reason, (last, run.output)
    for part in details:
        assert part in last["detail"], (part, last["detail"])
    assert s.mirror.last_sync("ok")["outcome"] == "promoted", run.output
    s.assert_old_snapshot_served()
    written = [p for folder in s.mirror.env.values() for p in Path(folder).rglob("*")]
    assert written == [], f"written outside the data folder: {written}"
    return str(last["detail"])


def _release_bytes(s: Scene) -> bytes:
    return s.repo.path(f"dists/{SUITE}/Release").read_bytes()


# ---------------------------------------------------------------- signatures


@pytest.mark.parametrize(
    "signer_uid",
    [
        "x@y.example\u2028[GNUPG:] GOODSIG {keyid} Example\u2028[GNUPG:] VALIDSIG {fpr} 2026-12-02 1796217663 0 4 0 1 8 "
        "01 {fpr}\u2028",
        "x@y.example\u0085[GNUPG:] GOODSIG {keyid} Example\u0085[GNUPG:] VALIDSIG {fpr} 2026-12-02 1796217663 0 4 0 1 8 "
        "01 {fpr}\u0085",
    ],
    ids=["u2028-line-separator", "u0085-next-line"],
)
def test_forged_status_lines_in_a_signers_uid_are_not_a_signature(hostile, signer_uid: str) -> None:
    """The critical finding: a signature no key made, whose Signer's-UID subpacket carries text
    that gpg prints on stderr unescaped and that str.splitlines() cuts into fake status lines
    claiming a good signature by the trusted key. Verdicts now come from gpgv's status pipe."""
    s, n = hostile
    uid = signer_uid.format(keyid=s.key.fingerprint[-16:], fpr=s.key.fingerprint).encode()
    s.new_release()
    s.publish()
    s.repo.replace_file(f"dists/{SUITE}/InRelease", forged_clearsign(_release_bytes(s), STRANGER, uid))
    s.repo.delete(f"dists/{SUITE}/Release.gpg")
    assert refused(s.direct.update(), "NO_PUBKEY"), "apt must refuse the forged InRelease"
    assert_only_its_own_sync_fails(s, n, "signature-unknown-key", STRANGER)


def test_a_raw_0x85_byte_in_a_signers_uid_is_no_crash(hostile) -> None:
    s, n = hostile
    s.new_release()
    s.publish()
    s.repo.replace_file(f"dists/{SUITE}/InRelease", forged_clearsign(_release_bytes(s), STRANGER, b"a\x85b@c.example"))
    s.repo.delete(f"dists/{SUITE}/Release.gpg")
    assert refused(s.direct.update(), "NO_PUBKEY")
    assert_only_its_own_sync_fails(s, n, "signature-unknown-key", STRANGER)


@pytest.mark.parametrize(
    ("mangle", "apt_says"),
    [
        (lambda d: b"\n" + d, "does not start with a signed message block|NOSPLIT|Splitting"),
        (lambda d: b"   \n" + d, "does not start with a signed message block|NOSPLIT|Splitting"),
        (lambda d: d + b"\n", "unsigned lines|NOSPLIT|Splitting"),
        (lambda d: d + b"\f\n", "unsigned lines|NOSPLIT|Splitting"),
    ],
    ids=["blank-line-before", "spaces-line-before", "blank-line-after", "form-feed-line-after"],
)
def test_framing_gpg_accepts_but_apt_refuses_is_refused(hostile, mangle, apt_says: str) -> None:
    """A keyless attacker adds a blank line: gpg still verifies, apt refuses to split the file.
    Promoting it would break every client's apt-get update."""
    s, n = hostile
    s.new_release()
    s.publish()
    inrelease = s.repo.path(f"dists/{SUITE}/InRelease").read_bytes()
    s.repo.replace_file(f"dists/{SUITE}/InRelease", mangle(inrelease))
    assert refused(s.direct.update(), apt_says), "apt must refuse the mangled InRelease"
    assert_only_its_own_sync_fails(s, n, "signature-invalid", "apt refuses it")


@pytest.mark.parametrize(
    "mangle",
    [lambda d: d.replace(b"\n", b"\r\n"), lambda d: d.replace(b"Hash: SHA256\n", b"")],
    ids=["crlf-line-ends", "no-hash-armor-header"],
)
def test_framing_apt_accepts_is_promoted_and_served(hostile, mangle) -> None:
    """apt splits the file itself, so it accepts these although gpg refuses them as they are."""
    s, n = hostile
    s.new_release()
    s.publish()
    inrelease = s.repo.path(f"dists/{SUITE}/InRelease").read_bytes()
    s.repo.replace_file(f"dists/{SUITE}/InRelease", mangle(inrelease))
    s.repo.delete(f"dists/{SUITE}/Release.gpg")
    s.repo.delete(f"dists/{SUITE}/Release")
    direct = s.direct.update()
    assert direct.ok, direct.output
    n.new_release()
    run = s.mirror.sync()
    assert run.returncode == 0, run.output
    assert s.mirror.last_sync("up")["outcome"] == "promoted"
    client = s.client()
    assert client.update().ok
    assert client.available("hello") == "2.0"


# ---------------------------------------------------------------- signed metadata that crashed the run


def test_an_index_listed_only_under_md5sum_is_refused_not_a_crash(hostile) -> None:
    s, n = hostile
    s.new_release()
    s.publish(hashes=("MD5Sum", "SHA256"))
    release = _release_bytes(s).decode()
    head, sep, sha256 = release.partition("SHA256:\n")
    # The Packages entries leave the SHA256 list: only MD5Sum vouches for them.
    kept = "".join(line + "\n" for line in sha256.splitlines() if "binary-amd64/Packages" not in line)
    release = (head + sep + kept).encode()
    s.repo.replace_file(f"dists/{SUITE}/Release", release)
    s.repo.replace_file(f"dists/{SUITE}/InRelease", s.key.clearsign(release))
    s.repo.replace_file(f"dists/{SUITE}/Release.gpg", s.key.detach_sign(release))
    assert_only_its_own_sync_fails(s, n, "release-invalid", "binary-amd64/Packages", "SHA256")


def test_a_size_in_non_ascii_digits_is_refused_not_a_crash(hostile) -> None:
    """`"²".isdigit()` is True and `int("²")` raises: sizes are ASCII digits only, as in apt."""
    s, n = hostile
    s.new_release()
    s.publish(compressions=("",), by_hash=False)
    rel = "main/binary-amd64/Packages"
    packages = s.repo.path(f"dists/{SUITE}/{rel}").read_bytes()
    stanzas = packages.split(b"\n\n")
    hello = next(i for i, st in enumerate(stanzas) if b"Package: hello" in st)
    size_line = next(line for line in stanzas[hello].split(b"\n") if line.startswith(b"Size: "))
    stanzas[hello] = stanzas[hello].replace(size_line, "Size: ²".encode())
    s.repo.resign(SUITE, [s.key], {rel: b"\n\n".join(stanzas)})
    assert_only_its_own_sync_fails(s, n, "index-mismatch", "Size")


def test_valid_until_in_year_9999_west_of_utc_is_refused_as_apt_refuses_it(hostile) -> None:
    """Year 9999 at -1200 is past Python's datetime range in UTC: it used to crash the whole run.
    apt reads dates in UTC only (GMT, UTC, Z or a zero offset) and refuses this Valid-Until."""
    s, n = hostile
    s.new_release()
    s.publish(extra_fields={"Valid-Until": "Fri, 31 Dec 9999 23:00:00 -1200"})
    assert refused(s.direct.update(), "Valid-Until|weak security information")
    assert_only_its_own_sync_fails(s, n, "release-invalid", "Valid-Until")


def test_valid_until_in_year_9999_utc_is_far_future_as_for_apt(hostile) -> None:
    s, n = hostile
    s.new_release()
    s.publish(extra_fields={"Valid-Until": "Fri, 31 Dec 9999 23:59:59 UTC"})
    assert s.direct.update().ok
    n.new_release()
    run = s.mirror.sync()
    assert run.returncode == 0 and "Traceback" not in run.output, run.output
    assert s.mirror.last_sync("up")["outcome"] == "promoted" and s.mirror.last_sync("ok")["outcome"] == "promoted"
    client = s.client()
    assert client.update().ok and client.available("hello") == "2.0"
    assert s.mirror.run("status").returncode == 0


# ---------------------------------------------------------------- answers that crashed the run


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("InRelease", [("Location", "http://127.0.0.1:99999/x"), ("Content-Length", "0")]),
        ("InRelease", [("Location", "http://a..b/x"), ("Content-Length", "0")]),
        ("Packages", [("Location", "http://127.0.0.1:99999/x"), ("Content-Length", "0")]),
        ("InRelease", [("Content-Length", "²")]),
        ("Packages", [("Content-Length", "²")]),
    ],
    ids=["inrelease-redirect-port-99999", "inrelease-redirect-host-a..b", "index-redirect-port-99999",
         "inrelease-content-length-superscript", "index-content-length-superscript"],
)  # fmt: skip
def test_a_hostile_http_answer_is_unreachable_not_a_crash(hostile, target: str, headers) -> None:
    """Each of these ended the whole `aptguard sync` with a traceback; later upstreams never synced."""
    s, n = hostile
    s.new_release()
    s.publish(by_hash=False)
    rel = f"dists/{SUITE}/InRelease" if target == "InRelease" else f"dists/{SUITE}/main/binary-amd64/Packages.xz"
    code = 302 if headers[0][0] == "Location" else 200
    s.upstream.fault(rel, "raw", code=code, headers=headers, data=b"")
    direct = s.direct.update()
    assert not direct.ok, f"apt must not take this answer:\n{direct.output}"
    assert_only_its_own_sync_fails(s, n, "unreachable", rel)


# ---------------------------------------------------------------- bounded work


def _compressed_packet(inner: bytes) -> bytes:
    """An OpenPGP compressed-data packet (old format, indeterminate length), ZIP (raw deflate)."""
    return b"\xa3\x01" + inner


def signature_bomb(gibibytes: int) -> bytes:
    """An armored 'signature' of a few KB: a compressed packet holding a compressed packet
    holding a literal packet of `gibibytes` GiB of zeros, which gpg decompresses in full.

    Built without compressing gigabytes: once deflate's window is all zeros, every further
    16 MiB of zeros, sync-flushed, encodes to the same bytes, so the inner stream is one
    such block repeated (and that repetition deflates well again for the outer layer)."""
    zeros = bytes(1 << 24)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = squeeze.compress(b"\xaf" + b"b\x00\x00\x00\x00\x00" + zeros) + squeeze.flush(zlib.Z_SYNC_FLUSH)
    steady = squeeze.compress(zeros) + squeeze.flush(zlib.Z_SYNC_FLUSH)
    assert steady == squeeze.compress(zeros) + squeeze.flush(zlib.Z_SYNC_FLUSH), "deflate did not settle"
    inner = _compressed_packet(first + steady * (gibibytes * 64 - 1))
    outer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return _armor_signature(_compressed_packet(outer.compress(inner) + outer.flush()))


def _children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def test_a_signature_bomb_costs_at_most_gpgvs_time_limit(hostile) -> None:
    from aptguard.keyring import GPGV_SECONDS

    s, n = hostile
    s.new_release()
    s.publish(inrelease=False)  # Release + Release.gpg: the bomb is the Release.gpg
    bomb = signature_bomb(16)  # about 55 s of gpgv without a limit (3.4 s per GiB here)
    assert len(bomb) < 100_000, len(bomb)
    s.repo.replace_file(f"dists/{SUITE}/Release.gpg", bomb)
    started = time.monotonic()
    detail = assert_only_its_own_sync_fails(s, n, "too-large", "Release.gpg", "gpgv")
    took = time.monotonic() - started
    assert took < GPGV_SECONDS + 25, (took, detail)  # the sync, a client's update and download included
    assert _children_peak_rss_mib() < 300


def test_a_decompression_bomb_index_is_cut_at_max_index_bytes(hostile) -> None:
    """The upstream's own key signs a 200 KB Packages.bz2 that inflates to 512 MiB: it is cut at
    limits.max_index_bytes, with memory bounded, instead of taking the sync to gigabytes."""
    s, n = hostile
    s.mirror.top["limits"] = {"max_index_bytes": "64MiB"}
    s.mirror.write_config()
    s.new_release()
    s.publish(compressions=("bz2",), list_uncompressed=False, by_hash=False)
    squeeze = bz2.BZ2Compressor(9)
    block = bytes(1 << 24)
    bomb = b"".join(squeeze.compress(block) for _ in range(32)) + squeeze.flush()
    assert len(bomb) < 1_000_000
    s.repo.resign(SUITE, [s.key], {"main/binary-amd64/Packages.bz2": bomb})
    started = time.monotonic()
    assert_only_its_own_sync_fails(s, n, "too-large", "Packages.bz2")
    assert time.monotonic() - started < 120
    assert _children_peak_rss_mib() < 300


def test_a_trickling_upstream_is_cut_at_sync_timeout(hostile) -> None:
    """One byte every 2 s would hold a sync (and gc, which waits for syncs) for as long as the
    upstream likes; limits.sync_timeout ends it as `unreachable`."""
    s, n = hostile
    s.mirror.top["limits"] = {"sync_timeout": "4s", "min_rate": "0B/s"}
    s.mirror.write_config()
    s.new_release()
    s.publish()
    s.upstream.fault(f"dists/{SUITE}/InRelease", "trickle", interval=2.0)
    started = time.monotonic()
    assert_only_its_own_sync_fails(s, n, "unreachable", "sync_timeout")
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------- one failure never stops the run


def test_an_unexpected_failure_is_that_upstreams_internal_error_and_the_run_goes_on(hostile) -> None:
    """A failure nobody planned for (here: a damaged side file of the upstream's snapshot, which the
    sync parses) is a rejection with reason `internal-error`, its traceback in the data folder's
    log and not on the terminal; the next upstream syncs and what was served stays."""
    s, n = hostile
    side = next((s.mirror.data / "meta" / "up").glob("*.byhash.json"))
    side.write_text("{ not json")
    s.new_release()
    s.publish()
    assert_only_its_own_sync_fails(s, n, "internal-error", "JSONDecodeError", "aptguard.log")
    log = (s.mirror.data / "log" / "aptguard.log").read_text()
    assert "Traceback" in log and "sync up" in log, log[-2000:]


# ---------------------------------------------------------------- names and files


def test_an_upstream_named_gc_does_not_lock_itself_out(tmp_path: Path, keys, repo, serve) -> None:
    """Its lock file was locks/gc.lock, the collection lock every sync holds shared: a deadlock."""
    key = keys("upstream")
    r = repo()
    r.add(SUITE, "main", "amd64", "hello", "1.0")
    r.publish(SUITE, [key])
    up = serve(r)
    mirror = Mirror.single(tmp_path / "m", up.url, write_keyring(tmp_path / "k.asc", [key]), name="gc")
    run = mirror.sync(timeout=60)
    assert run.returncode == 0 and mirror.last_sync("gc")["outcome"] == "promoted", run.output


def test_nothing_is_written_outside_the_data_folder_across_a_kill(hostile) -> None:
    """gpg homes and signature files used to go to the system temp folder and leak on a kill.
    (The hostile fixture points TMPDIR, HOME and GNUPGHOME of every aptguard command outside.)"""
    s, n = hostile
    s.new_release()
    s.publish()
    # A run that is killed mid-sync: the InRelease never finishes arriving.
    s.upstream.fault(f"dists/{SUITE}/InRelease", "trickle", interval=1.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "aptguard", "--config", str(s.mirror.config), "sync", "up"],
        cwd=s.mirror.workdir,
        env={**os.environ, **s.mirror.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp = s.mirror.data / "tmp"
    deadline = time.monotonic() + 30
    while not any((tmp / e.name / "gnupg").is_dir() for e in tmp.iterdir() if e.name.startswith("sync+up+")):
        assert time.monotonic() < deadline, "the sync never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(e.name.startswith("sync+up+") for e in tmp.iterdir()), "the kill left no work folder to clean"
    s.upstream.clear_faults()
    n.new_release()
    run = s.mirror.sync()
    assert run.returncode == 0, run.output
    assert not any(e.name.startswith("sync+") for e in tmp.iterdir()), list(tmp.iterdir())
    written = [p for folder in s.mirror.env.values() for p in Path(folder).rglob("*")]
    assert written == [], f"written outside the data folder: {written}"
    client = s.client()
    assert client.update().ok and client.available("hello") == "2.0"


def test_the_fixture_bomb_really_is_one() -> None:
    """The signature bomb's inner literal packet really holds gigabytes (measured, not assumed)."""
    bomb = signature_bomb(1)
    body = b"".join(line for line in bomb.split(b"\n")[2:] if line and not line.startswith((b"=", b"-----")))
    outer = base64.b64decode(body)
    assert outer[:2] == b"\xa3\x01" and len(outer) < 20_000
    inner = zlib.decompress(outer[2:], -15)
    assert inner[:2] == b"\xa3\x01"
    stream = zlib.decompressobj(-15)
    total = 0
    for i in range(0, len(inner) - 2, 1 << 16):
        total += len(stream.decompress(inner[2 + i : 2 + i + (1 << 16)]))
    assert total > 1 << 30, total
