"""Garbage collection: apply [retention], then delete every stored file no snapshot uses.

Kept, always: the current snapshot, every pinned one and the rollback target (state
rollback_targets, see snapshot.rollback_target); then the `keep_last` newest and every one younger than `keep_days`.

Safe while `sync` and `serve` run: gc holds the collection lock exclusively (every sync holds
it shared for its whole run, so no sync is between "this object is stored" and "link it"), and
each upstream's lock while it decides and deletes (so `promote`, `rollback` and `pin` see the
snapshot or its absence, never half of it). A file is unused when its object has no other
link (st_nlink 1): hard links are the reference count.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aptguard.config import Config
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore

# tmp/ entries made by syncs (under the shared collection lock) and by gc itself: with the
# lock held exclusively, any of them belongs to a process that died.
LEFTOVER_PREFIXES = ("sync+", "build+", "build-", "put-", "gc+")


def keep_reasons(
    store: FileStore, name: str, keep_last: int, keep_days: float, now: datetime
) -> tuple[dict[str, list[str]], list[str]]:
    """Which snapshots of `name` stay and why, and which go (oldest first)."""
    ids = store.snapshot_ids(name)
    state = store.read_state(name)
    reasons: dict[str, list[str]] = {snap_id: [] for snap_id in ids}
    current = store.current(name)
    if current in reasons:
        reasons[current].append("current")
    for pin_name, (pin_upstream, snap_id) in store.pins().items():
        if pin_upstream == name and snap_id in reasons:
            reasons[snap_id].append(f"pin {pin_name}")
    previous = rollback_target(store, name, state)
    if previous in reasons:
        reasons[previous].append("rollback target")
    for snap_id in ids[-keep_last:]:
        reasons[snap_id].append(f"among the {keep_last} newest")
    cutoff = now - timedelta(days=keep_days)
    for snap_id in ids:
        try:
            created = datetime.fromisoformat(store.read_manifest(name, snap_id).created)
        except (OSError, ValueError, KeyError):
            reasons[snap_id].append("manifest unreadable (run `aptguard fsck`)")
            continue
        if created > cutoff:
            reasons[snap_id].append(f"younger than {keep_days:g} days")
    kept = {snap_id: why for snap_id, why in reasons.items() if why}
    return kept, [snap_id for snap_id in ids if snap_id not in kept]


def upstream_names(config: Config, store: FileStore) -> list[str]:
    """Configured upstreams and any other with snapshots on disk (retention applies to both)."""
    names = set(config.upstreams)
    folder = store.root / "snapshots"
    if folder.is_dir():
        names.update(p.name for p in folder.iterdir() if p.is_dir())
    return sorted(names)


def _files(folder: Path) -> Iterator[os.stat_result]:
    for base, _dirs, files in os.walk(folder):
        for file_name in files:
            with contextlib.suppress(FileNotFoundError):
                yield os.lstat(os.path.join(base, file_name))


def leftovers(store: FileStore, names: list[str] | None = None) -> list[Path]:
    """What killed runs left: tmp/ work, and meta/ files of a snapshot whose tree is not in
    snapshots/ (a commit killed before its rename, or a gc killed after moving the tree out)."""
    found: list[Path] = []
    if store.tmp.is_dir():
        found += sorted(p for p in store.tmp.iterdir() if p.name.startswith(LEFTOVER_PREFIXES))
    meta = store.root / "meta"
    folders = [meta / n for n in names] if names is not None else sorted(meta.iterdir()) if meta.is_dir() else []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            snap_id = entry.name.split(".", 1)[0]  # ID.json and its side files (ID.byhash.json)
            if entry.name.startswith(".") or not store.snapshot_dir(folder.name, snap_id).is_dir():
                found.append(entry)
    return found


def _objects(store: FileStore) -> Iterator[tuple[Path, os.stat_result]]:
    if not store.objects.is_dir():
        return
    for sub in sorted(store.objects.iterdir()):
        if sub.is_dir():
            for entry in os.scandir(sub):
                with contextlib.suppress(FileNotFoundError):
                    yield Path(entry.path), entry.stat(follow_symlinks=False)


def _freed(store: FileStore, going: list[Path]) -> tuple[int, int]:
    """(objects, bytes) that deleting `going` plus every unused object frees: a file's bytes
    are freed when every one of its links is in `going` or is its object."""
    seen: Counter[tuple[int, int]] = Counter()
    sizes: dict[tuple[int, int], tuple[int, int]] = {}
    objects: set[tuple[int, int]] = set()
    for path in going:
        stats = [os.lstat(path)] if path.is_file() else list(_files(path))
        for st in stats:
            key = (st.st_dev, st.st_ino)
            seen[key] += 1
            sizes[key] = (st.st_nlink, st.st_size)
    for _path, st in _objects(store):
        key = (st.st_dev, st.st_ino)
        seen[key] += 1
        sizes[key] = (st.st_nlink, st.st_size)
        objects.add(key)
    freed = [key for key, count in seen.items() if count >= sizes[key][0]]
    return sum(1 for key in freed if key in objects), sum(sizes[key][1] for key in freed)


def collect(
    config: Config,
    store: FileStore,
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Apply retention and delete unused files; returns what went (or would go) and why the rest stays."""
    now = now or datetime.now(UTC)
    report: dict[str, Any] = {"dry_run": dry_run, "removed": [], "kept": {}, "leftovers": [], "objects": 0, "bytes": 0}
    with store.collection_lock(exclusive=True, wait_message="gc: waiting for running syncs to finish"):
        found = leftovers(store)
        report["leftovers"] = [p.relative_to(store.root).as_posix() for p in found]
        plans: dict[str, list[str]] = {}
        for name in upstream_names(config, store):
            kept, going = keep_reasons(store, name, config.keep_last, config.keep_days, now)
            report["kept"][name] = kept
            plans[name] = going
        trees = [store.snapshot_dir(name, snap_id) for name, ids in plans.items() for snap_id in ids]
        report["objects"], report["bytes"] = _freed(store, found + trees)
        for name, going in plans.items():
            for snap_id in going:
                manifest = store.read_manifest(name, snap_id)
                report["removed"].append(
                    {
                        "upstream": name,
                        "id": snap_id,
                        "created": manifest.created,
                        "files": manifest.count,
                        "bytes": manifest.bytes,
                    }
                )
        if dry_run:
            return report
        for path in found:
            log(f"gc: discarding {path.relative_to(store.root)} (left by an interrupted run)")
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for name, going in plans.items():
            if not going:
                continue
            # Under the upstream's lock: a promote, rollback or pin decided meanwhile is honoured.
            with store.lock(name, wait_message=f"gc: waiting for another aptguard process on {name}"):
                kept, still_going = keep_reasons(store, name, config.keep_last, config.keep_days, now)
                for snap_id in going:
                    if snap_id in still_going:
                        log(f"gc: removing snapshot {name}/{snap_id}")
                        store.remove_snapshot(name, snap_id)
                    else:
                        report["kept"][name][snap_id] = kept.get(snap_id, ["referenced meanwhile"])
                        report["removed"] = [
                            r for r in report["removed"] if (r["upstream"], r["id"]) != (name, snap_id)
                        ]
        removed = 0
        for path, st in _objects(store):
            if st.st_nlink == 1:  # no tree links it, and no sync runs that could link it now
                path.unlink(missing_ok=True)
                removed += 1
        report["objects"] = removed
    return report
