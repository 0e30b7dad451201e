"""The trust boundary: unverified bytes in, trusted objects out, or Rejected saying why not.

Order, as apt judges: signature -> Release fields (dates, suite, changes, rollback) -> index
hashes -> package entries. `verify_suite` runs the first three for one suite and `read_index`
the last two for one index, so a caller cannot skip a step. Framing and field parsing are
apt's (clearsign.py, tagfile.py); signature verdicts come from gpgv's status pipe
(keyring.py). Nothing here opens a socket or names a folder of the data directory.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO

from aptguard import clearsign, tagfile
from aptguard.config import UpstreamConfig
from aptguard.keyring import Keyring
from aptguard.reasons import Rejected
from aptguard.records import SuiteRecord, iso

# apt's own allowance for a Release Date ahead of the local clock (Acquire::Max-FutureTime).
MAX_FUTURE = timedelta(seconds=10)
# Release hash lists, and the hash names used everywhere inside aptguard.
RELEASE_HASHES = {"MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
INDEX_HASHES = {b"md5sum": "md5", b"sha1": "sha1", b"sha256": "sha256", b"sha512": "sha512"}
BY_HASH_DIR = {"md5": "MD5Sum", "sha1": "SHA1", "sha256": "SHA256", "sha512": "SHA512"}
HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
# gpg's digest algorithm numbers (RFC 4880 9.4): apt trusts SHA2 (and the reserved 4-7), no others.
WEAK_DIGESTS = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}
TRUSTED_DIGESTS = frozenset({"4", "5", "6", "7", "8", "9", "10", "11"})
COMPRESSIONS = ("", ".xz", ".gz", ".bz2", ".lzma", ".zst", ".lz4")
STANZA_LIMIT = 16 * 1024 * 1024  # real stanzas are a few KiB; a longer one is a memory attack
CHUNK = 256 * 1024
_HEX = re.compile(r"[0-9a-f]+")  # apt compares hash strings as they are: upper case never matches
_PATH_WORD = re.compile(r"^[A-Za-z0-9_+~:%@=,-][A-Za-z0-9_.+~:%@=,-]*$")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_+~:%@=,-][A-Za-z0-9_.+~:%@=,-]*(?:/[A-Za-z0-9_+~:%@=,-][A-Za-z0-9_.+~:%@=,-]*)*")
NAME_MAX = 255  # the longest file name a filesystem stores


@dataclass(frozen=True)
class Expected:
    """What one file must be: its path from the repository root, size and every listed hash."""

    path: str
    size: int
    hashes: dict[str, str]

    def check(self, size: int, hashes: dict[str, str], reason: str) -> None:
        """Raise `reason` (an *-mismatch code) unless size and every listed hash match."""
        if size != self.size:
            raise Rejected(reason, f"{self.path}: size {size} bytes, expected {self.size}")
        for algo, want in self.hashes.items():
            got = hashes.get(algo)
            if got != want:
                raise Rejected(reason, f"{self.path}: {algo} {got}, expected {want}")


@dataclass
class TrustedRelease:
    """A suite's Release whose signature and fields passed; `files` are relative to dists/SUITE/."""

    suite: str
    base: str  # the suite's folder from the repository root: "dists/bookworm/" or "" for flat
    fields: dict[str, str]  # names in lower case, as apt compares them
    date: datetime
    valid_until: datetime | None
    files: dict[str, Expected]
    signers: list[str]
    by_hash: bool

    @property
    def origin(self) -> str:
        return self.fields.get("origin", "")

    @property
    def label(self) -> str:
        return self.fields.get("label", "")

    @property
    def codename(self) -> str:
        return self.fields.get("codename", "")

    def summary(self) -> dict[str, object]:
        return {
            "date": iso(self.date),
            "valid_until": iso(self.valid_until) if self.valid_until else None,
            "origin": self.origin,
            "label": self.label,
            "codename": self.codename,
            "suite": self.fields.get("suite", ""),
            "acquire_by_hash": self.by_hash,
            "signers": self.signers,
        }


@dataclass
class IndexGroup:
    """One index a client fetches, in every compressed variant the Release lists."""

    kind: str  # "Packages", "Sources", "Translation", "Contents"
    name: str  # e.g. "main/binary-amd64/Packages" (relative to the suite folder)
    variants: list[Expected]  # the files to fetch, uncompressed one included if listed
    plain: Expected | None  # the uncompressed entry, which every variant must decompress to
    label: str  # "main/amd64" for Packages, used by diff


@dataclass(frozen=True)
class PoolFile:
    """A file an index references (a .deb, a .dsc, a tarball), with what it must be."""

    expected: Expected
    package: str = ""
    version: str = ""


@dataclass
class PreviousRelease:
    """What the current snapshot served for a suite: the base of change and rollback checks."""

    date: datetime
    origin: str
    label: str
    codename: str

    @classmethod
    def from_suite(cls, s: SuiteRecord) -> PreviousRelease:
        """What a snapshot's manifest recorded of the suite's Release."""
        return cls(date=datetime.fromisoformat(s.date), origin=s.origin, label=s.label, codename=s.codename)


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class SignedFiles:
    """A suite's signature-bearing files as the upstream served them; None where it said 404."""

    inrelease: bytes | None
    release: bytes | None
    release_gpg: bytes | None
    source: str = ""  # the suite's URL, for messages


@dataclass
class SuiteVerdict:
    """A suite whose Release is trusted: which signed files may be served, and what to tell the operator."""

    release: TrustedRelease
    serve: tuple[str, ...]  # of "InRelease", "Release", "Release.gpg": each one verified
    notes: list[str]


