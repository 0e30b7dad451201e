"""Garbage collection: apply [retention], then delete every stored file no snapshot uses.

Kept, always: the current snapshot, every pinned one and the rollback target (state
rollback_targets, see snapshot.rollback_target); then the `keep_last` newest and every one younger than `keep_days`.

Safe while `sync` and `serve` run: gc holds the collection lock exclusively (every sync holds
it shared for its whole run, so no sync is between "this object is stored" and "link it"), and
each upstream's lease while it decides and deletes (so `promote`, `rollback` and `pin` see the
snapshot or its absence, never half of it). An object is unused when no manifest of a kept
snapshot names its SHA256 (the store also keeps any object a tree still links).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aptguard.config import Config
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore


def keep_reasons(
    store: FileStore, name: str, keep_last: int, keep_days: float, now: datetime, refresh_seconds: float = 5.0
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
    for snap_id in store.recently_served(name, 2 * refresh_seconds):
        if snap_id in reasons:
            reasons[snap_id].append("served moments ago (a server may not have refreshed yet)")
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
    """Configured upstreams and any other with snapshots stored (retention applies to both)."""
    return sorted(set(config.upstreams) | set(store.upstreams()))


def _referenced(store: FileStore, snapshots: dict[str, list[str]]) -> set[str]:
    """SHA256 of every object these snapshots' manifests name."""
    found: set[str] = set()
    for name, ids in snapshots.items():
        for snap_id in ids:
            try:
                manifest = store.read_manifest(name, snap_id)
                found.update(r["sha256"] for r in manifest.files.values())
                found.update(r["sha256"] for r in manifest.listed.values())  # on demand: held once asked
                found.update(r["sha256"] for r in manifest.source.values())  # a published view's upstream files
            except (OSError, ValueError, KeyError):
                pass  # kept, and its objects too: the store never deletes an object a tree links
    return found


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
        found = store.leftovers()
        report["leftovers"] = found
        plans: dict[str, list[str]] = {}
        for name in upstream_names(config, store):
            kept, going = keep_reasons(
                store, name, config.keep_last, config.keep_days, now, config.storage.refresh_seconds
            )
            report["kept"][name] = kept
            plans[name] = going
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
        staying = {name: [i for i in store.snapshot_ids(name) if i not in plans[name]] for name in plans}
        referenced = _referenced(store, staying)
        unused = store.unreferenced(referenced)
        report["objects"], report["bytes"] = len(unused), sum(size for _sha, size in unused)
        if dry_run:
            return report
        for label in found:
            log(f"gc: discarding {label} (left by an interrupted run)")
        store.discard(found)
        kept_meanwhile: dict[str, list[str]] = {}
        for name, going in plans.items():
            # Under the upstream's lease: a promote, rollback or pin decided meanwhile is honoured.
            with store.lease(name, wait_message=f"gc: waiting for another aptguard process on {name}"):
                kept, still_going = keep_reasons(
                    store, name, config.keep_last, config.keep_days, now, config.storage.refresh_seconds
                )
                for snap_id in going:
                    if snap_id in still_going:
                        log(f"gc: removing snapshot {name}/{snap_id}")
                        store.remove_snapshot(name, snap_id)
                    else:
                        kept_meanwhile.setdefault(name, []).append(snap_id)
                        report["kept"][name][snap_id] = kept.get(snap_id, ["referenced meanwhile"])
                        report["removed"] = [
                            r for r in report["removed"] if (r["upstream"], r["id"]) != (name, snap_id)
                        ]
                store.prune_pools(name)
        if kept_meanwhile:  # no sync runs under the collection lock: only these joined the kept ones
            referenced |= _referenced(store, kept_meanwhile)
            unused = [(sha, size) for sha, size in unused if sha not in referenced]
        report["objects"], report["bytes"] = store.delete_objects(unused)
    return report
