"""On-demand pool files (`policy = "on-demand"`, SPEC §5): fetched, verified and stored at a
client's first request, in the server.

A sync of an on-demand upstream verifies InRelease and every index as always and records each
pool file it did not hold in the manifest's `listed` (size and every hash its index gave). The
first request for such a file, through any snapshot that lists it, is answered here: one
download from the upstream (the sync's Fetcher: its timeouts, retries, `min_rate` and
`Accept-Encoding: identity`), however many clients ask at once; its size and every listed hash
checked; only then stored (an object, linked into the snapshot's pool generation on the local
backend, so the next request, or nginx, finds it like any held file) and sent. A client never
receives a byte that was not verified: the answer starts after the check (a 502 on a mismatch,
and nothing is stored). Upstream 404: 404. Upstream unreachable or slower than `min_rate`: 504.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

from aptguard.config import Config, Limits
from aptguard.fetch import Fetcher
from aptguard.reasons import Rejected, UsageError
from aptguard.records import FileRecord, Manifest
from aptguard.store import FileStore, process_alive
from aptguard.verify import Expected

MANIFESTS = 4  # parsed manifests of on-demand snapshots kept (immutable)


class OnDemand:
    """One server process's on-demand fetches: per upstream a fetcher, per object one download."""

    def __init__(self, config: Config, store: FileStore, counted: Any = None) -> None:
        """`counted(upstream, outcome, size)`: the server's metrics (metrics.ServerMetrics.fetched)."""
        self.config = config
        self.store = store
        self.counted = counted or (lambda upstream, outcome, size=0: None)
        self.work = store.root / "tmp" / f"serve+{os.getpid()}"
        self._fetchers: dict[str, Fetcher] = {}
        self._pending: dict[str, asyncio.Future[int]] = {}
        self._manifests: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        # name -> counters, for /status and /metrics
        self.counts: dict[str, dict[str, int]] = {}
        self.last_error: dict[str, str] = {}

    def serves(self, name: str) -> bool:
        up = self.config.upstreams.get(name)
        return up is not None and up.policy == "on-demand"

    async def answer(self, where: str, key: tuple[str, ...], parts: list[str]) -> int:
        """Make the on-demand file a URL names held; the HTTP status to answer with: 200 (held
        now: resolve the URL again), 404, 502 (failed verification) or 504 (upstream unreachable)."""
        if where != "pin" and not self.serves(key[0]):
            return 404  # a path of an upstream that is not on demand: no store lookup
        snapshot = await asyncio.to_thread(self._snapshot, where, key)
        if snapshot is None or not self.serves(snapshot[0]):
            return 404
        manifest = await self._manifest(snapshot)
        path = "/".join(parts)
        record = manifest.listed.get(path) if manifest is not None else None
        if record is None:
            return 404
        return await self.hold(snapshot, path, record)

    async def hold(self, snapshot: tuple[str, str], path: str, record: FileRecord) -> int:
        """Fetch, verify and store one listed file of a snapshot (one download per object
        however many ask); 200 once it is held, else the HTTP status of the failure."""
        sha256 = record["sha256"]
        task = self._pending.get(sha256)
        if task is None:
            task = self._pending[sha256] = asyncio.ensure_future(self._fetch(snapshot[0], path, record))
            task.add_done_callback(lambda _done: self._pending.pop(sha256, None))
        status = await asyncio.shield(task)
        if status == 200:
            await asyncio.to_thread(self.store.hold, snapshot[0], snapshot[1], path, sha256)
        return status

    def _snapshot(self, where: str, key: tuple[str, ...]) -> tuple[str, str] | None:
        if where == "snapshot":
            return (key[0], key[1]) if key[1] in self.store.snapshot_ids(key[0]) else None
        if where == "pin":
            return self.store.pin_target(key[0])
        current = self.store.current(key[0])
        return None if current is None else (key[0], current)

    async def _manifest(self, snapshot: tuple[str, str]) -> Manifest | None:
        known = self._manifests.get(snapshot)
        if known is None:
            try:
                known = await asyncio.to_thread(self.store.read_manifest, *snapshot)
            except (OSError, ValueError):
                return None
            self._manifests[snapshot] = known
            while len(self._manifests) > MANIFESTS:
                self._manifests.popitem(last=False)
        return known

    def _fetcher(self, name: str) -> Fetcher:
        fetcher = self._fetchers.get(name)
        if fetcher is None:
            self.work.mkdir(parents=True, exist_ok=True)
            up = self.config.upstreams[name]
            fetcher = self._fetchers[name] = Fetcher(up.url, self.work, min_rate=self.config.limits.min_rate)
        return fetcher

    async def _fetch(self, name: str, path: str, record: FileRecord) -> int:
        counts = self.counts.setdefault(name, {"fetched": 0, "bytes": 0, "mismatches": 0, "errors": 0, "missing": 0})
        sha256 = record["sha256"]
        if await asyncio.to_thread(self.store.object_size, sha256) == record["size"]:
            return 200  # held for another snapshot (verified when it was stored)
        hashes = {a: h for a, h in record.items() if a != "size"}
        try:
            download = await self._fetcher(name).fetch(path, limit=record["size"], algos=hashes)
        except Rejected as exc:
            counts["errors"] += 1
            self.counted(name, "error")
            self.last_error[name] = f"{path}: {exc.reason}: {exc.detail}"
            return 504 if exc.reason == "unreachable" else 502
        if download is None:
            counts["missing"] += 1
            self.counted(name, "missing")
            return 404
        try:
            Expected(path, record["size"], hashes).check(download.size, download.hashes, "package-mismatch")  # type: ignore[arg-type]
        except Rejected as exc:
            download.discard()
            counts["mismatches"] += 1
            self.counted(name, "mismatch")
            self.last_error[name] = f"{exc.reason}: {exc.detail}"
            return 502
        await asyncio.to_thread(lambda: self.store.adopt(download.save(), sha256))
        counts["fetched"] += 1
        counts["bytes"] += record["size"]
        self.counted(name, "fetched", record["size"])
        return 200

    def report(self) -> dict[str, Any]:
        """Per upstream: this server's on-demand fetches, failures and the last failure."""
        return {name: {**counts, "last_error": self.last_error.get(name, "")} for name, counts in self.counts.items()}

    async def close(self) -> None:
        for fetcher in self._fetchers.values():
            await fetcher.__aexit__(None, None, None)
        shutil.rmtree(self.work, ignore_errors=True)