def verify_suite(
    files: SignedFiles,
    *,
    keyring: Keyring,
    upstream: UpstreamConfig,
    suite: str,
    now: datetime,
    previous: PreviousRelease | None,
    allow_change: bool,
    already_verified: bool,
) -> SuiteVerdict:
    """The suite's signed files in, a trusted Release out, or Rejected saying why not.

    In apt's order: the signature (InRelease when there is one, as apt prefers it; else
    Release + Release.gpg), then the Release's own fields (dates, suite, components, hash
    lists), then the comparison with the Release the current snapshot serves (replay, and
    Origin/Label/Codename changes). `already_verified`: these exact bytes are those of a
    stored snapshot, which passed the comparison when it was made; signature and dates are
    checked again all the same (keys and clocks move).
    """
    base = suite_base(suite)
    notes: list[str] = []
    if files.inrelease is not None:
        where = base + "InRelease"
        text, signers = verify_inrelease(files.inrelease, keyring, where)
        serve = ["InRelease"]
        if files.release is not None:
            signed_files_match(text, files.release, where)
            serve.append("Release")
            if files.release_gpg is not None:
                try:
                    verify_detached(files.release, files.release_gpg, keyring, base + "Release.gpg")
                    serve.append("Release.gpg")
                except Rejected as exc:
                    # apt reads Release.gpg only when InRelease is a 404, which it never is here.
                    # A stale one (Debian mirrors serve them mid-sync) must not block a verified
                    # InRelease, nor be served: it is left out, so the snapshot holds only what verifies.
                    notes.append(f"{exc.detail}; Release.gpg left out (InRelease verified)")
    else:
        if files.release is None or files.release_gpg is None:
            missing = " and ".join(
                n for n, f in (("Release", files.release), ("Release.gpg", files.release_gpg)) if f is None
            )
            raise Rejected("signature-missing", f"{files.source or base}: no InRelease, and no {missing} (HTTP 404)")
        where = base + "Release.gpg"
        text, signers = verify_detached(files.release, files.release_gpg, keyring, where)
        serve = ["Release", "Release.gpg"]
    release = check_release(text, signers, upstream, suite, now, where)
    if not already_verified:
        check_against_current(release, previous, allow_change, where)
    return SuiteVerdict(release, tuple(serve), notes)


def _same_key(fingerprint: str, key_id: str) -> bool:
    """apt's IsTheSameKey: a GOODSIG names a fingerprint or a long key id; VALIDSIG a fingerprint."""
    if len(key_id) == 40:
        return fingerprint[:40] == key_id
    return len(key_id) >= 16 and fingerprint[24:40] == key_id[:16]


def _judge(status: list[bytes], keyring: Keyring, where: str) -> list[str]:
    """apt's verdict (methods/gpgv.cc) from gpgv's `[GNUPG:] ` status lines; the good signers.

    Good: a GOODSIG whose VALIDSIG has a trusted digest, by a key of this keyring. The Release
    is signed when there is a good signature and no BADSIG; signatures by unknown, expired or
    revoked keys are otherwise ignored, as apt ignores them (Debian signs with several keys).
    Only the keyword and the hexadecimal key fields of each line are read: nothing a signer chose.
    """
    good: list[str] = []
    bad: list[str] = []
    worthless: list[tuple[str, str]] = []  # (kind, key id)
    no_pubkey: list[str] = []
    errsig: list[list[str]] = []
    valid: list[tuple[str, str]] = []  # (signing key's fingerprint, primary key's fingerprint)
    weak: list[tuple[str, str]] = []  # (fingerprint, digest name)
    nodata = False
    issuer: dict[str, str] = {}
    for line in status:
        words = line[len(b"[GNUPG:] ") :].decode("ascii", "replace").split(" ")
        word, args = words[0], [a.upper() for a in words[1:]]
        first = args[0] if args else ""
        if word == "BADSIG":
            bad.append(first)
        elif word == "ERRSIG":
            errsig.append(args)
            if len(args) > 6 and re.fullmatch(r"[0-9A-F]{40}", args[6]):  # the issuer fingerprint, for the message only
                issuer[args[0][:16]] = args[6]
        elif word == "NO_PUBKEY":
            no_pubkey.append(first)
            errsig = [e for e in errsig if not (e and e[0][:16] == first[:16])]
        elif word == "NODATA":
            nodata = True
        elif word in ("EXPKEYSIG", "EXPSIG", "REVKEYSIG"):
            worthless.append((word, first))
        elif word == "GOODSIG":
            good.append(first)
        elif word == "VALIDSIG" and len(args) >= 8:
            digest = args[7]
            if digest not in TRUSTED_DIGESTS:
                weak.append((first, WEAK_DIGESTS.get(digest, f"algorithm {digest}")))
            valid.append((first, args[9] if len(args) > 9 else first))
    good = [g for g in good if not any(_same_key(fpr, g) for fpr, _ in weak)]
    if bad:
        raise Rejected("signature-invalid", f"{where}: bad signature by key {bad[0]} (the signed text was altered)")
    signers: list[str] = []
    for fpr, primary in valid:
        ours = fpr in keyring.fingerprints or primary in keyring.fingerprints
        if ours and any(_same_key(fpr, g) for g in good) and primary not in signers:
            signers.append(primary)
    if signers:
        return signers

    def named(key_id: str) -> str:
        return next((primary for fpr, primary in valid if _same_key(fpr, key_id)), key_id)

    for kind, reason, text in (
        ("REVKEYSIG", "signature-key-revoked", "signed by revoked key"),
        ("EXPKEYSIG", "signature-key-expired", "signed by expired key"),
    ):
        keys = [k for w, k in worthless if w == kind]
        if keys:
            raise Rejected(reason, f"{where}: {text} {named(keys[0])}")
    if no_pubkey:
        raise Rejected(
            "signature-unknown-key",
            f"{where}: signed by key {issuer.get(no_pubkey[0][:16], no_pubkey[0])}, "
            f"which is not in the keyring {keyring.source}",
        )
    if weak:
        raise Rejected(
            "signature-invalid",
            f"{where}: only weak-digest signatures, by {weak[0][0]} ({weak[0][1]}); apt rejects them",
        )
    if any(w == "EXPSIG" for w, _ in worthless):
        raise Rejected("signature-invalid", f"{where}: the signature has expired")
    if errsig:
        raise Rejected(
            "signature-invalid", f"{where}: a signature by {errsig[0][0] if errsig[0] else '?'} could not be checked"
        )
    if nodata:
        raise Rejected("signature-invalid", f"{where}: no OpenPGP signature data found")
    raise Rejected("signature-invalid", f"{where}: no good signature by a key of {keyring.source}")


