"""The focused Packages parser (verify.packages_entries) against python-debian's deb822 parser.

The sync reads only the fields it needs with a search per stanza (a full Debian index in well
under a second); these tests show it reads the same Package, Version, Filename, Size and hashes
that python-debian reads from the same file, and still refuses what it refused before.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from debian.deb822 import Packages

from aptguard import verify
from aptguard.reasons import Rejected

FIELDS = {"MD5sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}


def _index(count: int, seed: int = 7) -> bytes:
    """A Packages file with the shapes real ones have: optional hash fields in any order, long
    multi-line descriptions whose continuation lines mention field names, tabs and trailing
    blanks around values, UTF-8 text, a first stanza without a leading field of interest."""
    rng = random.Random(seed)
    stanzas = []
    for i in range(count):
        body = rng.randbytes(16)
        name = f"pkg{i}-{rng.choice(['a', 'lib', 'x'])}"
        version = rng.choice([f"{i}.0-1", f"1:{i}.2~rc1+dfsg-3", f"{i}+b{i % 5}"])
        hashes = {f: hashlib.new(a, body).hexdigest() for f, a in FIELDS.items() if f == "SHA256" or rng.random() < 0.6}
        lines = [
            f"Package: {name}",
            "Source: s",
            f"Version:\t{version}  ",
            f"Installed-Size: {rng.randint(1, 999)}",
            "Maintainer: Jörg Müller <j@example.invalid>",
            "Description: a package\n Filename: not/this.deb (a continuation line, not a field)\n SHA256: 00\n .",
            f"Filename: pool/main/{name[0]}/{name}/{name}_{version.split(':')[-1]}_amd64.deb",
            f"Size: {rng.randint(1, 10**9)}",
        ]
        lines += [f"{f}: {h}" + (" " if rng.random() < 0.2 else "") for f, h in hashes.items()]
        head, tail = lines[:2], lines[2:]
        rng.shuffle(tail)  # field order is free in deb822
        stanzas.append("\n".join(head + tail) + "\n")
    return "\n".join(stanzas).encode()


def test_focused_parser_reads_what_deb822_reads() -> None:
    data = _index(3000)
    ours = list(verify.packages_entries(data, "Packages"))
    theirs = list(Packages.iter_paragraphs(data.decode().splitlines(keepends=True), use_apt_pkg=False))
    assert len(ours) == len(theirs) == 3000
    for mine, para in zip(ours, theirs, strict=True):
        assert mine.package == para["Package"]
        assert mine.version == para["Version"]
        assert mine.expected.path == para["Filename"]
        assert mine.expected.size == int(para["Size"])
        assert mine.expected.hashes == {a: para[f] for f, a in FIELDS.items() if f in para}


def test_text_and_bytes_give_the_same_entries() -> None:
    data = _index(200, seed=3)
    assert list(verify.packages_entries(data.decode(), "P")) == list(verify.packages_entries(data, "P"))


@pytest.mark.parametrize(
    ("stanza", "reason", "words"),
    [
        (b"Package: a\nVersion: 1\nSize: 3\nSHA256: " + b"a" * 64 + b"\n", "index-mismatch", "no Filename"),
        (b"Package: a\nFilename: pool/a.deb\nSize: x\nSHA256: " + b"a" * 64 + b"\n", "index-mismatch", "no valid Size"),
        (b"Package: a\nFilename: pool/a.deb\nSize: 3\nMD5sum: " + b"a" * 32 + b"\n", "index-mismatch", "no SHA256"),
        (b"Package: a\nFilename: pool/a.deb\nSize: 3\nSHA256: abc\n", "index-mismatch", "malformed sha256"),
        (b"Package: a\nFilename: pool/../../etc/a.deb\nSize: 3\nSHA256: " + b"a" * 64 + b"\n", "unsafe-path", ".."),
        (b"Package: a\nFilename: /etc/a.deb\nSize: 3\nSHA256: " + b"a" * 64 + b"\n", "unsafe-path", "plain relative"),
    ],
)
def test_bad_stanzas_are_still_refused(stanza: bytes, reason: str, words: str) -> None:
    good = _index(3, seed=1)
    with pytest.raises(Rejected) as caught:
        list(verify.packages_entries(good + b"\n" + stanza, "dists/x/main/binary-amd64/Packages"))
    assert caught.value.reason == reason
    assert words in caught.value.detail


def test_paths_the_fast_check_passes_are_the_ones_the_full_check_passes() -> None:
    for path in ["pool/main/a/a_1.0_amd64.deb", "dists/x/pool/stable/amd64/a_1:2~b+c_amd64.deb", "a"]:
        assert verify.check_path(path, "w") == path
    for path in ["", "/a", "a//b", "a/./b", "./a", "a/..", "a\\b", "a/b c", "a/" + "x" * 1100, "a\nb"]:
        with pytest.raises(Rejected):
            verify.check_path(path, "w")


def _read(data: bytes, memo: verify.ParseMemo | None) -> list[tuple[str, int, dict[str, str], str, str]]:
    """read_index over an uncompressed Packages file, as a sync reads it."""
    import io

    entry = verify.Expected(
        "dists/s/main/binary-amd64/Packages", len(data), {"sha256": hashlib.sha256(data).hexdigest()}
    )
    group = verify.IndexGroup("Packages", "main/binary-amd64/Packages", [entry], entry, "main/amd64")
    found = verify.read_index(
        group, [(entry, len(data), dict(entry.hashes))], lambda _e: io.BytesIO(data), 1 << 30, memo
    )
    assert found is not None
    return [(e.expected.path, e.expected.size, e.expected.hashes, e.package, e.version) for e in found]


def test_a_parse_memo_gives_exactly_what_parsing_gives_and_only_for_identical_stanzas() -> None:
    first = _index(2000, seed=3)
    memo = verify.ParseMemo()
    assert _read(first, memo) == _read(first, None)
    remembered = verify.ParseMemo.from_json(memo.to_json(keep_known=False))
    assert len(remembered.known) == 2000
    # A stanza remembered is taken from the memo (shown by a remembered reading altered on purpose)...
    key = hashlib.sha256(next(verify.tagfile.stanzas(first))).hexdigest()
    remembered.known[key] = [*remembered.known[key][:4], "remembered"]
    second = first.replace(b"Size: ", b"Size:  ", 1)  # ...and a changed byte makes it parsed again
    changed = _read(second, remembered)
    assert changed[0][4] != "remembered" and changed == _read(second, None)
    again = _read(first, remembered)
    assert again[0][4] == "remembered" and again[1:] == _read(first, None)[1:]


def test_a_damaged_parse_memo_is_read_past() -> None:
    data = _index(50, seed=5)
    memo = verify.ParseMemo()
    _read(data, memo)
    damaged = verify.ParseMemo.from_json({"format": 1, "stanzas": {k: ["x", "not a size", None, 1] for k in memo.seen}})
    assert _read(data, damaged) == _read(data, None)
    # Well formed, but naming a path outside the repository: read past like any damage.
    unsafe = verify.ParseMemo.from_json(
        {"format": 1, "stanzas": {k: ["../../etc/passwd", *v[1:]] for k, v in memo.seen.items()}}
    )
    assert all(path.startswith("pool/") for path, *_ in _read(data, unsafe))
    assert verify.ParseMemo.from_json({"format": 99, "stanzas": memo.seen}).known == {}
    assert verify.ParseMemo.from_json(["not", "a", "memo"]).known == {}
