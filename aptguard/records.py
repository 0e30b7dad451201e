"""The records aptguard writes to disk, as typed values: a snapshot's manifest and an upstream's state.

    meta/NAME/ID.json    Manifest       what a sync verified: per suite its Release, per file size and hashes
    state/NAME.json      UpstreamState  hold, rollback targets, the last sync and the outcome counters

Each record turns its JSON into a value (`from_json`) and back (`to_json`) with the same keys and
values the files have always had, so a data folder written before these classes existed reads
the same, and a record read and written again is the same file. store.py reads and writes these
files (summary.py's child process, handed a manifest's path, reads one too); every other module
reads attributes (`manifest.files`, `state.hold`).

A record carries a format number. `from_json` refuses a newer one than this code knows, naming the
file, rather than guess at fields it does not understand: the operator runs a newer aptguard (or
restores the data folder) instead of this version rewriting what it cannot read.

A manifest's files are plain dicts typed as `FileRecord`, not one object each: a manifest of 60,000
files (11.7 MB) parses in about 85 ms, and building a dataclass per file would add another 57 to
72 ms (and 25 ms to write it back), while a TypedDict costs nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict


class RecordError(ValueError):
    """A record that this version of aptguard cannot read: a newer format, or a field missing or malformed."""


class FileRecord(TypedDict):
    """One verified file: its size and every hash recorded when it was verified (algorithm -> hex)."""

    size: int
    sha256: str
    md5: NotRequired[str]
    sha1: NotRequired[str]
    sha512: NotRequired[str]


Listing = dict[str, dict[str, dict[str, str]]]  # suite -> "main/amd64" -> package -> version


def iso(when: datetime) -> str:
    """A time as the records write it: ISO 8601 in UTC with a "Z" (datetime.fromisoformat reads it back)."""
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def file_record(size: int, hashes: dict[str, str]) -> FileRecord:
    """The record of a file of `size` bytes with these hashes (SHA256 among them)."""
    return {"size": size, **hashes}  # type: ignore[typeddict-item]


def _check_format(data: Any, known: int, what: str, source: str) -> int:
    where = f" ({source})" if source else ""
    if not isinstance(data, dict):
        raise RecordError(f"{what}{where}: not a JSON object")
    version = data.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordError(f"{what}{where}: format {version!r} is not a number")
    if version > known:
        raise RecordError(
            f"{what}{where}: format {version} is newer than this aptguard reads (format {known}); "
            "run the aptguard version that wrote it, or a newer one"
        )
    return version


def _missing(what: str, source: str, exc: Exception) -> RecordError:
    where = f" ({source})" if source else ""
    if isinstance(exc, KeyError):
        return RecordError(f"{what}{where}: field {exc.args[0]!r} is missing")
    return RecordError(f"{what}{where}: malformed ({exc})")


# ---------------------------------------------------------------- manifest


@dataclass
class SuiteRecord:
    """What a snapshot holds of one suite: its verified Release's fields, the signed files' SHA256
    and every path of the suite (signed files, indices, by-hash entries and the pool files they name)."""

    date: str  # the Release's Date, ISO 8601 UTC
    valid_until: str | None
    origin: str = ""
    label: str = ""
    codename: str = ""
    suite: str = ""
    acquire_by_hash: bool = False
    signers: list[str] = field(default_factory=list)
    signed: dict[str, str] = field(default_factory=dict)  # "InRelease" / "Release" / "Release.gpg" -> SHA256
    paths: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SuiteRecord:
        return cls(
            date=data["date"],
            valid_until=data.get("valid_until"),
            origin=data.get("origin", ""),
            label=data.get("label", ""),
            codename=data.get("codename", ""),
            suite=data.get("suite", ""),
            acquire_by_hash=data.get("acquire_by_hash", False),
            signers=data.get("signers", []),
            signed=data.get("signed", {}),
            paths=data.get("paths", []),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "valid_until": self.valid_until,
            "origin": self.origin,
            "label": self.label,
            "codename": self.codename,
            "suite": self.suite,
            "acquire_by_hash": self.acquire_by_hash,
            "signers": self.signers,
            "signed": self.signed,
            "paths": self.paths,
        }


@dataclass
class Published:
    """A published view (SPEC §7): the snapshot's tree holds indices and Releases aptguard wrote and
    signed; the upstream's own verified signed files and indices are kept in `Manifest.source`."""

    date: str  # ISO 8601 UTC: the published Releases' Date (also their Last-Modified)
    valid_until: str  # ISO 8601 UTC
    keys: list[TrustedKey]  # the signing keys, with their expiry (status warns before it)
    config: str  # digest of the publish settings the view was made with: changed settings republish
    packages: int = 0  # package entries in the view, over all suites and architectures

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Published:
        return cls(
            date=data["date"],
            valid_until=data["valid_until"],
            keys=[TrustedKey.from_json(k) for k in data["keys"]],
            config=data["config"],
            packages=data.get("packages", 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "valid_until": self.valid_until,
            "keys": [k.to_json() for k in self.keys],
            "config": self.config,
            "packages": self.packages,
        }


@dataclass
class Manifest:
    """meta/NAME/ID.json: everything a snapshot was verified to hold, written once at commit."""

    # 2: with `listed` (an on-demand upstream's pool files not held); 3: with `published` and
    # `source` (a re-signed view). Each is written with the lowest format that can hold it, so an
    # older aptguard refuses, rather than garbage-collects, what it does not understand.
    FORMAT = 3

    id: str
    upstream: str
    url: str
    created: str  # ISO 8601 UTC
    suites: dict[str, SuiteRecord]
    files: dict[str, FileRecord]  # path in the tree -> record
    by_hash_own: list[str] = field(default_factory=list)  # by-hash paths this snapshot's Releases list
    packages: Listing = field(default_factory=dict)
    count: int = 0
    bytes: int = 0
    format: int = FORMAT
    # policy = "on-demand": pool files verified by their index but not fetched at sync time
    # (path -> record); served and stored at a client's first request. `files` is what is held.
    listed: dict[str, FileRecord] = field(default_factory=dict)
    # A published view: its record, and the upstream's verified signed files and indices (path ->
    # record), kept as objects for the next sync but not in the served tree.
    published: Published | None = None
    source: dict[str, FileRecord] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        id: str,  # noqa: A002 - the JSON key
        upstream: str,
        url: str,
        created: str,
        suites: dict[str, SuiteRecord],
        files: dict[str, FileRecord],
        by_hash_own: list[str],
        packages: Listing,
        listed: dict[str, FileRecord] | None = None,
        published: Published | None = None,
        source: dict[str, FileRecord] | None = None,
    ) -> Manifest:
        """A new manifest: count and bytes are computed from `files`."""
        return cls(
            id=id,
            upstream=upstream,
            url=url,
            created=created,
            suites=suites,
            files=files,
            by_hash_own=by_hash_own,
            packages=packages,
            count=len(files),
            bytes=sum(r["size"] for r in files.values()),
            listed=listed or {},
            format=3 if published else 2 if listed else 1,
            published=published,
            source=source or {},
        )

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> Manifest:
        """The manifest in `data` (parsed JSON); RecordError, naming `source`, if it cannot be read."""
        version = _check_format(data, cls.FORMAT, "manifest", source)
        try:
            files = data["files"]
            suites = data["suites"]
            listed = data.get("listed", {})
            source = data.get("source", {})
            published = data.get("published")
            if not all(isinstance(v, dict) for v in (files, suites, listed, source)):
                raise TypeError("files, listed, source and suites must be objects")
            return cls(
                id=data["id"],
                upstream=data["upstream"],
                url=data["url"],
                created=data["created"],
                suites={name: SuiteRecord.from_json(meta) for name, meta in suites.items()},
                files=files,
                by_hash_own=data.get("by_hash_own", []),
                packages=data.get("packages", {}),
                count=data["count"],
                bytes=data["bytes"],
                format=version,
                listed=listed,
                published=Published.from_json(published) if published is not None else None,
                source=source,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise _missing("manifest", source, exc) from exc

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"listed": self.listed} if self.listed else {}
        if self.published is not None:
            extra |= {"published": self.published.to_json(), "source": self.source}
        return {
            "format": self.format,
            "id": self.id,
            "upstream": self.upstream,
            "url": self.url,
            "created": self.created,
            "suites": {name: meta.to_json() for name, meta in self.suites.items()},
            "files": self.files,
            "by_hash_own": self.by_hash_own,
            "packages": self.packages,
            "count": self.count,
            "bytes": self.bytes,
            **extra,
        }

    def upstream_record(self, path: str) -> FileRecord | None:
        """The record of a file of the upstream's own tree this snapshot verified (in a published
        view, its signed files and indices are not served but kept in `source`)."""
        return self.source.get(path) or self.files.get(path)

    def listed_record(self, path: str) -> FileRecord | None:
        """The record of a file the snapshot lists, held or on demand."""
        return self.files.get(path) or self.listed.get(path)


