"""The trust boundary: unverified bytes in, trusted objects out, or Rejected saying why not.

Order, as apt judges: signature -> Release fields (dates, suite, changes, rollback) -> index
hashes -> package entries. Nothing here opens a socket or touches the data folder; the only
outside process is gpg, run on a home that holds one upstream's keys (keyring.py).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from aptguard.config import UpstreamConfig
from aptguard.keyring import Keyring
from aptguard.reasons import Rejected

# apt's own allowance for a Release Date ahead of the local clock (Acquire::Max-FutureTime).
MAX_FUTURE = timedelta(seconds=10)
# Release hash lists, and the hash names used everywhere inside aptguard.
RELEASE_HASHES = {"MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
INDEX_HASHES = {"MD5sum": "md5", "MD5Sum": "md5", "SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
BY_HASH_DIR = {"md5": "MD5Sum", "sha1": "SHA1", "sha256": "SHA256", "sha512": "SHA512"}
HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
# gpg's digest algorithm numbers (RFC 4880 9.4) that apt no longer accepts.
WEAK_DIGESTS = {"1": "MD5", "2": "SHA1", "3": "RIPEMD160"}
COMPRESSIONS = ("", ".xz", ".gz", ".bz2", ".lzma", ".zst", ".lz4")
_PATH_WORD = re.compile(r"^[A-Za-z0-9_.+~:%@=,-]+$")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_.+~:%@=,-]+(?:/[A-Za-z0-9_.+~:%@=,-]+)*")


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
    text: str
    fields: dict[str, str]
    date: datetime
    valid_until: datetime | None
    files: dict[str, Expected]
    signers: list[str]
    by_hash: bool

    @property
    def origin(self) -> str:
        return self.fields.get("Origin", "")

    @property
    def label(self) -> str:
        return self.fields.get("Label", "")

    @property
    def codename(self) -> str:
        return self.fields.get("Codename", "")

    def summary(self) -> dict[str, object]:
        return {
            "date": _iso(self.date),
            "valid_until": _iso(self.valid_until) if self.valid_until else None,
            "origin": self.origin,
            "label": self.label,
            "codename": self.codename,
            "suite": self.fields.get("Suite", ""),
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
    def from_summary(cls, s: dict[str, object]) -> PreviousRelease:
        return cls(
            date=datetime.fromisoformat(str(s["date"])),
            origin=str(s.get("origin", "")),
            label=str(s.get("label", "")),
            codename=str(s.get("codename", "")),
        )


# ---------------------------------------------------------------- signatures


def split_clearsigned(data: bytes, where: str) -> None:
    """Apply apt's framing rule: one clearsigned block, nothing but blank lines around it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("signature-invalid", f"{where}: not UTF-8 text") from None
    lines = text.split("\n")
    i = 0
    while i < len(lines) and not lines[i].strip():
        i += 1
    if i == len(lines) or lines[i].rstrip("\r") != "-----BEGIN PGP SIGNED MESSAGE-----":
        raise Rejected("signature-invalid", f"{where}: text before the clearsigned block (apt refuses it)")
    i += 1
    while i < len(lines) and lines[i].strip():
        if not lines[i].startswith("Hash: "):
            raise Rejected("signature-invalid", f"{where}: unexpected armor header {lines[i][:60]!r}")
        i += 1
    begins = [n for n, line in enumerate(lines) if line.rstrip("\r") == "-----BEGIN PGP SIGNATURE-----"]
    ends = [n for n, line in enumerate(lines) if line.rstrip("\r") == "-----END PGP SIGNATURE-----"]
    starts = [n for n, line in enumerate(lines) if line.startswith("-----BEGIN PGP SIGNED MESSAGE-----")]
    if len(begins) != 1 or len(ends) != 1 or len(starts) != 1 or not begins[0] < ends[0]:
        raise Rejected("signature-invalid", f"{where}: not exactly one clearsigned block (apt refuses it)")
    if any(line.strip() for line in lines[ends[0] + 1 :]):
        raise Rejected("signature-invalid", f"{where}: text after the signature block (apt refuses it)")


