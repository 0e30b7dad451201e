"""The data folder: content-addressed objects, snapshot trees of hard links, and pointers.

    objects/ab/<sha256>          every stored file once, read-only, named by its SHA256
    snapshots/NAME/ID/...        one immutable tree per snapshot: hard links to objects
    current/NAME -> ../snapshots/NAME/ID     what /NAME/ serves (a symlink swapped atomically)
    pins/PIN -> ../snapshots/NAME/ID         what /pins/PIN/ serves
    meta/NAME/ID.json            the snapshot's manifest: what was verified, per file
    meta/NAME/ID.byhash.json     its own by-hash entries, carried into later snapshots by sync
    state/NAME.json              hold, rollback target, last sync outcome
    locks/sync+NAME.lock         one writer per upstream ("+" is in no upstream name: no clash with gc.lock)
    locks/gc.lock                shared by every sync, exclusive for gc: no object vanishes mid-sync
    tmp/                         downloads, gpg homes and trees being built; never served
    log/aptguard.log             tracebacks of internal errors, for a bug report

Nothing becomes visible before it is complete: trees are built in tmp/ and renamed into
snapshots/, objects are renamed into objects/, and the only change clients see is the
rename of a symlink. This is the one storage backend; the syncer uses only this interface.
Manifests and state go in and out as the typed records of records.py, never as dicts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from aptguard.reasons import Rejected
from aptguard.records import FileRecord, Manifest, UpstreamState

try:  # syncfs(2) flushes only the data folder's filesystem, not every disk of the machine
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.syncfs.argtypes = [ctypes.c_int]
except (OSError, AttributeError):
    _libc = None


class FileStore:
    """A data folder on one local filesystem (hard links need one)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        for sub in ("objects", "snapshots", "current", "pins", "meta", "state", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not (self.objects / "ff").is_dir():  # the 256 fan-out folders, once: adopt() never mkdirs
            for n in range(256):
                (self.objects / f"{n:02x}").mkdir(exist_ok=True)

    def log_error(self, text: str) -> Path:
        """Append a traceback to log/aptguard.log (kept out of the terminal); where it went."""
        path = self.root / "log" / "aptguard.log"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a", encoding="utf-8") as out:
            out.write(text if text.endswith("\n") else text + "\n")
        return path

    # ------------------------------------------------------------ objects

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def object_size(self, sha256: str) -> int | None:
        try:
            return self.object_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def adopt(self, tmp_file: Path, sha256: str, mtime: float | None = None) -> Path:
        """Move a verified download into the object store (or drop it if the object exists).

        `tmp_file` was created read-only (mode 0444), as every stored object must be. `mtime`,
        when given, becomes its modification time: what both servers send as Last-Modified."""
        dest = self.object_path(sha256)
        if dest.exists():
            tmp_file.unlink(missing_ok=True)
            return dest
        if mtime is not None:
            os.utime(tmp_file, (mtime, mtime))
        try:
            os.rename(tmp_file, dest)
        except FileNotFoundError:  # a data folder from before the fan-out folders were made up front
            dest.parent.mkdir(exist_ok=True)
            os.rename(tmp_file, dest)
        return dest

    def put_bytes(self, data: bytes, sha256: str) -> Path:
        dest = self.object_path(sha256)
        if dest.exists():
            return dest
        tmp_file = self.tmp / f"put-{os.getpid()}-{sha256[:16]}"
        fd = os.open(tmp_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o444)
        with open(fd, "wb") as out:
            out.write(data)
        return self.adopt(tmp_file, sha256)

    # ------------------------------------------------------------ snapshot trees

    def snapshot_dir(self, name: str, snap_id: str) -> Path:
        return self.root / "snapshots" / name / snap_id

    def snapshot_ids(self, name: str) -> list[str]:
        """Committed snapshots of an upstream, oldest first (ids sort by time)."""
        folder = self.root / "snapshots" / name
        if not folder.is_dir():
            return []
        ids = [
            p.name for p in folder.iterdir() if p.is_dir() and (self.root / "meta" / name / f"{p.name}.json").exists()
        ]
        return sorted(ids)

    def new_tree(self, name: str, snap_id: str) -> Tree:
        return Tree(self, name, snap_id)

    def remove_snapshot(self, name: str, snap_id: str) -> None:
        """Delete a snapshot so that a crash at any instant leaves nothing half-visible.

        The tree leaves snapshots/ in one rename (its URLs answer 404 from then on), then the
        manifest goes, then the tree's files. A crash leaves a manifest without a tree (not a
        snapshot: snapshot_ids skips it) and a tree in tmp/, both discarded by the next gc.
        """
        folder = self.snapshot_dir(name, snap_id)
        grave = self.tmp / f"gc+{name}+{snap_id}+{os.getpid()}"
        os.rename(folder, grave)
        fsync_dir(folder.parent)
        self.meta_path(name, snap_id).unlink(missing_ok=True)
        self.by_hash_path(name, snap_id).unlink(missing_ok=True)
        fsync_dir(self.meta_path(name, snap_id).parent)
        shutil.rmtree(grave)

    # ------------------------------------------------------------ manifests and state

    def meta_path(self, name: str, snap_id: str) -> Path:
        return self.root / "meta" / name / f"{snap_id}.json"

    def read_manifest(self, name: str, snap_id: str) -> Manifest:
        """A snapshot's manifest; records.RecordError (a ValueError) if this version cannot read it."""
        path = self.meta_path(name, snap_id)
        return Manifest.from_json(json.loads(path.read_bytes()), source=str(path))

    def by_hash_path(self, name: str, snap_id: str) -> Path:
        """meta/NAME/ID.byhash.json: a snapshot's own by-hash entries, so a sync reads kilobytes, not manifests."""
        return self.meta_path(name, snap_id).with_suffix(".byhash.json")

    def read_by_hash(self, name: str, snap_id: str) -> dict[str, FileRecord] | None:
        """path -> record of a snapshot's own by-hash entries; None for a snapshot made before side files."""
        try:
            return json.loads(self.by_hash_path(name, snap_id).read_bytes())
        except FileNotFoundError:
            return None

    def write_by_hash(self, name: str, snap_id: str, entries: dict[str, FileRecord]) -> None:
        write_atomic(self.by_hash_path(name, snap_id), json.dumps(entries, separators=(",", ":")).encode())

    def state_path(self, name: str) -> Path:
        return self.root / "state" / f"{name}.json"

    def read_state(self, name: str) -> UpstreamState:
        """An upstream's state (empty if it never synced); records.RecordError if this version cannot read it."""
        path = self.state_path(name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return UpstreamState()
        return UpstreamState.from_json(data, source=str(path))

    def write_state(self, name: str, state: UpstreamState) -> None:
        write_atomic(self.state_path(name), json.dumps(state.to_json(), indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------ pointers

    def current(self, name: str) -> str | None:
        return self._pointer(self.root / "current" / name)

    def set_current(self, name: str, snap_id: str) -> None:
        self._point(self.root / "current" / name, f"../snapshots/{name}/{snap_id}")

    def pin_target(self, pin: str) -> tuple[str, str] | None:
        try:
            target = os.readlink(self.root / "pins" / pin)
        except (FileNotFoundError, OSError):
            return None
        parts = target.split("/")
        return (parts[-2], parts[-1]) if len(parts) >= 2 else None

    def set_pin(self, pin: str, name: str, snap_id: str) -> None:
        self._point(self.root / "pins" / pin, f"../snapshots/{name}/{snap_id}")

    def remove_pin(self, pin: str) -> bool:
        try:
            (self.root / "pins" / pin).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(self.root / "pins")
        return True

    def pins(self) -> dict[str, tuple[str, str]]:
        folder = self.root / "pins"
        found = {}
        if folder.is_dir():
            for link in sorted(folder.iterdir()):
                target = self.pin_target(link.name)
                if target:
                    found[link.name] = target
        return found

    @staticmethod
    def _pointer(link: Path) -> str | None:
        try:
            return os.readlink(link).rstrip("/").rsplit("/", 1)[-1]
        except FileNotFoundError:
            return None

    @staticmethod
    def _point(link: Path, target: str) -> None:
        """Swap a symlink in one rename: readers see the old target or the new, never neither."""
        tmp_link = link.with_name(f".{link.name}.new")
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        os.symlink(target, tmp_link)
        os.rename(tmp_link, link)
        fsync_dir(link.parent)

    # ------------------------------------------------------------ locking and durability

    @contextlib.contextmanager
    def lock(self, name: str, *, wait_message: str | None = None) -> Iterator[None]:
        """One writer per upstream; a second waits (a cron sync overlapping a slow one)."""
        path = self.root / "locks" / f"sync+{name}.lock"
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(wait_message, file=sys.stderr, flush=True)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def collection_lock(self, *, exclusive: bool, wait_message: str | None = None) -> Iterator[None]:
        """Syncs hold this shared for their whole run, gc holds it exclusive.

        A sync decides that an object is already stored long before it links it into its
        tree; gc must not delete that object in between, so the two never overlap.
        """
        path = self.root / "locks" / "gc.lock"
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    print(wait_message, file=sys.stderr, flush=True)
                fcntl.flock(handle, mode)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def flush(self) -> None:
        """Make every written object durable before a pointer names it: one syncfs, not one fsync per file."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc is None or _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


class Tree:
    """A snapshot tree being built in tmp/; visible only after commit()."""

    def __init__(self, store: FileStore, name: str, snap_id: str) -> None:
        self.store = store
        self.name = name
        self.snap_id = snap_id
        # "+" is in no upstream name: sync._discard_leftovers finds a killed run's tree by this prefix.
        self.path = store.tmp / f"build+{name}+{snap_id}+{os.getpid()}"
        self.path.mkdir(parents=True)
        self._dirs: set[Path] = {self.path}

    def link(self, rel: str, sha256: str) -> None:
        dest = self.path / rel
        parent = dest.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        try:
            os.link(self.store.object_path(sha256), dest)
        except FileExistsError:
            if os.stat(dest).st_ino != self.store.object_path(sha256).stat().st_ino:
                raise
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            # Too many links to one object (ext4 allows 65000): give this tree its own copy.
            shutil.copyfile(self.store.object_path(sha256), dest)
            os.chmod(dest, 0o444)

    def commit(self, manifest: Manifest) -> None:
        """Write the manifest, flush everything, then rename the tree into place."""
        final = self.store.snapshot_dir(self.name, self.snap_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        meta = self.store.meta_path(self.name, self.snap_id)
        meta.parent.mkdir(parents=True, exist_ok=True)
        self.store.flush()
        write_atomic(meta, json.dumps(manifest.to_json(), separators=(",", ":"), sort_keys=True).encode())
        os.rename(self.path, final)
        fsync_dir(final.parent)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so that a crash leaves the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp_file, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(tmp_file, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(exc: OSError, what: str) -> Rejected:
    """The Rejected an OSError of the local disk becomes."""
    return Rejected("storage-error", f"{what}: {exc.strerror or exc} ({getattr(exc, 'filename', '') or 'data folder'})")


def new_snapshot_id(existing: set[str], now: float | None = None) -> str:
    """The UTC time of the sync, YYYYMMDDTHHMMSSZ, with a suffix if that second is taken."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    snap_id, n = base, 1
    while snap_id in existing:
        snap_id = f"{base}-{n}"
        n += 1
    return snap_id
