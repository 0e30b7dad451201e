"""A published view (SPEC §7): the indices and signed Releases that clients of this mirror read
instead of the upstream's, made only from what the sync verified.

Per suite, from the upstream's verified Packages indices (read from the store under the SHA256
their signed Release gave, cut into stanzas by verify's own parser):
- the stanzas the view holds: every one, or with `packages` those packages and everything they
  need to install, resolved per architecture as apt would (resolve.py), `keep_versions` newest;
  each stanza is written byte for byte as the upstream signed it, so a client reads the same
  fields, and its pool file is the verified upstream object, unchanged;
- `Packages` per component and architecture (arch:all packages of a separate binary-all index
  listed in each architecture's, as Debian does), as .xz and .gz, plus uncompressed where the
  upstream served it (always listed in the Release, as Debian lists it: apt looks an index up
  by its uncompressed name); Translation files are passed through as the upstream signed them;
- a Release with the upstream's Origin, Label, Suite, Codename (apt refuses a change of them),
  a Date later than the previous view's (apt takes a Release whose Last-Modified equals its
  copy's as unchanged), Valid-Until, `Acquire-By-Hash: yes` and SHA256/SHA512 lists; every
  index is also at by-hash/SHA256/ and by-hash/SHA512/, so a promotion never makes a client
  mix an old Release with new indices (the Hash Sum mismatch of upstreams without by-hash);
- InRelease (clearsigned) and Release.gpg (detached), signed by every sign_with key, then read
  back by aptguard's own verifier with the mirror's public keys alone: what is published
  verifies as apt will verify it, or the sync ends as `publish-failed`.
Any failure is `publish-failed` naming the package and relation or the key: the served view
stays the previous one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from aptguard import resolve, verify
from aptguard.config import UpstreamConfig
from aptguard.keyring import Keyring
from aptguard.reasons import Rejected
from aptguard.records import FileRecord, Listing, Manifest, Published, TrustedKey, file_record, iso
from aptguard.signer import Signer
from aptguard.store import FileStore

VIEW_HASHES = {"sha256": "SHA256", "sha512": "SHA512"}  # listed in the Release, each with a by-hash folder
XZ_PRESET = 0  # a 60,000-package index (31 MB) in 1.5 s (-1: 2.2 s, -6: ~8 s), 5 % larger than at -1
RELEASE_FIELDS = ("origin", "label", "suite", "codename", "version", "description")


def settings_digest(up: UpstreamConfig) -> str:
    """What a view depends on besides the upstream's data: a change of any of it republishes."""
    assert up.publish is not None
    keys = [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else str(p) for p in up.publish.sign_with]
    settings = {
        "keys": keys,
        "packages": list(up.publish.packages),
        "keep_versions": up.publish.keep_versions,
        "valid_days": up.publish.valid_days,
        "components": list(up.components),
        "architectures": list(up.architectures),
        "languages": list(up.languages),
        "resolve_with": list(up.publish.resolve_with),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def needs_refresh(published: Published, up: UpstreamConfig, now: datetime) -> str | None:
    """Why an unchanged upstream still gets a new view, or None: the settings changed, or less
    than half of valid_days remains before the served Release expires."""
    assert up.publish is not None
    if published.config != settings_digest(up):
        return "publish settings changed"
    left = datetime.fromisoformat(published.valid_until) - now
    if left < timedelta(days=up.publish.valid_days / 2):
        return f"Valid-Until in {left.total_seconds() / 86400:.1f} days (less than half of valid_days)"
    return None


@dataclass
class View:
    """What a snapshot serves for a published upstream, besides its pool files."""

    files: dict[str, tuple[bytes | None, FileRecord]]  # path -> (bytes written here, or None: an upstream object)
    by_hash: dict[str, FileRecord]  # by-hash path -> record of the index it names
    pool: dict[str, verify.PoolFile]  # the pool files the view's indices name
    listing: Listing
    published: Published
    mtime: float  # the Date: Last-Modified of every file written here


@dataclass
class _Index:
    """One Packages index of the view: its stanzas in upstream order."""

    name: str  # relative to the suite folder: "main/binary-amd64/Packages", "Packages" (flat)
    label: str  # "main/amd64"
    plain: bool  # also published uncompressed (the upstream served it so)
    stanzas: list[_Stanza] = field(default_factory=list)


@dataclass
class _Stanza:
    """A stanza of a verified index as index_stanzas cut it; its pool file is read only once the
    view keeps it (a filtered view of 60,000 packages reads a few hundred)."""

    text: bytes
    plain: bool
    n: int  # its place in `where`, for messages
    where: str  # the index it came from
    entry: verify.PoolFile | None = None


Candidates = dict[str, list[resolve.Candidate]]  # architecture ("all"; "*": a flat index) -> its packages


def index_candidates(manifest: Manifest, open_object: Callable[[str], BinaryIO], max_index_bytes: int) -> Candidates:
    """The packages a snapshot serves, per architecture, as the resolver reads them (key: the
    Filename): of each Packages index the cheapest variant, read as a sync reads it and never
    decompressed past `max_index_bytes`. For `resolve_with` (packages of other upstreams satisfy
    dependencies but are not part of the view, as apt resolves across all its sources) and
    for `prefetch`."""
    found: Candidates = {}
    cheapest: dict[str, str] = {}  # index without its compression -> the cheapest variant's path
    for path in manifest.files:
        name = path.rsplit("/", 1)[-1]
        if "/by-hash/" in path or not (name == "Packages" or name.startswith("Packages.")):
            continue
        stem = path[: len(path) - len(verify.compression(path))]
        if stem not in cheapest or _cost(path) < _cost(cheapest[stem]):
            cheapest[stem] = path
    for stem, path in sorted(cheapest.items()):
        folder = stem.rsplit("/", 2)[-2] if "/" in stem else ""
        arch = folder.removeprefix("binary-") if folder.startswith("binary-") else "*"
        with open_object(manifest.files[path]["sha256"]) as raw:
            for stanza, plain in verify.index_stanzas(path, raw, max_index_bytes):
                found.setdefault(arch, []).append(_candidate(stanza, plain, None))
    return found


def _cost(path: str) -> int:
    return verify._DECOMPRESS_COST.get(verify.compression(path), 9)


def make_view(
    up: UpstreamConfig,
    releases: list[verify.TrustedRelease],
    records: dict[str, FileRecord],
    open_object: Callable[[str], BinaryIO],
    previous: Published | None,
    signer: Signer,
    work: Path,
    now: datetime,
    max_index_bytes: int,
    others: Candidates | None = None,
    memo: verify.ParseMemo | None = None,
) -> View:
    """The published view of these verified suites (`records`: every upstream file the sync
    verified, path -> record; `memo`: the sync's readings of stanzas, which spare reading the
    kept ones again). Runs in a worker thread; Rejected("publish-failed") if it cannot."""
    assert up.publish is not None
    date = now.astimezone(UTC).replace(microsecond=0)
    if previous is not None:
        date = max(date, datetime.fromisoformat(previous.date) + timedelta(seconds=1))
    valid_until = date + timedelta(days=up.publish.valid_days)
    files: dict[str, tuple[bytes | None, FileRecord]] = {}
    by_hash: dict[str, FileRecord] = {}
    pool: dict[str, verify.PoolFile] = {}
    listing: Listing = {}
    missing: dict[str, int] = {root: 0 for root in up.publish.packages}  # root -> (suite, arch)s that have it
    stanzas = 0  # package entries in the view
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="aptguard-publish") as compressors:
        for release in releases:
            indices, passthrough = _read_suite(up, release, records, open_object, max_index_bytes)
            for root, count in _select(up, release, indices, others or {}).items():
                missing[root] += count
            written: list[tuple[str, Future[bytes], bool]] = []  # (path, its bytes, served)
            for index in indices:
                for st in index.stanzas:
                    st.entry = verify.package_entry(st.text, st.n, st.where, st.plain, memo)
                text = b"".join(st.text.rstrip(b"\n") + b"\n\n" for st in index.stanzas)
                # Compressed in threads (lzma and zlib release the GIL) while the next index is read.
                for ext, compress in ((".xz", _xz), (".gz", _gz)):
                    written.append((release.base + index.name + ext, compressors.submit(compress, text), True))
                # apt finds an index by its uncompressed name in the Release: always listed (as
                # Debian lists it), served only where the upstream served it.
                done: Future[bytes] = Future()
                done.set_result(text)
                written.append((release.base + index.name, done, index.plain))
                stanzas += len(index.stanzas)
                versions = listing.setdefault(release.suite, {}).setdefault(index.label, {})
                entries = [st.entry for st in index.stanzas if st.entry is not None]
                for entry in entries:
                    versions[entry.package] = entry.version
                verify.merge_pool(entries, pool)
            listed: dict[str, FileRecord] = {}  # every entry of the Release
            for path, job, served in written:
                data = job.result()
                listed[path] = _record(data)
                if served:
                    files[path] = (data, listed[path])
            for path in passthrough:  # the upstream's verified object, hashed again for SHA512
                with open_object(records[path]["sha256"]) as raw:
                    listed[path] = _record(raw.read(records[path]["size"] + 1))
                if listed[path]["sha256"] != records[path]["sha256"]:
                    raise Rejected("publish-failed", f"{path}: the stored object no longer matches (run aptguard fsck)")
                files[path] = (None, listed[path])
            text = _release_text(up, release, date, valid_until, listed)
            inrelease, release_gpg = signer.clearsign(text), signer.detach(text)
            _check_signed(up, release.suite, signer, inrelease, text, release_gpg, work, now)
            for name, data in (("InRelease", inrelease), ("Release", text), ("Release.gpg", release_gpg)):
                files[release.base + name] = (data, _record(data))
            for path, record in listed.items():
                if path not in files:
                    continue
                for algo, folder in VIEW_HASHES.items():
                    by_hash[_by_hash_path(path, folder, record[algo])] = record  # type: ignore[literal-required]
    absent = [root for root, count in missing.items() if count == 0]
    if absent:
        where = f"suites {', '.join(up.suites)}, architectures {', '.join(up.architectures)}"
        raise Rejected("publish-failed", f"packages: {', '.join(absent)} in no index of the upstream ({where})")
    published = Published(
        date=iso(date),
        valid_until=iso(valid_until),
        keys=[TrustedKey(k.fingerprint, k.uid, iso(k.expires) if k.expires else None) for k in signer.keys],
        config=settings_digest(up),
        packages=stanzas,
    )
    return View(files, by_hash, pool, listing, published, date.timestamp())