def _judge(status: str, keyring: Keyring, where: str) -> list[str]:
    """Decide from gpg's per-signature status lines, as apt does; return the good signers."""
    sigs: list[dict[str, list[str]]] = []
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        word, *args = line[9:].split()
        if word == "NEWSIG":
            sigs.append({})
        elif word in ("GOODSIG", "BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG", "VALIDSIG", "NO_PUBKEY"):
            if not sigs:
                sigs.append({})
            sigs[-1][word] = args
    good: list[str] = []
    bad: list[str] = []
    expired: list[str] = []
    revoked: list[str] = []
    unknown: list[str] = []
    weak: list[str] = []
    broken: list[str] = []
    for sig in sigs:
        valid = sig.get("VALIDSIG")
        fpr = valid[0].upper() if valid else ""
        primary = valid[9].upper() if valid and len(valid) > 9 else fpr
        if "BADSIG" in sig:
            bad.append(sig["BADSIG"][0] if sig["BADSIG"] else "?")
        elif "REVKEYSIG" in sig:
            revoked.append(primary or sig["REVKEYSIG"][0])
        elif "EXPKEYSIG" in sig:
            expired.append(primary or sig["EXPKEYSIG"][0])
        elif "EXPSIG" in sig:
            broken.append(f"signature by {primary or sig['EXPSIG'][0]} has expired")
        elif "GOODSIG" in sig and valid:
            if fpr not in keyring.fingerprints and primary not in keyring.fingerprints:
                unknown.append(primary)
            elif valid[7] in WEAK_DIGESTS:
                weak.append(f"{primary} (digest {WEAK_DIGESTS[valid[7]]})")
            else:
                good.append(primary)
        elif "ERRSIG" in sig:
            args = sig["ERRSIG"]
            ident = (args[6] if len(args) > 6 and args[6] != "-" else args[0]).upper()
            if "NO_PUBKEY" in sig or (len(args) > 5 and args[5] == "9"):
                unknown.append(ident)
            elif len(args) > 2 and args[2] in WEAK_DIGESTS:
                weak.append(f"{ident} (digest {WEAK_DIGESTS[args[2]]})")
            else:
                broken.append(f"signature by {ident} could not be checked (gpg error {args[5:6]})")
        else:
            broken.append("a signature gpg could not judge")
    if bad:
        raise Rejected("signature-invalid", f"{where}: bad signature by key {bad[0]} (the signed text was altered)")
    if good:
        return good
    if revoked:
        raise Rejected("signature-key-revoked", f"{where}: signed by revoked key {revoked[0]}")
    if expired:
        raise Rejected("signature-key-expired", f"{where}: signed by expired key {expired[0]}")
    if unknown:
        raise Rejected(
            "signature-unknown-key",
            f"{where}: signed by key {unknown[0]}, which is not in the keyring {keyring.source}",
        )
    if weak:
        raise Rejected("signature-invalid", f"{where}: only weak-digest signatures, by {weak[0]}; apt rejects them")
    if broken:
        raise Rejected("signature-invalid", f"{where}: {broken[0]}")
    raise Rejected("signature-invalid", f"{where}: no OpenPGP signature found")


def verify_inrelease(data: bytes, keyring: Keyring, where: str) -> tuple[str, list[str]]:
    """Return (signed text as gpg output it, good signers) of an InRelease."""
    split_clearsigned(data, where)
    result = keyring.gpg.decrypt(data)
    signers = _judge(result.stderr or "", keyring, where)
    try:
        text = result.data.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected("signature-invalid", f"{where}: signed text is not UTF-8") from None
    if not text.strip():
        raise Rejected("signature-invalid", f"{where}: gpg returned no signed text")
    return text, signers


def verify_detached(release: bytes, signature: bytes, keyring: Keyring, where: str) -> tuple[str, list[str]]:
    """Return (Release text, good signers) for Release + Release.gpg."""
    with tempfile.NamedTemporaryFile(prefix="aptguard-sig-", suffix=".gpg") as sig:
        sig.write(signature)
        sig.flush()
        result = keyring.gpg.verify_data(sig.name, release)
    signers = _judge(result.stderr or "", keyring, where)
    try:
        return release.decode("utf-8"), signers
    except UnicodeDecodeError:
        raise Rejected("release-invalid", f"{where}: Release is not UTF-8 text") from None


# ---------------------------------------------------------------- Release fields


def parse_control(text: str, where: str, reason: str) -> dict[str, str]:
    """Parse one deb822 paragraph strictly: `Key: value` lines and indented continuations."""
    fields: dict[str, str] = {}
    key = None
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if fields and any(rest.strip() for rest in text.split("\n")[n:]):
                raise Rejected(reason, f"{where}: more than one paragraph (line {n})")
            continue
        if line[0] in " \t":
            if key is None:
                raise Rejected(reason, f"{where}: continuation line {n} before any field")
            fields[key] += "\n" + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or " " in name:
            raise Rejected(reason, f"{where}: line {n} is not 'Field: value': {line[:60]!r}")
        key = name
        fields[key] = value.strip()
    return fields


