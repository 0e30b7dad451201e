"""The storage interface, the same checks for every backend: a data folder and an S3 bucket (moto's server).

Each test speaks only the interface's words: objects, a snapshot builder, manifests, pointers,
leases, what is referenced and left over, and the file a URL path of a snapshot serves. Bytes are
read the way a server reads them (served_file), so a backend that lays things out otherwise
passes the same tests.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aptguard.reasons import Rejected
from aptguard.records import FileRecord, Manifest, SuiteRecord, file_record
from aptguard.store import FileStore, PointerMoved
from aptguard.store_s3 import S3Store

BACKENDS = ["local", "s3"]


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> FileStore:
    if request.param == "s3":
        moto = request.getfixturevalue("moto")
        made: FileStore = S3Store(moto.storage(moto.new_bucket()), tmp_path / "data")  # type: ignore[assignment]
    else:
        made = FileStore(tmp_path / "data")
    made.ensure()
    return made


def _opening(store: FileStore) -> str:
    """Python that makes the same store in a child process."""
    if store.remote:
        assert isinstance(store, S3Store)
        return (
            "from aptguard.store_s3 import S3Store\nfrom aptguard.config import Storage\n"
            f"store = S3Store(Storage(backend='s3', endpoint={store.storage.endpoint!r}, bucket={store.bucket!r}, "
            f"prefix={store.prefix!r}), Path({str(store.root)!r}))\n"
        )
    return f"from aptguard.store import FileStore\nstore = FileStore(Path({str(store.root)!r}))\n"


def _put(store: FileStore, data: bytes) -> FileRecord:
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(data, sha)
    return file_record(len(data), {"sha256": sha})


Archive = dict[str, bytes]


def _archive(n: int, tag: str = "") -> Archive:
    """An upstream with an InRelease, an index and `n` pool files in Debian's layout."""
    files = {"dists/stable/InRelease": f"release {tag}".encode(), "dists/stable/main/Packages": f"index {tag}".encode()}
    for i in range(n):
        files[f"pool/main/{'abc'[i % 3]}/pkg{i}/pkg{i}_1.0_all.deb"] = f"package {i}".encode()
    return files


def _commit(
    store: FileStore, snap_id: str, archive: Archive, base: Manifest | None = None, name: str = "up"
) -> tuple[Manifest, int]:
    """Store an archive as snapshot `snap_id` the way a sync does; (its manifest, entries written)."""
    records = {path: _put(store, data) for path, data in archive.items()}
    manifest = Manifest.build(
        id=snap_id,
        upstream=name,
        url="http://127.0.0.1:9/",
        created="2026-12-02T00:00:00Z",
        suites={"stable": SuiteRecord(date="2026-12-02T00:00:00Z", valid_until=None, paths=sorted(records))},
        files=records,
        by_hash_own=[],
        packages={},
    )
    builder = store.new_snapshot(name, snap_id, base)
    for path, record in records.items():
        builder.add(path, record["sha256"], pool=path.startswith("pool/"))
    builder.commit(manifest, {})
    return manifest, builder.written


def _served(store: FileStore, where: str, key: tuple[str, ...], path: str) -> bytes | None:
    found = store.served_file(where, key, path.split("/"))
    return None if found is None else Path(found).read_bytes()


def _serves_exactly(store: FileStore, snap_id: str, archive: Archive, name: str = "up") -> None:
    for path, data in archive.items():
        assert _served(store, "snapshot", (name, snap_id), path) == data, path


def test_objects_are_stored_once_and_read_back(store: FileStore) -> None:
    record = _put(store, b"hello")
    _put(store, b"hello")
    assert store.object_size(record["sha256"]) == 5
    with store.open_object(record["sha256"]) as handle:
        assert handle.read() == b"hello"
    assert store.object_size("0" * 64) is None
    assert store.object_totals() == (1, 5)


