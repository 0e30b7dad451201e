"""Promotion benchmark: `promote` between two snapshots of 60,000 files each must be O(1).

    .venv/bin/python bench/promote.py [--files 60000] [--runs 15] [--results bench/RESULTS.md]

Builds a data folder with two committed snapshots (pool generations and manifests, written by
store.py's snapshot builder as a sync writes them), then times snapshot.promote in-process (the symlink swap,
state write and their fsyncs) and the `aptguard promote` command's wall time (Python start-up
included), alternating between the two snapshots.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptguard import snapshot  # noqa: E402
from aptguard.records import Manifest  # noqa: E402
from aptguard.store import FileStore  # noqa: E402

APTGUARD = ROOT / ".venv" / "bin" / "aptguard"


def build(store: FileStore, files: int) -> list[str]:
    store.ensure()
    records = {}
    for i in range(files):
        data = f"package {i}\n".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.put_bytes(data, sha)
        records[f"pool/main/p/pkg{i // 1000}/pkg{i}_1.0_amd64.deb"] = {"size": len(data), "sha256": sha}
    ids = []
    for snap_id in ("20260101T000000Z", "20260102T000000Z"):
        builder = store.new_snapshot("bench", snap_id, None)
        for rel, record in records.items():
            builder.add(rel, record["sha256"], pool=True)
        builder.commit(
            Manifest.build(
                id=snap_id,
                upstream="bench",
                url="",
                created=snap_id,
                suites={},
                files=records,
                by_hash_own=[],
                packages={},
            ),
            {},
        )
        ids.append(snap_id)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agpromote-") as tmp:
        store = FileStore(Path(tmp) / "data")
        started = time.perf_counter()
        ids = build(store, args.files)
        print(f"== two snapshots of {args.files} files built in {time.perf_counter() - started:.1f} s")
        keyring = Path(tmp) / "key.asc"
        keyring.write_text("not read by promote\n")
        config = Path(tmp) / "aptguard.toml"
        config.write_text(
            f'data_dir = "{store.root}"\n[upstreams.bench]\nurl = "http://mirror.example/bench/"\n'
            f'suites = ["bench"]\ncomponents = ["main"]\narchitectures = ["amd64"]\nkeyring = "{keyring}"\n'
        )
        inside, wall = [], []
        for r in range(args.runs):
            target = ids[r % 2]
            t = time.perf_counter()
            snapshot.promote(store, "bench", target)
            inside.append(time.perf_counter() - t)
            assert store.current("bench") == target
        for r in range(max(3, args.runs // 3)):
            target = ids[(r + 1) % 2]
            t = time.perf_counter()
            subprocess.run([str(APTGUARD), "--config", str(config), "promote", "bench", target], check=True,
                           capture_output=True)  # fmt: skip
            wall.append(time.perf_counter() - t)
            assert store.current("bench") == target
    table = (
        f"### Promotion (snapshots of {args.files} files; medians of {len(inside)} and {len(wall)} runs)\n\n"
        f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.\n\n"
        "| snapshot.promote (in process) | `aptguard promote` (CLI wall, start-up included) | target |\n"
        "|---|---|---|\n"
        f"| {statistics.median(inside) * 1000:.1f} ms (max {max(inside) * 1000:.1f}) "
        f"| {statistics.median(wall) * 1000:.0f} ms | < 50 ms, O(1) |\n"
    )
    print(table)
    if args.results:
        with open(args.results, "a") as out:
            out.write("\n" + table)


if __name__ == "__main__":
    main()