def _date(value: str, name: str, where: str) -> datetime:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        parsed = None
    if parsed is None:
        raise Rejected("release-invalid", f"{where}: {name} {value!r} is not an RFC 2822 date")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def check_release(
    text: str,
    signers: list[str],
    upstream: UpstreamConfig,
    suite: str,
    now: datetime,
    where: str,
) -> TrustedRelease:
    """Check a signed Release's own fields: dates, suite, components, architectures, hash lists."""
    fields = parse_control(text, where, "release-invalid")
    if "Date" not in fields:
        raise Rejected("release-invalid", f"{where}: no Date field")
    date = _date(fields["Date"], "Date", where)
    valid_until = _date(fields["Valid-Until"], "Valid-Until", where) if fields.get("Valid-Until") else None
    if "SHA256" not in fields:
        raise Rejected("release-invalid", f"{where}: no SHA256 list (apt needs a strong hash)")
    if date > now + MAX_FUTURE:
        raise Rejected("release-future", f"{where}: Date {fields['Date']} lies in the future (now {rfc_date(now)})")
    if valid_until is not None and valid_until < now:
        raise Rejected(
            "release-expired", f"{where}: Valid-Until {fields['Valid-Until']} has passed (now {rfc_date(now)})"
        )
    flat = suite.endswith("/")
    names = {fields.get("Suite", ""), fields.get("Codename", "")} - {""}
    # apt's metaIndex::CheckDist: the suite itself, or its part before the last "/" ("" for a flat
    # "/" passes: Kubernetes' flat Release names no suite; a flat "stable/" must say "stable").
    dist = suite.rsplit("/", 1)[0] if "/" in suite else suite
    if suite not in names and dist not in ("", ".") and dist not in names and suite.split("/")[-1] not in names:
        raise Rejected(
            "release-mismatch",
            f"{where}: Suite {fields.get('Suite')!r} / Codename {fields.get('Codename')!r}, expected {suite!r}",
        )
    if not flat:
        if "Components" in fields:
            listed = set(fields["Components"].split())
            # Debian lists "updates/main" for security suites; apt accepts the last word.
            listed |= {c.split("/")[-1] for c in listed}
            for comp in upstream.components:
                if comp not in listed:
                    raise Rejected(
                        "release-mismatch",
                        f"{where}: component {comp!r} not in Components: {fields['Components']}",
                    )
    if "Architectures" in fields:
        listed = set(fields["Architectures"].split())
        for arch in upstream.architectures:
            if arch not in listed:
                raise Rejected(
                    "release-mismatch",
                    f"{where}: architecture {arch!r} not in Architectures: {fields['Architectures']}",
                )
    base = suite_base(suite)
    files: dict[str, Expected] = {}
    for list_name, algo in RELEASE_HASHES.items():
        if list_name not in fields:
            continue
        for line in fields[list_name].split("\n"):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 3 or not parts[1].isdigit() or len(parts[0]) != HEX_LEN[algo]:
                raise Rejected("release-invalid", f"{where}: bad {list_name} line {line[:80]!r}")
            digest, size, name = parts[0].lower(), int(parts[1]), parts[2]
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
        text=text,
        fields=fields,
        date=date,
        valid_until=valid_until,
        files=files,
        signers=signers,
        by_hash=fields.get("Acquire-By-Hash", "").lower() == "yes",
    )


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


def signed_files_match(inrelease_text: str, release: bytes, where: str) -> None:
    """InRelease's signed text must be the Release file, when upstream publishes both."""
    if inrelease_text.encode("utf-8").rstrip(b"\n") != release.rstrip(b"\n"):
        raise Rejected("signature-invalid", f"{where}: the signed text of InRelease differs from Release")


# ---------------------------------------------------------------- indices


def needed_indices(release: TrustedRelease, upstream: UpstreamConfig) -> list[IndexGroup]:
    """The indices a client of this mirror fetches, as listed in the Release.

    Release entries for anything else (stale files, other architectures) are ignored, as SPEC §2 says.
    """
    wanted: list[tuple[str, str, str, bool]] = []  # (kind, name, label, required)
    flat = release.suite.endswith("/")
    comps = [""] if flat else [c + "/" for c in upstream.components]
    archs = list(upstream.architectures)
    listed_archs = release.fields.get("Architectures", "").split()
    # apt fetches binary-all too, unless the Release says arch:all packages are already listed in
    # every architecture's Packages (Debian: "No-Support-for-Architecture-all: Packages").
    all_separate = release.fields.get("No-Support-for-Architecture-all", "") != "Packages"
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
    """Refuse any path that could leave the repository: absolute, `..`, empty parts, odd bytes."""
    if len(path) <= 1024 and _SAFE_PATH.fullmatch(path):  # the common case in one regex; else say why
        probe = f"/{path}/"
        if "/./" not in probe and "/../" not in probe:
            return path
    if not path or path.startswith("/") or "\\" in path or len(path) > 1024:
        raise Rejected("unsafe-path", f"{where}: path {path[:120]!r} is not a plain relative path")
    for part in path.split("/"):
        if part in ("", ".", "..") or not _PATH_WORD.match(part):
            raise Rejected("unsafe-path", f"{where}: path {path[:120]!r} has an unsafe part {part[:60]!r}")
    return path


