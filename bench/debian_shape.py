"""A Debian-sized upstream for bench/sync_vs_aptly.py, written directly in Python in seconds.

    .venv/bin/python bench/sync_vs_aptly.py --shapes debian [--tools aptguard,aptly] [--runs 1]

Sixty thousand packages cannot be built with dpkg-deb for each run, and no tool in the benchmark
opens a .deb during a mirror sync (aptguard, aptly `mirror update` / `snapshot create` / `publish`
without Contents, apt-mirror2 all check sizes and hashes against the Packages index only). So the
pool files are small blobs of deterministic pseudo-random bytes under Debian's pool layout
(pool/main/<prefix>/<source>/<name>_<version>_amd64.deb, lib* sources under lib<letter>, about
7 sources for 12 packages as in bookworm's 35,000 for 63,000), listed in a Packages index with
Debian's fields (MD5sum and SHA256, no long descriptions), compressed to .xz and .gz, and a
Release with MD5Sum and SHA256 lists, by-hash copies, InRelease and Release.gpg signed by the
bench's key. About 4-20 s on a shared 2-core machine (the file system's speed varies most); the
first time some 25 s more for xz -6 of the two 31 MB indices, cached in bench/.cache/debian-shape.

Two published states: A, and B = A + `new` packages, with `upgraded` packages of A at a new
version (a new pool file; the old one is gone from the index and from B's tree).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import lzma
import os
import string
from collections.abc import Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fixtures.keys import SigningKey
from fixtures.repo import release_date

MAINTAINER = "Example Maintainers <maint@example.invalid>"
WORDS = ("core", "tools", "perl", "python", "gtk", "qt", "font", "data", "xml", "ssl", "net", "kde", "gnome", "ruby")
SUFFIXES = ("data", "doc", "dev", "common", "utils", "bin")
SECTIONS = ("libs", "utils", "devel", "python", "perl", "net", "doc", "misc", "admin", "text", "x11", "fonts")
# Index compressions, as fixtures/repo.py writes them (xz preset 6, gzip 9).
COMPRESSORS = {
    "xz": lambda data: lzma.compress(data, preset=6),
    "gz": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
}
HASHES = {"MD5Sum": "md5", "SHA256": "sha256"}
CACHE = Path(__file__).resolve().parent / ".cache" / "debian-shape"


@dataclass(frozen=True)
class Binary:
    name: str
    source: str
    version: str

    @property
    def filename(self) -> str:
        prefix = self.source[:4] if self.source.startswith("lib") else self.source[0]
        return f"pool/main/{prefix}/{self.source}/{self.name}_{self.version}_amd64.deb"


def source_name(s: int) -> str:
    """A source package name: about one in five a lib*, first letters spread over a-z."""
    h = hashlib.blake2b(s.to_bytes(4, "big"), digest_size=4).digest()
    lib = "lib" if h[0] < 52 else ""
    return f"{lib}{string.ascii_lowercase[h[1] % 26]}{WORDS[h[2] % len(WORDS)]}{s}"


def binary(i: int, revision: int = 1) -> Binary:
    """Package number i: sources take 12 packages for every 7 (one or two binaries each)."""
    s = i * 7 // 12
    first = (i - 1) * 7 // 12 != s
    source = source_name(s)
    name = source if first else f"{source}-{SUFFIXES[s % len(SUFFIXES)]}"
    return Binary(name, source, f"{s % 9 + 1}.{s % 13}.{s % 5}-{revision}")


def states(count: int, new: int, upgraded: int) -> tuple[list[Binary], list[Binary]]:
    """A, and B: A with `upgraded` packages (evenly spread) at a new revision, plus `new` ones."""
    a = [binary(i) for i in range(count)]
    step = count // upgraded if upgraded else 0
    bumped = {i * step + step // 2 for i in range(upgraded)}
    b = [binary(i, 2) if i in bumped else pkg for i, pkg in enumerate(a)]
    b += [binary(i) for i in range(count, count + new)]
    return a, b


def content(pkg: Binary, size: int) -> bytes:
    """The pool file's bytes: pseudo-random (they do not compress away), the same every run."""
    return hashlib.shake_256(f"{pkg.name}_{pkg.version}".encode()).digest(size)


def stanza(pkg: Binary, data: bytes) -> str:
    h = hashlib.blake2b(pkg.name.encode(), digest_size=16).digest()
    source = f"Source: {pkg.source}\n" if pkg.name != pkg.source else ""
    return (
        f"Package: {pkg.name}\n{source}Version: {pkg.version}\nInstalled-Size: {h[0] * 37 + 4}\n"
        f"Maintainer: {MAINTAINER}\nArchitecture: amd64\nDepends: libc6 (>= 2.36), {source_name(h[1] * 100)}\n"
        f"Description: {WORDS[h[2] % len(WORDS)]} support for {pkg.source} (benchmark package)\n"
        f"Description-md5: {h.hex()}\nSection: {SECTIONS[h[3] % len(SECTIONS)]}\nPriority: optional\n"
        f"Filename: {pkg.filename}\nSize: {len(data)}\nMD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
    )


