"""Sync benchmark: aptguard against aptly, apt-mirror2 and the local-disk floor, side by side.

    .venv/bin/python bench/sync_vs_aptly.py [--runs 3] [--shapes small,large,debian] [--results bench/RESULTS.md]
        [--tools aptguard,aptly,...] [--baseline GIT-REV] [--log FILE] [--no-entries]

An upstream of real signed .debs (fixtures/repo.py, fixtures/keys.py) is served by nginx on
127.0.0.1. For each shape and each run, every tool starts from an empty folder and does three
phases: cold (nothing local), no-op (upstream unchanged) and incremental (+5% new packages).
The `debian` shape is Debian-sized: 60,000 packages of 512 bytes in Debian's pool layout,
written directly in Python (bench/debian_shape.py: no tool opens a .deb during a sync), and its
incremental phase is +1% new packages and 1% upgraded (a new version, the old one gone).
The tools take turns inside each run, so machine noise hits them alike; the table gives medians
of wall time and peak RSS (per process, from /usr/bin/time), and the ratios aptguard/aptly and
aptguard/floor. `--baseline REV` adds aptguard as of that git revision as one more tool, run
the same way in the same turns, for a before/after of a change (ratio aptguard/baseline).

After the timed runs of a shape, one more incremental sync of aptguard (and of the baseline)
runs under strace, untimed, from a fresh cold sync of A into a folder of its own: the bench counts
the filesystem entries it made, removed or renamed inside the data folder (mkdir, link, symlink,
rename, unlink, rmdir, and open with O_CREAT that succeeded), against the pool files that differ
between A and B. Making and promoting a snapshot should touch O(change) entries, not O(archive).
`--no-entries` skips it.
See the README, "Benchmarks".
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import filecmp
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import debian_shape  # noqa: E402

from fixtures.keys import make_key, write_keyring  # noqa: E402
from fixtures.repo import Repo  # noqa: E402

CACHE = ROOT / "bench" / ".cache"
PEERS_VENV = ROOT / "bench" / ".venv-peers"
APTGUARD = ROOT / ".venv" / "bin" / "aptguard"
SUITE = "bench"


@dataclass(frozen=True)
class Shape:
    count: int
    size: int
    new: int = 5  # % of packages added for the incremental phase
    upgraded: int = 0  # % of packages at a new version in it (new pool file, the old one gone)
    written: bool = False  # pool and indices written directly (bench/debian_shape.py), not real .debs

    def __str__(self) -> str:
        return f"{self.count} packages × " + (f"{self.size // 1024} KiB" if self.size >= 1024 else f"{self.size} B")

    @property
    def incremental(self) -> str:
        return f"+{self.new}% new" + (f", {self.upgraded}% upgraded" if self.upgraded else "")


SHAPES = {
    "small": Shape(1000, 64 * 1024),
    "large": Shape(100, 4 * 1024 * 1024),
    "tiny": Shape(40, 4096),
    # Debian bookworm main amd64: 63,440 packages in about 35,000 source folders.
    "debian": Shape(60_000, 512, new=1, upgraded=1, written=True),
    "debian-tiny": Shape(1200, 512, new=1, upgraded=1, written=True),
}
PHASES = ("cold", "no-op", "incremental")
TOOLS = ("aptguard", "aptly", "apt-mirror2", "floor")
LOG: Path | None = None  # --log: every command's output, appended
STRACE = Path("/usr/bin/strace")
# The system calls that make, remove or rename a directory entry (open only with O_CREAT).
TRACED = "mkdir,mkdirat,link,linkat,symlink,symlinkat,rename,renameat,renameat2,unlink,unlinkat,rmdir,open,openat,creat"
ENTRY_KINDS = ("mkdir", "link", "symlink", "rename", "unlink", "rmdir", "create")
# KEEP: no tool's folder is removed before every timed run of every shape is over. ext4 (without
# a journal, as on the machines here) does not reuse an inode deleted within the last 5 s, or 300 s
# while its inode table block is dirty: each new inode is found by walking past every recently
# deleted one (find_inode_bit -> recently_deleted). A cold sync right after another tool's folder
# was removed paid for that removal: perf showed a quarter of all CPU samples there, and the
# small shape's cold sync took 1.26-1.37 s after `rm -rf` of the last one against 0.92-1.07 s
# without (aptly's update 0.87-1.06 s against 0.63-0.65 s; aptly creates more inodes, so it paid
# more). The bench's disk use grows to the sum of every run's folders (about 12 GB with every
# shape and tool) and is freed at the end.


@dataclass
class Measure:
    seconds: float
    rss_kb: int


@dataclass
class Entries:
    """What one traced incremental sync did to the data folder, and the change it mirrored."""

    kinds: dict[str, int]  # ENTRY_KINDS -> successful calls on an entry inside the data folder
    unattributed: int  # successful calls on a path relative to a folder strace could not name
    changed: int  # pool files that differ between A and B (new, changed or gone)
    total: int  # pool files in B

    @property
    def touched(self) -> int:
        return sum(self.kinds.values())

    def line(self, tool: str) -> str:
        kinds = ", ".join(f"{k} {self.kinds[k]}" for k in ENTRY_KINDS)
        unknown = f"; {self.unattributed} more calls on paths not attributable" if self.unattributed else ""
        return (
            f"{tool} incremental: {self.touched} filesystem entries touched ({kinds}) "
            f"for {self.changed} changed pool files of {self.total}{unknown}"
        )


@dataclass
class Table:
    shape: str
    # (tool, phase) -> measures over runs
    runs: dict[tuple[str, str], list[Measure]] = field(default_factory=dict)
    entries: dict[str, Entries] = field(default_factory=dict)  # tool -> its traced incremental

    def add(self, tool: str, phase: str, m: Measure) -> None:
        self.runs.setdefault((tool, phase), []).append(m)

    def median(self, tool: str, phase: str) -> Measure | None:
        got = self.runs.get((tool, phase))
        if not got:
            return None
        return Measure(statistics.median(m.seconds for m in got), int(statistics.median(m.rss_kb for m in got)))


# ---------------------------------------------------------------- processes


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True) -> Measure:
    """Run one command; wall time and its peak RSS.

    The RSS comes from /usr/bin/time (%M): a child forked from this Python process would report
    this process's size as its high-water mark, since ru_maxrss survives execve."""
    with tempfile.NamedTemporaryFile(prefix="agbench-rss-") as rss:
        started = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
        )
        seconds = time.perf_counter() - started
        peak = int(Path(rss.name).read_text().split()[-1])
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout.decode(errors='replace')[-3000:]}")
    run.last_output = proc.stdout.decode(errors="replace")  # type: ignore[attr-defined]
    if LOG is not None:
        with open(LOG, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n# {seconds:.3f} s, {peak // 1024} MB\n{run.last_output}\n")  # type: ignore[attr-defined]
    return Measure(seconds, peak)


def disk_use(folder: Path) -> str:
    out = subprocess.run(["du", "-sh", str(folder)], capture_output=True, text=True).stdout.split()
    return out[0] if out else "?"


def steps(*cmds: Callable[[], Measure]) -> Measure:
    """Several commands as one phase: summed wall time, the largest peak RSS."""
    got = [c() for c in cmds]
    return Measure(sum(m.seconds for m in got), max(m.rss_kb for m in got))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx serving `www` on 127.0.0.1 from a private prefix (no system config touched)."""

    def __init__(self, prefix: Path, www: Path) -> None:
        self.prefix = prefix
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"  {t}_temp_path {prefix}/{t}_temp;\n" for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n"
            f"  default_type application/octet-stream;\n{temps}"
            f"  server {{ listen 127.0.0.1:{self.port}; root {www}; }}\n}}\n"
        )
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log"),
             "-g", "daemon off;"],
        )  # fmt: skip
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {(prefix / 'error.log').read_text()}")

    def url(self, rel: str) -> str:
        return f"http://127.0.0.1:{self.port}/{rel}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the upstream


def build_upstream(work: Path, shape: Shape) -> tuple[Path, Path, Path, int]:
    """Two published states of one suite: A (count packages) and B (A + new% new packages, and
    upgraded% of A's at a new version); the keyring; how many packages B adds."""
    key = make_key(work / "keys", "bench")
    count = shape.count
    extra = max(1, count * shape.new // 100)
    try:
        keyring = write_keyring(work / "keys" / "bench.gpg", [key], armored=False)
        if shape.written:
            upgraded = max(1, count * shape.upgraded // 100) if shape.upgraded else 0
            root_a, root_b = debian_shape.build(work / "up", SUITE, key, count, shape.size, extra, upgraded)
            return root_a, root_b, keyring, extra
        if shape.upgraded:
            raise ValueError("upgrades are only in written shapes (bench/debian_shape.py)")
        roots = []
        for label, n in (("A", count), ("B", count + extra)):
            repo = Repo(work / "up" / label, CACHE / "debs")
            for i in range(n):
                repo.add(SUITE, "main", "amd64", f"pkg{i:05d}", "1.0-1", size=shape.size)
            # B is published a second later: its Release Date is newer, as a real update's is.
            if label == "B":
                time.sleep(1.1)
            repo.publish(SUITE, [key], translations=False)
            roots.append(repo.root)
    finally:
        key.close()
    return roots[0], roots[1], keyring, extra


def point(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def tree_files(root: Path) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of every file, symlinks followed."""
    found = {}
    for folder, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            path = Path(folder) / name
            st = path.stat()
            found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


def count_debs(root: Path) -> int:
    """The .deb files served under root: symlinked folders followed (a snapshot's pool folders
    may be links to a shared tree)."""
    return sum(1 for _f, _d, files in os.walk(root, followlinks=True) for n in files if n.endswith(".deb"))


def pool_diff(root_a: Path, root_b: Path) -> tuple[int, int]:
    """Pool files that differ between two upstream trees (new in B, gone from A, or other
    bytes), and how many B has."""
    a, b = (set(tree_files(root / "pool")) if (root / "pool").is_dir() else set() for root in (root_a, root_b))
    changed = len(a ^ b)
    for rel in a & b:
        fa, fb = root_a / "pool" / rel, root_b / "pool" / rel
        if not os.path.samefile(fa, fb) and not filecmp.cmp(fa, fb, shallow=False):
            changed += 1
    return changed, len(b)


# ---------------------------------------------------------------- strace


def split_args(text: str) -> list[str]:
    """strace's argument list split at its top-level commas (quotes and <...>, [...], {...} kept)."""
    args, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "<[{(":
            depth += 1
        elif c in ">]})":
            depth -= 1
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    args.append(text[start:].strip())
    return args


def strace_path(dirfd: str | None, arg: str, cwd: Path) -> str | None:
    """The absolute path a call names, from its path argument and its dirfd (decorated by -y:
    `5</the/folder>`, `AT_FDCWD</cwd>`); None when that folder is unknown."""
    if not arg.startswith('"'):
        return None  # NULL or an address strace could not read
    path = arg[1 : arg.rindex('"')]
    if path.startswith("/"):
        return os.path.normpath(path)
    if dirfd is None or dirfd.startswith("AT_FDCWD"):
        base = dirfd[len("AT_FDCWD<") : -1] if dirfd and dirfd.endswith(">") else str(cwd)
    elif "<" in dirfd and dirfd.endswith(">"):
        base = dirfd[dirfd.index("<") + 1 : -1]
    else:
        return None
    return os.path.normpath(os.path.join(base, path))


# call -> (kind, [(dirfd index or None, path index)]): the entries it makes, removes or renames.
CALLS: dict[str, tuple[str, list[tuple[int | None, int]]]] = {
    "mkdir": ("mkdir", [(None, 0)]),
    "mkdirat": ("mkdir", [(0, 1)]),
    "link": ("link", [(None, 1)]),
    "linkat": ("link", [(2, 3)]),
    "symlink": ("symlink", [(None, 1)]),
    "symlinkat": ("symlink", [(1, 2)]),
    "rename": ("rename", [(None, 0), (None, 1)]),
    "renameat": ("rename", [(0, 1), (2, 3)]),
    "renameat2": ("rename", [(0, 1), (2, 3)]),
    "unlink": ("unlink", [(None, 0)]),
    "unlinkat": ("unlink", [(0, 1)]),  # rmdir with AT_REMOVEDIR
    "rmdir": ("rmdir", [(None, 0)]),
    "open": ("create", [(None, 0)]),  # only with O_CREAT
    "openat": ("create", [(0, 1)]),
    "creat": ("create", [(None, 0)]),
}


RETURNED = re.compile(r"(.*)\)\s+=\s+(\S.*)")  # the arguments (up to the last `) =`) and the result


def count_entries(trace: Path, data_dir: Path, cwd: Path) -> tuple[dict[str, int], int]:
    """Successful calls of `strace -f -y -e trace=TRACED` that made, removed or renamed an entry
    inside data_dir, by kind; and how many successful ones named a path relative to an unknown folder."""
    roots = {str(data_dir), os.path.realpath(data_dir)}
    kinds = dict.fromkeys(ENTRY_KINDS, 0)
    unattributed = 0
    pending: dict[str, str] = {}  # pid -> a call's text before <unfinished ...>
    with open(trace, errors="replace") as lines:
        for line in lines:
            pid, _, text = line.rstrip("\n").partition(" ")
            text = text.lstrip()
            if text.endswith("<unfinished ...>"):
                pending[pid] = text[: -len("<unfinished ...>")].rstrip()
                continue
            if text.startswith("<... "):
                head = pending.pop(pid, None)
                if head is None:
                    continue
                text = head + text.partition(" resumed>")[2]
            name, paren, rest = text.partition("(")
            if not paren or name not in CALLS:
                continue
            ended = RETURNED.fullmatch(rest)  # strace pads short calls: `mkdir("/x", 0777)       = 0`
            if ended is None or ended[2].startswith(("-1", "?")):
                continue  # failed or never returned: no entry touched
            args_text = ended[1]
            args = split_args(args_text)
            kind, places = CALLS[name]
            if kind == "create":
                flags = args[2] if name == "openat" else args[1]
                if name != "creat" and "O_CREAT" not in flags:
                    continue
            if name == "unlinkat" and "AT_REMOVEDIR" in args[2]:
                kind = "rmdir"
            paths = [strace_path(args[d] if d is not None else None, args[p], cwd) for d, p in places]
            if any(p is not None and any(p == r or p.startswith(r + "/") for r in roots) for p in paths):
                kinds[kind] += 1
            elif any(p is None for p in paths):
                unattributed += 1
    return kinds, unattributed


# ---------------------------------------------------------------- the tools


class Tool:
    name = ""

    def __init__(self, work: Path, nginx: Nginx, keyring: Path, shape: Shape) -> None:
        self.work = work
        self.nginx = nginx
        self.keyring = keyring
        self.shape = shape
        work.mkdir(parents=True)

    def phase(self, phase: str) -> Measure:
        raise NotImplementedError

    def debs(self) -> int:
        raise NotImplementedError


class Aptguard(Tool):
    name = "aptguard"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.config = self.work / "aptguard.toml"
        self.config.write_text(
            f'data_dir = "{self.work / "data"}"\n[upstreams.bench]\nurl = "{self.nginx.url("repo/")}"\n'
            f'suites = ["{SUITE}"]\ncomponents = ["main"]\narchitectures = ["amd64"]\nlanguages = []\n'
            f'keyring = "{self.keyring}"\n'
        )

    tree = ROOT

    def phase(self, phase: str, wrap: tuple[str, ...] = ()) -> Measure:
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        # Run from the tool's own folder: `python -m` puts the working directory first on sys.path,
        # so from a checkout's root it would import that checkout's aptguard, not self.tree's.
        cmd = [*wrap, sys.executable, "-m", "aptguard", "--config", str(self.config), "sync"]
        m = run(cmd, env=env, cwd=self.work)
        out = run.last_output  # type: ignore[attr-defined]
        want = "unchanged" if phase == "no-op" else "promoted"
        if f"bench: {want}" not in out:
            raise RuntimeError(f"{self.name} {phase}: expected {want!r}, got:\n{out}")
        return m

    def traced_incremental(self, trace: Path) -> tuple[dict[str, int], int]:
        """One incremental sync under strace (upstream already switched to B); the entries it
        made, removed or renamed in the data folder, by kind, and the calls not attributable."""
        self.phase("incremental", (str(STRACE), "-f", "-qq", "-y", "-e", f"trace={TRACED}", "-o", str(trace)))
        return count_entries(trace, self.work / "data", self.work)

    def debs(self) -> int:
        """The .deb files the current snapshot lists, each one served (a snapshot's pool folder
        may also hold files of its siblings: they are not what it serves to apt)."""
        from aptguard.store import FileStore

        store = FileStore(self.work / "data")
        current = store.current("bench")
        if current is None:
            return 0
        listed = [p for p in store.read_manifest("bench", current).files if p.endswith(".deb")]
        return sum(1 for p in listed if store.served_file("current", ("bench",), p.split("/")))


class AptguardS3(Aptguard):
    """aptguard syncing into a bucket of moto's S3 server on 127.0.0.1 (started once, a bucket per run)."""

    name = "aptguard-s3"
    moto = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        from fixtures.s3 import MotoServer

        if AptguardS3.moto is None:
            CACHE.mkdir(parents=True, exist_ok=True)
            AptguardS3.moto = MotoServer(CACHE / "moto.log").start()
            atexit.register(AptguardS3.moto.stop)
        bucket = AptguardS3.moto.new_bucket()
        self.config.write_text(self.config.read_text() + "\n" + AptguardS3.moto.storage_toml(bucket))

    def debs(self) -> int:
        """The .deb files the current snapshot lists whose object is in the bucket."""
        from aptguard.config import load_config
        from aptguard.store import open_store

        store = open_store(load_config(self.config))
        current = store.current("bench")
        if current is None:
            return 0
        listed = store.read_manifest("bench", current).files
        return sum(1 for p, r in listed.items() if p.endswith(".deb") and store.object_size(r["sha256"]) is not None)


class AptguardOnDemand(Aptguard):
    """aptguard with policy = "on-demand": indices verified and stored, no pool file fetched."""

    name = "aptguard-ondemand"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.config.write_text(self.config.read_text() + 'policy = "on-demand"\n')

    def debs(self) -> int:
        """The .deb files the current snapshot lists (held or on demand)."""
        from aptguard.store import FileStore

        store = FileStore(self.work / "data")
        current = store.current("bench")
        if current is None:
            return 0
        manifest = store.read_manifest("bench", current)
        return sum(1 for p in [*manifest.files, *manifest.listed] if p.endswith(".deb"))


class Baseline(Aptguard):
    """aptguard at another git revision (--baseline), exported to a folder of its own."""

    name = "baseline"
    tree = ROOT


class Aptly(Tool):
    name = "aptly"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.config = self.work / "aptly.conf"
        self.config.write_text(
            json.dumps(
                {
                    "rootDir": str(self.work / "root"),
                    "downloadConcurrency": 4,
                    "architectures": ["amd64"],
                    "gpgDisableVerify": False,
                    "gpgDisableSign": True,
                    "gpgProvider": "gpg",
                    "skipContentsPublishing": True,
                }
            )
        )
        self.snapshots = 0
        self.env = {**os.environ, "HOME": str(self.work)}  # aptly and gpg keep nothing in the real home
        run(self._cmd("mirror", "create", f"-keyring={self.keyring}", "-architectures=amd64", "bench",
                      self.nginx.url("repo/"), SUITE, "main"), env=self.env)  # fmt: skip

    def _cmd(self, *args: str) -> list[str]:
        return ["aptly", f"-config={self.config}", *args]

    def phase(self, phase: str) -> Measure:
        self.snapshots += 1
        snap = f"s{self.snapshots}"
        publish = (
            self._cmd("publish", "snapshot", "-skip-signing", f"-distribution={SUITE}", snap)
            if self.snapshots == 1
            else self._cmd("publish", "switch", "-skip-signing", SUITE, snap)
        )
        return steps(
            lambda: run(self._cmd("mirror", "update", f"-keyring={self.keyring}", "bench"), env=self.env),
            lambda: run(self._cmd("snapshot", "create", snap, "from", "mirror", "bench"), env=self.env),
            lambda: run(publish, env=self.env),
        )

    def debs(self) -> int:
        return count_debs(self.work / "root" / "public")


class AptMirror2(Tool):
    name = "apt-mirror2"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.config = self.work / "mirror.list"
        url = self.nginx.url("repo")
        # Where packages are upgraded, the old versions are deleted (`clean` and `_autoclean`),
        # as aptly's `publish switch` and aptguard's snapshots drop them.
        clean = f"set _autoclean 1\nclean {url}\n" if self.shape.upgraded else ""
        self.config.write_text(
            f"set base_path {self.work}\nset nthreads 16\nset gpg_verify force\nset _contents 0\n"
            f"deb-amd64 [signed-by={self.keyring}] {url} {SUITE} main\n{clean}"
        )

    def phase(self, phase: str) -> Measure:
        return run(
            [str(PEERS_VENV / "bin" / "apt-mirror"), str(self.config)], env={**os.environ, "HOME": str(self.work)}
        )

    def debs(self) -> int:
        return count_debs(self.work / "mirror")


class Floor(Tool):
    """The same bytes copied on local disk: what any mirror has to do at least."""

    name = "floor"
    source: Path

    def phase(self, phase: str) -> Measure:
        started = time.perf_counter()
        dest = self.work / "copy"
        src = self.source
        if phase == "no-op":
            tree_files(src)  # compare what is there with what upstream has: nothing to copy
        else:
            have = tree_files(dest) if dest.exists() else {}
            want = tree_files(src)
            for rel, (size, _mtime) in want.items():
                if rel.startswith("dists/") or have.get(rel, (None,))[0] != size:
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src / rel, target)
            for rel in have.keys() - want.keys():  # upgraded packages: the old version goes
                (dest / rel).unlink()
        return Measure(time.perf_counter() - started, 0)

    def debs(self) -> int:
        return count_debs(self.work / "copy")


# ---------------------------------------------------------------- the benchmark


def bench_shape(shape: str, runs: int, work: Path, tools: list[str], entries: bool = True) -> Table:
    count = SHAPES[shape].count
    print(f"== shape {shape}: {SHAPES[shape]} ({SHAPES[shape].incremental} for the incremental phase)", flush=True)
    started = time.perf_counter()
    root_a, root_b, keyring, extra = build_upstream(work, SHAPES[shape])
    print(f"   upstream built in {time.perf_counter() - started:.1f} s", flush=True)
    www = work / "www"
    www.mkdir()
    nginx = Nginx(work / "nginx", www)
    table = Table(shape)
    classes = {
        "aptguard": Aptguard,
        "aptguard-s3": AptguardS3,
        "aptguard-ondemand": AptguardOnDemand,
        "baseline": Baseline,
        "aptly": Aptly,
        "apt-mirror2": AptMirror2,
        "floor": Floor,
    }
    try:
        for r in range(runs):
            # Each run starts with another tool, so no tool always follows the upstream's build
            # (or another tool's clean-up) while the disk is still writing it back.
            for name in tools[r % len(tools) :] + tools[: r % len(tools)]:
                point(www / "repo", root_a)
                tool = classes[name](work / f"run{r}" / name, nginx, keyring, SHAPES[shape])
                if isinstance(tool, Floor):
                    tool.source = root_a
                for phase in PHASES:
                    if phase == "incremental":
                        point(www / "repo", root_b)
                        if isinstance(tool, Floor):
                            tool.source = root_b
                    os.sync()  # every phase starts with nothing left to write back from the one before
                    m = tool.phase(phase)
                    table.add(name, phase, m)
                    if phase != "no-op":
                        # Upgraded packages replace their old version: only new ones add to the count.
                        want = count + (extra if phase == "incremental" else 0)
                        got = tool.debs()
                        if got != want:
                            raise RuntimeError(f"{name} {phase}: {got} .deb files mirrored, expected {want}")
                print(f"   run {r + 1}/{runs} {name:12s} " + "  ".join(
                    f"{p} {table.runs[(name, p)][-1].seconds:.2f}s/{table.runs[(name, p)][-1].rss_kb // 1024}MB"
                    for p in PHASES), flush=True)  # fmt: skip
                # Its folder stays until every shape has run (main() removes them all): see KEEP.
        # After the timed runs, so that the trace slows none of them down.
        if entries:
            changed, total = pool_diff(root_a, root_b)
            for name in (t for t in tools if t in ("aptguard", "baseline")):
                point(www / "repo", root_a)
                tool = classes[name](work / "entries" / name, nginx, keyring, SHAPES[shape])
                assert isinstance(tool, Aptguard)
                tool.phase("cold")
                point(www / "repo", root_b)
                kinds, unattributed = tool.traced_incremental(work / "entries" / f"{name}.strace")
                table.entries[name] = Entries(kinds, unattributed, changed, total)
                print(f"   {table.entries[name].line(name)}", flush=True)
    finally:
        nginx.stop()
    return table


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    mem = {line.split(":")[0]: line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()}
    aptly = subprocess.run(["aptly", "version"], capture_output=True, text=True).stdout.strip()
    peers_bin = PEERS_VENV / "bin" / "apt-mirror"
    peers = "not installed"
    if peers_bin.exists():
        run_peers = subprocess.run([str(peers_bin), "--version"], capture_output=True, text=True)
        peers = run_peers.stdout.strip() or run_peers.stderr.strip()
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {int(mem['MemTotal']) // 1024} MiB RAM, {int(mem['MemAvailable']) // 1024} MiB "
        f"available; Python {platform.python_version()}; {aptly}; apt-mirror2 {peers}"
    )


def render(tables: list[Table], runs: int) -> str:
    lines = []
    for t in tables:
        lines += [
            f"### {SHAPES[t.shape]} (medians of {runs} runs"
            + ("" if SHAPES[t.shape].incremental == "+5% new" else f"; incremental: {SHAPES[t.shape].incremental}")
            + ")",
            "",
            "| phase | aptguard | aptly | apt-mirror2 | floor | aptguard/aptly | aptguard/floor |",
            "|---|---|---|---|---|---|---|",
        ]

        def cell(tool: str, phase: str, what: str, t: Table = t) -> str:
            m = t.median(tool, phase)
            if m is None:
                return "-"
            return f"{m.seconds:.3f} s" if what == "time" else f"{m.rss_kb / 1024:.0f} MB"

        def ratio(a: str, b: str, phase: str, what: str, t: Table = t) -> str:
            ma, mb = t.median(a, phase), t.median(b, phase)
            if ma is None or mb is None:
                return "-"
            x, y = (ma.seconds, mb.seconds) if what == "time" else (ma.rss_kb, mb.rss_kb)
            return f"{x / y:.2f}×" if y else "-"

        for phase in PHASES:
            lines.append(
                f"| {phase} | " + " | ".join(cell(tool, phase, "time") for tool in TOOLS)
                + f" | {ratio('aptguard', 'aptly', phase, 'time')} | {ratio('aptguard', 'floor', phase, 'time')} |"
            )  # fmt: skip
        for phase in PHASES:
            lines.append(
                f"| peak RSS, {phase} | " + " | ".join(cell(tool, phase, "rss") for tool in TOOLS[:3])
                + f" | - | {ratio('aptguard', 'aptly', phase, 'rss')} | - |"
            )  # fmt: skip
        # aptguard beside another way of running it: into a bucket, or as of another revision.
        for other, head in (
            ("aptguard-s3", "aptguard-s3 (moto) | aptguard-s3/aptguard"),
            ("aptguard-ondemand", "aptguard-ondemand (indices only) | on-demand/aptguard"),
            ("baseline", "baseline | aptguard/baseline"),
        ):
            if not any(tool == other for tool, _ in t.runs):
                continue
            a, b = ("aptguard", other) if other == "baseline" else (other, "aptguard")
            lines += ["", f"| phase | aptguard | {head} |", "|---|---|---|---|"]
            for what, label in (("time", "{}"), ("rss", "peak RSS, {}")):
                for phase in PHASES:
                    lines.append(
                        f"| {label.format(phase)} | {cell('aptguard', phase, what)} | {cell(other, phase, what)} "
                        f"| {ratio(a, b, phase, what)} |"
                    )
        if t.entries:
            lines += [
                "",
                "Filesystem entries made, removed or renamed in the data folder by one incremental sync (strace):",
                "",
            ]
            lines += [f"- {e.line(tool)}" for tool, e in t.entries.items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", default="small,large")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--results", type=Path, help="write the tables to this Markdown file (bench/RESULTS.md)")
    parser.add_argument("--baseline", help="also run aptguard as of this git revision (a before/after)")
    parser.add_argument("--log", type=Path, help="append every command's output to this file")
    parser.add_argument(
        "--entries",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="count the filesystem entries one more (untimed) incremental aptguard sync touches, under strace",
    )
    args = parser.parse_args()
    global LOG
    LOG = args.log
    tools = args.tools.split(",")
    if args.baseline:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", args.baseline + "^{commit}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        tree = CACHE / f"baseline-{rev}"  # by commit, not by name: HEAD moves
        if not (tree / "aptguard").is_dir():
            tree.mkdir(parents=True, exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", rev, "aptguard"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        Baseline.tree = tree
        tools.append("baseline")
    # aptguard runs as installed: its modules compiled to bytecode, as `pip install` leaves them.
    # From a checkout (an editable install) with PYTHONDONTWRITEBYTECODE=1, as on the machines
    # here, every start compiles every module from source instead: 40-60 ms a sync.
    for tree in {Aptguard.tree, Baseline.tree}:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "aptguard")], check=True)
    if "apt-mirror2" in tools and not (PEERS_VENV / "bin" / "apt-mirror").exists():
        print(f"apt-mirror2 not installed: python3 -m venv {PEERS_VENV} && {PEERS_VENV}/bin/pip install apt-mirror")
        tools.remove("apt-mirror2")
    if args.entries and not STRACE.exists():
        print(f"{STRACE} not found: no count of filesystem entries (--no-entries)")
        args.entries = False
    tables = []
    with tempfile.TemporaryDirectory(prefix="agbench-") as tmp:
        os.chmod(tmp, 0o755)
        for shape in args.shapes.split(","):
            work = Path(tmp) / shape
            work.mkdir()
            tables.append(bench_shape(shape, args.runs, work, tools, args.entries))
        print(f"removing {tmp} ({disk_use(Path(tmp))})", flush=True)
    text = render(tables, args.runs)
    print()
    print(text)
    if args.results:
        header = f"Machine: {machine()}\n\nDate: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n\n"
        args.results.write_text(f"## Sync: aptguard, aptly, apt-mirror2 and the floor\n\n{header}{text}")
        print(f"written to {args.results}")


if __name__ == "__main__":
    main()