def _read_suite(
    up: UpstreamConfig,
    release: verify.TrustedRelease,
    records: dict[str, FileRecord],
    open_object: Callable[[str], BinaryIO],
    max_index_bytes: int,
) -> tuple[list[_Index], list[str]]:
    """The suite's Packages indices as the view will publish them (a separate binary-all folded
    into each architecture's, unless "all" is configured), and the Translation files passed through."""
    indices: dict[str, _Index] = {}
    folded: list[tuple[str, list[_Stanza]]] = []  # (component, arch:all stanzas)
    passthrough: list[str] = []
    for group in verify.needed_indices(release, up):
        present = [v for v in group.variants if v.path in records]
        if group.kind == "Translation":
            passthrough.extend(v.path for v in present)
            continue
        if group.kind != "Packages" or not present:
            continue
        source = min(present, key=lambda v: _cost(v.path))
        with open_object(records[source.path]["sha256"]) as raw:
            stanzas = [
                _Stanza(text, plain, n, source.path)
                for n, (text, plain) in enumerate(verify.index_stanzas(source.path, raw, max_index_bytes), 1)
            ]
        component, _, arch = group.label.rpartition("/")
        if arch == "all" and "all" not in up.architectures:
            folded.append((component, stanzas))
            continue
        plain = group.plain is not None and group.plain.path in records
        indices[group.name] = _Index(group.name, group.label, plain, stanzas)
    for component, stanzas in folded:
        for index in indices.values():
            if index.label.rpartition("/")[0] == component:
                index.stanzas.extend(stanzas)
    return list(indices.values()), passthrough


