"""Manifests and upstream state as typed records: the files stay exactly what they were.

tests/data/records/ holds a manifest and a state file written by aptguard before records.py
existed (commit dbf2b19: a sync, a second sync, a rollback, a held sync and an unchanged one).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from aptguard.records import LastSync, Manifest, RecordError, UpstreamState
from aptguard.snapshot import rollback_target
from aptguard.store import FileStore
from fixtures.keys import SigningKey, write_keyring
from fixtures.repo import Repo
from tests.mirror import Mirror

DATA = Path(__file__).parent / "data" / "records"
OLD_MANIFEST = DATA / "manifest-before-records.json"
OLD_STATE = DATA / "state-before-records.json"


def _commit(store: FileStore, name: str, manifest: Manifest) -> bytes:
    """Write `manifest` as a sync does (an empty tree, committed); the bytes of its meta file."""
    store.ensure()
    store.new_snapshot(name, manifest.id).commit(manifest, {})
    return (store.root / "meta" / name / f"{manifest.id}.json").read_bytes()


def _write(store: FileStore, name: str, state: UpstreamState) -> bytes:
    store.write_state(name, state)
    return (store.root / "state" / f"{name}.json").read_bytes()


def test_records_written_before_records_py_are_written_back_byte_for_byte(tmp_path: Path) -> None:
    old_manifest, old_state = OLD_MANIFEST.read_bytes(), OLD_STATE.read_bytes()
    manifest = Manifest.from_json(json.loads(old_manifest))
    state = UpstreamState.from_json(json.loads(old_state))
    store = FileStore(tmp_path / "data")
    assert _commit(store, "up", manifest) == old_manifest
    assert _write(store, "up", state) == old_state
    # ... and read as typed values, the same ones the old code read by string keys
    suite = manifest.suites["bookworm"]
    assert manifest.count == len(manifest.files) and manifest.bytes == sum(r["size"] for r in manifest.files.values())
    assert set(suite.signed) == {"InRelease", "Release", "Release.gpg"} and suite.acquire_by_hash
    assert all(path in manifest.files for path in suite.paths)
    assert manifest.packages["bookworm"]["main/amd64"] == {"hello": "1.0"}
    assert state.held and state.last_sync is not None and state.last_sync.outcome == "unchanged"
    assert state.outcomes == {"promoted:": 2, "stored:": 1, "unchanged:": 1}
    assert state.keys and state.keys[0].fingerprint == "ACB23A732AA683836448A863C839BD5A8E48004E"


def test_a_real_sync_writes_records_that_read_back_unchanged(
    tmp_path: Path, keys: Callable[..., SigningKey], repo: Callable[..., Repo], serve
) -> None:
    key = keys("upstream")
    r = repo()
    now = dt.datetime.now(dt.UTC)
    up = serve(r)
    mirror = Mirror.single(tmp_path / "m", up.url, write_keyring(tmp_path / "k.asc", [key]))
    for n in (1, 2, 3):
        r.add("bookworm", "main", "amd64", "hello", f"{n}.0")
        r.publish("bookworm", [key], date=now - dt.timedelta(hours=4 - n))
        run = mirror.sync()
        assert run.returncode == 0, run.output
        if n == 2:
            assert mirror.run("rollback", "up").returncode == 0
    store = FileStore(mirror.data)
    first, second, third = store.snapshot_ids("up")
    for snap_id in (first, second, third):
        raw = (store.root / "meta" / "up" / f"{snap_id}.json").read_bytes()
        manifest = store.read_manifest("up", snap_id)
        assert (
            manifest.id == snap_id and manifest.upstream == "up" and manifest.format == 1
        )  # format 2 only with on-demand `listed`
        assert manifest.count == len(manifest.files)
        assert json.dumps(manifest.to_json(), separators=(",", ":"), sort_keys=True).encode() == raw
        for suite in manifest.suites.values():
            assert all(path in manifest.files for path in suite.paths)
    assert store.read_manifest("up", third).packages["bookworm"]["main/amd64"] == {"hello": "3.0"}
    raw_state = (store.root / "state" / "up.json").read_bytes()
    state = store.read_state("up")
    assert state.held and store.current("up") == first
    assert state.last_sync == LastSync(
        outcome="stored", reason=None, detail=state.last_sync.detail, at=state.last_sync.at, snapshot=third
    )
    assert rollback_target(store, "up", state) == second
    assert _write(FileStore(tmp_path / "copy"), "up", state) == raw_state


def test_a_manifest_of_a_newer_format_is_refused_naming_the_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "data")
    data = json.loads(OLD_MANIFEST.read_bytes()) | {"format": 4}
    path = store.root / "meta" / "up" / f"{data['id']}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match=r"format 4 is newer than this aptguard reads \(format 3\)") as caught:
        store.read_manifest("up", data["id"])
    assert str(path) in str(caught.value)


def test_a_state_of_a_newer_format_is_refused_naming_the_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "data")
    (store.root / "state" / "up.json").parent.mkdir(parents=True)
    (store.root / "state" / "up.json").write_text(json.dumps({"format": 2, "hold": True}))
    with pytest.raises(RecordError, match="format 2 is newer") as caught:
        store.read_state("up")
    assert str(store.root / "state" / "up.json") in str(caught.value)


def test_a_manifest_missing_a_field_is_refused_naming_it(tmp_path: Path) -> None:
    data = json.loads(OLD_MANIFEST.read_bytes())
    del data["files"]
    with pytest.raises(RecordError, match=r"manifest \(meta/up/X.json\): field 'files' is missing"):
        Manifest.from_json(data, source="meta/up/X.json")
    with pytest.raises(RecordError, match="not a JSON object"):
        Manifest.from_json([], source="meta/up/X.json")


def test_state_keys_this_version_does_not_use_are_kept() -> None:
    """Early versions wrote "previous"; a state read and written again keeps it, as the old code did."""
    data = json.loads(OLD_STATE.read_bytes()) | {"previous": "20250101T000000Z"}
    state = UpstreamState.from_json(data)
    state.hold = False
    assert state.to_json() == data | {"hold": False}


def test_a_state_never_written_has_no_keys() -> None:
    """Keys appear as they are first set, as before: a fresh state is `{}`, not a page of nulls."""
    state = UpstreamState()
    assert state.to_json() == {} and not state.held and state.rollback_target("X") is None
    state.count_outcome("rejected", "bad-signature")
    assert state.to_json() == {"outcomes": {"rejected:bad-signature": 1}}


def test_a_manifest_keeps_the_parsed_file_records_without_copying_them() -> None:
    """60,000 files: from_json must cost next to nothing beside json.loads, so no object per file."""
    data = json.loads(OLD_MANIFEST.read_bytes())
    assert Manifest.from_json(data).files is data["files"]
