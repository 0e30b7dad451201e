"""Full-size index benchmark: decompress, verify and parse a Debian main/binary-amd64/Packages.xz.

    .venv/bin/python bench/parse_index.py [--index FILE] [--runs 3] [--results bench/RESULTS.md]

Without --index it uses bench/.cache/index/Packages.xz, fetched once with
`../shared/live-debian.sh --packages-only` when the archive is reachable, else generated with
the same size and shape (about 63,000 stanzas, 50 MB uncompressed). Each run is a fresh
process running the sync's own code (verify.read_index: check the download, decompress as it
streams, check the uncompressed size and hashes, parse by apt's rules) in a worker thread, as the sync does, while the event
loop ticks every millisecond: the report gives wall time, peak RSS and the longest loop block.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import lzma
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache" / "index"
LIVE = ROOT.parent / "shared" / "live-debian.sh"
REL = "main/binary-amd64/Packages"


def generate(path: Path, stanzas: int = 63_000) -> None:
    """A Packages.xz of Debian's size and shape: long descriptions, every hash field."""
    rng = random.Random(5)
    words = [w.strip() for w in "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod".split()]
    out = []
    for i in range(stanzas):
        name = f"pkg{i:05d}-{rng.choice(words)}"
        body = rng.randbytes(32)
        desc = " ".join(rng.choice(words) for _ in range(8))
        long = "\n".join(" " + " ".join(rng.choice(words) for _ in range(12)) for _ in range(rng.randint(2, 9)))
        out.append(
            f"Package: {name}\nSource: {name}-src\nVersion: 1.{i % 97}-{i % 7}+deb12u1\nInstalled-Size: {rng.randint(8, 90000)}\n"
            f"Maintainer: Example Maintainers <maint@example.invalid>\nArchitecture: amd64\n"
            f"Depends: libc6 (>= 2.34), lib{rng.choice(words)}{i % 300} (>= 1.{i % 9})\n"
            f"Description: {desc}\n{long}\nHomepage: https://software.example/{name}\n"
            f"Description-md5: {hashlib.md5(body).hexdigest()}\nTag: role::program, uitoolkit::gtk\n"
            f"Section: misc\nPriority: optional\nFilename: pool/main/{name[0]}/{name}/{name}_1.{i % 97}_amd64.deb\n"
            f"Size: {rng.randint(1000, 5_000_000)}\nMD5sum: {hashlib.md5(body).hexdigest()}\n"
            f"SHA256: {hashlib.sha256(body).hexdigest()}\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress("\n".join(out).encode(), preset=6))


def index_file(explicit: Path | None) -> tuple[Path, str]:
    if explicit:
        return explicit, "given"
    target = CACHE / "Packages.xz"
    if not target.exists() and LIVE.exists():
        proc = subprocess.run(["bash", str(LIVE), "--packages-only", str(CACHE)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"live-debian.sh --packages-only failed ({proc.stderr.strip()[:200]}); generating one")
    if (CACHE / "InRelease").exists() and target.exists():
        return target, "the archive's (fetched by live-debian.sh --packages-only)"
    if not target.exists():
        generate(target)
    return target, "generated (archive unreachable)"


def expected_entries(xz: Path) -> tuple[dict[str, str], int, dict[str, str], int]:
    """What the Release says of Packages.xz and of the uncompressed Packages (InRelease beside the file
    when there is one, else computed: the benchmark then measures the same work)."""
    inrelease = xz.with_name("InRelease")
    listed: dict[str, tuple[int, dict[str, str]]] = {}
    if inrelease.exists():
        algo = None
        names = {"MD5Sum:": "md5", "SHA1:": "sha1", "SHA256:": "sha256", "SHA512:": "sha512"}
        for line in inrelease.read_text().splitlines():
            if line in names:
                algo = names[line]
            elif algo and line.startswith(" "):
                digest, size, name = line.split()
                if name in (REL, REL + ".xz"):
                    listed.setdefault(name, (int(size), {}))[1][algo] = digest
            else:
                algo = None
    if REL + ".xz" not in listed or REL not in listed:
        data = xz.read_bytes()
        plain = lzma.decompress(data)
        listed = {
            REL + ".xz": (
                len(data),
                {"md5": hashlib.md5(data).hexdigest(), "sha256": hashlib.sha256(data).hexdigest()},
            ),
            REL: (len(plain), {"md5": hashlib.md5(plain).hexdigest(), "sha256": hashlib.sha256(plain).hexdigest()}),
        }
    (xz_size, xz_hashes), (plain_size, plain_hashes) = listed[REL + ".xz"], listed[REL]
    return xz_hashes, xz_size, plain_hashes, plain_size


def child(xz: Path) -> None:
    """One measured run (a fresh process, so peak RSS is this run's)."""
    from aptguard import verify

    xz_hashes, xz_size, plain_hashes, plain_size = expected_entries(xz)
    started = time.perf_counter()
    data = xz.read_bytes()
    got = {a: hashlib.new(a, data).hexdigest() for a in xz_hashes}  # what the fetcher computes as it streams
    xz_exp = verify.Expected(f"dists/x/{REL}.xz", xz_size, dict(xz_hashes))
    xz_exp.check(len(data), got, "index-mismatch")
    del data
    group = verify.IndexGroup(
        "Packages", REL, [xz_exp], verify.Expected(f"dists/x/{REL}", plain_size, dict(plain_hashes)), "main/amd64"
    )
    present = [(xz_exp, xz_size, got)]
    lag = 0.0

    async def main() -> list[verify.PoolFile]:
        nonlocal lag
        loop = asyncio.get_running_loop()
        done = False

        def tick(at: float) -> None:
            nonlocal lag
            lag = max(lag, loop.time() - at)
            if not done:
                loop.call_later(0.001, tick, loop.time() + 0.001)

        loop.call_later(0.001, tick, loop.time() + 0.001)
        try:
            return await asyncio.to_thread(verify.read_index, group, present, lambda _: open(xz, "rb"), 2 * 1024**3)
        finally:
            done = True

    entries = asyncio.run(main())
    seconds = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "rss_kb": rss, "lag": lag, "entries": len(entries)}))


