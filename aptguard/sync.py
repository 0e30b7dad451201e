"""One sync of one upstream: fetch -> verify -> store -> snapshot -> promote.

Every decision about trust is delegated to verify.py; every byte written goes through store.py.
A sync ends as `promoted`, `unchanged`, `stored` or `rejected` (with a reason code), and a
rejected or interrupted sync changes nothing that clients are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aptguard import verify
from aptguard.config import Limits, UpstreamConfig
from aptguard.diff import compare, count_lines
from aptguard.fetch import Download, Fetcher, preload
from aptguard.keyring import Keyring
from aptguard.progress import Progress
from aptguard.reasons import Rejected
from aptguard.records import FileRecord, LastSync, Manifest, SuiteRecord, TrustedKey, UpstreamState, file_record, iso
from aptguard.signer import Signer
from aptguard.snapshot import switch_current
from aptguard.store import FileStore, SnapshotBuilder, new_snapshot_id, storage_error
from aptguard.twin import Send, Twin

if TYPE_CHECKING:  # publish.py (and the resolver's python-debian) load only for upstreams that publish
    from aptguard import publish

INRELEASE_LIMIT = 10_000_000  # apt's own cap on InRelease
SIGNATURE_LIMIT = 1_000_000  # a Release.gpg: Debian's, three signatures, is under 3 KB
SIGNED_NAMES = ("InRelease", "Release", "Release.gpg")
SMALL_BATCH = 64  # small pool files stored per worker-thread call
TWIN_FILES = 128  # from this many pool files to fetch, half go to a forked twin (twin.py)
PARSE_MEMO = "parse-memo"  # the store's cache key of verify.ParseMemo
# A sync that fetches only a few small files does it with the light client (http.client in worker
# threads, bodies in memory): importing aiohttp costs more than it saves (0.15 s).
LIGHT_FILES = 64
LIGHT_SIZE = 1 << 20
Log = Callable[[str], None]


@dataclass
class SyncResult:
    name: str
    outcome: str  # promoted | unchanged | stored | rejected
    reason: str | None = None
    detail: str = ""
    snapshot: str | None = None
    previous: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome != "rejected"


@dataclass
class _Suite:
    """A suite's signed files as fetched, and the Release they carry once verified."""

    name: str
    signed: dict[str, Download]  # "InRelease" / "Release" / "Release.gpg" -> download
    release: verify.TrustedRelease
    unchanged: bool


class _Files:
    """path -> verified record of the snapshot being assembled, and which are pool files; a path
    named twice with different content is refused."""

    def __init__(self) -> None:
        self.records: dict[str, FileRecord] = {}
        self.pool: dict[str, bool | None] = {}
        self.by_hash: set[str] = set()  # by-hash paths the snapshot's own Releases list

    def add(self, path: str, record: FileRecord, *, pool: bool | None = False) -> None:
        old = self.records.get(path)
        if old is not None and old["sha256"] != record["sha256"]:
            raise Rejected(
                "package-mismatch",
                f"{path}: named twice with different content (SHA256 {old['sha256']} and {record['sha256']})",
            )
        self.records[path] = record
        self.pool[path] = pool


@dataclass
class _Plan:
    """What is stored for the upstream when its sync starts."""

    state: UpstreamState
    current_id: str | None
    current: Manifest | None
    newest: Manifest | None


def _plan(store: FileStore, name: str) -> _Plan:
    ids = store.snapshot_ids(name)
    current_id = store.current(name)
    newest = store.read_manifest(name, ids[-1]) if ids else None
    if current_id is None or newest is None or current_id != newest.id:
        current = store.read_manifest(name, current_id) if current_id else None
    else:
        current = newest  # usually the same snapshot: read its manifest once
    return _Plan(store.read_state(name), current_id, current, newest)


