"""The trust boundary on its own: real gpg signatures in, a verdict out, as apt would judge.

These call aptguard.verify directly (no network, no data folder): the signatures are real,
made by throwaway keys with gpg, and judged by gpg in a home holding only the trusted keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from aptguard import verify
from aptguard.keyring import Keyring
from aptguard.reasons import Rejected
from fixtures.keys import SigningKey, multi_clearsign, write_keyring

TEXT = b"Origin: Example\nLabel: Example\nSuite: bookworm\nCodename: bookworm\nDate: Sun, 29 Nov 2026 10:00:00 UTC\n"


@pytest.fixture
def trusted(tmp_path: Path, keys: Callable[..., SigningKey]) -> Callable[..., Keyring]:
    opened: list[Keyring] = []

    def make(*names: str) -> Keyring:
        """A keyring of these keys; a name ending in "-expired" is an expired key."""
        chosen = [keys(n, expired=n.endswith("-expired")) for n in names]
        ring = write_keyring(tmp_path / f"{'-'.join(names)}.asc", chosen)
        opened.append(Keyring(ring, tmp_path / f"home-{len(opened)}"))
        return opened[-1]

    yield make
    for k in opened:
        k.close()


def verdict(data: bytes, keyring: Keyring) -> tuple[str, list[str]] | str:
    try:
        return verify.verify_inrelease(data, keyring, "InRelease")
    except Rejected as exc:
        return exc.reason


def test_good_signature_gives_the_signed_text_from_gpg(trusted, keys) -> None:
    ring = trusted("upstream")
    text, signers = verdict(keys("upstream").clearsign(TEXT), ring)
    assert text == TEXT.rstrip(b"\n")  # apt's split: the message lines, joined by newlines
    assert signers == [keys("upstream").fingerprint]


@pytest.mark.parametrize("order", ["trusted-first", "unknown-first"])
def test_cosigned_by_trusted_and_unknown_key_is_accepted_in_any_order(trusted, keys, order) -> None:
    """Debian signs with several keys; python-gnupg's `valid` reflects only the last signature."""
    ring = trusted("upstream")
    signers = [keys("upstream"), keys("stranger")]
    if order == "unknown-first":
        signers.reverse()
    text, good = verdict(multi_clearsign(TEXT, signers), ring)
    assert good == [keys("upstream").fingerprint]


def test_only_an_unknown_key_names_its_fingerprint(trusted, keys) -> None:
    ring = trusted("upstream")
    with pytest.raises(Rejected) as err:
        verify.verify_inrelease(keys("stranger").clearsign(TEXT), ring, "dists/x/InRelease")
    assert err.value.reason == "signature-unknown-key"
    assert keys("stranger").fingerprint in err.value.detail


def test_good_plus_expired_trusted_signatures_pass_as_apt_does(trusted, keys) -> None:
    """apt counts an EXPKEYSIG as worthless, not bad: one good signature suffices."""
    ring = trusted("upstream", "old-expired")
    text, good = verdict(multi_clearsign(TEXT, [keys("old-expired", expired=True), keys("upstream")]), ring)
    assert good == [keys("upstream").fingerprint]


def test_expired_key_alone_is_key_expired(tmp_path: Path, keys) -> None:
    key = keys("old-expired", expired=True)
    with Keyring(write_keyring(tmp_path / "k.asc", [key]), tmp_path / "home") as ring:
        assert verdict(key.clearsign(TEXT), ring) == "signature-key-expired"


def test_revoked_key_alone_is_key_revoked(tmp_path: Path, keys) -> None:
    key = keys("gone-revoked", revoked=True)
    with Keyring(write_keyring(tmp_path / "k.asc", [key]), tmp_path / "home") as ring:
        assert verdict(key.clearsign(TEXT), ring) == "signature-key-revoked"


def test_sha1_digest_does_not_count(trusted, keys) -> None:
    ring = trusted("upstream")
    with pytest.raises(Rejected) as err:
        verify.verify_inrelease(keys("upstream").clearsign(TEXT, digest="SHA1"), ring, "InRelease")
    assert err.value.reason == "signature-invalid" and "SHA1" in err.value.detail