def _select(
    up: UpstreamConfig, release: verify.TrustedRelease, indices: list[_Index], others: Candidates
) -> dict[str, int]:
    """Narrow each index to what the view holds, resolving per architecture across components
    (and the packages of `resolve_with` upstreams, which satisfy but are not held); root -> how
    many architectures have it."""
    assert up.publish is not None
    found = {root: 0 for root in up.publish.packages}
    arches: dict[str, list[_Index]] = {}
    for index in indices:
        arches.setdefault(index.label.rpartition("/")[2], []).append(index)
    if not up.publish.packages and not up.publish.keep_versions:
        return found  # every stanza
    for arch, group in arches.items():
        candidates = [
            _candidate(st.text, st.plain, (n, i)) for n, index in enumerate(group) for i, st in enumerate(index.stanzas)
        ]
        if up.publish.packages:
            outside = [*others.get(arch, ()), *others.get("all", ()), *others.get("*", ())]
            try:
                selection = resolve.select(candidates + outside, list(up.publish.packages), up.publish.keep_versions)
            except resolve.Unsatisfiable as exc:
                where = "the upstream" + "".join(f", {o}" for o in up.publish.resolve_with)
                raise Rejected("publish-failed", f"{release.base}{arch}: {exc} within {where}") from None
            chosen = [c for c in selection.chosen if isinstance(c.key, tuple)]  # this upstream's, not `outside`
            names = {c.package for c in candidates}
            for root in found:
                if root not in selection.missing_roots and root.split("(")[0].strip() in names:
                    found[root] += 1
        else:
            chosen = resolve.newest_versions(candidates, up.publish.keep_versions)
        keep = {c.key for c in chosen}
        for n, index in enumerate(group):
            index.stanzas = [s for i, s in enumerate(index.stanzas) if (n, i) in keep]
    return found


