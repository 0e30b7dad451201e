"""What the operators' views need of a snapshot, read once instead of at every request.

A snapshot's manifest lists every file it holds: tens of MB of JSON for 60,000 files, about
0.15 s to parse. `status`, `/status`, `/` and `/metrics` need a few lines of it: when the
snapshot was made, each suite's Release Date and Valid-Until, how many files and bytes. A
committed snapshot never changes (store.Tree.commit), so its summary is computed once and
kept in memory, keyed by (data folder, upstream, snapshot id), for the life of the process.

The server must not parse a big manifest on its event loop, nor in one of its threads: json's
parser holds the GIL for the whole file, which stalls the event loop just the same. So
`prepare` computes a missing summary in a child process (`python -m aptguard.summary MANIFEST`,
which prints it), once per snapshot however many requests wait for it; the CLI, which runs once
and has no event loop, calls `load` and parses in process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aptguard.records import Manifest
from aptguard.store import FileStore

# Summaries are a few hundred bytes; this bounds a server that runs for years of promotions.
_LIMIT = 4096
_CHILD_TIMEOUT = 300.0
_known: OrderedDict[tuple[str, str, str], dict[str, Any]] = OrderedDict()
_lock = threading.Lock()  # load() runs in the server's worker threads
_pending: dict[tuple[str, str, str], asyncio.Task[None]] = {}


def of_manifest(manifest: Manifest) -> dict[str, Any]:
    """The summary of one snapshot, from its manifest."""
    view = manifest.published  # a published view: clients read the mirror's Releases, not the upstream's
    summary: dict[str, Any] = {
        "created": manifest.created,
        "suites": {
            suite: {
                "date": view.date if view else meta.date,
                "valid_until": view.valid_until if view else meta.valid_until,
            }
            for suite, meta in manifest.suites.items()
        },
        "files": manifest.count,
        "bytes": manifest.bytes,
    }
    if view is not None:
        summary["published"] = {"keys": [k.to_json() for k in view.keys], "packages": view.packages}
    return summary


def _key(store: FileStore, name: str, snap_id: str) -> tuple[str, str, str]:
    return (str(store.root), name, snap_id)


def known(store: FileStore, name: str, snap_id: str) -> dict[str, Any] | None:
    """The summary if this process already has it, without touching the disk."""
    with _lock:
        return _known.get(_key(store, name, snap_id))


def _remember(key: tuple[str, str, str], summary: dict[str, Any]) -> None:
    with _lock:
        _known[key] = summary
        _known.move_to_end(key)
        while len(_known) > _LIMIT:
            _known.popitem(last=False)


def load(store: FileStore, name: str, snap_id: str) -> dict[str, Any]:
    """The summary of a committed snapshot, parsing its manifest only the first time.

    Raises FileNotFoundError when the snapshot has no manifest: that is checked every time (one
    stat), since a manifest gone from under a served snapshot is damage `status` must report."""
    if not store.has_manifest(name, snap_id):
        raise FileNotFoundError(f"{store.manifest_label(name, snap_id)}: no manifest")
    found = known(store, name, snap_id)
    if found is None:
        found = of_manifest(store.read_manifest(name, snap_id))
        _remember(_key(store, name, snap_id), found)
    return found


async def prepare(store: FileStore, wanted: Iterable[tuple[str, str]]) -> None:
    """Have the summaries of these (upstream, snapshot id) in memory before `load` is called.

    Each missing one is computed in a child process, one child per snapshot however many
    requests wait. A child that fails is reported on stderr and left to `load`, which then
    parses in process and raises what is wrong with the manifest."""
    if store.remote:  # the s3 store keeps the parsed manifests it read: load() is quick after the first
        return
    for name, snap_id in wanted:
        key = _key(store, name, snap_id)
        if known(store, name, snap_id) is not None or not store.has_manifest(name, snap_id):
            continue
        task = _pending.get(key)
        if task is None:
            task = asyncio.ensure_future(_compute_in_child(key))
            _pending[key] = task
            task.add_done_callback(lambda done, key=key: _settled(key, done))
        try:
            await asyncio.shield(task)
        except Exception as exc:  # noqa: BLE001 - load() reports it, in the request that needs it
            print(f"aptguard: summary of {name} {snap_id} in a child process failed: {exc}", file=sys.stderr)


def _settled(key: tuple[str, str, str], task: asyncio.Task[None]) -> None:
    _pending.pop(key, None)
    if not task.cancelled():
        task.exception()  # retrieved here too: every waiter may have gone (clients hung up)


async def _compute_in_child(key: tuple[str, str, str]) -> None:
    """key: (data folder, upstream, snapshot id)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aptguard.summary",
        *key,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _CHILD_TIMEOUT)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(err.decode(errors="replace").strip()[-500:] or f"exit {proc.returncode}")
    _remember(key, json.loads(out))


def main(argv: list[str]) -> int:
    """`python -m aptguard.summary DATA_DIR NAME ID`: print the summary of one snapshot as JSON."""
    if len(argv) != 3:
        print("usage: python -m aptguard.summary DATA_DIR NAME ID", file=sys.stderr)
        return 2
    print(json.dumps(of_manifest(FileStore(Path(argv[0])).read_manifest(argv[1], argv[2]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