def test_a_committed_snapshot_serves_every_file_it_lists_and_nothing_else(store: FileStore) -> None:
    archive = _archive(30)
    manifest, _written = _commit(store, "S1", archive)
    assert store.snapshot_ids("up") == ["S1"]
    assert store.read_manifest("up", "S1").files == manifest.files
    _serves_exactly(store, "S1", archive)
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/a/nothing.deb") is None
    assert _served(store, "snapshot", ("up", "S2"), "dists/stable/InRelease") is None
    assert store.served_file("snapshot", ("up", "S1"), ["pool", "main", "a"]) is None  # a folder


def test_a_snapshot_costs_what_changed_not_the_archive(store: FileStore) -> None:
    """1,000 pool files (200 in a bucket: moto answers a request in milliseconds), then 10 new
    ones: the second snapshot writes entries for the change."""
    size = 200 if store.remote else 1000
    first = _archive(size, "1")
    base, written_first = _commit(store, "S1", first)
    second = {**_archive(size, "2"), **{f"pool/main/n/new{i}/new{i}_1_all.deb": b"new %d" % i for i in range(10)}}
    objects = store.object_totals()[0]
    _manifest, written_second = _commit(store, "S2", second, base)
    assert store.object_totals()[0] == objects + 12  # the 10 new files and the 2 new index files
    assert written_first > size or store.remote  # an object store's cost is its uploads (the objects)
    # 10 files, their 10 folders and 1 parent, the own tree (2 index files, 3 folders, the pool
    # link) and the commit's renames: about 30, whatever the archive's size.
    assert written_second < 40, written_second
    _serves_exactly(store, "S1", first)
    _serves_exactly(store, "S2", second)


def test_a_pool_path_rewritten_upstream_starts_a_new_generation_and_both_snapshots_keep_their_bytes(
    store: FileStore,
) -> None:
    first = _archive(20, "1")
    base, _ = _commit(store, "S1", first)
    second = {**_archive(20, "2"), "pool/main/a/pkg0/pkg0_1.0_all.deb": b"other content, same name"}
    _commit(store, "S2", second, base)
    _serves_exactly(store, "S1", first)
    _serves_exactly(store, "S2", second)


def test_removing_a_snapshot_then_pruning_keeps_what_others_list_and_frees_the_rest(store: FileStore) -> None:
    first = _archive(20, "1")
    base, _ = _commit(store, "S1", first)
    second = {k: v for k, v in _archive(20, "2").items() if "pkg19" not in k}
    second["pool/main/z/fresh/fresh_1_all.deb"] = b"fresh"
    kept, _ = _commit(store, "S2", second, base)
    _serves_exactly(store, "S1", first)  # and remembered by served_file: it must forget S1 as it goes
    store.remove_snapshot("up", "S1")
    assert store.prune_pools("up") == (0 if store.remote else 1)  # pkg19, which only S1 listed (local pools)
    assert store.snapshot_ids("up") == ["S2"]
    assert _served(store, "snapshot", ("up", "S1"), "dists/stable/InRelease") is None
    # a pool file S2 shares with S1 stays on disk, but not under S1's name
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/a/pkg0/pkg0_1.0_all.deb") is None
    _serves_exactly(store, "S2", second)
    assert _served(store, "snapshot", ("up", "S2"), "pool/main/b/pkg19/pkg19_1.0_all.deb") is None
    referenced = {r["sha256"] for r in kept.files.values()}
    unused = store.unreferenced(referenced)
    left = {hashlib.sha256(data).hexdigest(): len(data) for data in first.values()}
    for data in second.values():
        left.pop(hashlib.sha256(data).hexdigest(), None)
    assert dict(unused) == left and len(left) == 3  # pkg19, S1's InRelease and index
    assert store.delete_objects(unused) == (3, sum(left.values()))
    _serves_exactly(store, "S2", second)


def test_an_object_still_linked_is_never_deleted_even_if_no_manifest_names_it(store: FileStore) -> None:
    if store.remote:
        pytest.skip("links are the local layout's second guard; an object store has only the manifests")
    archive = _archive(3)
    manifest, _ = _commit(store, "S1", archive)
    assert store.delete_objects(store.unreferenced(set())) == (0, 0)
    _serves_exactly(store, "S1", archive)


