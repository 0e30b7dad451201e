"""`aptguard migrate --from DATA_DIR`: move a local mirror into the config's object store.

Every snapshot of the data folder is copied as it is (its manifest, by-hash entries and the
objects they name, with their modification times, so the servers of the bucket send the same
Last-Modified and ETag as the local server did), then each upstream's state, current pointer and
the pins. Nothing is verified again: these bytes were verified when they were synced, and each
object is read back by its SHA256 name (a damaged one stops the migration; run `aptguard fsck`
on the data folder). It can be run again: what the bucket holds is skipped, and a pointer the
bucket already has is left as it is (the bucket's servers may be serving it).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aptguard.store import FileStore, StoreError
from aptguard.store_s3 import S3Store

UPLOADS = 16  # objects uploaded at a time


def migrate(source: FileStore, target: S3Store, log: Callable[[str], None]) -> dict[str, Any]:
    """Copy every snapshot, state, current pointer and pin of `source` into `target`."""
    report: dict[str, Any] = {"snapshots": 0, "skipped": 0, "objects": 0, "bytes": 0, "pointers": []}
    with ThreadPoolExecutor(UPLOADS) as pool:
        for name in source.upstreams():
            with target.lease(name, wait_message=f"{name}: waiting for another aptguard process to finish"):
                stored = set(target.snapshot_ids(name))
                for snap_id in source.snapshot_ids(name):
                    if snap_id in stored:
                        report["skipped"] += 1
                        continue
                    manifest = source.read_manifest(name, snap_id)
                    by_hash = source.read_by_hash(name, snap_id) or {}
                    objects = {r["sha256"] for r in (*manifest.files.values(), *manifest.source.values())}
                    for size in pool.map(lambda sha: _upload(source, target, sha), sorted(objects)):
                        if size:
                            report["objects"] += 1
                            report["bytes"] += size
                    builder = target.new_snapshot(name, snap_id)
                    for path, record in manifest.files.items():
                        builder.add(path, record["sha256"], pool=None)
                    builder.commit(manifest, by_hash)
                    report["snapshots"] += 1
                    log(f"{name}: copied snapshot {snap_id} ({manifest.count} files)")
                target.write_state(name, source.read_state(name))
                current = source.current(name)
                if current is not None and target.current(name) is None:
                    target.set_current(name, current, expect=None)
                    report["pointers"].append(f"current/{name} -> {current}")
        for pin, (name, snap_id) in source.pins().items():
            if target.pin_target(pin) is None:
                target.set_pin(pin, name, snap_id, expect=None)
                report["pointers"].append(f"pins/{pin} -> {name}/{snap_id}")
    return report


def _upload(source: FileStore, target: S3Store, sha256: str) -> int:
    """Upload one object unless the bucket has it; the bytes uploaded (0: already there)."""
    if target.object_size(sha256) is not None:
        return 0
    path = source._object(sha256)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise StoreError(f"{path}: its content does not match its name (run `aptguard fsck` on the data folder)")
    st = os.stat(path)
    target.upload(path, sha256, st.st_mtime)
    return st.st_size