def verify_inrelease(data: bytes, keyring: Keyring, where: str) -> tuple[bytes, list[str]]:
    """(signed text, good signers) of an InRelease, split by apt's rules and checked by gpgv.

    The text returned is exactly the text gpgv verified: apt parses that same text.
    """
    try:
        split = clearsign.split_clearsigned(data)
    except clearsign.FramingError as exc:
        raise Rejected("signature-invalid", f"{where}: {exc} (apt refuses it)") from None
    return split.text, _judge(keyring.gpgv(split.signature, split.text, where), keyring, where)


def verify_detached(release: bytes, signature: bytes, keyring: Keyring, where: str) -> tuple[bytes, list[str]]:
    """(Release, good signers) for Release + Release.gpg, with apt's checks on Release.gpg."""
    try:
        clearsign.check_detached(signature)
    except clearsign.FramingError as exc:
        raise Rejected("signature-invalid", f"{where}: {exc} (apt refuses it)") from None
    return release, _judge(keyring.gpgv(signature, release, where), keyring, where)


def signed_files_match(inrelease_text: bytes, release: bytes, where: str) -> None:
    """InRelease's signed text must be the Release file, when upstream publishes both
    (compared line by line as apt reads lines: trailing blanks and CRs do not count)."""
    if inrelease_text != b"\n".join(clearsign.lines_of(release)):
        raise Rejected("signature-invalid", f"{where}: the signed text of InRelease differs from Release")


# ---------------------------------------------------------------- Release fields


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CLOCK = re.compile(r"([0-9]{1,2}):([0-9]{1,2}):([0-9]{1,2})")


def apt_date(value: str) -> datetime | None:
    """A date as apt's RFC1123StrToTime reads it, or None where apt cannot read it.

    RFC 1123 ("Sun, 06 Nov 1994 08:49:37 GMT"), RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT")
    or asctime ("Sun Nov  6 08:49:37 1994"); the zone must be GMT, UTC, Z or a numeric zero
    offset: apt refuses "+0100" and "-1200", and so does aptguard.
    """
    words = value.split()
    if not words or words[0][:3].lower() not in _WEEKDAYS:
        return None
    weekday = words[0]
    try:
        if len(weekday) == 4 and weekday.endswith(","):
            day_text, month, year_text, clock, zone = words[1:]
        elif len(weekday) == 3:
            month, day_text, clock, year_text = words[1:]
            zone = "UTC"
        elif len(weekday) > 4 and weekday.endswith(","):
            date_text, clock, zone = words[1:]
            day_text, month, year_text = date_text.split("-")
            year_text = str(1900 + int(year_text))
        else:
            return None
    except ValueError:
        return None
    if zone not in ("GMT", "UTC", "Z") and not re.fullmatch(r"[+-]?0+", zone):
        return None
    found = _CLOCK.fullmatch(clock)
    if not found or month[:3].lower() not in _MONTHS or not day_text.isascii() or not day_text.isdigit():
        return None
    if not re.fullmatch(r"[+-]?[0-9]+", year_text):
        return None
    year = int(year_text)
    if year > 9999:  # apt's time_t holds it; Python's datetime does not: as far in the future as it goes
        return datetime.max.replace(tzinfo=UTC)
    try:
        return datetime(
            year, _MONTHS.index(month[:3].lower()) + 1, int(day_text), *(int(g) for g in found.groups()), tzinfo=UTC
        )
    except ValueError:
        return None


def _date(value: str, name: str, where: str) -> datetime:
    parsed = apt_date(value)
    if parsed is None:
        raise Rejected("release-invalid", f"{where}: {name} {value[:80]!r} is not a date apt reads (RFC 1123, in UTC)")
    return parsed