# The fields of a Packages stanza a sync needs. One search per stanza, on its bytes, for
# "\nField:" (a literal start the regex engine skips to; the last occurrence wins, as apt's
# would): a full-size Debian index (63,000 stanzas, 50 MB) parses with no decoded copy of the text.
_PKG_FIELD = re.compile(rb"\n(Package|Version|Filename|Size|MD5sum|MD5Sum|SHA1|SHA256|SHA512):[ \t]*([^\n]*)")


def _stanza_fields(stanza: bytes) -> dict[str, str]:
    """Field -> value (spaces and tabs around it stripped) of the wanted fields of one stanza."""
    return {
        key.decode(): value.rstrip(b" \t").decode("utf-8", "surrogateescape")
        for key, value in _PKG_FIELD.findall(stanza)
    }


def packages_entries(text: str | bytes, where: str) -> Iterator[PoolFile]:
    """The pool files of a Packages index, with every hash it lists, paths checked."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    pos, end, n = 0, len(data), 0
    while pos < end:
        stop = data.find(b"\n\n", pos)
        if stop < 0:
            stop = end
        stanza = b"\n" + data[pos:stop]
        pos = stop + 2
        if stanza.isspace():
            continue
        n += 1
        fields = _stanza_fields(stanza)
        filename = fields.get("Filename")
        if not filename:
            raise Rejected("index-mismatch", f"{where}: entry {n} ({fields.get('Package', '?')}) has no Filename")
        check_path(filename, where)
        size = fields.get("Size", "")
        if not size.isdigit():
            raise Rejected("index-mismatch", f"{where}: {filename} has no valid Size")
        hashes = {INDEX_HASHES[k]: v.lower() for k, v in fields.items() if k in INDEX_HASHES}
        if "sha256" not in hashes:
            raise Rejected("index-mismatch", f"{where}: {filename} has no SHA256 (no strong hash to verify)")
        for algo, digest in hashes.items():
            if len(digest) != HEX_LEN[algo]:
                raise Rejected("index-mismatch", f"{where}: {filename} has a malformed {algo} {digest[:80]!r}")
        yield PoolFile(Expected(filename, int(size), hashes), fields.get("Package", ""), fields.get("Version", ""))


_SRC_FIELD = re.compile(
    r"^(Package|Version|Directory|Files|Checksums-Sha1|Checksums-Sha256|Checksums-Sha512):"
    r"[ \t]*(.*(?:\n[ \t].*)*)",
    re.MULTILINE,
)
_SRC_HASHES = {"Files": "md5", "Checksums-Sha1": "sha1", "Checksums-Sha256": "sha256", "Checksums-Sha512": "sha512"}


def sources_entries(text: str, where: str) -> Iterator[PoolFile]:
    """The files of a Sources index (dsc, orig and debian tarballs), every listed hash kept."""
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        fields = dict(_SRC_FIELD.findall(para))
        directory = fields.get("Directory", "").strip()
        if not directory:
            raise Rejected("index-mismatch", f"{where}: source {fields.get('Package', '?')} has no Directory")
        files: dict[str, tuple[int, dict[str, str]]] = {}
        for key, algo in _SRC_HASHES.items():
            for line in fields.get(key, "").split("\n"):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 3 or not parts[1].isdigit() or len(parts[0]) != HEX_LEN[algo]:
                    raise Rejected("index-mismatch", f"{where}: bad {key} line {line.strip()[:80]!r}")
                size, hashes = files.setdefault(parts[2], (int(parts[1]), {}))
                if size != int(parts[1]):
                    raise Rejected("index-mismatch", f"{where}: {parts[2]} listed with two sizes")
                hashes[algo] = parts[0].lower()
        for name, (size, hashes) in files.items():
            path = check_path(f"{directory}/{name}", where)
            if "sha256" not in hashes:
                raise Rejected("index-mismatch", f"{where}: {path} has no Checksums-Sha256")
            yield PoolFile(
                Expected(path, size, hashes), fields.get("Package", "").strip(), fields.get("Version", "").strip()
            )


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


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")