def write_pool(root: Path, files: dict[str, bytes], link_from: Path | None = None, old: Container[str] = ()) -> None:
    """Write every pool file (rel path -> bytes), or hard-link it from `link_from`'s tree when
    it is one of `old`, that tree's files (B's unchanged packages: the same bytes, written once)."""
    made: set[str] = set()
    for rel, data in files.items():
        target = f"{root}/{rel}"
        folder = target.rpartition("/")[0]
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        if rel in old:
            os.link(f"{link_from}/{rel}", target)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def by_hash(path: Path, data: bytes) -> None:
    for field, algo in HASHES.items():
        target = path.parent / "by-hash" / field / hashlib.new(algo, data).hexdigest()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)


def publish(
    root: Path, suite: str, date: dt.datetime, packages_text: bytes, packed: dict[str, bytes], key: SigningKey
) -> None:
    """dists/<suite>: the compressed indices (the plain one listed, not written, as on Debian),
    the per-architecture Release, by-hash copies, Release, InRelease, Release.gpg; all dated `date`."""
    dist = root / "dists" / suite
    where = dist / "main" / "binary-amd64"
    where.mkdir(parents=True)
    listed = {"main/binary-amd64/Packages": packages_text}
    for ext, data in packed.items():
        (where / f"Packages.{ext}").write_bytes(data)
        by_hash(where / f"Packages.{ext}", data)
        listed[f"main/binary-amd64/Packages.{ext}"] = data
    sub = f"Archive: {suite}\nOrigin: Example\nLabel: Example\nComponent: main\nArchitecture: amd64\n".encode()
    (where / "Release").write_bytes(sub)
    by_hash(where / "Release", sub)
    listed["main/binary-amd64/Release"] = sub
    lines = [
        "Origin: Example",
        "Label: Example",
        f"Suite: {suite}",
        f"Codename: {suite}",
        f"Date: {release_date(date)}",
        "Acquire-By-Hash: yes",
        "Architectures: amd64",
        "Components: main",
        f"Description: Example {suite} (aptguard benchmark, Debian-sized)",
    ]
    for field, algo in HASHES.items():
        lines.append(f"{field}:")
        lines += [f" {hashlib.new(algo, d).hexdigest()} {len(d):>16} {rel}" for rel, d in sorted(listed.items())]
    release = ("\n".join(lines) + "\n").encode()
    (dist / "Release").write_bytes(release)
    (dist / "InRelease").write_bytes(key.clearsign(release))
    (dist / "Release.gpg").write_bytes(key.detach_sign(release))
    # Last-Modified is the Date: B's files are newer than A's even when both are written within a
    # second (apt-mirror2 takes an InRelease of the same size and time for unchanged).
    for folder, _dirs, names in os.walk(dist):
        for name in names:
            os.utime(os.path.join(folder, name), (date.timestamp(), date.timestamp()))


def index(packages: list[Binary], size: int) -> tuple[bytes, dict[str, bytes]]:
    """The Packages text (sorted by name, as dak writes it) and the pool files it lists."""
    files = {}
    stanzas = []
    for pkg in sorted(packages, key=lambda p: p.name):
        data = content(pkg, size)
        files[pkg.filename] = data
        stanzas.append(stanza(pkg, data))
    return "\n".join(stanzas).encode(), files


def compress(data: bytes, ext: str) -> bytes:
    """COMPRESSORS[ext](data), kept in bench/.cache: the text is the same every run (only the
    Release's Date and signatures change), and xz -6 of 30 MB takes some 20 s."""
    cached = CACHE / f"Packages-{hashlib.sha256(data).hexdigest()[:32]}.{ext}"
    if cached.exists():
        return cached.read_bytes()
    packed = COMPRESSORS[ext](data)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.write_bytes(packed)
    os.replace(tmp, cached)
    return packed


def build(up: Path, suite: str, key: SigningKey, count: int, size: int, new: int, upgraded: int) -> tuple[Path, Path]:
    """Trees up/A and up/B (B's unchanged pool files hard links to A's); their roots.

    The indices are compressed in threads (lzma and zlib release the GIL) while the pool files
    are written."""
    pkgs_a, pkgs_b = states(count, new, upgraded)
    (text_a, files_a), (text_b, files_b) = index(pkgs_a, size), index(pkgs_b, size)
    root_a, root_b = up / "A", up / "B"
    with ThreadPoolExecutor(4) as pool:
        jobs = {(label, ext): pool.submit(compress, text, ext) for label, text in (("A", text_a), ("B", text_b))
                for ext in COMPRESSORS}  # fmt: skip
        write_pool(root_a, files_a)
        write_pool(root_b, files_b, root_a, files_a)
        packed = {k: j.result() for k, j in jobs.items()}
    # B's Release Date is newer than A's, as a real update's is.
    now = dt.datetime.now(dt.UTC)
    for label, root, date, text in (("A", root_a, now - dt.timedelta(minutes=1), text_a), ("B", root_b, now, text_b)):
        publish(root, suite, date, text, {ext: packed[(label, ext)] for ext in COMPRESSORS}, key)
    return root_a, root_b
