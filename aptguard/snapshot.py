"""Operations on verified snapshots: list, promote, and what each one holds.

A snapshot is immutable once committed (store.Tree.commit); these functions only move the
pointers that say which one is served, under the upstream's lock.
"""

from __future__ import annotations

from typing import Any

from aptguard.reasons import UsageError
from aptguard.store import FileStore


def summary(
    store: FileStore, name: str, snap_id: str, current: str | None, pins: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """The SPEC's `snapshots --json` record of one snapshot."""
    manifest = store.read_manifest(name, snap_id)
    return {
        "id": snap_id,
        "created": manifest["created"],
        "current": snap_id == current,
        "pins": sorted(pin for pin, target in pins.items() if target == (name, snap_id)),
        "suites": {
            suite: {"date": meta["date"], "valid_until": meta["valid_until"]}
            for suite, meta in manifest["suites"].items()
        },
        "files": manifest["count"],
        "bytes": manifest["bytes"],
    }


def list_snapshots(store: FileStore, name: str) -> list[dict[str, Any]]:
    """Every committed snapshot of an upstream, newest first."""
    current = store.current(name)
    pins = store.pins()
    return [summary(store, name, snap_id, current, pins) for snap_id in reversed(store.snapshot_ids(name))]


def require_snapshot(store: FileStore, name: str, snap_id: str) -> None:
    if snap_id not in store.snapshot_ids(name):
        known = ", ".join(reversed(store.snapshot_ids(name)[-5:])) or "none yet"
        raise UsageError(
            f"upstream {name!r} has no snapshot {snap_id!r}; newest: {known} (see `aptguard snapshots {name}`)"
        )


def promote(store: FileStore, name: str, snap_id: str) -> str | None:
    """Make a verified snapshot current and clear a hold; returns the snapshot it replaced."""
    with store.lock(name, wait_message=f"{name}: waiting for another aptguard process to finish"):
        require_snapshot(store, name, snap_id)
        old = store.current(name)
        state = store.read_state(name)
        if old != snap_id:
            store.set_current(name, snap_id)
            state["previous"] = old
        state["hold"] = False
        store.write_state(name, state)
        return old