def test_a_failed_commit_leaves_nothing_visible_and_undoes_its_pool_links(store: FileStore) -> None:
    first = _archive(5, "1")
    base, _ = _commit(store, "S1", first)
    second = {**_archive(5, "2"), "pool/main/n/new/new_1_all.deb": b"new"}
    records = {path: _put(store, data) for path, data in second.items()}
    builder = store.new_snapshot("up", "S2", base)
    for path, record in records.items():
        builder.add(path, record["sha256"], pool=path.startswith("pool/"))
    # An own file where the own tree needs a folder: the commit fails after linking the pool.
    builder.add("dists/stable/InRelease/x", records["dists/stable/InRelease"]["sha256"], pool=False)
    manifest = Manifest.build(
        id="S2", upstream="up", url="", created="", suites={}, files=records, by_hash_own=[], packages={}
    )
    with pytest.raises((OSError, Rejected)):
        builder.commit(manifest, {})
    assert store.snapshot_ids("up") == ["S1"]
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/n/new/new_1_all.deb") is None
    _serves_exactly(store, "S1", first)
    assert store.leftovers() == []


def test_a_commit_killed_after_linking_its_pool_files_is_undone_by_the_next_sync(store: FileStore) -> None:
    """A real kill (os._exit in the child) at the instant after the pool links were made."""
    if store.remote:
        pytest.skip("pool links are the local layout's; an object store's commit is one write, last")
    first = _archive(5, "1")
    _commit(store, "S1", first)
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path[:0] = {sys.path!r}
        from pathlib import Path
        from aptguard.store import FileStore
        from tests import test_storage as t
        store = FileStore(Path({str(store.root)!r}))
        base = store.read_manifest("up", "S1")
        os.symlink = lambda *a, **k: os._exit(9)  # the own tree's .pool link comes after the pool links
        t._commit(store, "S2", {{**t._archive(5, "2"), "pool/main/n/new/new_1_all.deb": b"new"}}, base)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], check=False, cwd=Path(__file__).parent.parent)
    assert child.returncode == 9, "the child was not killed where intended"
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/n/new/new_1_all.deb") == b"new"  # the fault is real
    assert store.leftovers(), "a killed commit left nothing to discard"
    store.discard_leftovers("up")
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/n/new/new_1_all.deb") is None
    assert store.snapshot_ids("up") == ["S1"]
    _serves_exactly(store, "S1", first)
    assert store.leftovers() == []


def test_pointers_change_by_compare_and_swap(store: FileStore) -> None:
    archive = _archive(2)
    _commit(store, "S1", archive)
    _commit(store, "S2", archive)
    _commit(store, "S3", _archive(2, "3"))
    store.set_current("up", "S1", expect=None)
    assert _served(store, "current", ("up",), "dists/stable/InRelease") == archive["dists/stable/InRelease"]
    with pytest.raises(PointerMoved):
        store.set_current("up", "S2", expect=None)  # an operator who read "no current" loses
    store.set_current("up", "S3", expect="S1")
    assert _served(store, "current", ("up",), "dists/stable/InRelease") == b"release 3"  # at once
    store.set_current("up", "S2", expect="S3")
    assert store.current("up") == "S2"
    assert _served(store, "current", ("up",), "dists/stable/InRelease") == archive["dists/stable/InRelease"]
    store.set_pin("ci", "up", "S1", expect=None)
    with pytest.raises(PointerMoved):
        store.set_pin("ci", "up", "S2", expect=None)
    assert store.pins() == {"ci": ("up", "S1")}
    assert _served(store, "pin", ("ci",), "pool/main/a/pkg0/pkg0_1.0_all.deb") == b"package 0"
    with pytest.raises(PointerMoved):
        store.remove_pin("ci", expect=("up", "S2"))
    store.remove_pin("ci", expect=("up", "S1"))
    assert store.pins() == {} and _served(store, "pin", ("ci",), "dists/stable/InRelease") is None


