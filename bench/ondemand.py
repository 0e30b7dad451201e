"""Benchmark: on-demand pool files (`policy = "on-demand"`): a miss, a hit, and the upstream itself.

    .venv/bin/python bench/ondemand.py [--runs 3] [--big-mb 100]

A signed upstream served by nginx on 127.0.0.1 holds, per run, one 64 KiB and one large .deb
(new names each run, so every run's first request is a real miss). aptguard syncs it on demand
(indices only) and serves it (`aptguard serve`, one worker). curl measures time to first byte
and total time of: the file straight from the upstream's nginx; the first request through
aptguard (a miss: downloaded, verified, stored, then sent); the second (a hit). A miss answers
only once the whole file is verified, so its time to first byte is the upstream's whole
transfer plus hashing; streaming while hashing would start sooner but could not take back bytes
sent before a mismatch shows. Medians of --runs; ratios to the upstream.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_vs_aptly import Nginx  # noqa: E402

from fixtures.keys import make_key, write_keyring  # noqa: E402
from fixtures.repo import Repo  # noqa: E402
from tests.mirror import Mirror  # noqa: E402

SUITE = "stable"


def curl(url: str) -> tuple[float, float]:
    """(time to first byte, total), in milliseconds."""
    out = subprocess.run(
        ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{time_starttransfer} %{time_total}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]) * 1000, float(out[1]) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-mb", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aptguard-bench-ondemand-"))
    key = make_key(work, "bench")
    repo = Repo(work / "upstream", work / "debs")
    sizes = {"64 KiB": 64 * 1024, f"{args.big_mb} MB": args.big_mb * 1_000_000}
    names = {}
    for run in range(args.runs):
        for label, size in sizes.items():
            name = f"pkg-{label.split()[0]}-{run}"
            repo.add(SUITE, "main", "amd64", name, "1.0-1", size=size)
            names[(run, label)] = repo.deb_path(SUITE, "main", "amd64", name).relative_to(repo.root).as_posix()
    repo.publish(SUITE, [key], by_hash=True)
    keyring = write_keyring(work / "keys" / "bench.asc", [key])
    nginx = Nginx(work / "nginx", repo.root)
    mirror = Mirror.single(work / "mirror", nginx.url(""), keyring, suites=[SUITE], policy="on-demand", name="up")
    try:
        run = mirror.sync()
        if run.returncode != 0:
            raise RuntimeError(run.output)
        mirror.start_server()
        figures: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for n in range(args.runs):
            print(f"run {n + 1} of {args.runs} ...", flush=True)
            for label in sizes:
                path = names[(n, label)]
                figures.setdefault((label, "upstream (nginx)"), []).append(curl(nginx.url(path)))
                figures.setdefault((label, "miss"), []).append(curl(f"{mirror.url}/up/{path}"))
                figures.setdefault((label, "hit"), []).append(curl(f"{mirror.url}/up/{path}"))
        print(f"\nmedians of {args.runs}; ms")
        print(f"{'file':10}{'request':20}{'first byte':>12}{'total':>10}{'total / upstream':>18}")
        for label in sizes:
            base = statistics.median(t for _f, t in figures[(label, "upstream (nginx)")])
            for kind in ("upstream (nginx)", "miss", "hit"):
                first = statistics.median(f for f, _t in figures[(label, kind)])
                total = statistics.median(t for _f, t in figures[(label, kind)])
                print(f"{label:10}{kind:20}{first:>12.1f}{total:>10.1f}{total / base:>18.2f}")
    finally:
        mirror.stop_server()
        nginx.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