def check_release(
    text: bytes,
    signers: list[str],
    upstream: UpstreamConfig,
    suite: str,
    now: datetime,
    where: str,
) -> TrustedRelease:
    """Check a signed Release's own fields: dates, suite, components, architectures, hash lists.

    Read as apt reads it: the first stanza of the signed text, field names in any case.
    """
    try:
        raw = tagfile.first_stanza(text)
    except tagfile.TagFileError as exc:
        raise Rejected("release-invalid", f"{where}: {exc}") from None
    fields = {name.decode("latin-1"): value.decode("utf-8", "replace") for name, value in raw.items()}
    if "date" not in fields:
        raise Rejected("release-invalid", f"{where}: no Date field")
    date = _date(fields["date"], "Date", where)
    valid_until = _date(fields["valid-until"], "Valid-Until", where) if fields.get("valid-until") else None
    if "sha256" not in fields:
        raise Rejected("release-invalid", f"{where}: no SHA256 list (apt needs a strong hash)")
    if date > now + MAX_FUTURE:
        raise Rejected(
            "release-future", f"{where}: Date {fields['date'][:80]!r} lies in the future (now {rfc_date(now)})"
        )
    if valid_until is not None and valid_until < now:
        raise Rejected(
            "release-expired", f"{where}: Valid-Until {fields['valid-until'][:80]!r} has passed (now {rfc_date(now)})"
        )
    flat = suite.endswith("/")
    names = {fields.get("suite", ""), fields.get("codename", "")} - {""}
    # apt's metaIndex::CheckDist: the suite itself, or its part before the last "/" ("" for a flat
    # "/" passes: Kubernetes' flat Release names no suite; a flat "stable/" must say "stable").
    dist = suite.rsplit("/", 1)[0] if "/" in suite else suite
    if suite not in names and dist not in ("", ".") and dist not in names and suite.split("/")[-1] not in names:
        raise Rejected(
            "release-mismatch",
            f"{where}: Suite {fields.get('suite')!r} / Codename {fields.get('codename')!r}, expected {suite!r}",
        )
    if not flat and "components" in fields:
        listed = set(fields["components"].split())
        # Debian lists "updates/main" for security suites; apt accepts the last word.
        listed |= {c.split("/")[-1] for c in listed}
        for comp in upstream.components:
            if comp not in listed:
                raise Rejected(
                    "release-mismatch", f"{where}: component {comp!r} not in Components: {fields['components'][:200]!r}"
                )
    if "architectures" in fields:
        listed = set(fields["architectures"].split())
        for arch in upstream.architectures:
            if arch not in listed:
                raise Rejected(
                    "release-mismatch",
                    f"{where}: architecture {arch!r} not in Architectures: {fields['architectures'][:200]!r}",
                )
    base = suite_base(suite)
    files: dict[str, Expected] = {}
    for list_name, algo in RELEASE_HASHES.items():
        for digest, size, name in _sums(
            fields.get(list_name.lower(), ""), algo, f"{where}: {list_name}", "release-invalid"
        ):
            old = files.get(name)
            if old is None:
                files[name] = Expected(path=base + name, size=size, hashes={algo: digest})
            elif old.size != size:
                raise Rejected("release-invalid", f"{where}: {name} listed with sizes {old.size} and {size}")
            else:
                old.hashes[algo] = digest
    return TrustedRelease(
        suite=suite,
        base=base,
        fields=fields,
        date=date,
        valid_until=valid_until,
        files=files,
        signers=signers,
        by_hash=fields.get("acquire-by-hash", "").lower() == "yes",
    )


def _sums(text: str, algo: str, what: str, reason: str) -> Iterator[tuple[str, int, str]]:
    """(hash, size, name) triples of a Release hash list or a Sources Files/Checksums field,
    whitespace-separated as apt reads them; a hash must be lower-case hex of its algorithm's length."""
    words = text.split()
    if len(words) % 3:
        raise Rejected(reason, f"{what} is not (hash, size, name) triples")
    for i in range(0, len(words), 3):
        digest, size_text, name = words[i : i + 3]
        size = tagfile.number(size_text)
        if size is None or len(digest) != HEX_LEN[algo] or not _HEX.fullmatch(digest):
            raise Rejected(reason, f"{what}: bad entry {' '.join(words[i : i + 3])[:120]!r}")
        yield digest, size, name


def check_against_current(
    release: TrustedRelease, previous: PreviousRelease | None, allow_change: bool, where: str
) -> None:
    """Refuse a replayed (older) Release, and Origin/Label/Codename changes apt clients refuse."""
    if previous is None:
        return
    if release.date < previous.date:
        raise Rejected(
            "release-rollback",
            f"{where}: Date {rfc_date(release.date)} is older than the served Release's {rfc_date(previous.date)}",
        )
    if allow_change:
        return
    for name, old, new in (
        ("Origin", previous.origin, release.origin),
        ("Label", previous.label, release.label),
        ("Codename", previous.codename, release.codename),
    ):
        if old != new:
            raise Rejected(
                "release-changed",
                f"{where}: {name} changed from {old!r} to {new!r}; apt clients refuse this without "
                "--allow-releaseinfo-change; accept it with `aptguard sync --allow-release-change`",
            )


# ---------------------------------------------------------------- indices