def discard_dead_work(tmp: Path) -> None:
    """Remove the work folders of server processes that no longer run (killed mid-download)."""
    if not tmp.is_dir():
        return
    for entry in tmp.iterdir():
        if entry.name.startswith("serve+"):
            pid = entry.name.partition("+")[2]
            if pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


async def prefetch(
    config: Config, store: FileStore, snapshot: tuple[str, str], packages: list[str], log: Any
) -> dict[str, Any]:
    """Fetch and verify now the listed files of a snapshot: all, or those of `packages` and what
    they depend on (for a CI image that must outlive the upstream's old versions)."""
    manifest = store.read_manifest(*snapshot)
    wanted = (
        set(manifest.listed) if not packages else _closure(store, manifest, packages, config.limits.max_index_bytes)
    )
    todo = {path: record for path, record in manifest.listed.items() if path in wanted}
    held = store.held(record["sha256"] for record in todo.values())
    missing = {path: record for path, record in todo.items() if record["sha256"] not in held}
    for path, record in todo.items():
        if record["sha256"] in held:
            store.hold(*snapshot, path, record["sha256"])
    total = sum(record["size"] for record in missing.values())
    log(f"{snapshot[0]}: {len(todo) - len(missing)} of {len(todo)} files held; fetching {len(missing)} ({total} bytes)")
    fetcher = OnDemand(config, store)
    failed: dict[str, int] = {}
    done = 0

    async def one(path: str, record: FileRecord) -> None:
        nonlocal done
        status = await fetcher.hold(snapshot, path, record)
        done += 1
        if status != 200:
            failed[path] = status
        if done % 100 == 0 or done == len(missing):
            log(f"{snapshot[0]}: {done}/{len(missing)} fetched and verified")

    try:
        await asyncio.gather(*(one(path, record) for path, record in sorted(missing.items())))
    finally:
        await fetcher.close()
    return {
        "upstream": snapshot[0],
        "snapshot": snapshot[1],
        "files": len(todo),
        "fetched": len(missing) - len(failed),
        "bytes": sum(record["size"] for path, record in missing.items() if path not in failed),
        "failed": {path: _WHY.get(status, str(status)) for path, status in sorted(failed.items())},
        "counts": fetcher.report(),
    }


_WHY = {404: "gone upstream (404)", 502: "failed verification (not stored)", 504: "upstream unreachable"}


def _closure(
    store: FileStore, manifest: Manifest, packages: list[str], max_index_bytes: int = Limits().max_index_bytes
) -> set[str]:
    """The pool paths of `packages` (every version) and of what they need to install, chosen
    per architecture as apt would choose (aptguard.resolve: Depends, Pre-Depends, alternatives
    in order, versions, Provides), read from the snapshot's own Packages indices as a published
    view's filter reads them (publish.index_candidates); what this upstream cannot satisfy is
    left to the clients' other sources. `binary-all` indices belong to every other architecture."""
    from aptguard.publish import index_candidates
    from aptguard.resolve import parse_root, select

    for root in packages:
        problem = parse_root(root)
        if problem is not None:
            raise UsageError(f"prefetch: {problem}")
    by_arch = index_candidates(manifest, store.open_object, max_index_bytes)
    shared = by_arch.pop("all", []) if len(by_arch) > 1 else []
    paths: set[str] = set()
    found: set[str] = set()
    for candidates in by_arch.values():
        # A dependency this upstream cannot satisfy comes from another source of the clients
        # (Docker's packages need Debian's libc6): not this upstream's to fetch.
        selection = select(candidates + shared, packages, strict=False)
        found.update(root for root in packages if root not in selection.missing_roots)
        paths.update(str(candidate.key) for candidate in selection.chosen if candidate.key)
    unknown = [p for p in packages if p not in found]
    if unknown:
        raise UsageError(f"{manifest.upstream} snapshot {manifest.id} lists no package {', '.join(unknown)}")
    return paths
