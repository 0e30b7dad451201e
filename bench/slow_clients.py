"""Benchmark: a normal client's InRelease while many slow connections trickle their headers.

    .venv/bin/python bench/slow_clients.py [--connections 1100] [--every 5] [--seconds 40] [--source DIR]

Syncs a signed sample upstream with the real CLI, starts `aptguard serve` on 127.0.0.1 with the
soft open-files limit most systems give a service (1,024), opens `--connections` connections
that each send one header line every `--every` seconds and never finish their request, and
meanwhile times a normal GET of InRelease from a new connection every 2 s for `--seconds`.
Prints how many slow connections the server kept open over time, the normal client's
latencies, and how long the slow connections lived. `--source DIR` runs the server from another
copy of the package (for example `git archive HEAD aptguard | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.keys import make_key  # noqa: E402
from tests.test_serve_abuse import (  # noqa: E402
    DEFAULT_SOFT_NOFILE,
    INRELEASE,
    closed,
    start_server,
    synced_mirror,
    timed_get,  # noqa: E402
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--every", type=float, default=5)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--source", type=Path, help="run the server from this copy of the aptguard package")
    args = parser.parse_args()
    if args.source:
        os.environ["PYTHONPATH"] = str(args.source)  # the server's child process reads it
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.connections + 1000), hard))
    work = Path(tempfile.mkdtemp(prefix="agslow-"))
    key = make_key(work, "bench")
    mirror = upstream = None
    try:
        mirror, _repo, upstream = synced_mirror(work, key, work / "debs")
        start_server(mirror, DEFAULT_SOFT_NOFILE)
        assert mirror.port is not None
        print(f"server: {args.source or 'this tree'}, soft open-files limit {DEFAULT_SOFT_NOFILE} at start")
        selector = selectors.DefaultSelector()
        opened: dict[socket.socket, float] = {}
        ended: dict[socket.socket, float] = {}
        started = time.monotonic()
        while len(opened) < args.connections and time.monotonic() < started + 30:
            try:
                sock = socket.create_connection(("127.0.0.1", mirror.port), timeout=3)
            except OSError as exc:
                print(f"connection {len(opened) + 1}: {exc}")
                break  # the backlog is full: the server accepts no more
            sock.setblocking(False)
            sock.send(f"GET {INRELEASE} HTTP/1.1\r\n".encode())
            opened[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_READ)
        print(f"{len(opened)} slow connections opened in {time.monotonic() - started:.1f} s")
        burst = time.monotonic()
        latencies: list[tuple[float, float, int]] = []
        line, next_line, next_normal, next_report = 0, burst + args.every, burst + 0.5, burst + 5
        while time.monotonic() < burst + args.seconds:
            for key_, _ in selector.select(timeout=0.1):
                sock = key_.fileobj
                assert isinstance(sock, socket.socket)
                if closed(sock):
                    ended[sock] = time.monotonic()
                    selector.unregister(sock)
            now = time.monotonic()
            if now >= next_line:
                line += 1
                for sock in opened:
                    if sock not in ended:
                        try:
                            sock.send(f"X-Slow-{line}: x\r\n".encode())
                        except OSError:
                            pass
                next_line = now + args.every
            if now >= next_normal:
                took, status, _ = timed_get(mirror, INRELEASE)
                latencies.append((now - burst, took, status))
                next_normal = time.monotonic() + 2
            if now >= next_report:
                print(f"  t={now - burst:5.1f} s: {len(opened) - len(ended)} slow connections open", flush=True)
                next_report = now + 5
        for sock in opened:
            sock.close()
        selector.close()
        print("normal client, GET InRelease on a new connection (t, seconds, status; 0 = no answer in 10 s):")
        print("  " + ", ".join(f"t={t:.0f}s {took:.3f}s {status}" for t, took, status in latencies))
        answered = [took for _, took, status in latencies if status == 200]
        if answered:
            print(f"  answered {len(answered)} of {len(latencies)}; median {statistics.median(answered) * 1000:.1f} ms")
        lived = sorted(ended[s] - opened[s] for s in ended)
        if lived:
            print(
                f"slow connections closed by the server: {len(lived)} of {len(opened)}; lifetime min {lived[0]:.1f} s, "
                f"median {statistics.median(lived):.1f} s, max {lived[-1]:.1f} s"
            )
        else:
            print(f"slow connections closed by the server: none of {len(opened)} within {args.seconds:.0f} s")
        return 0
    finally:
        if mirror is not None:
            mirror.stop_server()
        if upstream is not None:
            upstream.stop()
        key.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