def needed_indices(release: TrustedRelease, upstream: UpstreamConfig) -> list[IndexGroup]:
    """The indices a client of this mirror fetches, as listed in the Release.

    Release entries for anything else (stale files, other architectures) are ignored, as SPEC §2 says.
    """
    wanted: list[tuple[str, str, str, bool]] = []  # (kind, name, label, required)
    flat = release.suite.endswith("/")
    comps = [""] if flat else [c + "/" for c in upstream.components]
    archs = list(upstream.architectures)
    listed_archs = release.fields.get("architectures", "").split()
    # apt fetches binary-all too, unless the Release says arch:all packages are already listed in
    # every architecture's Packages (Debian: "No-Support-for-Architecture-all: Packages").
    all_separate = release.fields.get("no-support-for-architecture-all", "") != "Packages"
    if not flat and all_separate and ("all" in listed_archs or not listed_archs) and "all" not in archs:
        archs.append("all")
    for comp in comps:
        for arch in archs:
            name = f"{comp}Packages" if flat else f"{comp}binary-{arch}/Packages"
            wanted.append(("Packages", name, f"{comp}{arch}", arch != "all" or "all" in upstream.architectures))
            if flat:
                break
        if upstream.sources:
            wanted.append(("Sources", f"{comp}Sources" if flat else f"{comp}source/Sources", f"{comp}source", True))
        for lang in upstream.languages:
            wanted.append(("Translation", f"{comp}i18n/Translation-{lang}", f"{comp}{lang}", False))
        if upstream.contents:
            for arch in upstream.architectures:
                wanted.append(("Contents", f"{comp}Contents-{arch}", f"{comp}{arch}", False))
    if upstream.contents and not flat:
        for arch in upstream.architectures:
            wanted.append(("Contents", f"Contents-{arch}", arch, False))
    groups = []
    seen: set[str] = set()
    for kind, name, label, required in wanted:
        if name in seen:
            continue
        seen.add(name)
        variants = [release.files[name + ext] for ext in COMPRESSIONS if name + ext in release.files]
        if not variants:
            if required:
                raise Rejected(
                    "index-missing", f"{release.base}{name}: the Release lists no such index (needed by clients)"
                )
            continue
        for v in variants:
            check_path(v.path, f"{release.base}Release")
            if "sha256" not in v.hashes:
                raise Rejected(
                    "release-invalid", f"{v.path}: listed in the Release without SHA256 (apt needs a strong hash)"
                )
        groups.append(IndexGroup(kind, name, variants, release.files.get(name), label.strip("/")))
    return groups


def _by_hash(entry: Expected, algo: str) -> str:
    return f"{entry.path.rsplit('/', 1)[0]}/by-hash/{BY_HASH_DIR[algo]}/{entry.hashes[algo]}"


def by_hash_paths(entry: Expected) -> Iterator[str]:
    """The by-hash path of an index for every hash type the Release lists for it."""
    return (_by_hash(entry, algo) for algo in entry.hashes)


def by_hash_fetch_path(entry: Expected) -> str:
    """The by-hash path apt asks for: the strongest hash type the Release lists for the file."""
    return _by_hash(entry, next(a for a in ("sha512", "sha256", "sha1", "md5") if a in entry.hashes))


def check_path(path: str, where: str) -> str:
    """Refuse any path that could leave the repository or that no client could be served:
    absolute, `..`, empty parts, dot-files (neither server serves them), parts longer than a
    file name may be, odd bytes."""
    if len(path) <= 1024 and _SAFE_PATH.fullmatch(path):  # the common case in one regex; else say why
        if len(path) <= NAME_MAX or all(len(part) <= NAME_MAX for part in path.split("/")):
            return path
    if not path or path.startswith("/") or "\\" in path or len(path) > 1024:
        raise Rejected("unsafe-path", f"{where}: path {path[:120]!r} is not a plain relative path")
    for part in path.split("/"):
        if len(part) > NAME_MAX:
            raise Rejected("unsafe-path", f"{where}: path {path[:120]!r} has a part longer than {NAME_MAX} bytes")
        if not _PATH_WORD.match(part):
            raise Rejected("unsafe-path", f"{where}: path {path[:120]!r} has an unsafe part {part[:60]!r}")
    raise AssertionError(f"check_path: {path!r} passed every part check but not the whole-path one")


# ---------------------------------------------------------------- index contents

# The fields of a Packages stanza a sync needs, found with one search per stanza on its bytes
# (a full-size Debian index, 63,000 stanzas, parses with no decoded copy of the text). Names in
# any case, spaces before the colon, the last repeat winning: apt's rules. A stanza where a
# faster reading could differ from apt's (a carriage return or other control whitespace, a field
# line without a colon, a wanted field continued on the next line) is read by tagfile.fields.
_PKG_FIELD = re.compile(
    rb"\n(package|version|filename|size|md5sum|sha1|sha256|sha512)[ \t]*:[ \t]*([^\n]*)(\n[ \t])?", re.IGNORECASE
)
_NO_COLON = re.compile(rb"\n[^ \t\n:][^:\n]*(?:\n|$)")  # a field line whose name would run on to the next line
_WANTED = frozenset({b"package", b"version", b"filename", b"size", b"md5sum", b"sha1", b"sha256", b"sha512"})


def _plain(text: bytes) -> bool:
    """True when nothing in `text` (starting with "\\n") could be read otherwise than apt reads it by
    the fast reading: no control whitespace, no colon-less field line."""
    return b"\r" not in text and b"\v" not in text and b"\f" not in text and not _NO_COLON.search(text)


