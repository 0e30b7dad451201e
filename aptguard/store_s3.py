"""The s3 backend of the storage interface: one bucket under a prefix, shared by any number of machines.

The same methods as FileStore (store.py), so every command works on both; tests/test_storage.py
runs the same checks against both. The layout (keys under `prefix`; nobody else relies on it):

    objects/ab/<sha256>             every stored file once; x-amz-meta-mtime is its Last-Modified
    manifests/NAME/ID.json          a snapshot: its manifest names every file (path -> object), so
                                    the manifest *is* the snapshot, and it is written last
    manifests/NAME/ID.byhash.json   its own by-hash entries, carried into later snapshots by sync
    pointers/current/NAME           {"snapshot", "target", "at", "left"}: what /NAME/ serves
    pointers/pins/PIN               {"upstream", "snapshot", "target", "at", "left"}; without the
                                    first three once removed (a tombstone)
    state/NAME.json                 hold, rollback target, last sync outcome (written under the lease)
    leases/upstream/NAME            one writer per upstream, on any machine
    leases/gc, leases/sync/HOLDER   the collection lock: gc runs alone, syncs together

Every pointer change is one conditional write: If-Match on the ETag read (If-None-Match: * to
create), so of two racing operators exactly one wins; a removed pin is a tombstone, not a delete,
so its removal is conditional too. A lease is an object with an expiry, created with
If-None-Match: *, renewed every LEASE_SECONDS / 3 with If-Match, and taken over (If-Match) only
once expired: a killed holder's lease lapses. Expiry compares the holder's clock with the
reader's: machines of one mirror keep time by NTP (README, "Deployment").

Objects are written whole (PutObject, or a multipart upload completed with If-None-Match: *),
so a half-uploaded file is never visible; a manifest is written after every object it names. The
store is reached through one aiobotocore client on an event loop of its own, in a thread of this
process: the synchronous interface blocks on it, the server awaits it (`run`).

Everything read back from the store is checked against its SHA256 before it is served or used:
the bucket is shared with other machines and other tools, and a bit flipped there must be an
error, never a byte apt sees.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from aptguard.config import Storage
from aptguard.reasons import Rejected
from aptguard.records import FileRecord, Manifest, UpstreamState
from aptguard.store import FileStore, ObjectMissing, PointerMoved, StoredFile, StoreError, _dumps, _loads

_T = TypeVar("_T")

UPLOADS = 32  # objects a snapshot builder uploads at once
PART = 64 * 1024**2  # files past this upload in parts (S3 allows 10,000 parts: 640 GB)
LEASE_SECONDS = 60.0  # a lease lapses this long after its holder last renewed it
LEASE_POLL = 0.5  # how often a waiter looks again
MISS_REFRESH = 0.25  # a server re-reads the pointers on a 404 at most this often
MANIFESTS = 16  # snapshots a server keeps ready to serve (each a path -> SHA256 table)
PARSED = 4  # parsed manifests a process keeps (immutable: a hit is never re-read)
SMALL_OBJECT = 1 << 20  # a pointer, lease or state object is read only up to this many bytes
HELD_SECONDS = 60.0  # how old a listing held() answers from may be
HISTORY = 16  # earlier targets a pointer remembers (with when it left them), for gc
_CHUNK = 1 << 20


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return ""


def _is(exc: BaseException, *codes: str) -> bool:
    return _code(exc) in codes


_MISSING = ("NoSuchKey", "404", "NotFound")
_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


class _Bridge:
    """One aiobotocore client on an event loop in a daemon thread of this process.

    Made again after a fork (serve --workers forks): a child inherits the thread's memory but not
    the thread."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.client: Any = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name="aptguard-s3", daemon=True)
        self.thread.start()
        self._ready.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._open())
        self._ready.set()
        self.loop.run_forever()

    async def _open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=10,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=64,
        )
        self._context = get_session().create_client(
            "s3", endpoint_url=self.storage.endpoint, region_name=self.storage.region, config=config
        )
        try:
            self.client = await self._context.__aenter__()
        except Exception as exc:  # noqa: BLE001 - no credentials, a bad endpoint: every call says so
            self.failure: BaseException | None = exc
        else:
            self.failure = None

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the store's loop and wait for it (from any thread but the store's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await `coro`, run on the store's loop, from another event loop (the server's)."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))