def test_altered_text_is_a_bad_signature_even_next_to_a_good_one(trusted, keys) -> None:
    ring = trusted("upstream", "second")
    signed = multi_clearsign(TEXT, [keys("upstream"), keys("second")])
    assert verdict(signed.replace(b"Label: Example", b"Label: Exbmple"), ring) == "signature-invalid"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: b"Injected: before\n" + d,
        lambda d: d + b"Injected: after\n",
        lambda d: d + d,
        lambda d: b"\n" + d,
        lambda d: b"  \n" + d,
        lambda d: d + b"\n",
        lambda d: d + b"\f\n",
        lambda d: d.replace(b"Hash: SHA256\n", b"Hash: SHA256\n-Comment: a dash\n"),
        lambda d: d.replace(b"Origin:", b"-Origin:"),
    ],
    ids=[
        "text-before",
        "text-after",
        "second-block",
        "blank-line-before",
        "spaces-line-before",
        "blank-line-after",
        "form-feed-after",
        "dash-armor-header",
        "unescaped-dash-line",
    ],
)
def test_framing_apt_refuses_is_refused_though_gpg_accepts_some(trusted, keys, mangle) -> None:
    """gpg says 'valid' for several of these; apt's splitter refuses them all, so aptguard must too."""
    ring = trusted("upstream")
    assert verdict(mangle(keys("upstream").clearsign(TEXT)), ring) == "signature-invalid"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d.replace(b"\n", b"\r\n"),
        lambda d: d.replace(b"Hash: SHA256\n", b""),
        lambda d: d.replace(b"Hash: SHA256\n", b"Hash: SHA256\nComment: extra armor header\n"),
        lambda d: d.replace(b"-----BEGIN PGP SIGNED MESSAGE-----\n", b"-----BEGIN PGP SIGNED MESSAGE-----  \n"),
    ],
    ids=["crlf", "no-hash-header", "extra-armor-header", "trailing-blanks-on-armor-line"],
)
def test_framing_apt_accepts_is_accepted_though_gpg_refuses_some(trusted, keys, mangle) -> None:
    """apt splits the file itself and runs gpgv on text + detached signature: these verify for apt."""
    ring = trusted("upstream")
    text, signers = verdict(mangle(keys("upstream").clearsign(TEXT)), ring)
    assert text == TEXT.rstrip(b"\n") and signers == [keys("upstream").fingerprint]


def test_detached_signature_over_release(trusted, keys) -> None:
    ring = trusted("upstream")
    text, good = verify.verify_detached(TEXT, keys("upstream").detach_sign(TEXT), ring, "Release.gpg")
    assert text == TEXT and good == [keys("upstream").fingerprint]
    with pytest.raises(Rejected) as err:
        verify.verify_detached(TEXT + b"X: y\n", keys("upstream").detach_sign(TEXT), ring, "Release.gpg")
    assert err.value.reason == "signature-invalid"


def test_inrelease_must_say_what_release_says() -> None:
    verify.signed_files_match(TEXT.rstrip(b"\n"), TEXT, "InRelease")
    with pytest.raises(Rejected) as err:
        verify.signed_files_match(TEXT.rstrip(b"\n"), TEXT.replace(b"Example", b"Other"), "InRelease")
    assert err.value.reason == "signature-invalid"


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd",
        "/etc/passwd",
        "pool/../../x.deb",
        "pool//x.deb",
        "pool/./x.deb",
        "pool/x\\y.deb",
        "pool/x y.deb",
        "pool/x\x00.deb",
        "pool/\u00e9.deb",
        "",
    ],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(Rejected) as err:
        verify.check_path(path, "Packages")
    assert err.value.reason == "unsafe-path"


@pytest.mark.parametrize(
    "path", ["pool/main/h/hello/hello_1.0-1+b2~bpo_amd64.deb", "dists/bookworm/pool/stable/amd64/x_1%3a2_amd64.deb"]
)
def test_real_pool_paths_are_accepted(path: str) -> None:
    assert verify.check_path(path, "Packages") == path


@pytest.mark.parametrize(
    "path", ["pool/.hidden/a.deb", "pool/a/.deb", ".well-known/a.deb", "pool/" + "x" * 256 + ".deb"]
)
def test_paths_no_server_would_serve_are_refused_as_unsafe(path: str) -> None:
    """Dot-files are never served (by either server) and a part over 255 bytes cannot be stored:
    a snapshot naming them would be promoted and then fail every client."""
    with pytest.raises(Rejected) as err:
        verify.check_path(path, "Packages")
    assert err.value.reason == "unsafe-path"