def _stanza_fields(stanza: bytes, plain: bool = False) -> dict[bytes, bytes]:
    """Wanted field (lower case) -> value, as apt reads the stanza (which starts with "\\n");
    `plain`: _plain() already holds for a block of text the stanza is part of."""
    if plain or _plain(stanza):
        fields = {}
        for key, value, continued in _PKG_FIELD.findall(stanza):
            if continued:
                break
            fields[key.lower()] = value.rstrip(tagfile.WHITESPACE)
        else:
            return fields
    try:
        return {k: v for k, v in tagfile.fields(stanza[1:]).items() if k in _WANTED}
    except tagfile.TagFileError as exc:
        raise Rejected("index-mismatch", f"stanza unreadable by apt's rules: {exc}") from None


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _package_entry(stanza: bytes, n: int, where: str, plain: bool = False) -> PoolFile:
    try:
        fields = _stanza_fields(b"\n" + stanza, plain)
    except Rejected as exc:
        raise Rejected(exc.reason, f"{where}: entry {n}: {exc.detail}") from None
    package_field = fields.get(b"package")
    if package_field is None:
        raise Rejected("index-mismatch", f"{where}: entry {n} has no Package field (apt refuses the whole index)")
    package = _text(package_field)
    filename = _text(fields.get(b"filename", b""))
    if not filename:
        raise Rejected("index-mismatch", f"{where}: entry {n} ({package[:80]!r}) has no Filename")
    check_path(filename, where)
    size = tagfile.number(fields.get(b"size", b""))
    if size is None:
        raise Rejected("index-mismatch", f"{where}: {filename} has no valid Size (ASCII digits)")
    hashes = {}
    for key, algo in INDEX_HASHES.items():
        value = fields.get(key)
        if value is not None:
            digest = _text(value)
            if len(digest) != HEX_LEN[algo] or not _HEX.fullmatch(digest):
                raise Rejected("index-mismatch", f"{where}: {filename} has a malformed {algo} {digest[:80]!r}")
            hashes[algo] = digest
    if "sha256" not in hashes:
        raise Rejected("index-mismatch", f"{where}: {filename} has no SHA256 (no strong hash to verify)")
    return PoolFile(Expected(filename, size, hashes), package, _text(fields.get(b"version", b"")))


def packages_entries(text: str | bytes, where: str) -> Iterator[PoolFile]:
    """The pool files of a Packages index, with every hash it lists, paths checked."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    for n, stanza in enumerate(tagfile.stanzas(data), 1):
        yield _package_entry(stanza, n, where)


_SRC_HASHES = {b"files": "md5", b"checksums-sha1": "sha1", b"checksums-sha256": "sha256", b"checksums-sha512": "sha512"}


def _source_entries(stanza: bytes, where: str) -> Iterator[PoolFile]:
    try:
        fields = tagfile.fields(stanza)
    except tagfile.TagFileError as exc:
        raise Rejected("index-mismatch", f"{where}: {exc}") from None
    if b"package" not in fields:
        raise Rejected("index-mismatch", f"{where}: a source stanza has no Package field (apt refuses the whole index)")
    package, version = _text(fields[b"package"]), _text(fields.get(b"version", b""))
    directory = _text(fields.get(b"directory", b""))
    if not directory:
        raise Rejected("index-mismatch", f"{where}: source {package[:80]!r} has no Directory")
    files: dict[str, tuple[int, dict[str, str]]] = {}
    for key, algo in _SRC_HASHES.items():
        for digest, size, name in _sums(
            _text(fields.get(key, b"")), algo, f"{where}: {package} {key.decode()}", "index-mismatch"
        ):
            known, hashes = files.setdefault(name, (size, {}))
            if known != size:
                raise Rejected("index-mismatch", f"{where}: {name} listed with two sizes")
            hashes[algo] = digest
    for name, (size, hashes) in files.items():
        path = check_path(f"{directory}/{name}", where)
        if "sha256" not in hashes:
            raise Rejected("index-mismatch", f"{where}: {path} has no Checksums-Sha256")
        yield PoolFile(Expected(path, size, hashes), package, version)


class _Stanzas:
    """Cuts a stream of index bytes into stanzas as they complete, so memory holds one stanza
    (up to STANZA_LIMIT), not the index."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.rest = b""
        self.first = True  # apt skips blank lines between stanzas, not at the start of the file
        self.plain = False  # _plain() holds for the whole block the stanzas being yielded come from

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        # A separator begun in `rest` can only be its tail: a newline and carriage returns.
        tail = self.rest.rstrip(b"\r")
        start = len(tail) - 1 if tail.endswith(b"\n") else len(self.rest)
        data = self.rest + chunk
        cut = max((m.end() for m in tagfile.STANZA_END.finditer(data, start)), default=None)
        if cut is None:
            self.rest = data
        else:
            self.rest = data[cut:]
            first, self.first = self.first, False
            block = data[:cut]
            self.plain = _plain(b"\n" + block)  # one search per block instead of one per stanza
            yield from tagfile.stanzas(block, start_of_file=first)
        if len(self.rest) > STANZA_LIMIT:
            raise Rejected("too-large", f"{self.where}: a stanza longer than {STANZA_LIMIT} bytes")

    def finish(self) -> Iterator[bytes]:
        self.plain = _plain(b"\n" + self.rest)
        yield from tagfile.stanzas(self.rest, start_of_file=self.first)
        self.rest = b""


