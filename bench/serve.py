"""Benchmark: the embedded server (`aptguard serve`) against nginx (`aptguard nginx-config`) on one data folder.

    .venv/bin/python bench/serve.py [--seconds 8] [--connections 16] [--big-mb 20] [--workers N]

Builds a signed sample upstream with a small and a large .deb, syncs it with the real CLI,
starts both servers on 127.0.0.1 (the embedded one with `--workers N`, default: one per CPU,
as nginx's `worker_processes auto`), and runs `wrk` (Debian's package; installed if missing and
run as root) against each for a small file (InRelease), an index (Packages.xz) and the large
.deb. Prints requests/s, p99 latency, throughput and the nginx/embedded ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.keys import make_key  # noqa: E402
from tests.servers import Site  # noqa: E402


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk is missing: installing Debian's package", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    return shutil.which("wrk") or "wrk"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


def wrk(binary: str, url: str, seconds: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [binary, "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    rate = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        print(f"  warning: {url}: {(errors or socket_errors).group(0)}", flush=True)  # type: ignore[union-attr]
    return {
        "rps": rps,
        "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        "mb_s": float(rate.group(1)) * _BYTES[rate.group(2)] / (1 << 20) if rate else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--big-mb", type=int, default=20)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    binary = ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="aptguard-bench-"))
    key = make_key(work, "bench")
    site = None
    try:
        print(f"building and syncing a sample upstream under {work} ...", flush=True)
        site = Site(work, key, work / "debs", big=args.big_mb * 1_000_000, workers=args.workers)
        deb = site.repo.deb_path("stable", "main", "amd64", "bigpkg").relative_to(site.repo.root).as_posix()
        targets = {
            "InRelease (small)": "/example/dists/stable/InRelease",
            "Packages.xz (index)": "/example/dists/stable/main/binary-amd64/Packages.xz",
            f"{args.big_mb} MB .deb": f"/example/{deb}",
        }
        print(
            f"wrk: 2 threads, {args.connections} connections, {args.seconds} s per run, 127.0.0.1;"
            f" embedded server: {args.workers} worker(s)\n",
            flush=True,
        )
        header = f"{'file':<22}{'server':<10}{'req/s':>10}{'p99 ms':>10}{'MB/s':>10}"
        print(header)
        print("-" * len(header))
        ratios = []
        for label, path in targets.items():
            results = {}
            for server in ("embedded", "nginx"):
                results[server] = r = wrk(binary, site.url(server) + path, args.seconds, args.connections)
                print(f"{label:<22}{server:<10}{r['rps']:>10.0f}{r['p99_ms']:>10.2f}{r['mb_s']:>10.1f}", flush=True)
            rps_ratio = results["nginx"]["rps"] / results["embedded"]["rps"]
            p99_ratio = results["embedded"]["p99_ms"] / results["nginx"]["p99_ms"]
            ratios.append((label, rps_ratio, p99_ratio))
        print("\nratio nginx / embedded (requests/s) and embedded / nginx (p99 latency); above 1: nginx is better")
        for label, rps_ratio, p99_ratio in ratios:
            print(f"  {label:<22} requests/s {rps_ratio:5.1f}x   p99 {p99_ratio:5.1f}x")
        return 0
    finally:
        if site is not None:
            site.close()
        key.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