def _candidate(stanza: bytes, plain: bool, key: tuple[int, int] | None) -> resolve.Candidate:
    """A stanza as the resolver sees it, its fields read by apt's rules; `key`: its place in the
    view's indices, or None for its Filename."""
    package, version, depends, pre_depends, provides, filename = verify.relation_fields(stanza, plain)
    return resolve.Candidate(package, version, depends, pre_depends, provides, key=key or filename)


def _release_text(
    up: UpstreamConfig,
    release: verify.TrustedRelease,
    date: datetime,
    valid_until: datetime,
    files: dict[str, FileRecord],
) -> bytes:
    flat = release.suite.endswith("/")
    # The upstream chooses these values (signed, but its words): only their first line is carried,
    # so nothing it wrote can stand as a line of the mirror's Release.
    carried = {name: release.fields.get(name, "").split("\n", 1)[0].strip() for name in RELEASE_FIELDS}
    lines = [f"{name.capitalize()}: {value}" for name, value in carried.items() if value]
    lines += [f"Date: {verify.rfc_date(date)}", f"Valid-Until: {verify.rfc_date(valid_until)}"]
    lines.append(f"Architectures: {' '.join(up.architectures)}")
    if not flat:
        lines.append(f"Components: {' '.join(up.components)}")
        if "all" not in up.architectures:
            lines.append("No-Support-for-Architecture-all: Packages")
    lines.append("Acquire-By-Hash: yes")
    for algo, title in VIEW_HASHES.items():
        lines.append(f"{title}:")
        for path in sorted(files):
            record = files[path]
            lines.append(f" {record[algo]} {record['size']:>16} {path[len(release.base) :]}")  # type: ignore[literal-required]
    return ("\n".join(lines) + "\n").encode()


def _check_signed(
    up: UpstreamConfig,
    suite: str,
    signer: Signer,
    inrelease: bytes,
    release: bytes,
    release_gpg: bytes,
    work: Path,
    now: datetime,
) -> None:
    """Read what was signed back through the verifier, with the mirror's public keys alone."""
    keys = work / "mirror-keys.asc"
    keys.write_bytes(signer.public_keys())
    home = work / f"check-{len(list(work.glob('check-*')))}"
    try:
        with Keyring(keys, home) as keyring:
            verdict = verify.verify_suite(
                verify.SignedFiles(inrelease, release, release_gpg),
                keyring=keyring,
                upstream=up,
                suite=suite,
                now=now,
                previous=None,
                allow_change=True,
                already_verified=True,
            )
    except Rejected as exc:
        raise Rejected("publish-failed", f"the published Release does not verify: {exc.reason}: {exc.detail}") from None
    if set(verdict.serve) != {"InRelease", "Release", "Release.gpg"}:
        raise Rejected("publish-failed", f"the published Release.gpg does not verify ({'; '.join(verdict.notes)})")


def _record(data: bytes) -> FileRecord:
    return file_record(len(data), {a: hashlib.new(a, data).hexdigest() for a in ("md5", "sha256", "sha512")})


def _by_hash_path(path: str, folder: str, digest: str) -> str:
    parent = path.rsplit("/", 1)[0] + "/" if "/" in path else ""
    return f"{parent}by-hash/{folder}/{digest}"


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=XZ_PRESET)


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


