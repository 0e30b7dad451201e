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
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aptguard.gc import leftovers
from aptguard.records import FileRecord
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore

HASH_NAMES = {"md5": "MD5Sum", "sha1": "SHA1", "sha256": "SHA256", "sha512": "SHA512"}


@dataclass
class _File:
    """One inode and every (snapshot path, record) that vouches for it."""

    path: Path
    algos: set[str] = field(default_factory=set)
    claims: list[tuple[str, FileRecord]] = field(default_factory=list)


def _rel(store: FileStore, path: Path) -> str:
    return path.relative_to(store.root).as_posix()


def check(store: FileStore, names: list[str], *, log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """{"damaged": [{"path", "problem"}], "snapshots", "files", "bytes", "leftovers"} for `names`."""
    report: dict[str, Any] = {"damaged": [], "snapshots": 0, "files": 0, "bytes": 0, "leftovers": []}

    def damaged(path: str, problem: str) -> None:
        report["damaged"].append({"path": path, "problem": problem})

    if not store.root.is_dir():
        return report
    (store.root / "locks").mkdir(parents=True, exist_ok=True)
    # Shared, like a sync: a gc cannot delete a snapshot while it is being read.
    with store.collection_lock(exclusive=False, wait_message="fsck: waiting for a running gc to finish"):
        inodes: dict[tuple[int, int], _File] = {}
        for name in names:
            _check_upstream(store, name, inodes, report, damaged)
        log(f"fsck: re-hashing {len(inodes)} stored files")
        for entry in inodes.values():
            _check_content(entry, report, damaged)
        _check_pointers(store, names, damaged)
        report["leftovers"] = [_rel(store, p) for p in leftovers(store, names)]
    return report


def _check_upstream(
    store: FileStore,
    name: str,
    inodes: dict[tuple[int, int], _File],
    report: dict[str, Any],
    damaged: Callable[[str, str], None],
) -> None:
    folder = store.root / "snapshots" / name
    trees = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    for snap_id in trees:
        tree = store.snapshot_dir(name, snap_id)
        meta = store.meta_path(name, snap_id)
        try:
            files = store.read_manifest(name, snap_id).files
        except FileNotFoundError:
            damaged(_rel(store, tree), f"snapshot tree without its manifest {_rel(store, meta)}")
            continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            damaged(_rel(store, meta), f"manifest unreadable: {exc}")
            continue
        report["snapshots"] += 1
        listed: set[str] = set()
        for rel, record in files.items():
            path = tree / rel
            listed.add(os.path.normpath(path))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                damaged(_rel(store, path), "missing (listed in the manifest)")
                continue
            if not stat.S_ISREG(st.st_mode):
                damaged(_rel(store, path), "not a regular file")
                continue
            report["files"] += 1
            report["bytes"] += st.st_size
            if st.st_size != record["size"]:
                damaged(_rel(store, path), f"size {st.st_size}, verified as {record['size']}")
                continue
            entry = inodes.setdefault((st.st_dev, st.st_ino), _File(path))
            entry.algos.update(a for a in record if a in HASH_NAMES)
            entry.claims.append((_rel(store, path), record))
        for base, _dirs, names in os.walk(tree):
            for file_name in names:
                path = os.path.normpath(os.path.join(base, file_name))
                if path not in listed:
                    damaged(_rel(store, Path(path)), "not in the snapshot's manifest (added after verification)")


def _check_content(entry: _File, report: dict[str, Any], damaged: Callable[[str, str], None]) -> None:
    hashers = {a: hashlib.new(a) for a in sorted(entry.algos)}
    try:
        with open(entry.path, "rb") as handle:
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
            damaged(f"current/{name}", f"points to snapshot {current}, which is not stored")
        previous = rollback_target(store, name)
        if previous is not None and previous not in ids:
            damaged(f"state/{name}.json", f"rollback target {previous} is not stored")
    for pin_name, (name, snap_id) in store.pins().items():
        if name in names and snap_id not in store.snapshot_ids(name):
            damaged(f"pins/{pin_name}", f"points to snapshot {name}/{snap_id}, which is not stored")