class S3Store:
    """Snapshots in one bucket under a prefix; this machine's caches and work files in data_dir."""

    remote = True

    def __init__(self, storage: Storage, data_dir: Path) -> None:
        self.storage = storage
        self.bucket = storage.bucket
        self.prefix = storage.prefix
        self.local = FileStore(data_dir)  # work folders, caches, the log: never the truth
        self.root = self.local.root
        self._bridge: _Bridge | None = None
        self._bridge_lock = threading.Lock()
        self._manifests: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        self._manifest_lock = threading.Lock()
        self._serving: Serving | None = None
        self._listing_lock = threading.Lock()
        self._listing = False  # while a sync holds the collection lock: object_size lists the objects once
        self._listed: dict[str, int] | None = None  # sha256 -> size, that listing
        self._uploads = threading.BoundedSemaphore(UPLOADS)
        self._live_view: Serving | None = None
        self._held_listing: tuple[float, frozenset[str]] | None = None

    def __repr__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    # ------------------------------------------------------------ the client

    def _client(self) -> _Bridge:
        bridge = self._bridge
        if bridge is None or bridge.pid != os.getpid():
            with self._bridge_lock:
                bridge = self._bridge
                if bridge is None or bridge.pid != os.getpid():
                    bridge = self._bridge = _Bridge(self.storage)
        if bridge.failure is not None:
            raise StoreError(f"{self}: cannot reach the object store: {bridge.failure}")
        return bridge

    def _do(self, coro_fn: Any, *args: Any, what: str) -> Any:
        """Run the coroutine function `coro_fn(client, *args)` on the store's loop; StoreError for
        what the store answers other than the missing key or failed precondition its caller handles."""
        bridge = self._client()
        return bridge.call(self._guard(coro_fn(bridge.client, *args), what))

    async def arun_on_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Await, from another event loop (the server's), a coroutine run on the store's loop."""
        return await self._client().run(coro)

    async def arun(self, coro_fn: Any, *args: Any, what: str) -> Any:
        bridge = self._client()
        return await bridge.run(self._guard(coro_fn(bridge.client, *args), what))

    async def _guard(self, coro: Coroutine[Any, Any, _T], what: str) -> _T:
        try:
            return await coro
        except (StoreError, PointerMoved, _Missing, _Precondition):
            raise
        except Exception as exc:  # botocore's and aiohttp's errors: one kind for every caller
            if _is(exc, *_MISSING):
                raise _Missing(what) from None
            if _is(exc, *_PRECONDITION):
                raise _Precondition(what) from None
            detail = _code(exc) or type(exc).__name__
            raise StoreError(f"{self}{what}: {detail}: {exc}") from None

    def _key(self, rel: str) -> str:
        return self.prefix + rel

    # ------------------------------------------------------------ small objects

    def _get(self, rel: str, limit: int | None = None) -> tuple[bytes, str] | None:
        """(body, ETag) of a key, None if it does not exist; StoreError past `limit` bytes."""
        try:
            return self._do(_get_object, self.bucket, self._key(rel), limit, what=rel)
        except _Missing:
            return None

    def _put(self, rel: str, body: bytes, *, if_match: str | None = None, create: bool = False) -> str:
        """Write a key (If-Match `if_match`, or only if absent when `create`); its new ETag.
        _Precondition when the condition fails."""
        return self._do(_put_object, self.bucket, self._key(rel), body, if_match, create, None, what=rel)

    def _list(self, rel: str, *, folders: bool = False) -> list[dict[str, Any]]:
        return self._do(_list_keys, self.bucket, self._key(rel), folders, what=rel)

    def _delete(self, rels: list[str]) -> None:
        for start in range(0, len(rels), 1000):
            self._do(_delete_keys, self.bucket, [self._key(r) for r in rels[start : start + 1000]], what="objects/")

    # ------------------------------------------------------------ the FileStore interface: local parts

    def exists(self) -> bool:
        return True  # the bucket is the operator's; a missing one is a storage-error on first use

    def ensure(self) -> None:
        """This machine's folders: work files and caches (the snapshots are in the bucket)."""
        for sub in ("tmp", "cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def log_error(self, text: str) -> Path:
        return self.local.log_error(text)

    def work_dir(self, name: str) -> Path:
        return self.local.work_dir(name)

    def read_cache(self, name: str, key: str) -> object | None:
        return self.local.read_cache(name, key)

    def write_cache(self, name: str, key: str, value: object) -> None:
        self.local.write_cache(name, key, value)

    def flush(self) -> None:
        """Every write returned once the store had it: nothing to flush."""

    def nginx_roots(self) -> dict[str, Path]:
        raise StoreError(f"{self}: nginx serves a local data folder; with s3, run `aptguard serve` behind it")

    # ------------------------------------------------------------ objects

    @staticmethod
    def _object_rel(sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}"

    def object_size(self, sha256: str) -> int | None:
        """From the listing made at the start of this sync (one request per 1,000 objects, not
        one per object); else asked of the store."""
        listed = self._listed
        if listed is None and self._listing:
            with self._listing_lock:
                if self._listed is None:
                    self._listed = {item["Key"].rsplit("/", 1)[-1]: item["Size"] for item in self._list("objects/")}
                listed = self._listed
        if listed is not None:
            return listed.get(sha256)
        try:
            return self._do(_head_size, self.bucket, self._key(self._object_rel(sha256)), what=self._object_rel(sha256))
        except _Missing:
            return None

    def put_bytes(self, data: bytes, sha256: str, mtime: float | None = None) -> None:
        self._client().call(self._put_new(data, sha256, mtime))

    async def _put_new(self, data: bytes, sha256: str, mtime: float | None) -> None:
        """Create an object unless it exists (the same bytes, by their name); on the store's loop."""
        rel = self._object_rel(sha256)
        meta = {"mtime": _mtime_ns(mtime)}
        with contextlib.suppress(_Precondition):
            await self._guard(
                _put_object(self._client().client, self.bucket, self._key(rel), data, None, True, meta), rel
            )
        if self._listed is not None:
            self._listed[sha256] = len(data)

    def put_soon(self, data: bytes, sha256: str) -> concurrent.futures.Future[None]:
        """Start storing an object and return at once (at most UPLOADS in flight: then it waits)."""
        self._uploads.acquire()
        future = asyncio.run_coroutine_threadsafe(self._put_new(data, sha256, None), self._client().loop)
        future.add_done_callback(lambda _done: self._uploads.release())
        return future

    def adopt(self, tmp_file: Path, sha256: str, mtime: float | None = None) -> None:
        """Upload a verified download and remove it."""
        try:
            self.upload(tmp_file, sha256, mtime)
        finally:
            Path(tmp_file).unlink(missing_ok=True)

    def upload(self, path: Path, sha256: str, mtime: float | None = None) -> None:
        """Store a verified file as an object: whole, or in parts past PART bytes."""
        if os.path.getsize(path) <= PART:
            self.put_bytes(Path(path).read_bytes(), sha256, mtime)
        elif self.object_size(sha256) is None:
            rel = self._object_rel(sha256)
            with contextlib.suppress(_Precondition):
                self._do(_upload_parts, self.bucket, self._key(rel), str(path), {"mtime": _mtime_ns(mtime)}, what=rel)

    def open_object(self, sha256: str) -> BinaryIO:
        """A stored object's bytes, checked against its name, in a temporary file of this machine."""
        return self._download(sha256)

    def _download(self, sha256: str) -> BinaryIO:
        self.ensure()
        handle = tempfile.TemporaryFile(dir=self.local.root / "tmp")  # noqa: SIM115 - the caller closes it
        try:
            self._do(_get_into, self.bucket, self._key(self._object_rel(sha256)), handle, sha256, what=sha256)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        return handle

    def held(self, shas: Iterable[str]) -> set[str]:
        """Which of these objects are stored: from a listing of the objects (one request per
        1,000), at most HELD_SECONDS old (status and /metrics ask on every call)."""
        wanted = set(shas)
        if not wanted:
            return set()
        now = time.monotonic()
        listed = self._held_listing
        if listed is None or now - listed[0] > HELD_SECONDS:
            names = frozenset(item["Key"].rsplit("/", 1)[-1] for item in self._list("objects/"))
            listed = self._held_listing = (now, names)
        return wanted & listed[1]

    def object_totals(self) -> tuple[int, int]:
        items = self._list("objects/")
        return len(items), sum(item["Size"] for item in items)

    def unreferenced(self, referenced: set[str]) -> list[tuple[str, int]]:
        found = []
        for item in self._list("objects/"):
            sha256 = item["Key"].rsplit("/", 1)[-1]
            if sha256 not in referenced:
                found.append((sha256, item["Size"]))
        return found

    def delete_objects(self, objects: Iterable[tuple[str, int]]) -> tuple[int, int]:
        going = list(objects)
        self._delete([self._object_rel(sha) for sha, _size in going])
        return len(going), sum(size for _sha, size in going)

    # ------------------------------------------------------------ snapshots

    def upstreams(self) -> list[str]:
        return sorted(item["Prefix"].rstrip("/").rsplit("/", 1)[-1] for item in self._list("manifests/", folders=True))

    def snapshot_ids(self, name: str) -> list[str]:
        ids = []
        for item in self._list(f"manifests/{name}/"):
            file_name = item["Key"].rsplit("/", 1)[-1]
            if file_name.endswith(".json") and file_name.count(".") == 1:
                ids.append(file_name[: -len(".json")])
        return sorted(ids)

    tree_ids = snapshot_ids  # a snapshot is its manifest: there is no tree without one

    def has_manifest(self, name: str, snap_id: str) -> bool:
        if (name, snap_id) in self._manifests:
            return True
        try:
            self._do(_head_size, self.bucket, self._key(self._manifest_rel(name, snap_id)), what=name)
        except _Missing:
            return False
        return True

    @staticmethod
    def _manifest_rel(name: str, snap_id: str, suffix: str = ".json") -> str:
        return f"manifests/{name}/{snap_id}{suffix}"

    def manifest_label(self, name: str, snap_id: str) -> str:
        return self._manifest_rel(name, snap_id)

    def read_manifest(self, name: str, snap_id: str) -> Manifest:
        with self._manifest_lock:
            known = self._manifests.get((name, snap_id))
            if known is not None:
                self._manifests.move_to_end((name, snap_id))
                return known
        rel = self._manifest_rel(name, snap_id)
        got = self._get(rel)
        if got is None:
            raise FileNotFoundError(f"{self}{rel}: no such manifest")
        manifest = Manifest.from_json(_loads(got[0]), source=f"{self}{rel}")
        with self._manifest_lock:
            self._manifests[(name, snap_id)] = manifest
            while len(self._manifests) > PARSED:
                self._manifests.popitem(last=False)
        return manifest

    def read_by_hash(self, name: str, snap_id: str) -> dict[str, FileRecord] | None:
        got = self._get(self._manifest_rel(name, snap_id, ".byhash.json"))
        return None if got is None else orjson.loads(got[0])

    def new_snapshot(self, name: str, snap_id: str, base: Manifest | None = None) -> S3SnapshotBuilder:
        return S3SnapshotBuilder(self, name, snap_id)

    def remove_snapshot(self, name: str, snap_id: str) -> None:
        """The manifest goes first (the snapshot is gone), then its side file."""
        self._delete([self._manifest_rel(name, snap_id)])
        self._delete([self._manifest_rel(name, snap_id, ".byhash.json")])
        with self._manifest_lock:
            self._manifests.pop((name, snap_id), None)

    def hold(self, name: str, snap_id: str, path: str, sha256: str) -> None:
        """An on-demand file stored since the snapshot was made: its object is all it takes."""

    def prune_pools(self, name: str, *, dry_run: bool = False) -> int:
        return 0  # no pool trees: a snapshot is its manifest, its files are objects

    # ------------------------------------------------------------ fsck

    def stored_file(self, name: str, snap_id: str, path: str) -> StoredFile | str:
        record = self.read_manifest(name, snap_id).listed_record(path)
        size = None if record is None else self.object_size(record["sha256"])
        if record is None or size is None:
            return "missing (listed in the manifest)"
        return StoredFile((0, int(record["sha256"][:15], 16)), size, Path(record["sha256"]))

    def open_stored(self, stored: StoredFile) -> BinaryIO:
        """The object's bytes as the store holds them (not checked: fsck hashes them itself)."""
        self.ensure()
        handle = tempfile.TemporaryFile(dir=self.local.root / "tmp")  # noqa: SIM115 - the caller closes it
        try:
            self._do(_get_into, self.bucket, self._key(self._object_rel(stored.path.name)), handle, None, what="")
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        return handle

    @staticmethod
    def file_label(name: str, snap_id: str, path: str = "") -> str:
        return f"snapshots/{name}/{snap_id}" + (f"/{path}" if path else "")

    def unlisted(self, name: str, snap_id: str, files: dict[str, FileRecord]) -> Iterator[tuple[str, str]]:
        return iter(())  # the manifest is the whole snapshot: nothing can sit beside it

    # ------------------------------------------------------------ state

    pointer_label = staticmethod(FileStore.pointer_label)

    def state_label(self, name: str) -> str:
        return f"state/{name}.json"

    def read_state(self, name: str) -> UpstreamState:
        got = self._get(self.state_label(name), SMALL_OBJECT)
        if got is None:
            return UpstreamState()
        return UpstreamState.from_json(orjson.loads(got[0]), source=f"{self}{self.state_label(name)}")

    def write_state(self, name: str, state: UpstreamState) -> None:
        self._put(self.state_label(name), _dumps(state.to_json(), sort_keys=True))

    # ------------------------------------------------------------ pointers

    def _pointer(self, rel: str) -> tuple[dict[str, Any], str | None]:
        got = self._get(rel, SMALL_OBJECT)
        if got is None:
            return {}, None
        try:
            body = orjson.loads(got[0])
        except ValueError as exc:
            raise StoreError(f"{self}{rel}: not an object aptguard wrote ({exc}); restore it or remove it") from None
        return (body if isinstance(body, dict) else {}), got[1]

    def _swap(self, rel: str, etag: str | None, body: dict[str, Any], old: dict[str, Any]) -> bool:
        """Write a pointer if it still has `etag` (None: if it does not exist); False if it moved.
        `left` keeps the targets it had and when each was left (newest first, HISTORY of them):
        gc keeps those a server may not have refreshed away from yet."""
        now = time.time()
        left = list(old.get("left") or [])
        if old.get("target"):
            left.insert(0, [old["target"], now])
        body = body | {"at": now, "left": left[:HISTORY]}
        try:
            self._put(rel, _dumps(body, sort_keys=True), if_match=etag, create=etag is None)
        except _Precondition:
            return False
        return True

    def current(self, name: str) -> str | None:
        return self._pointer(f"pointers/current/{name}")[0].get("snapshot")

    def set_current(self, name: str, snap_id: str, *, expect: str | None) -> None:
        rel = f"pointers/current/{name}"
        body, etag = self._pointer(rel)
        found = body.get("snapshot")
        new = {"snapshot": snap_id, "target": snap_id}
        if found != expect or not self._swap(rel, etag, new, body):
            raise PointerMoved(
                f"{name}: current is {self.current(name)}, not {expect}: another operator changed it first"
            )

    def pin_target(self, pin: str) -> tuple[str, str] | None:
        return _pin(self._pointer(f"pointers/pins/{pin}")[0])

    def set_pin(self, pin: str, name: str, snap_id: str, *, expect: tuple[str, str] | None) -> None:
        self._set_pin(pin, {"upstream": name, "snapshot": snap_id}, expect)

    def remove_pin(self, pin: str, *, expect: tuple[str, str]) -> None:
        self._set_pin(pin, {}, expect)  # a tombstone: its `left` still protects the snapshot a while

    def _set_pin(self, pin: str, new: dict[str, Any], expect: tuple[str, str] | None) -> None:
        rel = f"pointers/pins/{pin}"
        body, etag = self._pointer(rel)
        found = _pin(body)
        target = f"{new['upstream']}/{new['snapshot']}" if new else None
        if found != expect or not self._swap(rel, etag, new | {"target": target}, body):
            raise PointerMoved(
                f"pin {pin} points at {self.pin_target(pin)}, not {expect}: another operator changed it first"
            )

    def pins(self) -> dict[str, tuple[str, str]]:
        found = {}
        for item in self._list("pointers/pins/"):
            pin = item["Key"].rsplit("/", 1)[-1]
            target = self.pin_target(pin)
            if target:
                found[pin] = target
        return found

    def recently_served(self, name: str, within: float) -> set[str]:
        """Snapshots of `name` that a pointer named less than `within` seconds ago: a server that
        has not refreshed yet may still serve them, so gc keeps them."""
        now = time.time()
        found = set()
        bodies = [self._pointer(f"pointers/current/{name}")[0]]
        bodies += [self._pointer(item["Key"][len(self.prefix) :])[0] for item in self._list("pointers/pins/")]
        for kind, body in zip(["current"] + ["pin"] * (len(bodies) - 1), bodies, strict=True):
            for target, left_at in body.get("left") or []:
                if now - float(left_at) >= within:
                    break  # newest first
                if kind == "current":
                    found.add(target)
                elif target.split("/")[0] == name:
                    found.add(target.split("/", 1)[1])
        return found

    # ------------------------------------------------------------ serving

    def serving(self) -> Serving:
        """This process's view for a server (one per process: made again after a fork)."""
        view = self._serving
        if view is None or view.pid != os.getpid():
            view = self._serving = Serving(self, live=False)
        return view

    def served_file(self, where: str, key: tuple[str, ...], parts: list[str]) -> str | None:
        """The local cached copy of the file a URL path of a snapshot names, or None (a 404);
        pointers read now (a server reads them every refresh_seconds instead: serving())."""
        view = self._live_view
        if view is None or view.pid != os.getpid():
            view = self._live_view = Serving(self, live=True)
        return self._client().call(view.file(where, key, parts))

    # ------------------------------------------------------------ leftovers

    def discard_leftovers(self, name: str) -> None:
        self.local.discard_leftovers(name)

    def leftovers(self, names: list[str] | None = None) -> list[str]:
        """Local work of killed runs, and multipart uploads never completed (a killed upload)."""
        found = self.local.leftovers(names)
        for upload in self._do(_list_uploads, self.bucket, self._key("objects/"), what="objects/"):
            found.append(f"upload {upload['Key'][len(self.prefix) :]} {upload['UploadId']}")
        return found

    def discard(self, labels: Iterable[str]) -> None:
        local = []
        for label in labels:
            if label.startswith("upload "):
                _word, rel, upload_id = label.split(" ", 2)
                with contextlib.suppress(_Missing):
                    self._do(_abort_upload, self.bucket, self._key(rel), upload_id, what=rel)
            else:
                local.append(label)
        self.local.discard(local)

    # ------------------------------------------------------------ leases

    @contextlib.contextmanager
    def lease(self, name: str, *, wait_message: str | None = None) -> Iterator[None]:
        """One writer per upstream on any machine: sync, promote, rollback, pin, gc's removals."""
        with self._held(f"leases/upstream/{name}", wait_message):
            yield

    @contextlib.contextmanager
    def collection_lock(self, *, exclusive: bool, wait_message: str | None = None) -> Iterator[None]:
        """gc alone (exclusive), syncs together (shared): no object a running sync decided was
        stored is deleted before its manifest names it."""
        if exclusive:
            with self._held("leases/gc", wait_message):
                told = False
                while self._live("leases/sync/"):
                    if wait_message and not told:
                        print(wait_message, file=sys.stderr, flush=True)
                        told = True
                    time.sleep(LEASE_POLL)
                yield
            return
        told = False
        while True:
            with self._held(f"leases/sync/{_holder()}", None, unique=True):
                if not self._live("leases/gc"):
                    self._listing = True  # no gc until this lease goes: a listing of objects stays true
                    try:
                        yield
                    finally:
                        self._listing, self._listed = False, None
                    return
            if wait_message and not told:
                print(wait_message, file=sys.stderr, flush=True)
                told = True
            time.sleep(LEASE_POLL)

    def _live(self, rel: str) -> bool:
        """Whether any unexpired lease exists under `rel`."""
        now = time.time()
        for item in self._list(rel):
            body, _etag = self._pointer(item["Key"][len(self.prefix) :])
            if body.get("expires", 0) > now:
                return True
        return False

    @contextlib.contextmanager
    def _held(self, rel: str, wait_message: str | None, *, unique: bool = False) -> Iterator[None]:
        """Hold the lease `rel`; a `unique` one (named for its holder) is deleted when let go."""
        lease = _Lease(self, rel, unique=unique)
        lease.acquire(wait_message)
        try:
            yield
        finally:
            lease.release()


class _Lease:
    """A lease object: created if absent, taken over if expired, renewed while held."""

    def __init__(self, store: S3Store, rel: str, *, unique: bool = False) -> None:
        self.store = store
        self.rel = rel
        self.unique = unique
        self.holder = _holder()
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _body(self) -> bytes:
        return _dumps({"holder": self.holder, "expires": time.time() + LEASE_SECONDS})

    def acquire(self, wait_message: str | None) -> None:
        told = False
        while True:
            body, etag = self.store._pointer(self.rel)
            if etag is None or body.get("expires", 0) <= time.time():
                try:
                    self.etag = self.store._put(self.rel, self._body(), if_match=etag, create=etag is None)
                    break
                except _Precondition:
                    continue  # another took it first: look again
            if wait_message and not told:
                print(f"{wait_message} (held by {body.get('holder')})", file=sys.stderr, flush=True)
                told = True
            time.sleep(LEASE_POLL)
        self._renewer = threading.Thread(target=self._renew, name="aptguard-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 3):
            try:
                self.etag = self.store._put(self.rel, self._body(), if_match=self.etag)
            except _Precondition:
                return  # taken over after it lapsed: the pointer writes' own conditions still hold
            except OSError:
                continue  # the store is down: try again; the lease lapses if it stays down

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with contextlib.suppress(_Precondition, OSError):  # lapsed and taken, or the store is down: it lapses
            if self.unique:
                self.store._delete([self.rel])
            else:
                self.store._put(self.rel, _dumps({"holder": None, "expires": 0}), if_match=self.etag)


def _mtime_ns(mtime: float | None) -> str:
    """x-amz-meta-mtime: nanoseconds, so every server sets the same mtime on its cached copy and
    sends the same Last-Modified and ETag (a client may meet a different server each request)."""
    return str(int((time.time() if mtime is None else mtime) * 1_000_000_000))


def _holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pin(body: dict[str, Any]) -> tuple[str, str] | None:
    if body.get("upstream") and body.get("snapshot"):
        return (body["upstream"], body["snapshot"])
    return None


class S3SnapshotBuilder:
    """A snapshot being assembled: path -> object. Objects are uploaded as they come; the manifest,
    written last, makes the snapshot exist (nothing names an object before it is complete)."""

    def __init__(self, store: S3Store, name: str, snap_id: str) -> None:
        self.store = store
        self.name = name
        self.snap_id = snap_id
        self.files: dict[str, str] = {}
        self.written = 0
        self._lock = threading.Lock()
        self._pending: list[concurrent.futures.Future[None]] = []

    def add(self, path: str, sha256: str, *, pool: bool | None) -> None:
        with self._lock:
            self.files[path] = sha256

    def put(self, path: str, sha256: str, data: bytes) -> None:
        """Verified bytes of a pool file: their upload starts now, commit() waits for it."""
        future = self.store.put_soon(data, sha256)
        with self._lock:
            self._pending.append(future)
            self.files[path] = sha256
            self.written += 1

    def _uploaded(self) -> None:
        """Wait for every upload started; the first failure is raised."""
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def placed(self, path: str) -> bool:
        return False

    def stored_elsewhere(self, path: str, sha256: str, *, placed: bool) -> None:
        self.add(path, sha256, pool=True)

    def count_written(self, entries: int) -> None:
        with self._lock:
            self.written += entries

    def commit(self, manifest: Manifest, by_hash: dict[str, FileRecord]) -> None:
        """The by-hash side file, then the manifest (created, never replaced): the snapshot exists."""
        store = self.store
        self._uploaded()
        paths = sorted(self.files)
        for path, following in zip(paths, paths[1:], strict=False):
            if following.startswith(path + "/"):  # a file and a folder: the local backend cannot hold it either
                raise Rejected("package-mismatch", f"{path} is a file and a folder of this snapshot ({following})")
        store._put(store._manifest_rel(self.name, self.snap_id, ".byhash.json"), _dumps(by_hash))
        try:
            store._put(
                store._manifest_rel(self.name, self.snap_id),
                _dumps(manifest.to_json(), sort_keys=True),
                create=True,
            )
        except _Precondition:
            raise StoreError(f"{store}{store._manifest_rel(self.name, self.snap_id)}: already exists") from None
        self.written += 2

    def abort(self) -> None:
        """Objects already uploaded stay until gc: nothing names them."""
        with contextlib.suppress(Exception):
            self._uploaded()


class _View:
    """What a server needs of one snapshot: URL path -> (SHA256, size), by-hash entries included."""

    __slots__ = ("files",)

    def __init__(self, manifest: Manifest, by_hash: dict[str, FileRecord] | None) -> None:
        self.files: dict[str, str] = {path: record["sha256"] for path, record in manifest.listed.items()}
        self.files.update((path, record["sha256"]) for path, record in manifest.files.items())
        for path, record in (by_hash or {}).items():
            self.files.setdefault(path, record["sha256"])


class Serving:
    """A server's view of the store: pointers re-read every refresh_seconds, each snapshot's
    manifest loaded once (immutable), and the objects it served kept in data_dir/cache/objects up
    to cache_bytes. Its state changes only on the store's loop; a server's loop reads it (`lookup`)
    without a thread hop, and awaits `file` only for what it lacks.

    A refresh loads the manifest of every snapshot a pointer now names before it swaps the whole
    pointer table: a server switches whole snapshots, never a mix. If the store cannot be reached,
    the table and the cached objects stay as they are and `unreachable_since` says since when."""

    def __init__(self, store: S3Store, *, live: bool) -> None:
        self.store = store
        self.pid = os.getpid()
        self.live = live  # read the pointers on every request (the synchronous interface's tests)
        self.pointers: dict[tuple[str, str], tuple[str, str]] = {}  # ("current", NAME) / ("pin", PIN) -> (NAME, ID)
        self.views: dict[tuple[str, str], _View] = {}
        self.refreshed = 0.0  # when the pointers were last read
        self.unreachable_since: float | None = None
        self.error = ""
        self.cache_dir = store.local.root / "cache" / "objects"
        self.cache_bytes = store.storage.cache_bytes
        self._cached: OrderedDict[str, int] = OrderedDict()  # sha256 -> size, least recently used first
        self._cached_total = 0
        self._fetching: dict[str, asyncio.Future[str]] = {}
        self._etags: dict[str, str] = {}
        self._scanned = False
        self._refreshing: asyncio.Future[None] | None = None

    # ---- the server's loop: plain reads

    def snapshot_of(self, where: str, key: tuple[str, ...]) -> tuple[str, str] | None:
        if where == "snapshot":
            return (key[0], key[1])
        return self.pointers.get((where, key[0]))

    UNKNOWN = ("", None)

    def lookup(self, where: str, key: tuple[str, ...], parts: list[str]) -> tuple[str, str | None] | None:
        """(SHA256, cached path or None) of a URL path, None for a 404, or UNKNOWN when only the
        store can say (a snapshot by id not loaded yet: await `resolve`)."""
        snapshot = self.snapshot_of(where, key)
        if snapshot is None:
            return None
        view = self.views.get(snapshot)
        if view is None:
            return self.UNKNOWN if where == "snapshot" else None
        sha256 = view.files.get("/".join(parts))
        if sha256 is None:
            return None
        return sha256, self.cached_path(sha256) if sha256 in self._cached else None

    def sibling(self, where: str, key: tuple[str, ...], parts: list[str]) -> tuple[str, str | None] | None:
        """A pool file the snapshot does not list, from another snapshot of the same upstream this
        server holds (as the local backend's shared pool answers it): a client that read the
        previous snapshot's index just before a promotion still gets its package."""
        snapshot = self.snapshot_of(where, key)
        if snapshot is None:
            return None
        rel = "/".join(parts)
        for (name, _snap_id), view in list(self.views.items()):
            if name == snapshot[0] and (sha256 := view.files.get(rel)) is not None:
                return sha256, self.cached_path(sha256) if sha256 in self._cached else None
        return None

    def cached_path(self, sha256: str) -> str:
        return f"{self.cache_dir}/{sha256[:2]}/{sha256}"

    # ---- the store's loop

    async def file(self, where: str, key: tuple[str, ...], parts: list[str]) -> str | None:
        sha256 = await self.resolve(where, key, parts)
        return None if sha256 is None else await self.fetch(sha256)

    async def resolve(self, where: str, key: tuple[str, ...], parts: list[str]) -> str | None:
        """The SHA256 of the file a URL path names, or None (a 404)."""
        snapshot = await self._live_target(where, key) if self.live else self.snapshot_of(where, key)
        if snapshot is None:
            return None
        view = self.views.get(snapshot)
        if view is None:
            if where != "snapshot" and not self.live:
                return None
            view = await self._load(snapshot)
            if view is None:
                return None
        return view.files.get("/".join(parts))

    async def _live_target(self, where: str, key: tuple[str, ...]) -> tuple[str, str] | None:
        """The snapshot a pointer names now, or a snapshot by id if its manifest exists now."""
        store = self.store
        if where == "snapshot":
            snapshot = (key[0], key[1])
            try:
                await store.arun(_head_size, store.bucket, store._key(store._manifest_rel(*snapshot)), what=key[0])
            except _Missing:
                self.views.pop(snapshot, None)
                return None
            return snapshot
        rel = f"pointers/{'current' if where == 'current' else 'pins'}/{key[0]}"
        try:
            got = await store.arun(_get_object, store.bucket, store._key(rel), SMALL_OBJECT, what=rel)
            body = orjson.loads(got[0])
        except _Missing:
            return None
        return (key[0], body["snapshot"]) if where == "current" and body.get("snapshot") else _pin(body)

    async def _load(self, snapshot: tuple[str, str]) -> _View | None:
        """The view of a snapshot, None if it does not exist (or is not a snapshot name)."""
        known = self.views.get(snapshot)
        if known is not None:
            return known
        name, snap_id = snapshot
        if not name or not snap_id or "/" in name + snap_id or snap_id.startswith("."):
            return None
        try:
            manifest = await asyncio.to_thread(self.store.read_manifest, name, snap_id)
        except FileNotFoundError:
            return None
        by_hash = await asyncio.to_thread(self.store.read_by_hash, name, snap_id)
        view = self.views[snapshot] = _View(manifest, by_hash)
        return view

    async def refresh(self) -> None:
        """Read every pointer (one listing; a GET only for a pointer whose ETag changed), load
        the manifests they name, then switch the whole table at once."""
        store = self.store
        try:
            items = await store.arun(_list_keys, store.bucket, store._key("pointers/"), False, what="pointers/")
            table: dict[tuple[str, str], tuple[str, str]] = {}
            etags: dict[str, str] = {}
            for item in items:
                rel = item["Key"][len(store.prefix) :]
                words = rel.split("/")
                if len(words) != 3 or words[1] not in ("current", "pins"):
                    continue
                kind = "current" if words[1] == "current" else "pin"
                etags[rel] = item["ETag"]
                old = self.pointers.get((kind, words[2]))
                if self._etags.get(rel) == item["ETag"] and old is not None:
                    table[(kind, words[2])] = old
                    continue
                try:
                    got = await store.arun(_get_object, store.bucket, item["Key"], SMALL_OBJECT, what=rel)
                    body = orjson.loads(got[0])
                    if not isinstance(body, dict):
                        raise ValueError("not a JSON object")
                except (ValueError, _Damaged) as exc:  # damaged (fsck's to name): keep what this pointer named
                    self.error = f"{rel}: unreadable pointer: {exc}"
                    if old is not None:
                        table[(kind, words[2])] = old
                    continue
                target = (words[2], body["snapshot"]) if kind == "current" and body.get("snapshot") else _pin(body)
                if target is not None:
                    table[(kind, words[2])] = target
            stored = await store.arun(_list_keys, store.bucket, store._key("manifests/"), False, what="manifests/")
            exists = set()
            for item in stored:
                words = item["Key"][len(store.prefix) :].split("/")
                if len(words) == 3 and words[2].endswith(".json") and words[2].count(".") == 1:
                    exists.add((words[1], words[2][: -len(".json")]))
            for snapshot in [s for s in self.views if s not in exists]:
                del self.views[snapshot]  # removed by gc: its URLs answer 404 from now on
            for pointer, snapshot in list(table.items()):
                if snapshot not in exists or await self._load(snapshot) is None:
                    # Named but gone (damage for fsck): keep serving what this pointer named before.
                    old = self.pointers.get(pointer)
                    if old is not None and old in self.views:
                        table[pointer] = old
                    else:
                        del table[pointer]
        except (_Missing, StoreError) as exc:
            if self.unreachable_since is None:
                self.unreachable_since = time.time()
            self.error = str(exc)
            if self.live:
                raise
            return
        self.pointers, self._etags = table, etags
        self.refreshed = time.time()
        self.unreachable_since, self.error = None, ""
        held = set(table.values())
        for snapshot in [s for s in self.views if s not in held]:
            if len(self.views) <= MANIFESTS:
                break
            del self.views[snapshot]  # a snapshot by id is loaded again on demand

    async def refresh_soon(self) -> None:
        """A refresh now, unless one ended less than MISS_REFRESH ago (one at a time, shared)."""
        if self.unreachable_since is not None or time.time() - self.refreshed < MISS_REFRESH:
            return  # an unreachable store is retried by refresh_forever, not by each request
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self.refresh())
            self._refreshing.add_done_callback(lambda _done: setattr(self, "_refreshing", None))
        await asyncio.shield(self._refreshing)

    async def refresh_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - a bug or a damaged pointer: keep serving, say so, retry
                self.error = f"refresh failed: {type(exc).__name__}: {exc}"
                print(f"aptguard: {self.store}: {self.error}", file=sys.stderr, flush=True)

    async def fetch(self, sha256: str) -> str:
        """The local path of an object, downloaded (checked against its name) if not cached;
        one download however many requests want it."""
        path = self.cached_path(sha256)
        if sha256 in self._cached and os.path.exists(path):
            self._cached.move_to_end(sha256)
            return path
        if not self._scanned:
            await asyncio.to_thread(self._scan)
            if sha256 in self._cached and os.path.exists(path):
                return path
        pending = self._fetching.get(sha256)
        if pending is None:
            pending = self._fetching[sha256] = asyncio.ensure_future(self._download(sha256, path))
            pending.add_done_callback(lambda _done: self._fetching.pop(sha256, None))
        return await asyncio.shield(pending)

    async def _download(self, sha256: str, path: str) -> str:
        store = self.store
        rel = store._object_rel(sha256)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as handle:
                try:
                    mtime = await store.arun(_get_into, store.bucket, store._key(rel), handle, sha256, what=rel)
                except _Missing:
                    raise ObjectMissing(f"{store}{rel}: listed by a snapshot but not in the store") from None
            os.chmod(tmp, 0o444)
            if mtime is not None:
                os.utime(tmp, ns=(mtime, mtime))
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        size = os.path.getsize(path)
        self._cached[sha256] = size
        self._cached_total += size
        self._trim()
        return path

    def _scan(self) -> None:
        """What an earlier run of this server left in the cache counts against cache_bytes."""
        self._scanned = True
        if not self.cache_dir.is_dir():
            return
        found = []
        for sub in os.scandir(self.cache_dir):
            if sub.is_dir():
                for entry in os.scandir(sub.path):
                    if entry.name.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                        continue
                    with contextlib.suppress(OSError):
                        st = entry.stat()
                        found.append((st.st_atime, entry.name, st.st_size))
        for _atime, sha256, size in sorted(found):
            if sha256 not in self._cached:
                self._cached[sha256] = size
                self._cached_total += size
        self._trim()

    def _trim(self) -> None:
        while self._cached_total > self.cache_bytes and len(self._cached) > 1:
            sha256, size = self._cached.popitem(last=False)
            self._cached_total -= size
            with contextlib.suppress(OSError):
                os.unlink(self.cached_path(sha256))

    async def presigned(self, sha256: str, expires: int = 300) -> str:
        store = self.store
        return await store.arun(_presign, store.bucket, store._key(store._object_rel(sha256)), expires, what=sha256)

    def health(self) -> dict[str, Any]:
        """For /status and /metrics: whether the store answered the last refresh."""
        return {
            "backend": "s3",
            "store": str(self.store),
            "reachable": self.unreachable_since is None,
            "unreachable_since": self.unreachable_since,
            "refreshed": self.refreshed,
            "error": self.error,
            "cached_objects": len(self._cached),
            "cached_bytes": self._cached_total,
            "serving": {f"{kind}/{key}": f"{name}/{snap_id}" for (kind, key), (name, snap_id) in self.pointers.items()},
        }


class _Damaged(StoreError):
    """An object of the store that aptguard cannot have written (too large to be one)."""


class _Missing(Exception):
    pass


class _Precondition(Exception):
    pass


# ---------------------------------------------------------------- calls on the store's loop


async def _get_object(client: Any, bucket: str, key: str, limit: int | None = None) -> tuple[bytes, str]:
    """(body, ETag); StoreError past `limit` bytes (a pointer, lease or state object is small:
    a huge one is damage, not something to hold in memory)."""
    response = await client.get_object(Bucket=bucket, Key=key)
    async with response["Body"] as stream:
        if limit is None:
            body = await stream.read()
        else:  # read(n) returns what has arrived, up to n: read on to the limit or the end
            body = b""
            while len(body) <= limit and (chunk := await stream.read(limit + 1 - len(body))):
                body += chunk
    if limit is not None and len(body) > limit:
        raise _Damaged(f"{key}: more than {limit} bytes; not an object aptguard wrote (restore or remove it)")
    return body, response["ETag"]


async def _put_object(
    client: Any,
    bucket: str,
    key: str,
    body: bytes,
    if_match: str | None,
    create: bool,
    metadata: dict[str, str] | None,
) -> str:
    extra: dict[str, Any] = {}
    if if_match is not None:
        extra["IfMatch"] = if_match
    elif create:
        extra["IfNoneMatch"] = "*"
    if metadata:
        extra["Metadata"] = metadata
    response = await client.put_object(Bucket=bucket, Key=key, Body=body, **extra)
    return response["ETag"]


async def _head_size(client: Any, bucket: str, key: str) -> int:
    response = await client.head_object(Bucket=bucket, Key=key)
    return int(response["ContentLength"])


async def _list_keys(client: Any, bucket: str, prefix: str, folders: bool) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    paginator = client.get_paginator("list_objects_v2")
    extra = {"Delimiter": "/"} if folders else {}
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **extra):
        found += page.get("CommonPrefixes", []) if folders else page.get("Contents", [])
    return found


async def _delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    if keys:
        response = await client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
        errors = response.get("Errors") or []
        if errors:
            raise StoreError(f"{errors[0].get('Key')}: {errors[0].get('Code')}: {errors[0].get('Message')}")


async def _get_into(client: Any, bucket: str, key: str, handle: BinaryIO, sha256: str | None) -> int | None:
    """Write an object into `handle`, checked against `sha256` when given; its x-amz-meta-mtime (ns)."""
    response = await client.get_object(Bucket=bucket, Key=key)
    digest = hashlib.sha256()
    async with response["Body"] as stream:
        while chunk := await stream.read(_CHUNK):
            digest.update(chunk)
            handle.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise StoreError(f"{key}: the store's copy has SHA256 {digest.hexdigest()}: damaged in the store")
    mtime = (response.get("Metadata") or {}).get("mtime", "")
    return int(mtime) if mtime.isdigit() else None


async def _presign(client: Any, bucket: str, key: str, expires: int) -> str:
    return await client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)


async def _upload_parts(client: Any, bucket: str, key: str, path: str, metadata: dict[str, str]) -> None:
    """A multipart upload completed only if the key is still absent; aborted on any failure."""
    upload = await client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=metadata)
    upload_id = upload["UploadId"]
    try:
        parts = []
        with open(path, "rb") as source:
            number = 1
            while chunk := await asyncio.to_thread(source.read, PART):
                part = await client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
                number += 1
        await client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


async def _list_uploads(client: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    response = await client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return list(response.get("Uploads", []))


async def _abort_upload(client: Any, bucket: str, key: str, upload_id: str) -> None:
    await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
