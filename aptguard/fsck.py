"""fsck: re-hash everything stored against what was verified, and check every reference.

Every file of every snapshot tree is read again and compared with its manifest (size and every
hash recorded when it was verified); every manifest file must be in its tree and nothing else
may be; current/, pins/ and each rollback target must name a stored snapshot. A file shared by
several snapshots (one object, many hard links) is read once.

Leftovers of a killed run (tmp/ entries, a manifest whose tree was never committed or was
already collected) are not damage: nothing serves them, and the next sync or gc discards them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aptguard.records import FileRecord
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore, StoredFile

HASH_NAMES = {"md5": "MD5Sum", "sha1": "SHA1", "sha256": "SHA256", "sha512": "SHA512"}


@dataclass
class _File:
    """One stored file and every (snapshot path, record) that vouches for it."""

    stored: StoredFile
    algos: set[str] = field(default_factory=set)
    claims: list[tuple[str, FileRecord]] = field(default_factory=list)


def check(store: FileStore, names: list[str], *, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """{"damaged": [{"path", "problem"}], "snapshots", "files", "bytes", "leftovers"} for `names`."""
    report: dict[str, Any] = {"damaged": [], "snapshots": 0, "files": 0, "bytes": 0, "leftovers": []}

    def damaged(path: str, problem: str) -> None:
        report["damaged"].append({"path": path, "problem": problem})

    if not store.exists():
        return report
    # Shared, like a sync: a gc cannot delete a snapshot while it is being read.
    with store.collection_lock(exclusive=False, wait_message="fsck: waiting for a running gc to finish"):
        stored: dict[tuple[int, int], _File] = {}
        for name in names:
            _check_upstream(store, name, stored, report, damaged)
        log(f"fsck: re-hashing {len(stored)} stored files")
        for entry in stored.values():
            _check_content(store, entry, damaged)
        _check_pointers(store, names, damaged)
        report["leftovers"] = store.leftovers(names)
    return report


def _check_upstream(
    store: FileStore,
    name: str,
    stored: dict[tuple[int, int], _File],
    report: dict[str, Any],
    damaged: Callable[[str, str], None],
) -> None:
    for snap_id in store.tree_ids(name):
        meta = store.manifest_label(name, snap_id)
        if not store.has_manifest(name, snap_id):
            damaged(store.file_label(name, snap_id), f"snapshot tree without its manifest {meta}")
            continue
        try:
            manifest = store.read_manifest(name, snap_id)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            damaged(meta, f"manifest unreadable: {exc}")
            continue
        files = manifest.files
        report["snapshots"] += 1
        # On-demand files not fetched yet are not missing: those held are checked like the rest.
        for rel, record, held_only in [
            *((r, f, False) for r, f in files.items()),
            *((r, f, True) for r, f in manifest.listed.items()),
        ]:
            label = store.file_label(name, snap_id, rel)
            found = store.stored_file(name, snap_id, rel)
            if isinstance(found, str):
                if not held_only:
                    damaged(label, found)
                continue
            report["files"] += 1
            report["bytes"] += found.size
            if found.size != record["size"]:
                damaged(label, f"size {found.size}, verified as {record['size']}")
                continue
            entry = stored.setdefault(found.key, _File(found))
            entry.algos.update(a for a in record if a in HASH_NAMES)
            entry.claims.append((label, record))
        for label, problem in store.unlisted(name, snap_id, files):
            damaged(label, problem)
        # A published view's upstream files are not served, but the next sync republishes from them.
        for rel, record in manifest.source.items():
            if store.object_size(record["sha256"]) != record["size"]:
                damaged(f"{meta}: source {rel}", f"object {record['sha256']} missing or not {record['size']} bytes")


def _check_content(store: FileStore, entry: _File, damaged: Callable[[str, str], None]) -> None:
    hashers = {a: hashlib.new(a) for a in sorted(entry.algos)}
    try:
        with store.open_stored(entry.stored) as handle:
            while chunk := handle.read(1 << 20):
                for h in hashers.values():
                    h.update(chunk)
    except OSError as exc:
        for path, _record in entry.claims:
            damaged(path, f"unreadable: {exc.strerror}")
        return
    actual = {a: h.hexdigest() for a, h in hashers.items()}
    for path, record in entry.claims:
        for algo in sorted(actual, key=lambda a: a != "sha256"):  # SHA256 first: what names the object
            want = record.get(algo)
            if want is not None and actual[algo] != want:
                damaged(path, f"{HASH_NAMES[algo]} {actual[algo]}, verified as {want}")
                break


def _check_pointers(store: FileStore, names: list[str], damaged: Callable[[str, str], None]) -> None:
    for name in names:
        ids = set(store.snapshot_ids(name))
        current = store.current(name)
        if current is not None and current not in ids:
            damaged(store.pointer_label("current", name), f"points to snapshot {current}, which is not stored")
        previous = rollback_target(store, name)
        if previous is not None and previous not in ids:
            damaged(store.state_label(name), f"rollback target {previous} is not stored")
    for pin_name, (name, snap_id) in store.pins().items():
        if name in names and snap_id not in store.snapshot_ids(name):
            damaged(store.pointer_label("pin", pin_name), f"points to snapshot {name}/{snap_id}, which is not stored")