class _LargeReads:
    """A compressed file read 1 MiB at a time: the xz and bzip2 readers ask for 8 KiB, and each
    call needs the GIL, which a parse in another thread hands over only every 5 ms."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw

    def read(self, size: int = -1) -> bytes:
        return self.raw.read(-1 if size < 0 else max(size, 1 << 20))

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.raw.close()


def _decompressed(ext: str, raw: BinaryIO) -> BinaryIO:
    """A reader of the decompressed bytes; each read(n) returns at most n bytes, whatever the ratio."""
    if ext == "":
        return raw
    if ext == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if ext in (".xz", ".lzma"):
        return lzma.LZMAFile(_LargeReads(raw))
    if ext == ".bz2":
        return bz2.BZ2File(_LargeReads(raw))
    if ext == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if ext == ".lz4":
        import lz4.frame

        return lz4.frame.LZ4FrameFile(raw)
    raise ValueError(ext)


def compression(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return next((ext for ext in COMPRESSIONS[1:] if name.endswith(ext)), "")


# Cheapest to decompress first: the variant a sync parses; the others are only hashed, alongside.
_DECOMPRESS_COST = {"": 0, ".gz": 1, ".lz4": 2, ".zst": 3, ".bz2": 4, ".lzma": 5, ".xz": 5}


def read_index(
    group: IndexGroup,
    present: list[tuple[Expected, int, dict[str, str]]],
    open_file: Callable[[Expected], BinaryIO],
    max_bytes: int,
    memo: ParseMemo | None = None,
) -> list[PoolFile] | None:
    """Check the downloaded variants of one index and return the pool files it names.

    `present`: (entry, size, hashes) of every variant that arrived. Each must match its Release
    entry; each is then decompressed incrementally, never past the uncompressed size the Release
    declares nor `max_bytes` (limits.max_index_bytes); all must decompress to the same bytes
    (the uncompressed entry's, when listed). The cheapest to decompress is parsed by apt's rules
    as it streams, while the others are decompressed and hashed in threads of their own (the
    decompressors and hashes run outside the GIL). Runs in a worker thread: CPU-bound for large
    indices.
    """
    if not present:
        names = ", ".join(v.path.rsplit("/", 1)[-1] for v in group.variants)
        raise Rejected(
            "index-missing", f"{group.variants[0].path}: none of the listed variants ({names}) is on the upstream"
        )
    for expected, size, hashes in present:
        expected.check(size, hashes, "index-mismatch")
    parse = group.kind in ("Packages", "Sources")
    # The uncompressed variant's hashes were just checked: read it again only to parse it.
    variants = [e for e, _, _ in present if e is not group.plain or parse]
    variants.sort(key=lambda e: _DECOMPRESS_COST.get(compression(e.path), 9))
    if not variants:
        return None
    first, others = variants[0], variants[1:]
    if not others:
        return _read_variant(group, first, open_file, max_bytes, parse, memo)[0]
    with ThreadPoolExecutor(max_workers=len(others), thread_name_prefix="aptguard-index") as pool:
        futures = [pool.submit(_read_variant, group, e, open_file, max_bytes, False) for e in others]
        try:
            entries, digest = _read_variant(group, first, open_file, max_bytes, parse, memo)
        except BaseException:
            for future in futures:
                future.cancel()  # not started yet: no need to read them
            raise
        for expected, future in zip(others, futures, strict=True):
            if future.result()[1] != digest:  # result() raises what was wrong with that variant
                raise Rejected("index-mismatch", f"{expected.path}: decompresses to other content than its siblings")
    return entries


def _read_variant(
    group: IndexGroup,
    expected: Expected,
    open_file: Callable[[Expected], BinaryIO],
    max_bytes: int,
    parse: bool,
    memo: ParseMemo | None = None,
) -> tuple[list[PoolFile] | None, str]:
    """Decompress one variant within its limit and check it against the uncompressed entry;
    (its pool files if asked to parse it, the SHA256 of its content)."""
    if memo is None or group.kind != "Packages":
        memo = None
    plain = group.plain
    limit = min(max_bytes, plain.size) if plain is not None else max_bytes
    algos = sorted(set(plain.hashes if plain else ()) | {"sha256"})
    where = expected.path
    stanzas = _Stanzas(where) if parse else None
    already = expected is plain
    hashers = {} if already else {a: hashlib.new(a) for a in algos}
    entries: list[PoolFile] = []
    total = 0
    n = 0
    try:
        # A variant only hashed runs in a thread beside the parse, and each read needs the GIL,
        # which the parse hands over every 5 ms: few large reads, not many small ones.
        size = CHUNK if stanzas is not None else 16 * CHUNK
        with open_file(expected) as raw, _decompressed(compression(where), raw) as text:
            while chunk := text.read(size):
                total += len(chunk)
                if total > limit:
                    declared = (
                        "the uncompressed size the Release declares" if limit < max_bytes else "limits.max_index_bytes"
                    )
                    raise Rejected("too-large", f"{where}: decompresses past {limit} bytes ({declared})")
                for h in hashers.values():
                    h.update(chunk)
                if stanzas is not None:
                    for stanza in stanzas.feed(chunk):
                        n += 1
                        if memo is not None:
                            entries.append(memo.entry(stanza, n, where, stanzas.plain))
                        else:
                            entries.extend(_entries(group.kind, stanza, n, where, stanzas.plain))
    except Rejected:
        raise
    except Exception as exc:  # every decompressor's own error types: a corrupt or truncated file
        raise Rejected("index-mismatch", f"{where}: cannot be decompressed ({type(exc).__name__}: {exc})") from None
    if stanzas is not None:
        for stanza in stanzas.finish():
            n += 1
            if memo is not None:
                entries.append(memo.entry(stanza, n, where, stanzas.plain))
            else:
                entries.extend(_entries(group.kind, stanza, n, where, stanzas.plain))
    got = dict(expected.hashes) if already else {a: h.hexdigest() for a, h in hashers.items()}
    if plain is not None and (total != plain.size or any(got[a] != h for a, h in plain.hashes.items())):
        raise Rejected(
            "index-mismatch", f"{where}: decompresses to other content than the Release lists for {plain.path}"
        )
    return (entries if parse else None), got["sha256"]


class ParseMemo:
    """Packages stanzas already read by earlier syncs of an upstream, by the SHA-256 of their bytes:
    a stanza byte for byte the same reads the same by apt's rules, so only what changed since is
    parsed (1 % of a Debian index a day). Kept by the store between syncs; `seen` is what this
    sync met (stanza digest -> [Filename, Size, hashes, Package, Version]). FORMAT changes with
    any change to how a Packages stanza is read: a memo of another format is not used."""

    FORMAT = 1

    def __init__(self, known: dict[str, list[Any]] | None = None) -> None:
        self.known = known or {}
        self.seen: dict[str, list[Any]] = {}

    @classmethod
    def from_json(cls, data: Any) -> ParseMemo:
        """A memo from its JSON; an empty one for anything this version did not write."""
        if isinstance(data, dict) and data.get("format") == cls.FORMAT and isinstance(data.get("stanzas"), dict):
            return cls(data["stanzas"])
        return cls()

    def to_json(self, keep_known: bool) -> dict[str, Any]:
        """What the next sync starts from: the stanzas met now (and those of the earlier syncs,
        when suites reused unchanged were not read this time)."""
        stanzas = {**self.known, **self.seen} if keep_known else self.seen
        return {"format": self.FORMAT, "stanzas": stanzas}

    def entry(self, stanza: bytes, n: int, where: str, plain: bool) -> PoolFile:
        """The pool file of a Packages stanza: remembered, or parsed (and remembered)."""
        key = hashlib.sha256(stanza).hexdigest()
        known = self.seen.get(key) or self.known.get(key)
        found = _remembered(known, where) if known is not None else None
        if found is None:
            found = _package_entry(stanza, n, where, plain)
            known = [found.expected.path, found.expected.size, found.expected.hashes, found.package, found.version]
        self.seen[key] = known
        return found


def _remembered(known: Any, where: str) -> PoolFile | None:
    """A remembered reading, if it is one this version wrote; its path is checked again, so a
    damaged cache cannot name a path outside the repository."""
    try:
        path, size, hashes, package, version = known
        if not (isinstance(path, str) and isinstance(size, int) and isinstance(hashes, dict) and "sha256" in hashes):
            return None
        check_path(path, where)
        return PoolFile(Expected(path, size, dict(hashes)), str(package), str(version))
    except (TypeError, ValueError, Rejected):
        return None


def index_stanzas(path: str, raw: BinaryIO, max_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Each stanza of a stored Packages index (`raw`: its object, already verified against its
    Release), cut exactly as a sync cuts it, with whether the fast reading applies to it (see
    package_entry, relation_fields); decompressed never past `max_bytes`. For a published view,
    which writes the very stanzas apt would read."""
    stanzas = _Stanzas(path)
    total = 0
    try:
        with _decompressed(compression(path), raw) as text:
            while chunk := text.read(CHUNK):
                total += len(chunk)
                if total > max_bytes:
                    raise Rejected("too-large", f"{path}: decompresses past {max_bytes} bytes (limits.max_index_bytes)")
                for stanza in stanzas.feed(chunk):
                    yield stanza, stanzas.plain
    except Rejected:
        raise
    except Exception as exc:  # a decompressor's own error: the object changed since it was verified
        raise Rejected("index-mismatch", f"{path}: cannot be decompressed ({type(exc).__name__}: {exc})") from None
    for stanza in stanzas.finish():
        yield stanza, stanzas.plain


def package_entry(stanza: bytes, n: int, where: str, plain: bool, memo: ParseMemo | None = None) -> PoolFile:
    """The pool file of the `n`th stanza of a Packages index, read as a sync reads it."""
    return memo.entry(stanza, n, where, plain) if memo is not None else _package_entry(stanza, n, where, plain)


_RELATION_FIELD = re.compile(
    rb"\n(package|version|depends|pre-depends|provides|filename)[ \t]*:[ \t]*([^\n]*(?:\n[ \t][^\n]*)*)",
    re.IGNORECASE,
)
_RELATIONS = (b"package", b"version", b"depends", b"pre-depends", b"provides", b"filename")


def relation_fields(stanza: bytes, plain: bool) -> tuple[str, ...]:
    """Package, Version, Depends, Pre-Depends, Provides and Filename of a Packages stanza by
    apt's rules ("" where absent): one search over its bytes where `plain` (index_stanzas) says nothing in it
    could read otherwise, else tagfile.fields."""
    found: dict[bytes, bytes] = {}
    if plain:
        for key, value in _RELATION_FIELD.findall(b"\n" + stanza):
            found[key.lower()] = value.strip(tagfile.WHITESPACE)
    else:
        try:
            found = tagfile.fields(stanza)
        except tagfile.TagFileError as exc:
            raise Rejected("index-mismatch", f"stanza unreadable by apt's rules: {exc}") from None
    return tuple(_text(found.get(name, b"")) for name in _RELATIONS)


def _entries(kind: str, stanza: bytes, n: int, where: str, plain: bool = False) -> Iterable[PoolFile]:
    if kind == "Packages":
        return (_package_entry(stanza, n, where, plain),)
    return _source_entries(stanza, where)


def merge_pool(entries: Iterable[PoolFile], into: dict[str, PoolFile]) -> None:
    """Add pool files; one path named with two different contents cannot be served: refuse it."""
    for entry in entries:
        old = into.get(entry.expected.path)
        if old is None:
            into[entry.expected.path] = entry
        elif old.expected.hashes.get("sha256") != entry.expected.hashes.get("sha256"):
            raise Rejected(
                "package-mismatch",
                f"{entry.expected.path}: two indices give it different SHA256 "
                f"({old.expected.hashes.get('sha256')} and {entry.expected.hashes.get('sha256')})",
            )


def suite_base(suite: str) -> str:
    if suite == "/":
        return ""
    if suite.endswith("/"):
        return suite
    return f"dists/{suite}/"


def rfc_date(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S UTC")
