"""Benchmark: does a client looping on /status, / or /metrics slow down InRelease?

    .venv/bin/python bench/status_load.py [--files 60000] [--seconds 6] [--loopers 2] [--source DIR]

Builds a data folder holding one committed snapshot of `--files` files, written through store.py
as a sync writes one (objects, a hard-link tree, and a manifest of the shape sync.py writes:
every file with its size and hashes, each suite's paths, the package listing), plus a state
file with a last sync and a trusted key. Its dists/stable/InRelease is a plain file: the server
does not verify what it serves, it serves what the store holds. Then starts `aptguard serve`
on 127.0.0.1 and measures, from one keep-alive connection, the latency of GET InRelease for
`--seconds`: once alone, then while `--loopers` other processes request /status (then /, then
/metrics) in a loop. `--source DIR` runs the server from another copy of the package (for
example `git archive HEAD aptguard | tar -x -C DIR`) to compare before and after a change.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aptguard.records import Manifest, UpstreamState  # noqa: E402
from aptguard.store import FileStore  # noqa: E402

SNAP = "20260101T000000Z"
INRELEASE = "/bench/dists/stable/InRelease"


def build(store: FileStore, files: int) -> int:
    """One snapshot of `files` files; returns the manifest's size in bytes."""
    store.ensure()
    records: dict[str, dict[str, object]] = {}
    listing: dict[str, str] = {}
    for i in range(files):
        data = f"package {i}\n".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.put_bytes(data, sha)
        rel = f"pool/main/p/pkg{i // 1000}/pkg{i}_1.0-1_amd64.deb"
        records[rel] = {"size": len(data), "md5": hashlib.md5(data).hexdigest(), "sha256": sha}
        listing[f"pkg{i}"] = "1.0-1"
    release = b"Origin: bench\nSuite: stable\nDate: Thu, 01 Jan 2026 00:00:00 UTC\n"
    sha = hashlib.sha256(release).hexdigest()
    store.put_bytes(release, sha)
    records["dists/stable/InRelease"] = {"size": len(release), "sha256": sha}
    builder = store.new_snapshot("bench", SNAP, None)
    for rel, record in records.items():
        builder.add(rel, str(record["sha256"]), pool=rel.startswith("pool/"))
    suite = {
        "date": "2026-01-01T00:00:00+00:00",
        "valid_until": "2036-01-01T00:00:00+00:00",
        "origin": "bench",
        "label": "bench",
        "codename": "stable",
        "suite": "stable",
        "acquire_by_hash": False,
        "signers": ["0" * 40],
        "signed": {"InRelease": sha},
        "paths": sorted(records),
    }
    manifest = {
        "format": 1,
        "id": SNAP,
        "upstream": "bench",
        "url": "http://upstream.invalid/bench/",
        "created": "2026-01-01T00:00:00Z",
        "suites": {"stable": suite},
        "files": records,
        "by_hash_own": [],
        "packages": {"stable": {"main/binary-amd64": listing}},
        "count": len(records),
        "bytes": sum(int(r["size"]) for r in records.values()),  # type: ignore[call-overload]
    }
    builder.commit(Manifest.from_json(manifest), {})
    store.set_current("bench", SNAP, expect=store.current("bench"))
    at = "2026-01-01T00:00:00+00:00"
    store.write_state(
        "bench",
        UpstreamState.from_json(
            {
                "last_sync": {"outcome": "promoted", "reason": None, "detail": "", "at": at, "snapshot": SNAP},
                "last_success": at,
                "outcomes": {"promoted:": 1},
                "keys": [{"fingerprint": "0" * 40, "uid": "bench", "expires": "2036-01-01T00:00:00+00:00"}],
            }
        ),
    )
    return len(json.dumps(manifest, separators=(",", ":")))  # about the manifest's size on disk


def loop(url: str, path: str, seconds: float) -> None:
    """A looping client (run in its own process): GET `path` for `seconds`; prints requests and median."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    took: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(took) < 1_000_000:
        t = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        took.append(time.perf_counter() - t)
    print(json.dumps({"requests": len(took), "median_ms": statistics.median(took) * 1000 if took else None}))


def measure(url: str, seconds: float) -> list[float]:
    """InRelease latencies (s) from one keep-alive connection, one request every 10 ms."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    took: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(took) < 100_000:
        t = time.perf_counter()
        conn.request("GET", INRELEASE)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        took.append(time.perf_counter() - t)
        time.sleep(0.01)
    conn.close()
    return took


def start_server(config: Path, port: int, source: Path | None, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    cmd = [sys.executable, "-m", "aptguard", "--config", str(config), "serve", "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))  # noqa: SIM115
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", INRELEASE)
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()) from None
            time.sleep(0.1)
    raise RuntimeError("aptguard serve did not answer within 30 s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def figures(took: list[float]) -> str:
    ms = sorted(t * 1000 for t in took)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{len(ms):>6} {statistics.median(ms):>9.1f} {p99:>9.1f} {ms[-1]:>9.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=60_000)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--loopers", type=int, default=2)
    parser.add_argument("--source", type=Path, help="run the server from this copy of the aptguard package")
    parser.add_argument("--loop", nargs=3, metavar=("URL", "PATH", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop:
        loop(args.loop[0], args.loop[1], float(args.loop[2]))
        return 0
    with tempfile.TemporaryDirectory(prefix="agstatus-") as tmp:
        work = Path(tmp)
        store = FileStore(work / "data")
        started = time.perf_counter()
        size = build(store, args.files)
        print(
            f"snapshot of {args.files} files built in {time.perf_counter() - started:.1f} s; manifest {size / 1e6:.1f} MB"
        )
        (work / "key.asc").write_text("not read by serve\n")
        config = work / "aptguard.toml"
        config.write_text(
            f'data_dir = "{store.root}"\n[upstreams.bench]\nurl = "http://upstream.invalid/bench/"\n'
            'suites = ["stable"]\ncomponents = ["main"]\narchitectures = ["amd64"]\nkeyring = "key.asc"\n'
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(config, port, args.source, work / "serve.log")
        try:
            print(f"server: {args.source or ROOT}; InRelease from one keep-alive connection, {args.seconds} s per row")
            print(f"{'while':<28}{'requests':>8}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}   loopers")
            print(f"{'(alone)':<28}  {figures(measure(url, args.seconds))}", flush=True)
            for path in ("/status", "/", "/metrics"):
                loopers = [
                    subprocess.Popen(
                        [sys.executable, __file__, "--loop", url, path, str(args.seconds + 1)],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(args.loopers)
                ]
                took = measure(url, args.seconds)
                done = [json.loads(p.communicate(timeout=120)[0]) for p in loopers]
                rates = ", ".join(f"{d['requests']} req (p50 {d['median_ms']:.1f} ms)" for d in done)
                print(f"{f'{args.loopers} clients looping on {path}':<28}  {figures(took)}   {rates}", flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