# ---------------------------------------------------------------- re-signing on rollback

_DATE_LINE = re.compile(rb"^Date: [^\n]*$", re.MULTILINE)
_VALID_LINE = re.compile(rb"^Valid-Until: [^\n]*$", re.MULTILINE)


def resigned_copy(store: FileStore, up: UpstreamConfig, target: Manifest, now: datetime) -> str:
    """A new snapshot serving exactly `target`'s view, its Releases signed again with a Date later
    than any view of the upstream; its id. apt ignores a Release older than the one it holds, so
    a rollback (or a promote) to an older view reaches the hosts that updated since only re-signed.
    Under the upstream's lease and the shared collection lock (the caller's)."""
    assert up.publish is not None and target.published is not None
    from aptguard.store import new_snapshot_id
    from aptguard.sync import SIGNED_NAMES, retained_by_hash

    ids = store.snapshot_ids(up.name)
    current_id = store.current(up.name)
    others = {i: store.read_manifest(up.name, i) for i in {ids[-1], current_id} - {None, target.id} if i}
    dates = [target.published.date, *(m.published.date for m in others.values() if m.published)]
    date = max(
        now.astimezone(UTC).replace(microsecond=0), *(datetime.fromisoformat(d) + timedelta(seconds=1) for d in dates)
    )
    valid_until = date + timedelta(days=up.publish.valid_days)
    files = dict(target.files)
    written: dict[str, bytes] = {}
    work = store.work_dir(up.name)  # the verifier's keyring of the mirror's keys
    try:
        with Signer(up.publish, now) as signer:
            for suite in target.suites:
                base = verify.suite_base(suite)
                release = target.files[base + "Release"]
                with store.open_object(release["sha256"]) as raw:
                    text = raw.read(release["size"])  # a Release this mirror wrote and verified
                text = _DATE_LINE.sub(b"Date: " + verify.rfc_date(date).encode(), text, count=1)
                text = _VALID_LINE.sub(b"Valid-Until: " + verify.rfc_date(valid_until).encode(), text, count=1)
                inrelease, release_gpg = signer.clearsign(text), signer.detach(text)
                _check_signed(up, suite, signer, inrelease, text, release_gpg, work, now)
                for name, data in zip(SIGNED_NAMES, (inrelease, text, release_gpg), strict=True):
                    written[base + name] = data
                    files[base + name] = _record(data)
            keys = [TrustedKey(k.fingerprint, k.uid, iso(k.expires) if k.expires else None) for k in signer.keys]
        for path, data in written.items():
            store.put_bytes(data, files[path]["sha256"], mtime=date.timestamp())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    own_by_hash = store.read_by_hash(up.name, target.id)
    if own_by_hash is None:
        own_by_hash = {p: target.files[p] for p in target.by_hash_own if p in target.files}
    current = target if current_id == target.id else others.get(current_id) if current_id else None
    snap_id = new_snapshot_id(set(ids))
    builder = store.new_snapshot(up.name, snap_id, target)
    try:
        for path, record in files.items():
            builder.add(path, record["sha256"], pool=False if path in written else None)
        # A client that read the InRelease of any retained snapshot finds its by-hash indices.
        for path, record in retained_by_hash(store, up.name, current_id, current).items():
            if path not in files:
                files[path] = record
                builder.add(path, record["sha256"], pool=False)
        manifest = replace(
            target,
            id=snap_id,
            created=iso(datetime.now(UTC)),
            files=files,
            count=len(files),
            bytes=sum(r["size"] for r in files.values()),
            published=replace(target.published, date=iso(date), valid_until=iso(valid_until), keys=keys),
        )
        builder.commit(manifest, own_by_hash)
    except BaseException:
        builder.abort()
        raise
    return snap_id


def older_view(store: FileStore, name: str, target: str, current: str | None) -> Manifest | None:
    """`target`'s manifest if it is a view no newer than the one served (apt would ignore it)."""
    if current is None or current == target:
        return None
    chosen = store.read_manifest(name, target)
    served = store.read_manifest(name, current)
    if chosen.published is None or served.published is None:
        return None
    return (
        chosen
        if datetime.fromisoformat(chosen.published.date) <= datetime.fromisoformat(served.published.date)
        else None
    )