# ---------------------------------------------------------------- upstream state


@dataclass
class LastSync:
    """How the last sync of an upstream ended."""

    outcome: str  # promoted | unchanged | stored | rejected
    reason: str | None
    detail: str
    at: str  # ISO 8601 UTC, when it started
    snapshot: str | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LastSync:
        return cls(
            outcome=data["outcome"],
            reason=data.get("reason"),
            detail=data.get("detail", ""),
            at=data["at"],
            snapshot=data.get("snapshot"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "detail": self.detail,
            "at": self.at,
            "snapshot": self.snapshot,
        }


@dataclass
class TrustedKey:
    """A key of the upstream's keyring, as the last sync found it (for expiry warnings)."""

    fingerprint: str
    uid: str
    expires: str | None  # ISO 8601 UTC, None for a key that does not expire

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrustedKey:
        return cls(fingerprint=data["fingerprint"], uid=data.get("uid", ""), expires=data.get("expires"))

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "uid": self.uid, "expires": self.expires}


# The keys UpstreamState knows; any other (such as "previous", written by early versions) is kept as it is.
_STATE_KEYS = ("hold", "rollback_targets", "last_sync", "last_success", "keys", "outcomes")


@dataclass
class UpstreamState:
    """state/NAME.json: what is decided about an upstream beyond its snapshots.

    A key is written only once it has been set, as the file has always been: a state that was never
    held has no "hold", and format 1 is the file without a "format" key."""

    FORMAT = 1

    hold: bool | None = None  # True after a rollback: syncs store but do not promote
    rollback_targets: dict[str, str] | None = None  # snapshot id -> the snapshot it replaced as current
    last_sync: LastSync | None = None
    last_success: str | None = None  # ISO 8601 UTC of the last sync that was not rejected
    keys: list[TrustedKey] | None = None
    outcomes: dict[str, int] | None = None  # "OUTCOME:REASON" -> syncs, for /metrics
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not use, written back unchanged

    @property
    def held(self) -> bool:
        return bool(self.hold)

    def rollback_target(self, current: str | None) -> str | None:
        """The snapshot that `current` replaced, if recorded."""
        return (self.rollback_targets or {}).get(current) if current else None

    def count_outcome(self, outcome: str, reason: str | None) -> None:
        counts = self.outcomes if self.outcomes is not None else {}
        key = f"{outcome}:{reason or ''}"
        counts[key] = counts.get(key, 0) + 1
        self.outcomes = counts

    @classmethod
    def from_json(cls, data: Any, source: str = "") -> UpstreamState:
        """The state in `data` (parsed JSON); RecordError, naming `source`, if it cannot be read."""
        _check_format(data, cls.FORMAT, "upstream state", source)
        try:
            last = data.get("last_sync")
            keys = data.get("keys")
            return cls(
                hold=data.get("hold"),
                rollback_targets=data.get("rollback_targets"),
                last_sync=LastSync.from_json(last) if last else None,
                last_success=data.get("last_success"),
                keys=[TrustedKey.from_json(k) for k in keys] if keys is not None else None,
                outcomes=data.get("outcomes"),
                extra={k: v for k, v in data.items() if k not in _STATE_KEYS},
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise _missing("upstream state", source, exc) from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.hold is not None:
            out["hold"] = self.hold
        if self.rollback_targets is not None:
            out["rollback_targets"] = self.rollback_targets
        if self.last_sync is not None:
            out["last_sync"] = self.last_sync.to_json()
        if self.last_success is not None:
            out["last_success"] = self.last_success
        if self.keys is not None:
            out["keys"] = [k.to_json() for k in self.keys]
        if self.outcomes is not None:
            out["outcomes"] = self.outcomes
        return out