def deb822_reference(xz: Path) -> float:
    """python-debian's deb822 parse of the same text, for reference (one run)."""
    from debian.deb822 import Packages

    text = lzma.decompress(xz.read_bytes()).decode()
    started = time.perf_counter()
    count = sum(1 for _ in Packages.iter_paragraphs(text.splitlines(keepends=True), use_apt_pkg=False))
    seconds = time.perf_counter() - started
    print(f"   python-debian deb822 (pure Python): {count} paragraphs in {seconds:.2f} s")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--deb822", action="store_true", help="also time python-debian's parser (about 4 s)")
    parser.add_argument("--results", type=Path, help="append the table to this Markdown file")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    xz, origin = index_file(args.index)
    plain_size = expected_entries(xz)[3]
    print(f"== {xz}: {xz.stat().st_size} bytes xz, {plain_size} bytes uncompressed; {origin}")
    runs = []
    for r in range(args.runs):
        out = subprocess.run([sys.executable, __file__, "--child", str(xz)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout))
        m = runs[-1]
        print(f"   run {r + 1}/{args.runs}: {m['entries']} entries in {m['seconds']:.3f} s, "
              f"peak RSS {m['rss_kb'] // 1024} MB, longest loop block {m['lag'] * 1000:.1f} ms")  # fmt: skip
    ref = deb822_reference(xz) if args.deb822 else None
    med = {k: statistics.median(m[k] for m in runs) for k in ("seconds", "rss_kb", "lag")}
    table = (
        f"### Full-size index (medians of {args.runs} runs)\n\n"
        f"{xz.name}: {origin}; {xz.stat().st_size / 1e6:.1f} MB xz, {plain_size / 1e6:.1f} MB uncompressed, "
        f"{runs[0]['entries']} packages. Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.\n\n"
        "| decompress + verify + parse | peak RSS | longest event-loop block | targets |\n|---|---|---|---|\n"
        f"| {med['seconds']:.3f} s | {med['rss_kb'] / 1024:.0f} MB | {med['lag'] * 1000:.1f} ms "
        "| ≤ 1.5 s, ≤ 300 MB, ≤ 100 ms |\n"
    )
    if ref is not None:
        table += f"\nFor reference, python-debian's pure-Python deb822 parse of the same text: {ref:.2f} s.\n"
    print()
    print(table)
    if args.results:
        with open(args.results, "a") as out:
            out.write("\n" + table)
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
