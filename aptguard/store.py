"""The storage interface, and its filesystem backend: the one module that knows the data folder.

Every other module speaks the domain's words through FileStore's methods: objects (has, put,
open), a snapshot builder (add path -> object, commit), manifests and upstream state as typed
records, pointers (current, pins), an upstream's sync lease, what is referenced, what is left
over, and the file a URL path of a snapshot names. A second backend (an object store) implements
the same methods, and tests/test_storage.py runs the same checks against every backend.

The filesystem layout (nobody outside this module may rely on it):

    objects/ab/<sha256>          every stored file once, read-only, named by its SHA256
    snapshots/NAME/ID/...        a snapshot's own tree: the files its Releases list (InRelease,
                                 Release, indices, by-hash) as hard links to objects
    snapshots/NAME/ID/.pool -> ../../../pools/NAME/GEN    its pool generation
    pools/NAME/GEN/...           a pool generation: the pool files of every retained snapshot
                                 built on it, at their URL paths (hard links to objects)
    current/NAME -> ../snapshots/NAME/ID     what /NAME/ serves (a symlink swapped atomically)
    pins/PIN -> ../snapshots/NAME/ID         what /pins/PIN/ serves
    meta/NAME/ID.json            the snapshot's manifest: what was verified, per file (the truth)
    meta/NAME/ID.byhash.json     its own by-hash entries, carried into later snapshots by sync
    meta/NAME/ID.tree.json       its pool generation and the paths of its own tree
    state/NAME.json              hold, rollback target, last sync outcome
    locks/sync+NAME.lock         one writer per upstream ("+" is in no upstream name: no clash with gc.lock)
    locks/gc.lock                shared by every sync, exclusive for gc: no object vanishes mid-sync
    tmp/                         downloads, gpg homes and trees being built; never served
    log/aptguard.log             tracebacks of internal errors, for a bug report
    cache/NAME/KEY.json          what a sync keeps for the next one (never the truth: may go)

Snapshots cost what changed. Pool files never change under a path in a sane archive, so all
snapshots of an upstream share one pool generation: a new snapshot links only its new pool files
into it, builds its own small tree of index files, and is done. A URL path of a snapshot is its
own tree's file if there is one, else its pool generation's (both servers look in that order,
following no link but `.pool`). A snapshot that names an existing pool path with other content (an
upstream that rewrote a file) starts a new generation, linked whole, once. gc removes from a
generation the files no retained snapshot lists. What a snapshot lists never changes while it
exists; a pool path it does not list may answer with a verified file of a sibling snapshot of
the same upstream (README, "Storage").

Nothing becomes visible before it is complete: own trees are built in tmp/ and renamed into
snapshots/, objects are renamed into objects/, pool files are linked into a generation only
after everything was verified (and unlinked again if the commit fails), and the only change
clients see is the rename of a symlink.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from aptguard.config import Config
from aptguard.reasons import Rejected
from aptguard.records import FileRecord, Manifest, UpstreamState

try:  # syncfs(2) flushes only the data folder's filesystem, not every disk of the machine
    # The C library this process already runs (find_library would start ldconfig on every import).
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
    _libc.syncfs.argtypes = [ctypes.c_int]
except (OSError, AttributeError):
    _libc = None
try:
    _sync_file_range = _libc.sync_file_range if _libc is not None else None
except AttributeError:
    _sync_file_range = None
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2

# tmp/ entries made by syncs (under the shared collection lock) and by gc itself: with the
# lock held exclusively, any of them belongs to a process that died.
_LEFTOVER_PREFIXES = ("sync+", "build+", "build-", "put-", "gc+")
_TREE_FORMAT = 1
SERVED_PATHS = 100_000  # served_file's memory of resolved URL paths (about 30 MB when full)


class StoreError(OSError):
    """The object store failed (denied, unreachable, damaged): a storage-error, never a crash."""


class ObjectMissing(StoreError):
    """An object a snapshot names is not in the store (not fetched yet, for an on-demand file)."""


class PointerMoved(Exception):
    """A pointer was not what the caller read: another operator changed it first (exit 1)."""


@dataclass(frozen=True)
class StoredFile:
    """A stored file as fsck sees it: `key` is the same for two paths that share content."""

    key: tuple[int, int]
    size: int
    path: Path


@dataclass
class Layout:
    """meta/NAME/ID.tree.json: a snapshot's pool generation and the paths of its own tree.
    A snapshot without one (made before pool generations) is a plain tree of its own."""

    generation: str | None = None
    own: frozenset[str] = frozenset()

    def pooled(self, path: str) -> bool:
        return self.generation is not None and path not in self.own


class FileStore:
    """A data folder on one local filesystem (hard links need one)."""

    remote = False  # the s3 backend (store_s3.py) is True: no nginx, no forked helpers on its files

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._roots: tuple[str, str] | None = None  # served_file's real snapshots/ and pools/
        self._served: dict[tuple[str, tuple[str, ...], str, tuple[str, ...]], str] = {}

    def __repr__(self) -> str:
        return f"the data folder {self.root}"

    def exists(self) -> bool:
        return self.root.is_dir()

    def ensure(self) -> None:
        for sub in ("objects", "snapshots", "pools", "current", "pins", "meta", "state", "locks", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not (self._objects / "ff").is_dir():  # the 256 fan-out folders, once: adopt() never mkdirs
            for n in range(256):
                (self._objects / f"{n:02x}").mkdir(exist_ok=True)

    def log_error(self, text: str) -> Path:
        """Append a traceback to log/aptguard.log (kept out of the terminal); where it went."""
        path = self.root / "log" / "aptguard.log"
        path.parent.mkdir(exist_ok=True)
        with open(path, "a", encoding="utf-8") as out:
            out.write(text if text.endswith("\n") else text + "\n")
        return path

    def work_dir(self, name: str) -> Path:
        """A fresh local folder for one sync's downloads and gpg home, never served; the caller
        removes it, and discard_leftovers removes a killed run's."""
        work = self._tmp / f"sync+{name}+{os.getpid()}"
        work.mkdir(parents=True)
        return work

    # ------------------------------------------------------------ objects

    def _object(self, sha256: str) -> Path:
        return self._objects / sha256[:2] / sha256

    def object_size(self, sha256: str) -> int | None:
        """The size of a stored object, None if it is not stored."""
        try:
            return self._object(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def open_object(self, sha256: str) -> BinaryIO:
        return open(self._object(sha256), "rb")  # noqa: SIM115 - the caller closes it

    def adopt(self, tmp_file: Path, sha256: str, mtime: float | None = None) -> None:
        """Move a verified download (a file of work_dir) into the objects, or drop it if stored.

        `tmp_file` was created read-only (mode 0444), as every stored object must be. `mtime`,
        when given, becomes its modification time: what both servers send as Last-Modified.
        Its write-back starts now (start_writeback)."""
        dest = self._object(sha256)
        if dest.exists():
            tmp_file.unlink(missing_ok=True)
            return
        fd = os.open(tmp_file, os.O_RDONLY)
        try:
            start_writeback(fd)
        finally:
            os.close(fd)
        _place(tmp_file, dest, mtime)

    def put_bytes(self, data: bytes, sha256: str, mtime: float | None = None) -> None:
        """Store verified bytes as an object (safe from several threads); `mtime` as for adopt()."""
        dest = self._object(sha256)
        if dest.exists():
            return
        tmp_file = self._tmp / f"put-{os.getpid()}-{threading.get_ident()}-{sha256[:16]}"
        _write_new(tmp_file, data)  # its write-back started as it was written
        _place(tmp_file, dest, mtime)

    def held(self, shas: Iterable[str]) -> set[str]:
        """Which of these objects are stored."""
        return {sha for sha in shas if os.path.exists(self._object(sha))}

    def object_totals(self) -> tuple[int, int]:
        """(objects, bytes) stored."""
        count = total = 0
        for _path, st in self._object_stats():
            count += 1
            total += st.st_size
        return count, total

    def _object_stats(self) -> Iterator[tuple[Path, os.stat_result]]:
        if not self._objects.is_dir():
            return
        for sub in sorted(self._objects.iterdir()):
            if sub.is_dir():
                for entry in os.scandir(sub):
                    with contextlib.suppress(FileNotFoundError):
                        yield Path(entry.path), entry.stat(follow_symlinks=False)

    def unreferenced(self, referenced: set[str]) -> list[tuple[str, int]]:
        """(sha256, size) of every stored object whose SHA256 is not in `referenced`."""
        return [(path.name, st.st_size) for path, st in self._object_stats() if path.name not in referenced]

    def delete_objects(self, objects: Iterable[tuple[str, int]]) -> tuple[int, int]:
        """Delete these (sha256, size) objects, except any a tree or pool still links (never a used
        file, even one whose manifest could not be read); (objects, bytes) deleted."""
        count = total = 0
        for sha256, size in objects:
            path = self._object(sha256)
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_nlink == 1:
                    path.unlink()
                    count += 1
                    total += size
        return count, total

    # ------------------------------------------------------------ snapshots

    def _tree(self, name: str, snap_id: str) -> Path:
        return self.root / "snapshots" / name / snap_id

    def _meta(self, name: str, snap_id: str, suffix: str = ".json") -> Path:
        return self.root / "meta" / name / f"{snap_id}{suffix}"

    def upstreams(self) -> list[str]:
        """Every upstream with a snapshot tree stored."""
        folder = self.root / "snapshots"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def snapshot_ids(self, name: str) -> list[str]:
        """Committed snapshots of an upstream (a tree and its manifest), oldest first (ids sort by time)."""
        meta = self.root / "meta" / name
        return [snap_id for snap_id in self.tree_ids(name) if (meta / f"{snap_id}.json").exists()]

    def tree_ids(self, name: str) -> list[str]:
        """Every snapshot tree of an upstream, with a manifest or not (fsck reports the latter)."""
        folder = self.root / "snapshots" / name
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def has_manifest(self, name: str, snap_id: str) -> bool:
        return self._meta(name, snap_id).is_file()

    def manifest_label(self, name: str, snap_id: str) -> str:
        """How reports name a snapshot's manifest."""
        return f"meta/{name}/{snap_id}.json"

    def read_manifest(self, name: str, snap_id: str) -> Manifest:
        """A snapshot's manifest; records.RecordError (a ValueError) if this version cannot read it."""
        path = self._meta(name, snap_id)
        return Manifest.from_json(_loads(path.read_bytes()), source=str(path))

    def read_by_hash(self, name: str, snap_id: str) -> dict[str, FileRecord] | None:
        """path -> record of a snapshot's own by-hash entries; None for a snapshot made before side files."""
        try:
            return json.loads(self._meta(name, snap_id, ".byhash.json").read_bytes())
        except FileNotFoundError:
            return None

    def _layout(self, name: str, snap_id: str) -> Layout:
        try:
            data = json.loads(self._meta(name, snap_id, ".tree.json").read_bytes())
        except FileNotFoundError:
            return Layout()
        if data.get("format", 1) > _TREE_FORMAT:
            raise ValueError(f"{self._meta(name, snap_id, '.tree.json')}: a newer format than this aptguard reads")
        return Layout(data["generation"], frozenset(data["own"]))

    def new_snapshot(self, name: str, snap_id: str, base: Manifest | None = None) -> SnapshotBuilder:
        """A snapshot to build; `base`, the manifest of a stored snapshot of the same upstream
        (the newest), lets it reuse that snapshot's pool generation."""
        return SnapshotBuilder(self, name, snap_id, base)

    def remove_snapshot(self, name: str, snap_id: str) -> None:
        """Delete a snapshot so that a crash at any instant leaves nothing half-visible.

        The tree leaves snapshots/ in one rename (its URLs answer 404 from then on), then the
        manifest goes, then the tree's files. A crash leaves a manifest without a tree (not a
        snapshot: snapshot_ids skips it) and a tree in tmp/, both discarded by the next gc.
        Its pool files stay in their generation until prune_pools.
        """
        folder = self._tree(name, snap_id)
        grave = self._tmp / f"gc+{name}+{snap_id}+{os.getpid()}"
        os.rename(folder, grave)
        fsync_dir(folder.parent)
        for suffix in (".json", ".byhash.json", ".tree.json"):
            self._meta(name, snap_id, suffix).unlink(missing_ok=True)
        fsync_dir(self._meta(name, snap_id).parent)
        shutil.rmtree(grave)

    def prune_pools(self, name: str, *, dry_run: bool = False) -> int:
        """Remove from an upstream's pool generations every file no stored snapshot lists, and
        every generation no stored snapshot uses (under the collection lock, exclusive: no sync
        is adding to them); how many files go."""
        folder = self.root / "pools" / name
        if not folder.is_dir():
            return 0
        listed: dict[str, set[str]] = {}
        for snap_id in self.snapshot_ids(name):
            try:
                layout = self._layout(name, snap_id)
                if layout.generation is not None:
                    manifest = self.read_manifest(name, snap_id)
                    paths = [*manifest.files, *manifest.listed]  # listed: held once a client asked
                    listed.setdefault(layout.generation, set()).update(p for p in paths if layout.pooled(p))
            except (OSError, ValueError, KeyError, TypeError):
                return 0  # a snapshot whose files cannot be known (fsck names it): remove nothing
        gone = 0
        for generation in sorted(p.name for p in folder.iterdir()):
            keep = listed.get(generation)
            tree = folder / generation
            if keep is None:
                gone += sum(len(files) for _base, _dirs, files in os.walk(tree))
                if not dry_run:
                    grave = self._tmp / f"gc+{name}+pool-{generation}+{os.getpid()}"
                    os.rename(tree, grave)
                    shutil.rmtree(grave)
                continue
            for base, _dirs, files in os.walk(tree, topdown=False):
                rel_base = os.path.relpath(base, tree)
                for file_name in files:
                    rel = file_name if rel_base == "." else f"{rel_base}/{file_name}"
                    if rel not in keep:
                        gone += 1
                        if not dry_run:
                            os.unlink(os.path.join(base, file_name))
                if not dry_run and base != str(tree):
                    with contextlib.suppress(OSError):  # not empty: kept
                        os.rmdir(base)
        return gone

    def hold(self, name: str, snap_id: str, path: str, sha256: str) -> None:
        """An on-demand pool file, verified and stored as an object since the snapshot was made:
        link it at `path` of the snapshot's pool generation, where both servers find it."""
        layout = self._layout(name, snap_id)
        if layout.generation is None or not layout.pooled(path):
            return
        dest = self.root / "pools" / name / layout.generation / path
        source = self._object(sha256)
        _makedirs(dest.parent)
        try:
            os.link(source, dest)
        except FileExistsError:  # held already (another request, a sync): the same bytes
            if os.lstat(dest).st_ino != os.stat(source).st_ino:
                tmp_link = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}")
                os.link(source, tmp_link)
                os.rename(tmp_link, dest)

    # ------------------------------------------------------------ fsck

    def stored_file(self, name: str, snap_id: str, path: str) -> StoredFile | str:
        """The file at `path` of a snapshot (its own tree's, else its pool generation's), or what
        is wrong with it."""
        tree = self._tree(name, snap_id)
        for full in (tree / path, tree / ".pool" / path):
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                continue
            if not stat.S_ISREG(st.st_mode):
                return "not a regular file"
            return StoredFile((st.st_dev, st.st_ino), st.st_size, full)
        return "missing (listed in the manifest)"

    @staticmethod
    def open_stored(stored: StoredFile) -> BinaryIO:
        return open(stored.path, "rb")  # noqa: SIM115 - the caller closes it

    def file_label(self, name: str, snap_id: str, path: str = "") -> str:
        """How reports name a path of a snapshot (or the snapshot itself)."""
        return f"snapshots/{name}/{snap_id}" + (f"/{path}" if path else "")

    def unlisted(self, name: str, snap_id: str, files: dict[str, FileRecord]) -> Iterator[tuple[str, str]]:
        """(label, problem) for what a snapshot's own tree holds beyond its manifest: a file added
        after verification, or a link other than its pool generation's."""
        tree = self._tree(name, snap_id)
        try:
            layout = self._layout(name, snap_id)
        except (OSError, ValueError, KeyError) as exc:
            yield f"meta/{name}/{snap_id}.tree.json", f"unreadable: {exc}"
            return
        for base, dirs, names in os.walk(tree):
            rel_base = os.path.relpath(base, tree)
            for entry in dirs + names:
                rel = entry if rel_base == "." else f"{rel_base}/{entry}"
                full = os.path.join(base, entry)
                if os.path.islink(full):
                    if rel != ".pool" or os.readlink(full) != _pool_link(name, layout.generation or ""):
                        yield self.file_label(name, snap_id, rel), "a link that is not the snapshot's own pool link"
                elif entry in names and rel not in files:
                    yield (
                        self.file_label(name, snap_id, rel),
                        "not in the snapshot's manifest (added after verification)",
                    )

    # ------------------------------------------------------------ manifests and state

    @staticmethod
    def pointer_label(kind: str, key: str) -> str:
        """How reports name the pointer of /NAME/ ("current") or /pins/PIN/ ("pin")."""
        return f"current/{key}" if kind == "current" else f"pins/{key}"

    def state_label(self, name: str) -> str:
        return f"state/{name}.json"

    def read_state(self, name: str) -> UpstreamState:
        """An upstream's state (empty if it never synced); records.RecordError if this version cannot read it."""
        path = self.root / "state" / f"{name}.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return UpstreamState()
        return UpstreamState.from_json(data, source=str(path))

    def write_state(self, name: str, state: UpstreamState) -> None:
        write_atomic(
            self.root / "state" / f"{name}.json", json.dumps(state.to_json(), indent=1, sort_keys=True).encode()
        )

    # ------------------------------------------------------------ caches

    def read_cache(self, name: str, key: str) -> object | None:
        """What an earlier sync of the upstream kept under `key` (JSON), or None. A cache is never
        the truth: it may be missing, and an unreadable one is None."""
        try:
            return _loads((self.root / "cache" / name / f"{key}.json").read_bytes())
        except (OSError, ValueError):
            return None

    def write_cache(self, name: str, key: str, value: object) -> None:
        write_atomic(self.root / "cache" / name / f"{key}.json", _dumps(value), durable=False)

    # ------------------------------------------------------------ pointers

    def current(self, name: str) -> str | None:
        return self._pointer(self.root / "current" / name)

    def set_current(self, name: str, snap_id: str, *, expect: str | None) -> None:
        """Point /NAME/ at a snapshot if it still points at `expect` (compare and swap, under the
        upstream's lease); PointerMoved if another operator moved it first."""
        found = self.current(name)
        if found != expect:
            raise PointerMoved(f"{name}: current is {found}, not {expect}: another operator changed it")
        self._point(self.root / "current" / name, f"../snapshots/{name}/{snap_id}")

    def pin_target(self, pin: str) -> tuple[str, str] | None:
        try:
            target = os.readlink(self.root / "pins" / pin)
        except (FileNotFoundError, OSError):
            return None
        parts = target.split("/")
        return (parts[-2], parts[-1]) if len(parts) >= 2 else None

    def set_pin(self, pin: str, name: str, snap_id: str, *, expect: tuple[str, str] | None) -> None:
        """Point /pins/PIN/ at a snapshot if it still points at `expect` (None: no such pin yet)."""
        with self._pins_lock():
            found = self.pin_target(pin)
            if found != expect:
                raise PointerMoved(f"pin {pin} points at {found}, not {expect}: another operator changed it")
            self._point(self.root / "pins" / pin, f"../snapshots/{name}/{snap_id}")

    def remove_pin(self, pin: str, *, expect: tuple[str, str]) -> None:
        """Remove a pin if it still points at `expect`."""
        with self._pins_lock():
            found = self.pin_target(pin)
            if found != expect:
                raise PointerMoved(f"pin {pin} points at {found}, not {expect}: another operator changed it")
            (self.root / "pins" / pin).unlink()
            fsync_dir(self.root / "pins")

    @contextlib.contextmanager
    def _pins_lock(self) -> Iterator[None]:
        """Pins of different upstreams are set under different leases: one lock for the compare."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with _flock(self.root / "locks" / "pins.lock", fcntl.LOCK_EX, None):
            yield

    def recently_served(self, name: str, within: float) -> set[str]:
        """Snapshots a pointer left less than `within` seconds ago: none here, since the only
        server of a data folder reads its pointers on every request."""
        return set()

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

    # ------------------------------------------------------------ serving

    def served_file(self, where: str, key: tuple[str, ...], parts: list[str]) -> str | None:
        """The file to send for URL path words `parts` of a snapshot, or None (a 404).

        `where` is "current" (key: NAME), "pin" (key: PIN) or "snapshot" (key: NAME, ID). The file
        is a regular file of that snapshot's own tree, else of its pool generation, reached
        through no link but the pointer and the snapshot's `.pool`.

        The answer is remembered per tree: by the pointer's target for "current" and "pin" (one
        readlink per call sees a promotion at once), by the id for "snapshot" (one stat per call
        sees gc remove it). A remembered file is answered again only while it is still a regular
        file (an lstat): a pool generation is shared, and the link a killed commit left in it
        goes when its leftovers are discarded."""
        if where == "snapshot":
            tree = os.path.join(self.root, "snapshots", *key)
            if not os.path.isdir(tree):
                return None
            marker = ""
        else:
            try:
                marker = os.readlink(os.path.join(self.root, "current" if where == "current" else "pins", key[0]))
            except OSError:
                return None
        cache_key = (where, key, marker, tuple(parts))
        known = self._served.get(cache_key)
        if known is not None:
            try:
                if stat.S_ISREG(os.lstat(known).st_mode):
                    return known
            except OSError:
                pass
            del self._served[cache_key]
        found = self._resolve(where, key, parts)
        if found is not None:  # a 404 is not remembered: a client's made-up paths would fill it
            if len(self._served) >= SERVED_PATHS:
                self._served.clear()
            self._served[cache_key] = found
        return found

    def _resolve(self, where: str, key: tuple[str, ...], parts: list[str]) -> str | None:
        if where == "current":
            base = self.root / "current" / key[0]
        elif where == "pin":
            base = self.root / "pins" / key[0]
        else:
            base = self._tree(*key)
        tree = os.path.realpath(base)
        snapshots, pools = self._real_roots()
        rel = os.path.relpath(tree, snapshots).split(os.sep)
        if len(rel) != 2 or rel[0] in ("..", "."):
            return None
        wanted = os.path.join(tree, *parts)
        if os.path.realpath(wanted) == wanted and os.path.isfile(wanted):
            return wanted
        pool = os.path.realpath(os.path.join(tree, ".pool"))
        inside = os.path.relpath(pool, os.path.join(pools, rel[0])).split(os.sep)
        if len(inside) != 1 or inside[0] in ("..", "."):
            return None
        wanted = os.path.join(pool, *parts)
        if os.path.realpath(wanted) == wanted and os.path.isfile(wanted):
            return wanted
        return None

    def _real_roots(self) -> tuple[str, str]:
        """The real paths of snapshots/ and pools/, resolved once they exist (not on every request)."""
        if self._roots is None:
            found = (os.path.realpath(self.root / "snapshots"), os.path.realpath(self.root / "pools"))
            if not os.path.isdir(found[0]):
                return found
            self._roots = found
        return self._roots

    def nginx_roots(self) -> dict[str, Path]:
        """The folders nginx serves /snapshots/, /pins/ and /NAME/ from."""
        root = self.root.resolve()
        return {"snapshots": root / "snapshots", "pins": root / "pins", "current": root / "current"}

    # ------------------------------------------------------------ leftovers of killed runs

    def discard_leftovers(self, name: str) -> None:
        """Under the upstream's lock, any tmp work of this upstream is from a process that died:
        remove it, with the pool files its commit had linked into a generation."""
        if self._tmp.is_dir():
            for entry in sorted(self._tmp.iterdir()):
                if entry.name.startswith((f"sync+{name}+", f"build+{name}+")):
                    self._discard(entry)
        folder = self.root / "pools" / name
        if folder.is_dir():
            try:
                used = {self._layout(name, snap_id).generation for snap_id in self.snapshot_ids(name)}
            except (OSError, ValueError, KeyError):
                return  # a damaged layout file: fsck reports it; nothing is removed on a guess
            for generation in folder.iterdir():
                if generation.name not in used:  # begun by a sync that died before its commit
                    shutil.rmtree(generation, ignore_errors=True)

    def leftovers(self, names: list[str] | None = None) -> list[str]:
        """What killed runs left: tmp/ work, and meta/ files of a snapshot whose tree is not in
        snapshots/ (a commit killed before its rename, or a gc killed after moving the tree out),
        as labels for reports."""
        found: list[Path] = []
        if self._tmp.is_dir():
            found += sorted(p for p in self._tmp.iterdir() if p.name.startswith(_LEFTOVER_PREFIXES))
        meta = self.root / "meta"
        folders = [meta / n for n in names] if names is not None else sorted(meta.iterdir()) if meta.is_dir() else []
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in sorted(folder.iterdir()):
                snap_id = entry.name.split(".", 1)[0]  # ID.json and its side files
                if entry.name.startswith(".") or not self._tree(folder.name, snap_id).is_dir():
                    found.append(entry)
        return [p.relative_to(self.root).as_posix() for p in found]

    def discard(self, labels: Iterable[str]) -> None:
        for label in labels:
            self._discard(self.root / label)

    def _discard(self, path: Path) -> None:
        if path.name.endswith(".pool"):  # a commit's journal: undo its links into a generation
            _undo_journal(self, path)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------ locking and durability

    @contextlib.contextmanager
    def lease(self, name: str, *, wait_message: str | None = None) -> Iterator[None]:
        """One writer per upstream (sync, promote, rollback, pin, gc's removals); a second waits
        (a cron sync overlapping a slow one)."""
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with _flock(self.root / "locks" / f"sync+{name}.lock", fcntl.LOCK_EX, wait_message):
            yield

    @contextlib.contextmanager
    def collection_lock(self, *, exclusive: bool, wait_message: str | None = None) -> Iterator[None]:
        """Syncs hold this shared for their whole run, gc holds it exclusive.

        A sync decides that an object is already stored long before it links it into its
        tree; gc must not delete that object in between, so the two never overlap.
        """
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        with _flock(self.root / "locks" / "gc.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait_message):
            yield

    def flush(self) -> None:
        """Make every written object durable before a pointer names it: one syncfs, not one fsync per file."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc is None or _libc.syncfs(fd) != 0:
                os.sync()
        finally:
            os.close(fd)


class SnapshotBuilder:
    """A snapshot being assembled: path -> object; nothing is visible before commit().

    Files of the upstream's Releases (signed files, indices, by-hash) go into the snapshot's
    own tree; pool files (`pool=True`) into the pool generation it shares with its base. Without
    a base to share with, the snapshot starts a generation of its own, which nothing serves
    before the commit: its pool files are linked as they are added (a cold sync links while it
    downloads), and abort() removes it."""

    def __init__(self, store: FileStore, name: str, snap_id: str, base: Manifest | None) -> None:
        self.store = store
        self.name = name
        self.snap_id = snap_id
        self.base = base
        self.files: dict[str, str] = {}  # path -> sha256
        self.pool: set[str] = set()
        self.written = 0  # filesystem entries created: what the snapshot cost
        # "+" is in no upstream name: discard_leftovers finds a killed run's tree by this prefix.
        self._build = store._tmp / f"build+{name}+{snap_id}+{os.getpid()}"
        self._journal = self._build.with_name(self._build.name + ".pool")
        self._added: list[str] = []
        self._base_layout = Layout()
        if base is not None and base.id in store.snapshot_ids(name):
            with contextlib.suppress(OSError, ValueError, KeyError):
                self._base_layout = store._layout(name, base.id)
        base_generation = self._base_layout.generation
        usable = base_generation is not None and (store.root / "pools" / name / base_generation).is_dir()
        self._fresh = not usable  # a generation of its own, invisible until commit
        self._generation = snap_id if self._fresh else (base_generation or "")
        self._early: set[str] = set()
        self._early_dirs: set[str] = set()
        self._fresh_tree = f"{store.root}/pools/{name}/{snap_id}"  # the generation of its own, when _fresh
        self._lock = threading.Lock()

    def add(self, path: str, sha256: str, *, pool: bool | None) -> None:
        """Put the object `sha256` at `path`: a pool file (named by an index), an index file (named
        by a Release), or None: as in the base snapshot (a suite reused unchanged). Safe to call
        from several threads."""
        if pool is None:
            pool = self._base_layout.pooled(path)
        with self._lock:
            self.files[path] = sha256
            if not pool:
                self.pool.discard(path)
                return
            self.pool.add(path)
            if not self._fresh or path in self._early:
                return
            self._early.add(path)
        tree = self.store.root / "pools" / self.name / self.snap_id
        try:
            self._link(tree, path, sha256, self._early_dirs)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            with self._lock:
                self._early.discard(path)  # commit() finds the clash and refuses it

    def put(self, path: str, sha256: str, data: bytes) -> None:
        """Verified bytes of a pool file: stored as an object and added at `path`. In a generation
        of its own the file is written where it is served and the object is a link to it: two
        filesystem entries instead of three (a cold sync of 60,000 small files is bound by them)."""
        object_path = f"{self.store._objects}/{sha256[:2]}/{sha256}"
        with self._lock:
            early = self._fresh and path not in self._early
            if early:
                self._early.add(path)
            self.files[path] = sha256
            self.pool.add(path)
        if not early:
            self.store.put_bytes(data, sha256)
            return
        # Strings, not Paths, from here: this runs once per file of a cold sync, in worker
        # threads that share the GIL with the event loop (pathlib built 7 Paths a file).
        parent = os.path.dirname(path)
        if parent not in self._early_dirs:
            self._parent(Path(self._fresh_tree), path, self._early_dirs)
        dest = f"{self._fresh_tree}/{path}"
        try:
            _write_new(dest, data)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            with self._lock:
                self._early.discard(path)  # commit() finds the clash and refuses it
            self.store.put_bytes(data, sha256)
            return
        try:
            os.link(dest, object_path)
        except FileExistsError:  # already stored (or by a twin path meanwhile): share its inode
            tmp_link = f"{os.path.dirname(dest)}/.{os.path.basename(dest)}.{threading.get_ident()}"
            os.link(object_path, tmp_link)
            os.rename(tmp_link, dest)
        with self._lock:
            self.written += 2

    def placed(self, path: str) -> bool:
        """Whether the pool file `path` is already where it is served (in a generation of its own)."""
        with self._lock:
            return path in self._early

    def stored_elsewhere(self, path: str, sha256: str, *, placed: bool) -> None:
        """A pool file that another process (the sync's twin, twin.py) stored through its copy
        of this builder: `placed` as that copy's placed(path) said."""
        with self._lock:
            self.files[path] = sha256
            self.pool.add(path)
            if placed:
                self._early.add(path)

    def count_written(self, entries: int) -> None:
        """Filesystem entries another process created for this snapshot."""
        with self._lock:
            self.written += entries

    def commit(self, manifest: Manifest, by_hash: dict[str, FileRecord]) -> None:
        """Link the pool files into the generation, build the own tree, flush, write the
        manifest and its side files, then rename the tree into place."""
        store = self.store
        try:
            own = sorted(p for p in self.files if p not in self.pool)
            self._link_pool(sorted(self.pool), manifest.listed)
            self._build.mkdir(parents=True)
            dirs: set[str] = {""}
            for path in own:
                self._link(self._build, path, self.files[path], dirs)
            os.symlink(_pool_link(self.name, self._generation), self._build / ".pool")
            self.written += 1
            final = store._tree(self.name, self.snap_id)
            final.parent.mkdir(parents=True, exist_ok=True)
            store._meta(self.name, self.snap_id).parent.mkdir(parents=True, exist_ok=True)
            store.flush()
            layout = {"format": _TREE_FORMAT, "generation": self._generation, "own": own}
            write_atomic(store._meta(self.name, self.snap_id, ".tree.json"), _dumps(layout))
            write_atomic(store._meta(self.name, self.snap_id, ".byhash.json"), _dumps(by_hash))
            write_atomic(store._meta(self.name, self.snap_id), _dumps(manifest.to_json(), sort_keys=True))
            os.rename(self._build, final)
            fsync_dir(final.parent)
            self.written += 4
        except BaseException:
            self.abort()
            raise
        self._journal.unlink(missing_ok=True)

    def abort(self) -> None:
        """Undo what was done for a snapshot that will not be committed: the own tree, the links
        into a shared generation, a generation of its own."""
        shutil.rmtree(self._build, ignore_errors=True)
        if self._journal.exists():
            _undo_journal(self.store, self._journal)
        self._added = []
        if self._fresh and self.snap_id not in self.store.snapshot_ids(self.name):
            shutil.rmtree(self.store.root / "pools" / self.name / self.snap_id, ignore_errors=True)

    # ------------------------------------------------------------ inside commit

    def _link_pool(self, pooled: list[str], listed: dict[str, FileRecord]) -> None:
        """Link the pool files the generation lacks into it (journalled first, so a killed commit
        is undone); a path the base generation holds with other content starts a new one. Paths
        listed on demand count as held (a client's request links them later: hold())."""
        if not self._fresh:
            base = self.base
            base_files = {
                p: r for p, r in ({**base.listed, **base.files} if base else {}).items() if self._base_layout.pooled(p)
            }
            new = [p for p in pooled if (r := base_files.get(p)) is None or r["sha256"] != self.files[p]]
            rewritten = any(
                (r := base_files.get(p)) is not None and r["sha256"] != rec["sha256"] for p, rec in listed.items()
            )
            if not rewritten and not any(p in base_files for p in new) and self._try_link(self._generation, new):
                return
            self._fresh, self._generation = True, self.snap_id  # the base lists a path with other content
        if not self._try_link(self.snap_id, [p for p in pooled if p not in self._early]):
            raise Rejected(
                "package-mismatch", "two pool files of this snapshot claim the same path (a file and a folder)"
            )

    def _try_link(self, generation: str, paths: list[str]) -> bool:
        """Link into a generation the `paths` it lacks; False (and nothing left linked) if one is
        taken by other content. The links to make are journalled first: under the upstream's
        lease no other snapshot lists them, so a killed commit's are undone exactly."""
        self._generation = generation
        tree = self.store.root / "pools" / self.name / generation
        missing: list[str] = []
        for path in sorted(paths):
            try:
                st = os.lstat(tree / path)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(path)
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_ino != os.stat(self.store._object(self.files[path])).st_ino:
                return False
        self._journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self._journal, "w", encoding="utf-8") as out:
            out.write(json.dumps({"upstream": self.name, "generation": generation, "snapshot": self.snap_id}) + "\n")
            out.writelines(p + "\n" for p in missing)
        dirs: set[str] = set()
        for path in missing:
            try:
                self._link(tree, path, self.files[path], dirs)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                _unlink_all(tree, self._added)
                self._added = []
                self._journal.unlink(missing_ok=True)
                return False
            self._added.append(path)
        return True

    def _parent(self, tree: Path, path: str, dirs: set[str]) -> None:
        """Make the folder of `path` in `tree` (once: `dirs` holds the folders made so far)."""
        parent = os.path.dirname(path)
        if parent not in dirs:
            made = _makedirs(tree / parent)
            with self._lock:
                self.written += made
                dirs.add(parent)

    def _link(self, tree: Path, path: str, sha256: str, dirs: set[str]) -> None:
        """Hard-link an object at `path` of `tree`."""
        dest = tree / path
        self._parent(tree, path, dirs)
        source = self.store._object(sha256)
        try:
            os.link(source, dest)
        except FileExistsError:
            if os.stat(dest).st_ino != source.stat().st_ino:
                raise
            return
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            # Too many links to one object (ext4 allows 65000): give this tree its own copy.
            shutil.copyfile(source, dest)
            os.chmod(dest, 0o444)
        with self._lock:
            self.written += 1