async def sync_upstream(
    up: UpstreamConfig,
    store: FileStore,
    *,
    promote: bool = True,
    allow_release_change: bool = False,
    limits: Limits | None = None,
    log: Log = lambda msg: None,
    concurrency: int = 16,
    progress: Progress | None = None,
) -> SyncResult:
    """Sync one upstream under its lock and record the outcome in its state.

    Whatever happens inside, the result is an outcome: a failure of this upstream (a hostile
    answer, a bug, the sync_timeout) is its own rejection, and the caller goes on with the next.
    """
    started = time.monotonic()
    limits = limits or Limits()
    with (
        store.collection_lock(exclusive=False, wait_message=f"{up.name}: waiting for a running gc to finish"),
        store.lease(up.name, wait_message=f"{up.name}: waiting for another aptguard process to finish"),
    ):
        at = datetime.now(UTC)
        work: Path | None = None
        try:
            store.discard_leftovers(up.name)
            if not store.snapshot_ids(up.name):
                preload()
            work = store.work_dir(up.name)
            with Keyring(up.keyring, work / "gnupg") as keyring:
                # One deadline for the whole sync and for every request (a request read in a worker
                # thread is not cancelled with the coroutine: the fetcher must end it itself).
                deadline = time.monotonic() + limits.sync_timeout
                run = _Sync(up, store, keyring, work, log, concurrency, progress or Progress(), limits, deadline)
                async with asyncio.timeout_at(asyncio.get_running_loop().time() + limits.sync_timeout):
                    result = await run.run(promote=promote, allow_release_change=allow_release_change)
        except Rejected as exc:
            result = SyncResult(up.name, "rejected", exc.reason, exc.detail)
        except TimeoutError:
            result = SyncResult(
                up.name,
                "rejected",
                "unreachable",
                f"{up.url}: sync_timeout of {limits.sync_timeout:g} s reached (limits.sync_timeout)",
            )
        except OSError as exc:
            result = SyncResult(up.name, "rejected", "storage-error", storage_error(exc, "local disk").detail)
        except Exception as exc:  # a bug: this upstream is rejected, the others still sync
            result = internal_error(store, up, exc)
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        result.stats["seconds"] = round(time.monotonic() - started, 3)
        _record_outcome(store, up, result, at)
        return result


async def sync_all(
    upstreams: Iterable[UpstreamConfig],
    store: FileStore,
    *,
    limits: Limits,
    promote: bool = True,
    allow_release_change: bool = False,
    log: Callable[[str], None] = lambda message: None,
    progress: Progress | None = None,
) -> list[SyncResult]:
    """Sync each upstream in turn; whatever fails is that upstream's rejection, never the next one's.
    A published view resolving with other upstreams (`resolve_with`) is synced after them."""
    results = []
    for up in sorted(upstreams, key=lambda u: bool(u.publish and u.publish.resolve_with)):
        try:
            result = await sync_upstream(
                up,
                store,
                promote=promote,
                allow_release_change=allow_release_change,
                limits=limits,
                log=log,
                progress=progress,
            )
        except OSError as exc:  # the lock or the state file: this upstream fails, the next one syncs
            result = SyncResult(up.name, "rejected", "storage-error", f"{store.root}: {exc}")
        except Exception as exc:  # a bug outside the sync's own guard: still only this upstream's
            result = internal_error(store, up, exc)
        results.append(result)
        if progress is not None:
            progress.end(up.name)
    return results


def internal_error(store: FileStore, up: UpstreamConfig, exc: Exception) -> SyncResult:
    """A bug met while syncing `up`: its rejection, the traceback appended to the data folder's log."""
    text = f"{datetime.now(UTC).isoformat()} sync {up.name}:\n" + "".join(traceback.format_exception(exc))
    try:
        where = f"; traceback in {store.log_error(text)}"
    except OSError:
        where = ""
    return SyncResult(up.name, "rejected", "internal-error", f"{type(exc).__name__}: {str(exc)[:200]}{where}")


def _record_outcome(store: FileStore, up: UpstreamConfig, result: SyncResult, at: datetime) -> None:
    try:
        state = store.read_state(up.name)
        state.last_sync = LastSync(
            outcome=result.outcome,
            reason=result.reason,
            detail=result.detail,
            at=at.isoformat().replace("+00:00", "Z"),
            snapshot=result.snapshot,
        )
        if result.ok:
            state.last_success = state.last_sync.at
        if result.stats.get("keys") is not None:
            state.keys = result.stats.pop("keys")
        state.count_outcome(result.outcome, result.reason)
        store.write_state(up.name, state)
    except (OSError, ValueError) as exc:  # unwritable, or a damaged state file (left as it is: it holds the hold)
        detail = (
            storage_error(exc, "state file").detail if isinstance(exc, OSError) else f"state file unreadable: {exc}"
        )
        if result.ok:
            result.outcome, result.reason, result.detail = "rejected", "storage-error", detail
        else:
            result.detail += f"; the outcome could not be recorded ({detail})"


