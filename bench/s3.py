"""Benchmark: one `aptguard serve` on the s3 backend against one on the local backend, same snapshot.

    .venv/bin/python bench/s3.py [--seconds 8] [--connections 16] [--big-mb 20] [--runs 3]

A signed sample upstream with a small and a large .deb is synced by the real CLI twice: into a
data folder and into a bucket of moto's S3 server on 127.0.0.1. Three servers (one worker each)
then answer the same URLs: local, s3 with pool = "serve" (objects cached in its data folder after
the first request) and s3 with pool = "redirect" (302 to a presigned URL of the store). `wrk`
measures InRelease requests/s and p99, and the .deb's MB/s where the server sends it; curl -L
measures one client's download of the .deb through each (for redirect: from the store, so the
figure is moto's, a Python server, not S3's). Medians of `--runs`; ratios s3/local.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import ensure_wrk, wrk  # noqa: E402
from fixtures.keys import make_key, write_keyring  # noqa: E402
from fixtures.repo import Repo  # noqa: E402
from fixtures.s3 import MotoServer  # noqa: E402
from fixtures.upstream import Upstream  # noqa: E402
from tests.mirror import Mirror  # noqa: E402

SUITE = "stable"


def curl_mb_s(url: str) -> float:
    """One download with redirects followed, in MiB/s."""
    out = subprocess.run(
        ["curl", "-s", "-L", "-o", "/dev/null", "-w", "%{speed_download}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out) / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--big-mb", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    binary = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="aptguard-bench-s3-"))
    moto = MotoServer(work / "moto.log").start()
    key = make_key(work, "bench")
    repo = Repo(work / "upstream", work / "debs")
    repo.add(SUITE, "main", "amd64", "hello", "1.0-1")
    repo.add(SUITE, "main", "amd64", "bigpkg", "1.0-1", size=args.big_mb * 1_000_000)
    repo.publish(SUITE, [key], by_hash=True)
    deb = repo.deb_path(SUITE, "main", "amd64", "bigpkg").relative_to(repo.root).as_posix()
    keyring = write_keyring(work / "keys" / "bench.asc", [key])
    upstream = Upstream(repo.root).start()
    bucket = moto.new_bucket()
    settings = {
        "url": upstream.url,
        "suites": [SUITE],
        "components": ["main"],
        "architectures": ["amd64"],
        "keyring": keyring,
    }
    storage = {"backend": "s3", "endpoint": moto.endpoint, "bucket": bucket, "prefix": "mirror/"}
    servers = {
        "local": Mirror(work / "local", {"example": settings}),
        "s3 serve": Mirror(work / "s3-serve", {"example": settings}, storage=storage),
        "s3 redirect": Mirror(
            work / "s3-redirect", {"example": settings}, storage=storage, server={"pool": "redirect"}
        ),
    }
    try:
        for label in ("local", "s3 serve"):
            run = servers[label].sync()
            if run.returncode != 0:
                raise RuntimeError(f"{label} sync failed:\n{run.output}")
        first: dict[str, float] = {}
        for label, server in servers.items():
            server.start_server()
            # Warm: the s3 servers fetch the files into their cache (serve) or presign (redirect).
            first[label] = float(
                subprocess.run(
                    ["curl", "-s", "-L", "-o", "/dev/null", "-w", "%{time_total}", f"{server.url}/example/{deb}"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            subprocess.run(
                ["curl", "-s", "-o", "/dev/null", f"{server.url}/example/dists/{SUITE}/InRelease"], check=True
            )
        figures: dict[str, dict[str, list[float]]] = {label: {} for label in servers}
        for n in range(args.runs):
            print(f"run {n + 1} of {args.runs} ...", flush=True)
            for label, server in servers.items():  # in turns: noise hits all alike
                small = wrk(binary, f"{server.url}/example/dists/{SUITE}/InRelease", args.seconds, args.connections)
                got = figures[label]
                got.setdefault("InRelease req/s", []).append(small["rps"])
                got.setdefault("InRelease p99 ms", []).append(small["p99_ms"])
                if label != "s3 redirect":
                    big = wrk(binary, f"{server.url}/example/{deb}", args.seconds, 4)
                    got.setdefault(".deb MB/s (wrk, 4 conns)", []).append(big["mb_s"])
                got.setdefault(".deb MB/s (one curl -L)", []).append(
                    statistics.median(curl_mb_s(f"{server.url}/example/{deb}") for _ in range(3))
                )
        for label in servers:
            figures[label]["first .deb request, ms"] = [first[label] * 1000]
        rows = list(figures["local"])
        print(f"\none server, one worker each; wrk -t2 -c{args.connections} {args.seconds}s; medians of {args.runs}")
        print(f"{'':28}" + "".join(f"{label:>14}" for label in servers) + f"{'s3/local':>11}{'redir/local':>13}")
        for row in rows:
            values = [statistics.median(figures[label][row]) if row in figures[label] else None for label in servers]
            cells = "".join(f"{v:>14,.1f}" if v is not None else f"{'-':>14}" for v in values)
            ratio = f"{values[1] / values[0]:>11.2f}" if values[0] and values[1] is not None else f"{'-':>11}"
            redir = f"{values[2] / values[0]:>13.2f}" if values[0] and values[2] is not None else f"{'-':>13}"
            print(f"{row:28}{cells}{ratio}{redir}")
    finally:
        for server in servers.values():
            server.stop_server()
        upstream.stop()
        moto.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