@pytest.mark.parametrize("plant", ["own tree", "pool generation"])
def test_a_planted_link_is_never_followed_and_fsck_names_one_in_the_own_tree(
    store: FileStore, tmp_path: Path, plant: str
) -> None:
    """Links that are not the snapshot's own: the filesystem backend's layout is used to plant them."""
    if store.__class__ is not FileStore:
        pytest.skip("planting needs the local layout")
    archive = _archive(3)
    manifest, _ = _commit(store, "S1", archive)
    secret = tmp_path / "secret"
    secret.write_text("secret")
    folder = store.root / "snapshots" / "up" / "S1" / "dists"
    if plant == "pool generation":
        folder = next((store.root / "pools" / "up").iterdir()) / "pool"
    os.symlink(secret, folder / "leak")
    where = "dists/leak" if plant == "own tree" else "pool/leak"
    assert Path(folder / "leak").read_text() == "secret"  # the plant is real
    assert store.served_file("snapshot", ("up", "S1"), where.split("/")) is None
    if plant == "own tree":
        assert [label for label, _problem in store.unlisted("up", "S1", manifest.files)] == [
            "snapshots/up/S1/dists/leak"
        ]


def test_fsck_words_find_each_file_and_name_one_added_after_verification(store: FileStore) -> None:
    archive = _archive(3)
    manifest, _ = _commit(store, "S1", archive)
    found = store.stored_file("up", "S1", "pool/main/a/pkg0/pkg0_1.0_all.deb")
    assert not isinstance(found, str) and found.size == len(b"package 0")
    with store.open_stored(found) as handle:
        assert handle.read() == b"package 0"
    assert store.stored_file("up", "S1", "pool/main/a/none.deb") == "missing (listed in the manifest)"
    assert list(store.unlisted("up", "S1", manifest.files)) == []
    if store.__class__ is not FileStore:
        return  # adding a file behind the store's back needs the local layout
    (store.root / "snapshots" / "up" / "S1" / "dists" / "stable" / "extra").write_bytes(b"added")
    assert list(store.unlisted("up", "S1", manifest.files)) == [
        ("snapshots/up/S1/dists/stable/extra", "not in the snapshot's manifest (added after verification)")
    ]


def test_leases_are_one_writer_per_upstream(store: FileStore) -> None:
    """A second process wanting the same upstream's lease waits until the first lets go; another
    upstream's lease is free meanwhile."""

    def child(name: str) -> subprocess.Popen[bytes]:
        script = (
            f"import sys; sys.path[:0] = {sys.path!r}\n"
            "from pathlib import Path\n"
            + _opening(store)
            + f"with store.lease({name!r}):\n    print('got', flush=True)\n"
        )
        return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)

    with store.lease("up"):
        waiting, other = child("up"), child("other")
        assert other.wait(timeout=30) == 0
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=1.5)
    assert waiting.wait(timeout=30) == 0
    assert waiting.stdout is not None and waiting.stdout.read() == b"got\n"


def test_pruning_removes_nothing_while_a_snapshot_cannot_be_read(store: FileStore) -> None:
    """A damaged manifest (fsck's to name) hides which pool files its snapshot lists: keep them all."""
    if store.__class__ is not FileStore:
        pytest.skip("damaging a manifest needs the local layout")
    first = _archive(5, "1")
    base, _ = _commit(store, "S1", first)
    second = {k: v for k, v in _archive(5, "2").items() if "pkg4" not in k}
    _commit(store, "S2", second, base)
    (store.root / "meta" / "up" / "S1.json").write_text("{damaged")
    with pytest.raises(ValueError):
        store.read_manifest("up", "S1")  # the damage is real
    assert store.prune_pools("up") == 0
    assert _served(store, "snapshot", ("up", "S1"), "pool/main/b/pkg4/pkg4_1.0_all.deb") == b"package 4"