class _Sync:
    """One sync's context (upstream, store, keyring, fetcher settings); its steps are the methods
    below, each returning what the next one takes: plan -> releases -> suite files -> pool ->
    build -> commit -> promote."""

    def __init__(
        self,
        up: UpstreamConfig,
        store: FileStore,
        keyring: Keyring,
        work: Path,
        log: Log,
        concurrency: int,
        progress: Progress,
        limits: Limits,
        deadline: float,
    ) -> None:
        self.limits = limits
        self.deadline = deadline
        self.up = up
        self.store = store
        self.keyring = keyring
        self.work = work
        self.log = log
        self.concurrency = concurrency
        self.progress = progress
        self.downloaded = 0
        self.pool_processes = 1  # 2 when a twin fetched half of the pool
        self.listed: dict[str, FileRecord] = {}  # policy = "on-demand": pool files not held (path -> record)
        self.memo: verify.ParseMemo | None = None  # read when a Packages index is, kept for the next sync

    async def run(self, *, promote: bool, allow_release_change: bool) -> SyncResult:
        up, store = self.up, self.store
        steps: dict[str, float] = {}  # step -> seconds, for `--log-format json` (where a sync's time goes)
        mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            steps[name] = round(now - mark, 3)
            mark = now

        plan = _plan(store, up.name)
        step("plan")
        # The snapshot whose suites an unchanged upstream reuses. A published view's snapshot holds
        # only the pool files its filter chose: with publish turned off, everything is made anew.
        base = plan.newest if plan.newest is None or plan.newest.published is None or up.publish else None
        keys = [
            TrustedKey(fingerprint=k.fingerprint, uid=k.uid, expires=iso(k.expires) if k.expires else None)
            for k in self.keyring.keys
        ]
        now = datetime.now(UTC)

        def bytes_in(n: int) -> None:
            self.downloaded += n
            self.progress.advance(up.name, nbytes=n)

        async with Fetcher(
            up.url,
            self.work,
            concurrency=self.concurrency,
            on_bytes=bytes_in,
            min_rate=self.limits.min_rate,
            deadline=self.deadline,
        ) as fetcher:
            previous = plan.current.suites if plan.current is not None else {}
            suites = await _gather(
                self._release(fetcher, s, base, previous.get(s), allow_release_change, now) for s in up.suites
            )
            step("releases")
            if base is not None and all(s.unchanged for s in suites):
                why = _republish(up, base, now)
                if why is None:
                    self.log(f"{up.name}: unchanged (signed Release identical to snapshot {base.id})")
                    return SyncResult(
                        up.name, "unchanged", snapshot=base.id, stats={"keys": keys, "requests": fetcher.requests}
                    )
                self.log(f"{up.name}: upstream unchanged; publishing a new view ({why})")
            files, suite_meta, packages, pool = await self._suites(fetcher, suites, base)
            step("indices")
            view: publish.View | None = None
            source: dict[str, FileRecord] = {}
            if up.publish is not None:
                view, source = await asyncio.to_thread(self._publish, suites, files, plan.newest, now)
                files, pool, packages = self._view_files(view), view.pool, view.listing
                suite_meta = {
                    name: replace(meta, paths=[p for p in meta.paths if p in source])
                    for name, meta in suite_meta.items()
                }
                step("publish")
            snap_id = new_snapshot_id(set(store.snapshot_ids(up.name)))
            builder = store.new_snapshot(up.name, snap_id, plan.newest)
            try:
                await self._pool(fetcher, pool, _known_hashes(plan.newest, plan.current), files, builder)
                requests = fetcher.requests
                step("pool")
                manifest, own_by_hash = self._build(snap_id, files, suite_meta, packages, plan, view, source)
                written = await asyncio.to_thread(self._commit, builder, manifest, files, own_by_hash)
                step("commit")
            except BaseException:
                await asyncio.to_thread(builder.abort)
                raise
        if self.memo is not None:
            try:
                memo = self.memo.to_json(keep_known=any(s.unchanged for s in suites))
                await asyncio.to_thread(store.write_cache, up.name, PARSE_MEMO, memo)
            except OSError as exc:  # a cache: the next sync parses everything, nothing is lost
                self.log(f"{up.name}: parse memo not kept ({exc.strerror or exc})")
        old_packages = plan.current.packages if plan.current is not None else {}
        stats = {
            "keys": keys,
            "files": manifest.count,
            "bytes": manifest.bytes,
            "downloaded": self.downloaded,
            "requests": requests,
            "written": written,
            "pool_processes": self.pool_processes,
            **(
                {"on_demand": {"files": len(self.listed), "bytes": sum(r["size"] for r in self.listed.values())}}
                if self.listed
                else {}
            ),
            **({"published": view.published.to_json()} if view is not None else {}),
            # Against the current snapshot (what a promotion replaced, or what stays served).
            "changes": count_lines({"suites": compare(old_packages, manifest.packages)}),
            "steps": steps,
        }
        if promote and not plan.state.held:
            switch_current(store, up.name, store.read_state(up.name), snap_id, plan.current_id, hold=False)
            step("promote")
            self.log(f"{up.name}: promoted snapshot {snap_id} ({manifest.count} files)")
            return SyncResult(up.name, "promoted", snapshot=snap_id, previous=plan.current_id, stats=stats)
        why = "on hold (rollback): `aptguard promote` to serve it" if plan.state.held else "--no-promote"
        self.log(f"{up.name}: stored snapshot {snap_id}, not promoted: {why}")
        return SyncResult(up.name, "stored", detail=why, snapshot=snap_id, stats=stats)

    # ------------------------------------------------------------ build and commit

    def _build(
        self,
        snap_id: str,
        files: _Files,
        suite_meta: dict[str, SuiteRecord],
        packages: dict[str, Any],
        plan: _Plan,
        view: publish.View | None,
        source: dict[str, FileRecord],
    ) -> tuple[Manifest, dict[str, FileRecord]]:
        """The manifest of the new snapshot, and its own by-hash entries."""
        own_by_hash = {p: files.records[p] for p in sorted(files.by_hash)}
        # Guarantee 2: a client that read the InRelease of any retained snapshot just before a
        # promotion (or a rollback) finds its by-hash indices in the new tree too.
        for path, record in retained_by_hash(self.store, self.up.name, plan.current_id, plan.current).items():
            if path not in files.records:
                files.add(path, record)
        manifest = Manifest.build(
            id=snap_id,
            upstream=self.up.name,
            url=self.up.url,
            created=iso(datetime.now(UTC)),
            suites=suite_meta,
            files=files.records,
            by_hash_own=sorted(own_by_hash),
            packages=packages,
            listed=self.listed,
            published=view.published if view is not None else None,
            source=source,
        )
        return manifest, own_by_hash

    # ------------------------------------------------------------ published view

    def _publish(
        self, suites: list[_Suite], upstream: _Files, newest: Manifest | None, now: datetime
    ) -> tuple[publish.View, dict[str, FileRecord]]:
        """The published view of the verified suites, and the upstream files it was made from
        (signed files, indices, by-hash: kept for the next sync, not served). In a worker thread."""
        from aptguard import publish

        assert self.up.publish is not None
        named: set[str] = set()
        for s in suites:
            named.update(s.release.base + name for name in SIGNED_NAMES)
            named.update(e.path for e in s.release.files.values())
        source = {p: r for p, r in upstream.records.items() if p in named or p in upstream.by_hash}
        work = self.work / "publish"
        work.mkdir(exist_ok=True)
        others: publish.Candidates = {}
        if self.up.publish.packages and self.up.publish.resolve_with:
            for other in self.up.publish.resolve_with:
                current = self.store.current(other)
                if current is None:
                    raise Rejected("publish-failed", f"resolve_with: {other} has no current snapshot; sync it first")
                manifest = self.store.read_manifest(other, current)
                for arch, found in publish.index_candidates(
                    manifest, self.store.open_object, self.limits.max_index_bytes
                ).items():
                    others.setdefault(arch, []).extend(found)
        with Signer(self.up.publish, now) as signer:
            view = publish.make_view(
                self.up,
                [s.release for s in suites],
                source,
                self.store.open_object,
                newest.published if newest is not None else None,
                signer,
                work,
                now,
                self.limits.max_index_bytes,
                others,
                self.memo or verify.ParseMemo.from_json(self.store.read_cache(self.up.name, PARSE_MEMO)),
            )
        for path, (data, record) in view.files.items():
            if data is not None:
                self.store.put_bytes(data, record["sha256"], mtime=view.mtime)
                view.files[path] = (None, record)  # stored: the bytes need not stay in memory
        keys = ", ".join(k.fingerprint for k in view.published.keys)
        self.log(f"{self.up.name}: published view of {view.published.packages} packages, signed by {keys}")
        return view, source

    def _view_files(self, view: publish.View) -> _Files:
        """The snapshot's tree of a published view, before its pool files join it."""
        files = _Files()
        for path, (_, record) in view.files.items():
            files.add(path, record)
        for path, record in view.by_hash.items():
            files.add(path, record)
            files.by_hash.add(path)
        return files

    def _commit(
        self, builder: SnapshotBuilder, manifest: Manifest, files: _Files, own_by_hash: dict[str, FileRecord]
    ) -> int:
        """Make the snapshot in the store (runs in a worker thread); the filesystem entries it took."""
        for path, record in files.records.items():
            builder.add(path, record["sha256"], pool=files.pool[path])
        builder.commit(manifest, own_by_hash)
        return builder.written

    # ------------------------------------------------------------ Release

    async def _release(
        self,
        fetcher: Fetcher,
        suite: str,
        newest: Manifest | None,
        previous: SuiteRecord | None,
        allow_change: bool,
        now: datetime,
    ) -> _Suite:
        """Fetch a suite's signed files and have the verifier judge them."""
        base = verify.suite_base(suite)
        old_suite = newest.suites.get(suite) if newest is not None else None
        old_signed = old_suite.signed if old_suite is not None else {}
        signed: dict[str, Download] = {}
        inrelease = await fetcher.fetch(base + "InRelease", limit=INRELEASE_LIMIT, light=True)
        if inrelease is not None:
            signed["InRelease"] = inrelease
        # An InRelease identical to the newest snapshot's: one request, and the suite is reused.
        quick = inrelease is not None and old_signed.get("InRelease") == inrelease.hashes["sha256"]
        if not quick:
            extra = await _gather(
                fetcher.fetch(
                    base + name, limit=SIGNATURE_LIMIT if name == "Release.gpg" else INRELEASE_LIMIT, light=True
                )
                for name in ("Release", "Release.gpg")
            )
            for name, download in zip(("Release", "Release.gpg"), extra, strict=True):
                if download is not None:
                    signed[name] = download
        unchanged = quick or (
            bool(old_signed)
            and all(old_signed.get(n) == (signed[n].hashes["sha256"] if n in signed else None) for n in SIGNED_NAMES)
        )
        body = {name: download.read() for name, download in signed.items()}  # each read once
        files = verify.SignedFiles(
            body.get("InRelease"), body.get("Release"), body.get("Release.gpg"), source=fetcher.base_url + base
        )
        verdict = await asyncio.to_thread(
            verify.verify_suite,
            files,
            keyring=self.keyring,
            upstream=self.up,
            suite=suite,
            now=now,
            previous=verify.PreviousRelease.from_suite(previous) if previous else None,
            allow_change=allow_change,
            already_verified=unchanged,
        )
        for note in verdict.notes:
            self.log(f"{self.up.name}: {note}")
        if unchanged and newest is not None and not _holds_needed(verdict.release, self.up, newest):
            # The config now asks for an index (an architecture, a component, a language) the
            # stored snapshot never fetched: the suite is made anew from the same Release.
            self.log(f"{self.up.name}: {suite}: the configured indices changed; fetching them")
            unchanged = False
        for name in list(signed):
            if name not in verdict.serve:
                signed.pop(name).discard()
        return _Suite(suite, signed, verdict.release, unchanged)

    # ------------------------------------------------------------ indices

    async def _suites(
        self, fetcher: Fetcher, suites: list[_Suite], newest: Manifest | None
    ) -> tuple[_Files, dict[str, SuiteRecord], dict[str, Any], dict[str, verify.PoolFile]]:
        """Every suite's files: reused from the newest snapshot when its Release did not change,
        else fetched and verified. (files, suite records, package listings, pool files to get)."""
        files = _Files()
        suite_meta: dict[str, SuiteRecord] = {}
        packages: dict[str, Any] = {}
        pool: dict[str, verify.PoolFile] = {}
        for s in suites:
            if s.unchanged:
                assert newest is not None
                suite_meta[s.name] = meta = newest.suites[s.name]
                for path in meta.paths:
                    record = newest.upstream_record(path)
                    if record is None:
                        raise KeyError(f"snapshot {newest.id} lists {path} in suite {s.name} but holds no record of it")
                    files.add(path, record, pool=None)  # as the newest snapshot holds it
                if s.name in newest.packages:
                    packages[s.name] = newest.packages[s.name]
                base = verify.suite_base(s.name)
                files.by_hash.update(p for p in newest.by_hash_own if p.startswith(base))
                continue
            self.log(
                f"{self.up.name}: {s.name}: Release of {verify.rfc_date(s.release.date)} verified "
                f"(signed by {', '.join(s.release.signers)})"
            )
            paths, packages[s.name] = await self._suite_files(fetcher, s, files, pool)
            suite_meta[s.name] = SuiteRecord.from_json(
                {
                    **s.release.summary(),
                    "signed": {n: d.hashes["sha256"] for n, d in s.signed.items()},
                    "paths": paths,
                }
            )
        return files, suite_meta, packages, pool

    async def _suite_files(
        self, fetcher: Fetcher, s: _Suite, files: _Files, pool: dict[str, verify.PoolFile]
    ) -> tuple[list[str], dict[str, dict[str, str]]]:
        """Store a changed suite's signed files and indices, and read its pool files into `pool`;
        (the suite's paths, its package listing)."""
        release = s.release
        paths: list[str] = []
        for name, download in s.signed.items():
            path = release.base + name
            # Last-Modified of InRelease, Release and Release.gpg is the Release's Date, as on the
            # upstream: apt takes a 200 whose Last-Modified equals its copy's as unchanged, so two
            # downloads within one second must not both say "now".
            self.store.adopt(download.save(), download.hashes["sha256"], mtime=release.date.timestamp())
            files.add(path, file_record(download.size, {"sha256": download.hashes["sha256"]}))
            paths.append(path)
        groups = verify.needed_indices(release, self.up)
        fetched = await _gather(self._index(fetcher, release, g) for g in groups)
        listing: dict[str, dict[str, str]] = {}
        for group, (present, entries) in zip(groups, fetched, strict=True):
            for expected, download in present:
                self.store.adopt(download.save(), expected.hashes["sha256"])
                files.add(expected.path, file_record(expected.size, expected.hashes))
                paths.append(expected.path)
                if release.by_hash:
                    for hashed_path in verify.by_hash_paths(expected):
                        verify.check_path(hashed_path, release.base + "Release")
                        files.add(hashed_path, file_record(expected.size, expected.hashes))
                        files.by_hash.add(hashed_path)
                        paths.append(hashed_path)
            if entries is not None:
                verify.merge_pool(entries, pool)
                paths.extend(e.expected.path for e in entries)
                if group.kind == "Packages":
                    versions = listing.setdefault(group.label, {})
                    for entry in entries:
                        versions[entry.package] = entry.version
        return sorted(set(paths)), listing

    async def _index(
        self, fetcher: Fetcher, release: verify.TrustedRelease, group: verify.IndexGroup
    ) -> tuple[list[tuple[verify.Expected, Download]], list[verify.PoolFile] | None]:
        """Fetch every listed variant of one index; the verifier checks them and reads the pool files."""
        downloads = await _gather(self._fetch_index(fetcher, release, v) for v in group.variants)
        present = [(v, d) for v, d in zip(group.variants, downloads, strict=True) if d is not None]
        by_entry = {id(v): d for v, d in present}
        if self.memo is None and group.kind == "Packages":
            self.memo = verify.ParseMemo()  # at once: the other indices' reads may start meanwhile
            self.memo.known = verify.ParseMemo.from_json(
                await asyncio.to_thread(self.store.read_cache, self.up.name, PARSE_MEMO)
            ).known
        entries = await asyncio.to_thread(
            verify.read_index,
            group,
            [(v, d.size, d.hashes) for v, d in present],
            lambda v: by_entry[id(v)].open(),  # the verifier closes it
            self.limits.max_index_bytes,
            self.memo,
        )
        return present, entries

    async def _fetch_index(
        self, fetcher: Fetcher, release: verify.TrustedRelease, expected: verify.Expected
    ) -> Download | None:
        """Fetch an index as apt does: by-hash (strongest listed hash) first when the Release offers
        it, the plain name on a 404. An upstream caught between two publishes still serves the
        by-hash files its signed Release names, so the mirror stays as tolerant as apt."""
        light = expected.size <= LIGHT_SIZE
        if release.by_hash:
            hashed = verify.by_hash_fetch_path(expected)
            download = await fetcher.fetch(hashed, limit=expected.size, algos=expected.hashes, light=light)
            if download is not None:
                return download
        return await fetcher.fetch(expected.path, limit=expected.size, algos=expected.hashes, light=light)

    # ------------------------------------------------------------ pool

    async def _pool(
        self,
        fetcher: Fetcher,
        pool: dict[str, verify.PoolFile],
        known: dict[str, dict[str, Any]],
        files: _Files,
        builder: SnapshotBuilder,
    ) -> None:
        """Every pool file into the store, `files` and the snapshot: reused when a verified
        snapshot vouches for its content, re-hashed when only stored, fetched and checked
        otherwise."""

        def classify() -> tuple[list[verify.PoolFile], list[verify.PoolFile]]:
            """(to fetch, stored but to re-hash). Content a stored snapshot vouches for is in the
            store (gc cannot run during a sync): no stat. Runs in a worker thread."""
            missing: list[verify.PoolFile] = []
            recheck: list[verify.PoolFile] = []
            for entry in pool.values():
                exp = entry.expected
                if _agrees(known.get(exp.hashes["sha256"]), exp):
                    files.add(exp.path, file_record(exp.size, exp.hashes), pool=True)
                elif self.store.object_size(exp.hashes["sha256"]) == exp.size:
                    recheck.append(entry)
                else:
                    missing.append(entry)
            return missing, recheck

        missing, recheck = await asyncio.to_thread(classify)
        # Objects in the store that no verified snapshot vouches for (a crash leftover, or listed
        # with a hash type not seen before) are re-hashed before they are trusted.
        if recheck:
            results = await asyncio.to_thread(lambda: [self._hash_object(e.expected) for e in recheck])
            for entry, hashes in zip(recheck, results, strict=True):
                if hashes == entry.expected.hashes:
                    files.add(entry.expected.path, file_record(entry.expected.size, entry.expected.hashes), pool=True)
                else:
                    missing.append(entry)
        if self.up.policy == "on-demand":  # verified by their index; fetched at a client's first request
            for entry in missing:
                exp = entry.expected
                self.listed[exp.path] = file_record(exp.size, exp.hashes)
            if missing:
                total = sum(e.expected.size for e in missing)
                self.log(f"{self.up.name}: {len(missing)} pool files ({total} bytes) listed on demand, not fetched")
            return
        if not missing:
            return
        total = sum(e.expected.size for e in missing)
        self.log(f"{self.up.name}: fetching {len(missing)} pool files ({total} bytes)")
        self.progress.begin(self.up.name, len(missing), total)
        light = len(missing) <= LIGHT_FILES and all(e.expected.size <= LIGHT_SIZE for e in missing)

        def stored(expected: list[verify.Expected]) -> None:
            for exp in expected:
                files.add(exp.path, file_record(exp.size, exp.hashes), pool=True)
            self.progress.advance(self.up.name, files=len(expected))

        # A light fetch (at most LIGHT_FILES) is always below TWIN_FILES. An object store's
        # uploads wait on the network, not on this process's GIL: no twin for them.
        if len(missing) < TWIN_FILES or (os.cpu_count() or 1) < 2 or self.concurrency < 2 or self.store.remote:
            await self._fetch_and_store(fetcher, missing, builder, self.concurrency, stored, light=light)
            return
        # Half of the files (and of the connections) go to a forked twin: its own interpreter,
        # so its own GIL. aiohttp is imported first: fork() must not meet an import under way.
        import aiohttp  # noqa: F401

        theirs, ours = missing[1::2], missing[0::2]
        share = self.concurrency // 2
        try:
            twin = Twin.start(lambda send: self._twin_job(fetcher, theirs, builder, share, send))
        except OSError as exc:  # no process to spare (EAGAIN, ENOMEM): this one fetches it all
            self.log(f"{self.up.name}: no twin process ({exc.strerror or exc}); fetching the pool in one")
            await self._fetch_and_store(fetcher, missing, builder, self.concurrency, stored)
            return
        self.pool_processes = 2
        try:
            await _gather(
                [
                    self._fetch_and_store(fetcher, ours, builder, self.concurrency - share, stored, inline=True),
                    self._follow_twin(twin, theirs, builder, fetcher, stored),
                ]
            )
        finally:
            twin.stop()  # before anything it wrote is undone

    async def _fetch_and_store(
        self,
        fetcher: Fetcher,
        entries: list[verify.PoolFile],
        builder: SnapshotBuilder,
        concurrency: int,
        stored: Callable[[list[verify.Expected]], None],
        *,
        light: bool = False,
        inline: bool = False,
    ) -> None:
        """Fetch, check and store pool files, `concurrency` at a time; `stored` hears of each
        batch once it is in the store. Files are written by worker threads, or `inline` on the
        event loop: where the pool is shared with a twin, each process has a core's worth of
        work, and handing the GIL to and from writer threads cost more than the writes block
        (debian-12k cold: pool 8.6 s inline against 10.0 s with threads, medians of 3)."""

        async def store(items: list[tuple[Download, verify.Expected]]) -> None:
            if inline:
                self._adopt(builder, items)
            else:
                await asyncio.to_thread(self._adopt, builder, items)
            stored([exp for _, exp in items])

        async def fetch_one(entry: verify.PoolFile) -> None:
            exp = entry.expected
            download = await fetcher.fetch(exp.path, limit=exp.size, algos=exp.hashes, light=light)
            if download is None:
                raise Rejected(
                    "package-missing",
                    f"{exp.path}: named by the index ({entry.package[:80]!r} {entry.version[:80]!r}) but absent upstream (HTTP 404)",
                )
            try:
                exp.check(download.size, download.hashes, "package-mismatch")
            except Rejected:
                download.discard()
                raise
            if download.data is None:
                await store([(download, exp)])
            else:  # small: stored in batches, one worker-thread call for many (each call wakes the loop)
                batch.append((download, exp))
                if len(batch) >= SMALL_BATCH:
                    writing.append(asyncio.ensure_future(store(batch[:])))
                    batch.clear()
                    if len(writing) > concurrency:  # bounded memory: wait for the oldest
                        await writing.pop(0)

        batch: list[tuple[Download, verify.Expected]] = []
        writing: list[asyncio.Future[None]] = []
        try:
            await _run_bounded(entries, fetch_one, concurrency)
            writing.append(asyncio.ensure_future(store(batch)))
        finally:
            results = await asyncio.gather(*writing, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _twin_job(
        self,
        fetcher: Fetcher,
        entries: list[verify.PoolFile],
        builder: SnapshotBuilder,
        concurrency: int,
        send: Send,
    ) -> None:
        """In the twin process: fetch, check and store `entries` through its copy of the builder,
        and tell the parent of each batch stored, of the end, or of why it stopped."""
        received = 0
        written = builder.written

        def count(n: int) -> None:
            nonlocal received
            received += n

        def stored(expected: list[verify.Expected]) -> None:
            nonlocal received
            send({"stored": [[e.path, builder.placed(e.path)] for e in expected], "bytes": received})
            received = 0

        async def run() -> None:
            async with fetcher.sibling(on_bytes=count) as own:
                await self._fetch_and_store(own, entries, builder, concurrency, stored, inline=True)
            send({"end": {"requests": own.requests, "written": builder.written - written}, "bytes": received})

        try:
            asyncio.run(run())
        except Rejected as exc:
            send({"rejected": [exc.reason, exc.detail]})
        except OSError as exc:
            send({"oserror": [exc.errno, exc.strerror, exc.filename]})

    async def _follow_twin(
        self,
        twin: Twin,
        entries: list[verify.PoolFile],
        builder: SnapshotBuilder,
        fetcher: Fetcher,
        stored: Callable[[list[verify.Expected]], None],
    ) -> None:
        """The parent's side of the twin: what it stored joins the snapshot; its rejection is
        this sync's."""
        expected = {e.expected.path: e.expected for e in entries}
        async for message in twin.messages():
            if fetcher.on_bytes is not None and message.get("bytes", 0):
                fetcher.on_bytes(message["bytes"])
            if "stored" in message:
                batch = [expected[path] for path, _ in message["stored"]]
                for (path, placed), exp in zip(message["stored"], batch, strict=True):
                    builder.stored_elsewhere(path, exp.hashes["sha256"], placed=placed)
                stored(batch)
            elif "end" in message:
                fetcher.requests += message["end"]["requests"]
                builder.count_written(message["end"]["written"])
                return
            elif "rejected" in message:
                raise Rejected(*message["rejected"])
            elif "oserror" in message:
                raise OSError(*message["oserror"])
            else:  # a bug in the twin: its own words first (they become the rejection's detail)
                raise RuntimeError(
                    f"the sync's twin process failed: {message.get('error')}\n{message.get('traceback')}"
                )
        raise RuntimeError(f"the sync's twin process ended before its work did (exit status {twin.stop()})")

    def _adopt(self, builder: SnapshotBuilder, downloads: list[tuple[Download, verify.Expected]]) -> None:
        """Verified pool files into the store and the snapshot (in a worker thread: creating,
        renaming and linking files wait on the filesystem; a snapshot of its own links them now)."""
        for download, exp in downloads:
            if download.data is not None:  # a small body, still in memory: written where it belongs
                builder.put(exp.path, exp.hashes["sha256"], download.data)
                download.data = None
            else:
                self.store.adopt(download.path, exp.hashes["sha256"])
                builder.add(exp.path, exp.hashes["sha256"], pool=True)

    def _hash_object(self, exp: verify.Expected) -> dict[str, str]:
        hashers = {a: hashlib.new(a) for a in exp.hashes}
        with self.store.open_object(exp.hashes["sha256"]) as handle:
            while chunk := handle.read(1 << 20):
                for h in hashers.values():
                    h.update(chunk)
        return {a: h.hexdigest() for a, h in hashers.items()}


# ---------------------------------------------------------------- helpers


def retained_by_hash(
    store: FileStore, name: str, current_id: str | None, current: Manifest | None
) -> dict[str, FileRecord]:
    """path -> record of the own by-hash entries of every snapshot still stored (their objects are too)."""
    found: dict[str, FileRecord] = {}
    for snap_id in store.snapshot_ids(name):
        entries = store.read_by_hash(name, snap_id)
        if entries is None:
            # Made before side files existed: only the current one is cheap (its manifest is loaded).
            entries = {}
            if snap_id == current_id and current is not None:
                entries = {p: current.files[p] for p in current.by_hash_own if p in current.files}
        found.update(entries)
    return found


def _holds_needed(release: verify.TrustedRelease, up: UpstreamConfig, newest: Manifest) -> bool:
    """Whether `newest` holds a variant of every index this config needs of the suite (a sync
    that stored the snapshot had to: an index with no variant upstream is `index-missing`)."""
    return all(
        any(newest.upstream_record(v.path) is not None for v in group.variants)
        for group in verify.needed_indices(release, up)
    )


def _republish(up: UpstreamConfig, newest: Manifest, now: datetime) -> str | None:
    """Why an upstream whose Releases did not change still needs a new snapshot (a view to
    publish or refresh), or None."""
    if up.publish is None:
        return None
    if newest.published is None:
        return "publish is configured"
    from aptguard import publish

    return publish.needs_refresh(newest.published, up, now)


def _known_hashes(*manifests: Manifest | None) -> dict[str, dict[str, Any]]:
    """sha256 -> every hash recorded for that content by verified snapshots. A record is shared,
    not copied, until a second one for the same content adds to it (60,000 records: 30 MB)."""
    known: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for manifest in manifests:
        if manifest is None or id(manifest) in seen:
            continue
        seen.add(id(manifest))
        for record in manifest.files.values():
            found = known.get(record["sha256"])
            if found is None:
                known[record["sha256"]] = record
            elif found is not record and any(found.get(k) != v for k, v in record.items()):
                known[record["sha256"]] = {**found, **record}
    return known


def _agrees(record: dict[str, Any] | None, exp: verify.Expected) -> bool:
    return record is not None and all(record.get(a) == h for a, h in exp.hashes.items())


async def _gather(aws: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run together; the first failure cancels the rest and is raised as itself."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _run_bounded(items: Iterable[Any], job: Callable[[Any], Awaitable[None]], workers: int) -> None:
    """A fixed set of workers over a list of jobs: memory stays flat for 60,000 files."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            await job(item)

    await _gather(worker() for _ in range(workers))