def _pool_link(name: str, generation: str) -> str:
    """Where snapshots/NAME/ID/.pool points: its pool generation."""
    return f"../../../pools/{name}/{generation}"


def start_writeback(fd: int) -> None:
    """Start writing what a file holds to disk, without waiting for it (sync_file_range with
    SYNC_FILE_RANGE_WRITE, as git's core.fsyncMethod=batch): the one syncfs before a pointer
    moves (FileStore.flush) then waits for what is still on its way, not for the whole sync's
    data at once. A hint: where the call fails or is missing, flush() still writes it all."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _place(tmp_file: Path, dest: Path, mtime: float | None) -> None:
    """A stored file becomes the object `dest`, with `mtime` as its modification time if given."""
    if mtime is not None:
        os.utime(tmp_file, (mtime, mtime))
    try:
        os.rename(tmp_file, dest)
    except FileNotFoundError:  # a data folder from before the fan-out folders were made up front
        dest.parent.mkdir(exist_ok=True)
        os.rename(tmp_file, dest)


def _write_new(path: Path | str, data: bytes) -> None:
    """Create a read-only file that did not exist, with `data`, on its way to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        start_writeback(fd)
    finally:
        os.close(fd)


def _makedirs(folder: Path) -> int:
    """mkdir -p; how many folders it created."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        with contextlib.suppress(FileExistsError):
            made.mkdir()
    return len(missing)


def _unlink_all(tree: Path, paths: Iterable[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tree / path)


def _undo_journal(store: FileStore, journal: Path) -> None:
    """A killed or failed commit: unlink the pool files it added, unless its snapshot exists."""
    try:
        lines = journal.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        name, generation, snap_id = head["upstream"], head["generation"], head["snapshot"]
    except (OSError, ValueError, KeyError, IndexError):
        journal.unlink(missing_ok=True)
        return
    if snap_id not in store.snapshot_ids(name):
        # Only paths the generation lacked were journalled, under the upstream's lease: no
        # other snapshot lists them.
        _unlink_all(store.root / "pools" / name / generation, lines[1:])
    journal.unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(path: Path, mode: int, wait_message: str | None) -> Iterator[None]:
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


def _dumps(value: object, *, sort_keys: bool = False) -> bytes:
    """Compact JSON, byte for byte what json.dumps writes: orjson's output whenever it is ASCII
    (json escapes anything else, and orjson refuses the lone surrogates an upstream's bytes can
    decode to), else json's."""
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
        if data.isascii():
            return data
    except (TypeError, orjson.JSONEncodeError):
        pass
    return json.dumps(value, separators=(",", ":"), sort_keys=sort_keys).encode()


def _loads(data: bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:  # escaped lone surrogates, which json reads
        return json.loads(data)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write a small file so that a crash leaves the old content or the new, never a mix
    (`durable`: flushed to the disk before it returns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp_file, "wb") as out:
        out.write(data)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    os.rename(tmp_file, path)
    if durable:
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


def open_store(config: Config) -> FileStore:
    """The store of a config's [storage]: its data folder, or a bucket (store_s3.py)."""
    if config.storage.backend == "s3":
        from aptguard.store_s3 import S3Store

        return S3Store(config.storage, config.data_dir)  # type: ignore[return-value]
    return FileStore(config.data_dir)


def process_alive(pid: int) -> bool:
    """Whether a process of that id runs (a work folder named after a dead one is a leftover)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def new_snapshot_id(existing: set[str], now: float | None = None) -> str:
    """The UTC time of the sync, YYYYMMDDTHHMMSSZ, with a suffix if that second is taken."""
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    snap_id, n = base, 1
    while snap_id in existing:
        snap_id = f"{base}-{n}"
        n += 1
    return snap_id
