"""Operations on verified snapshots: list, promote, and what each one holds.

A snapshot is immutable once committed (store.Tree.commit); these functions only move the
pointers that say which one is served, under the upstream's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aptguard.config import NAME_RE
from aptguard.reasons import UsageError
from aptguard.records import UpstreamState
from aptguard.store import FileStore, PointerMoved


def summary(
    store: FileStore, name: str, snap_id: str, current: str | None, pins: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """The SPEC's `snapshots --json` record of one snapshot."""
    manifest = store.read_manifest(name, snap_id)
    return {
        "id": snap_id,
        "created": manifest.created,
        "current": snap_id == current,
        "pins": sorted(pin for pin, target in pins.items() if target == (name, snap_id)),
        "suites": {
            suite: {"date": meta.date, "valid_until": meta.valid_until} for suite, meta in manifest.suites.items()
        },
        "files": manifest.count,
        "bytes": manifest.bytes,
        # policy = "on-demand": pool files listed but not held when the snapshot was made
        **(
            {"on_demand": {"files": len(manifest.listed), "bytes": sum(r["size"] for r in manifest.listed.values())}}
            if manifest.listed
            else {}
        ),
        # [upstreams.NAME.publish]: what clients are served is the mirror's re-signed view
        **({"published": manifest.published.to_json()} if manifest.published is not None else {}),
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


def rollback_target(store: FileStore, name: str, state: UpstreamState | None = None) -> str | None:
    """The snapshot `rollback` returns to: the one the current snapshot replaced.

    It is recorded keyed by the snapshot it belongs to, before current/NAME is swapped, so a kill
    between the two writes leaves the right target for whichever snapshot ends up current."""
    current = store.current(name)
    state = store.read_state(name) if state is None else state
    return state.rollback_target(current)


def switch_current(store: FileStore, name: str, state: UpstreamState, new: str, old: str | None, *, hold: bool) -> None:
    """Record `old` as `new`'s rollback target and the hold, then make `new` current (under the
    upstream's lock). State first: see rollback_target."""
    stored = set(store.snapshot_ids(name))
    targets = {k: v for k, v in (state.rollback_targets or {}).items() if k in stored}
    if old is not None and old != new:
        targets[new] = old
    state.rollback_targets = targets
    state.hold = hold
    store.write_state(name, state)
    if old != new:
        try:
            store.set_current(name, new, expect=old)
        except PointerMoved as exc:
            raise Refused(str(exc)) from None


def _unmoved(store: FileStore, name: str, seen: str | None) -> str | None:
    """Under the lease: current as the operator saw it before waiting for the lease, else
    Refused naming the winner (of two racing operators exactly one wins, guarantee 10)."""
    now = store.current(name)
    if now != seen:
        raise Refused(
            f"{name}: current moved from {seen} to {now} while this command waited for the lease "
            "(another operator or a sync changed it first); nothing was changed"
        )
    return now


# Under the lease, before a switch: the snapshot to make current instead of the one chosen
# (a published view's re-signed copy, publish.resigned_copy), given (chosen, current).
Resign = Callable[[str, str | None], str]


def promote(store: FileStore, name: str, snap_id: str, resign: Resign | None = None) -> tuple[str | None, str]:
    """Make a verified snapshot current and clear a hold; returns (the snapshot it replaced,
    the one now current: `snap_id`, or its re-signed copy)."""
    seen = store.current(name)
    with store.lease(name, wait_message=f"{name}: waiting for another aptguard process to finish"):
        require_snapshot(store, name, snap_id)
        old = _unmoved(store, name, seen)
        new = resign(snap_id, old) if resign is not None else snap_id
        switch_current(store, name, store.read_state(name), new, old, hold=False)
        return old, new


class Refused(Exception):
    """An operation the data folder's state does not allow (exit 1): nothing was changed."""


def rollback(
    store: FileStore, name: str, to: str | None = None, resign: Resign | None = None
) -> tuple[str | None, str]:
    """Make the previously current snapshot (or `to`) current again and hold the upstream.

    Later syncs verify and store but do not promote until `promote`. The replaced snapshot
    becomes the new rollback target, so a second rollback undoes the first (like `cd -`), and
    gc keeps it for inspection (`aptguard diff`). Returns (replaced, now current).
    """
    seen = store.current(name)
    with store.lease(name, wait_message=f"{name}: waiting for another aptguard process to finish"):
        state = store.read_state(name)
        old = _unmoved(store, name, seen)
        target = to or rollback_target(store, name, state)
        if target is None:
            raise Refused(
                f"{name}: no previous snapshot to roll back to (nothing was promoted over another snapshot); "
                f"pick one from `aptguard snapshots {name}` and run `aptguard rollback {name} --to ID`"
            )
        if target not in store.snapshot_ids(name):
            raise Refused(
                f"{name}: the rollback target {target} is not a stored snapshot any more; "
                f"pick one from `aptguard snapshots {name}` and run `aptguard rollback {name} --to ID`"
            )
        if resign is not None:
            target = resign(target, old)
        switch_current(store, name, state, target, old, hold=True)
        return old, target


def check_pin_name(pin: str) -> None:
    """A pin is one URL path word (/pins/PIN/), spelled like an upstream name."""
    if not NAME_RE.match(pin):
        raise UsageError(f"pin name {pin!r}: must match [a-z0-9][a-z0-9._-]* (it becomes the URL /pins/{pin}/)")


def pin(store: FileStore, pin_name: str, name: str, snap_id: str) -> tuple[str, str] | None:
    """Point /pins/PIN/ at one snapshot (moving it if it exists); returns its old target."""
    check_pin_name(pin_name)
    seen = store.pin_target(pin_name)
    # Under the upstream's lock, so that a gc deciding what to keep sees the pin or the snapshot is gone.
    with store.lease(name, wait_message=f"{name}: waiting for another aptguard process to finish"):
        require_snapshot(store, name, snap_id)
        old = store.pin_target(pin_name)
        if old != seen:
            raise Refused(
                f"pin {pin_name} moved from {seen} to {old} while this command waited for the lease "
                "(another operator changed it first); nothing was changed"
            )
        try:
            store.set_pin(pin_name, name, snap_id, expect=old)
        except PointerMoved as exc:
            raise Refused(str(exc)) from None
        return old


def unpin(store: FileStore, pin_name: str) -> tuple[str, str]:
    """Remove a pin; its snapshot becomes collectable by retention. Returns its old target."""
    check_pin_name(pin_name)
    target = store.pin_target(pin_name)
    if target is None:
        known = ", ".join(store.pins()) or "none"
        raise UsageError(f"no pin named {pin_name!r} (pins: {known})")
    try:
        store.remove_pin(pin_name, expect=target)
    except PointerMoved as exc:
        raise Refused(str(exc)) from None
    return target