def _variants(tmp_path: Path, plain: bytes, others: dict[str, bytes]) -> tuple[verify.IndexGroup, list, dict]:
    import hashlib

    files = {"": plain, **others}
    entries = {
        ext: verify.Expected(
            f"dists/x/main/binary-amd64/Packages{ext}", len(d), {"sha256": hashlib.sha256(d).hexdigest()}
        )
        for ext, d in files.items()
    }
    for ext, d in files.items():
        (tmp_path / f"Packages{ext}").write_bytes(d)
    group = verify.IndexGroup(
        "Packages", "main/binary-amd64/Packages", list(entries.values()), entries[""], "main/amd64"
    )
    present = [(e, e.size, e.hashes) for e in entries.values()]
    return group, present, {id(e): tmp_path / f"Packages{ext}" for ext, e in entries.items()}


STANZA = b"Package: a\nVersion: 1\nFilename: pool/a.deb\nSize: 3\nSHA256: " + b"a" * 64 + b"\n"


@pytest.mark.parametrize("ext", [".zst", ".lz4", ".xz", ".gz", ".bz2"])
def test_every_compressed_variant_must_say_what_the_others_say(tmp_path: Path, ext: str) -> None:
    import bz2
    import gzip
    import lzma

    import lz4.frame
    import zstandard

    pack = {
        ".zst": zstandard.ZstdCompressor().compress,
        ".lz4": lz4.frame.compress,
        ".xz": lzma.compress,
        ".gz": gzip.compress,
        ".bz2": bz2.compress,
    }[ext]
    group, present, paths = _variants(tmp_path, STANZA, {ext: pack(STANZA)})
    entries = verify.read_index(group, present, lambda e: open(paths[id(e)], "rb"), 1 << 20)
    assert [p.expected.path for p in entries or []] == ["pool/a.deb"]
    other = STANZA.replace(b"pool/a.deb", b"pool/b.deb")
    group, present, paths = _variants(tmp_path, STANZA, {ext: pack(other)})
    with pytest.raises(Rejected) as err:
        verify.read_index(group, present, lambda e: open(paths[id(e)], "rb"), 1 << 20)
    assert err.value.reason == "index-mismatch" and ext in err.value.detail


ESC = "\x1b]0;owned\x07\x1b[2J"  # a terminal title change and a screen clear


@pytest.mark.parametrize(
    ("release", "reason"),
    [
        (f"Suite: bookworm\nDate: Sun, 29 Nov 2026 10:00:00 UTC {ESC}\nSHA256:\n", "release-invalid"),
        (f"Suite: bookworm\nComponents: {ESC}\nDate: Sun, 29 Nov 2026 10:00:00 UTC\nSHA256:\n", "release-mismatch"),
        (f"Suite: bookworm\nArchitectures: {ESC}\nDate: Sun, 29 Nov 2026 10:00:00 UTC\nSHA256:\n", "release-mismatch"),
        (f"Suite: {ESC}\nDate: Sun, 29 Nov 2026 10:00:00 UTC\nSHA256:\n", "release-mismatch"),
    ],
)
def test_text_an_upstream_chose_reaches_the_operator_escaped(tmp_path: Path, release: str, reason: str) -> None:
    """Details go to terminals, logs and the status page: control bytes from a Release never do."""
    import datetime as dt

    from aptguard.config import UpstreamConfig

    up = UpstreamConfig("up", "http://u.example/", ("bookworm",), ("main",), ("amd64",), tmp_path / "k.asc")
    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    with pytest.raises(Rejected) as err:
        verify.check_release(release.encode(), ["F" * 40], up, "bookworm", now, "InRelease")
    assert err.value.reason == reason, err.value.detail
    assert "\x1b" not in err.value.detail and "\x07" not in err.value.detail, err.value.detail


def test_a_package_name_an_upstream_chose_reaches_the_operator_escaped() -> None:
    stanza = f"Package: a{ESC}\nVersion: 1\nSize: 3\nSHA256: {'a' * 64}\n".encode()
    with pytest.raises(Rejected) as err:
        list(verify.packages_entries(stanza, "Packages"))
    assert "no Filename" in err.value.detail and "\x1b" not in err.value.detail, err.value.detail
