"""Published views: aptguard's `[upstreams.NAME.publish]` against aptly's snapshot + publish, side by side.

    .venv/bin/python bench/publish.py [--runs 3] [--shape debian] [--roots 100] [--as-is] [--log FILE]

The upstream is bench/debian_shape.py's Debian-sized one (60,000 packages of 512 bytes, one
suite, main, amd64; its compressed indices cached in bench/.cache/debian-shape), served by
nginx on 127.0.0.1 as in bench/sync_vs_aptly.py, plus one package the shape lacks: every
stanza of the shape says `Depends: libc6 (>= 2.36), <one of 256 "hub" packages>`, and no
package of the shape is libc6, so a view filtered with its dependencies cannot be made from
the shape as it is (aptguard: `publish-failed`, "libc6 (>= 2.36)"; aptly's -with-deps skips a
dependency it cannot find). The bench adds `libc6` (2.36-9, a package like the others) to the
one state it publishes; `--as-is` uses build_upstream()'s state A unchanged instead (the
filtered aptguard rows then show the failure). With `--shape debian-tiny` (1,200 packages) most
hubs lie outside the shape, so its filtered view fails too: a quick check of the script only.

The mirror's key: ed25519, no passphrase, made by gpg in a GNUPGHOME of the bench's own;
aptguard reads it as an ASCII-armored secret key file (`sign_with`), aptly signs through gpg
with that GNUPGHOME (`-gpg-key FPR`, gpgProvider "gpg": aptly 1.5's internal provider (Go's
x/crypto/openpgp) cannot sign with ed25519).

Each run, the two tools take turns (the one that starts alternates), every timed command
after an os.sync():
- aptguard, unfiltered: a cold sync into an empty data folder with `sign_with` (wall, and the
  `publish` step of `--log-format json`: read + parse the stored indices, select, compress
  .xz/.gz, hash, sign, verify, store); then the same upstream with `valid_days` changed: the sync
  makes a new view from the stored indices, nothing downloaded (wall, publish step).
- aptguard, filtered to --roots packages (spread evenly over the shape) and their dependency
  closure: a cold sync (only the closure's pool files are fetched) and a republish.
- aptly, in a fresh rootDir: `mirror create` + `mirror update` (set-up, timed but not the
  comparison), `snapshot create`, `publish snapshot` signed (the comparison: index generation,
  gz + bz2 + plain, signing, and linking the pool into public/); then `snapshot filter
  -with-deps` + `publish snapshot` of the filtered snapshot; and, for the filtered cold sync,
  a mirror of its own made with `-filter -filter-with-deps` (only the closure downloaded),
  snapshot, publish.
Medians of wall time and peak RSS (/usr/bin/time, per process). Every published view is
checked: its package count, and the packages each tool's filtered view holds.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian_shape  # noqa: E402
import sync_vs_aptly  # noqa: E402
from sync_vs_aptly import ROOT, SHAPES, SUITE, Aptguard, Aptly, Measure, Nginx, Shape, build_upstream, machine, run  # noqa: E402

from aptguard.publish import XZ_PRESET  # noqa: E402
from fixtures.keys import make_key, write_keyring  # noqa: E402

LIBC6 = debian_shape.Binary("libc6", "glibc", "2.36-9")


# ---------------------------------------------------------------- upstream and key


def build(work: Path, shape: Shape, as_is: bool) -> tuple[Path, Path, list[str]]:
    """The published upstream state's root, its keyring, and every package name in it."""
    names = [debian_shape.binary(i).name for i in range(shape.count)]
    if as_is:
        root_a, _root_b, keyring, _extra = build_upstream(work, shape)
        return root_a, keyring, names
    key = make_key(work / "keys", "bench")
    try:
        keyring = write_keyring(work / "keys" / "bench.gpg", [key], armored=False)
        text, files = debian_shape.index([debian_shape.binary(i) for i in range(shape.count)] + [LIBC6], shape.size)
        root = work / "up" / "A"
        with ThreadPoolExecutor(2) as pool:
            jobs = {ext: pool.submit(debian_shape.compress, text, ext) for ext in debian_shape.COMPRESSORS}
            debian_shape.write_pool(root, files)
            packed = {ext: job.result() for ext, job in jobs.items()}
        debian_shape.publish(root, SUITE, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1), text, packed, key)
    finally:
        key.close()
    return root, keyring, [*names, LIBC6.name]


class MirrorKey:
    """The mirror's signing key: ed25519, no passphrase, in a GNUPGHOME of its own."""

    def __init__(self, folder: Path) -> None:
        self.home = folder / "gnupg"
        self.home.mkdir(parents=True, mode=0o700)
        self.env = {**os.environ, "GNUPGHOME": str(self.home)}
        atexit.register(self.close)
        self.gpg(
            "--passphrase",
            "",
            "--quick-gen-key",
            "aptguard bench mirror <mirror@bench.invalid>",
            "ed25519",
            "sign",
            "1y",
        )
        listing = self.gpg("--with-colons", "--list-secret-keys").decode()
        self.fingerprint = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        self.secret = folder / "mirror.key"
        self.secret.write_bytes(self.gpg("--armor", "--export-secret-keys", self.fingerprint))

    def gpg(self, *args: str) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--no-tty", *args], env=self.env, capture_output=True, check=True
        ).stdout

    def close(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"], env=self.env, capture_output=True)


# ---------------------------------------------------------------- the tools


def timed(cmd: list[str], **kwargs: object) -> Measure:
    os.sync()  # nothing left to write back from what came before
    return run(cmd, **kwargs)  # type: ignore[arg-type]


class Publisher(Aptguard):
    """aptguard with `[upstreams.bench.publish]`, synced through the CLI with --log-format json."""

    def __init__(self, work: Path, nginx: Nginx, keyring: Path, shape: Shape, key: Path, roots: list[str]) -> None:
        super().__init__(work, nginx, keyring, shape)
        self.base = self.config.read_text()
        self.key = key
        self.roots = roots
        self.configure(7)

    def configure(self, valid_days: int) -> None:
        text = f'\n[upstreams.bench.publish]\nsign_with = ["{self.key}"]\nvalid_days = {valid_days}\n'
        if self.roots:
            text += f"packages = {json.dumps(self.roots)}\n"
        self.config.write_text(self.base + text)

    def sync(self) -> tuple[Measure, dict]:
        """One sync: its measure and its JSON result (outcome, steps, published)."""
        cmd = [sys.executable, "-m", "aptguard", "--config", str(self.config), "sync", "--log-format", "json"]
        m = timed(cmd, env={**os.environ, "PYTHONPATH": str(self.tree)}, cwd=self.work, check=False)
        out = run.last_output  # type: ignore[attr-defined]
        results = []
        for line in out.splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "result":
                    results.append(record)
        if not results:
            raise RuntimeError(f"aptguard sync: no result line:\n{out[-3000:]}")
        return m, results[-1]

    def view_packages(self) -> list[str]:
        """The package names the served view's Packages index lists."""
        from aptguard.store import FileStore

        store = FileStore(self.work / "data")
        path = f"dists/{SUITE}/main/binary-amd64/Packages.gz".split("/")
        served = store.served_file("current", ("bench",), path)
        if served is None:
            raise RuntimeError("the view serves no Packages.gz")
        return packages_in(gzip.decompress(Path(served).read_bytes()))


def packages_in(text: bytes) -> list[str]:
    return [line[9:].strip().decode() for line in text.splitlines() if line.startswith(b"Package: ")]


class AptlySigned(Aptly):
    """aptly with signing on, through gpg and the mirror key's GNUPGHOME."""

    def __init__(self, work: Path, nginx: Nginx, keyring: Path, shape: Shape, key: MirrorKey, flags: list[str]) -> None:
        super().__init__(work, nginx, keyring, shape)  # writes its config and creates mirror "bench"
        config = json.loads(self.config.read_text())
        config.update(gpgDisableSign=False, gpgProvider="gpg")
        self.config.write_text(json.dumps(config))
        self.key = key
        self.env = {**self.env, "GNUPGHOME": str(key.home)}
        self.sign = ["-batch", f"-gpg-key={key.fingerprint}", *flags]

    def cmd(self, *args: str) -> Measure:
        return timed(self._cmd(*args), env=self.env)

    def publish(self, snap: str, prefix: str) -> Measure:
        return self.cmd("publish", "snapshot", *self.sign, f"-distribution={SUITE}", snap, prefix)

    def view_packages(self, prefix: str) -> list[str]:
        where = self.work / "root" / "public" / prefix / "dists" / SUITE / "main" / "binary-amd64" / "Packages"
        return packages_in(where.read_bytes())

    def view_files(self, prefix: str) -> list[str]:
        where = self.work / "root" / "public" / prefix / "dists" / SUITE
        return sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file())


def aptly_sign_flags(work: Path, nginx: Nginx, keyring: Path, shape: Shape, key: MirrorKey) -> list[str]:
    """The signing flags this aptly and gpg accept, tried on an empty snapshot. With gpg 2.2 and
    GNUPGHOME set to the key's home, -gpg-key alone works (aptly 1.5.0, gpgProvider "gpg");
    -keyring and -secret-keyring (exported keyring files) are the fallback for other set-ups."""
    exported = work / "exported"
    exported.mkdir(parents=True)
    (exported / "pub.gpg").write_bytes(key.gpg("--export", key.fingerprint))
    (exported / "sec.gpg").write_bytes(key.gpg("--export-secret-keys", key.fingerprint))
    tries = [[], [f"-keyring={exported / 'pub.gpg'}", f"-secret-keyring={exported / 'sec.gpg'}"]]
    errors = []
    for n, flags in enumerate(tries):
        tool = AptlySigned(work / f"try{n}", nginx, keyring, shape, key, flags)
        run(tool._cmd("snapshot", "create", "empty", "empty"), env=tool.env)
        run(tool._cmd("publish", "snapshot", *tool.sign, "-architectures=amd64", f"-distribution={SUITE}", "empty", "p"),
            env=tool.env, check=False)  # fmt: skip
        out = run.last_output  # type: ignore[attr-defined]
        signed = tool.work / "root" / "public" / "p" / "dists" / SUITE / "InRelease"
        ok = signed.exists() and b"BEGIN PGP SIGNATURE" in signed.read_bytes()
        shutil.rmtree(tool.work, ignore_errors=True)
        if ok:
            return flags
        errors.append(f"{flags or 'GNUPGHOME only'}: {out.strip()[-400:]}")
    raise RuntimeError("aptly could not sign with the mirror key:\n" + "\n".join(errors))


# ---------------------------------------------------------------- the benchmark


PHASES = {
    # row -> (aptguard key, aptly key, what aptly's figure is)
    "unfiltered: cold sync + publish, wall": ("ag-cold", "al-cold", "mirror update + snapshot create + publish"),
    "unfiltered: publish step (cold sync)": ("ag-cold:publish", "al-publish", "publish snapshot"),
    "unfiltered: republish, upstream unchanged, wall": ("ag-re", "al-re", "snapshot create + publish"),
    "unfiltered: republish, publish step": ("ag-re:publish", "al-publish", "publish snapshot"),
    "filtered: cold sync + publish, wall": ("agf-cold", "alf-cold", "mirror -filter -filter-with-deps: update + snapshot + publish"),
    "filtered: publish step (cold sync)": ("agf-cold:publish", "al-filter+publish", "snapshot filter -with-deps + publish"),
    "filtered: republish, upstream unchanged, wall": ("agf-re", "al-filter+publish", "snapshot filter -with-deps + publish"),
    "filtered: republish, publish step": ("agf-re:publish", "al-fpublish", "publish snapshot (filtered) alone"),
}  # fmt: skip
RSS = {
    "peak RSS: unfiltered cold sync / aptly publish": ("ag-cold", "al-publish"),
    "peak RSS: unfiltered republish / aptly publish": ("ag-re", "al-publish"),
    "peak RSS: aptly mirror update": (None, "al-update"),
    "peak RSS: filtered cold sync / aptly filter, publish": ("agf-cold", "al-filter+publish"),
}


class Figures:
    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.rss: dict[str, list[int]] = {}
        self.notes: list[str] = []

    def add(self, key: str, seconds: float, rss_kb: int | None = None) -> None:
        self.seconds.setdefault(key, []).append(seconds)
        if rss_kb is not None:
            self.rss.setdefault(key, []).append(rss_kb)

    def add_measure(self, key: str, *ms: Measure) -> None:
        self.add(key, sum(m.seconds for m in ms), max(m.rss_kb for m in ms))

    def median(self, key: str | None) -> float | None:
        got = self.seconds.get(key) if key else None
        return statistics.median(got) if got else None

    def median_rss(self, key: str | None) -> int | None:
        got = self.rss.get(key) if key else None
        return int(statistics.median(got)) if got else None


def aptguard_run(fig: Figures, r: int, work: Path, nginx: Nginx, keyring: Path, shape: Shape, key: MirrorKey,
                 roots: list[str], expect: dict[str, int]) -> None:  # fmt: skip
    for label, packages in (("ag", []), ("agf", roots)):
        tool = Publisher(work / f"run{r}" / label, nginx, keyring, shape, key.secret, packages)
        for phase, valid_days in (("cold", 7), ("re", 8)):
            tool.configure(valid_days)
            m, result = tool.sync()
            if result["outcome"] != "promoted":
                fig.notes.append(
                    f"{label}-{phase} run {r + 1}: {result['outcome']} {result.get('reason')}: {result.get('detail')}"
                )
                print(
                    f"   run {r + 1} {label}-{phase}: {result['outcome']} ({result.get('reason')}: {result.get('detail')})",
                    flush=True,
                )
                break
            steps = result.get("steps", {})
            fig.add_measure(f"{label}-{phase}", m)
            fig.add(f"{label}-{phase}:publish", steps.get("publish", float("nan")))
            for name, value in steps.items():
                fig.add(f"{label}-{phase}:step:{name}", value)
            got = result.get("published", {}).get("packages")
            expect.setdefault(f"{label}-packages", got)
            if phase == "re" and result.get("downloaded", 0) > 200_000:
                fig.notes.append(f"{label} republish run {r + 1} downloaded {result['downloaded']} bytes")
            print(f"   run {r + 1} aptguard {label + '-' + phase:10s} wall {m.seconds:6.2f} s, {m.rss_kb // 1024} MB, "
                  f"view {got} packages, steps " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()), flush=True)  # fmt: skip
        if r == 0 and expect.get(f"{label}-packages") is not None:
            try:
                expect.setdefault(f"{label}-names", tool.view_packages())  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - a check, not a figure
                fig.notes.append(f"could not read aptguard's {label} view: {exc}")
        # Its folder stays until every run is over: see KEEP in sync_vs_aptly.py.


def aptly_run(fig: Figures, r: int, work: Path, nginx: Nginx, keyring: Path, shape: Shape, key: MirrorKey,
              flags: list[str], roots: list[str], expect: dict[str, object]) -> None:  # fmt: skip
    query = " | ".join(roots)
    tool = AptlySigned(work / f"run{r}" / "aptly", nginx, keyring, shape, key, flags)
    update = tool.cmd("mirror", "update", f"-keyring={keyring}", "bench")
    create = tool.cmd("snapshot", "create", "s1", "from", "mirror", "bench")
    publish = tool.publish("s1", "full")
    fig.add_measure("al-update", update)
    fig.add_measure("al-snapshot", create)
    fig.add_measure("al-publish", publish)
    fig.add_measure("al-cold", update, create, publish)
    # A new signed view of the unchanged mirror: a snapshot, published at another prefix.
    create2 = tool.cmd("snapshot", "create", "s2", "from", "mirror", "bench")
    publish2 = tool.publish("s2", "again")
    fig.add_measure("al-re", create2, publish2)
    filt = tool.cmd("snapshot", "filter", "-with-deps", "-architectures=amd64", "s1", "s100", query)
    fpublish = tool.publish("s100", "filtered")
    fig.add_measure("al-filter", filt)
    fig.add_measure("al-fpublish", fpublish)
    fig.add_measure("al-filter+publish", filt, fpublish)
    print(f"   run {r + 1} aptly    mirror update {update.seconds:.2f} s ({update.rss_kb // 1024} MB), snapshot "
          f"{create.seconds:.2f}, publish {publish.seconds:.2f} ({publish.rss_kb // 1024} MB), again "
          f"{create2.seconds + publish2.seconds:.2f}, filter {filt.seconds:.2f} + publish {fpublish.seconds:.2f}", flush=True)  # fmt: skip
    if r == 0:
        expect["al-names"] = tool.view_packages("filtered")
        expect["al-packages"] = len(tool.view_packages("full"))
        expect["al-files"] = tool.view_files("full")
        inrelease = tool.work / "root" / "public" / "full" / "dists" / SUITE / "InRelease"
        key.gpg("--verify", str(inrelease))  # signed by the mirror key, or CalledProcessError
    # The filtered cold sync: a mirror of the closure only.
    fcreate = tool.cmd("mirror", "create", f"-keyring={keyring}", "-architectures=amd64", f"-filter={query}",
                       "-filter-with-deps", "bench100", nginx.url("repo/"), SUITE, "main")  # fmt: skip
    fupdate = tool.cmd("mirror", "update", f"-keyring={keyring}", "bench100")
    fsnap = tool.cmd("snapshot", "create", "m100", "from", "mirror", "bench100")
    fpub = tool.publish("m100", "mirror100")
    fig.add_measure("alf-cold", fcreate, fupdate, fsnap, fpub)
    print(
        f"   run {r + 1} aptly    filtered mirror: create + update {fcreate.seconds + fupdate.seconds:.2f} s, "
        f"snapshot + publish {fsnap.seconds + fpub.seconds:.2f} s",
        flush=True,
    )
    if r == 0:
        expect["alf-packages"] = len(tool.view_packages("mirror100"))


def render(fig: Figures, runs: int, shape: Shape, n_roots: int, expect: dict[str, object], as_is: bool) -> str:
    def sec(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.2f} s"

    def mb(v: int | None) -> str:
        return "-" if v is None else f"{v / 1024:.0f} MB"

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None or not b or a != a else f"{a / b:.2f}×"

    upstream = f"{shape}" + ("" if as_is else " + libc6")
    lines = [
        f"### {upstream}, filtered to {n_roots} packages + dependencies (medians of {runs} runs)",
        "",
        "| phase | aptguard | aptly | ratio | aptly's figure is |",
        "|---|---|---|---|---|",
    ]
    for row, (a, b, what) in PHASES.items():
        ma, mb_ = fig.median(a), fig.median(b)
        lines.append(f"| {row} | {sec(ma)} | {sec(mb_)} | {ratio(ma, mb_)} | {what} |")
    for row, (a, b) in RSS.items():
        ra, rb = fig.median_rss(a), fig.median_rss(b)
        lines.append(f"| {row} | {mb(ra)} | {mb(rb)} | {ratio(ra, rb)} | |")
    lines.append("")
    for label, title in (("ag-cold", "unfiltered cold"), ("ag-re", "unfiltered republish"),
                         ("agf-cold", "filtered cold"), ("agf-re", "filtered republish")):  # fmt: skip
        steps = sorted({k.rsplit(":", 1)[1] for k in fig.seconds if k.startswith(f"{label}:step:")})
        if steps:
            got = ", ".join(f"{s} {fig.median(f'{label}:step:{s}'):.2f}" for s in steps)
            lines.append(f"- aptguard {title}, median steps (s): {got}")
    al = ", ".join(f"{k} {sec(fig.median(f'al-{k}'))}" for k in ("update", "snapshot", "publish", "filter", "fpublish"))
    lines.append(f"- aptly, median commands: {al}")
    ag_names, al_names = expect.get("agf-names"), expect.get("al-names")
    lines.append(
        f"- views: aptguard unfiltered {expect.get('ag-packages')} packages, aptly {expect.get('al-packages')}; "
        f"filtered: aptguard {expect.get('agf-packages')}, aptly snapshot filter {len(al_names) if isinstance(al_names, list) else '-'}, "
        f"aptly filtered mirror {expect.get('alf-packages')}"
    )
    if isinstance(ag_names, list) and isinstance(al_names, list):
        only_ag, only_al = sorted(set(ag_names) - set(al_names)), sorted(set(al_names) - set(ag_names))
        same = "the same packages" if not only_ag and not only_al else (
            f"{len(only_ag)} only in aptguard's ({', '.join(only_ag[:5])}), {len(only_al)} only in aptly's ({', '.join(only_al[:5])})")  # fmt: skip
        lines.append(f"- filtered views: {same}")
    files = expect.get("al-files")
    if isinstance(files, list):
        idx = [f for f in files if "binary-amd64/Packages" in f]
        lines.append(f"- aptly's indices: {', '.join(idx)}; aptguard's: Packages.xz (xz -{XZ_PRESET}), Packages.gz (gzip -6), "
                     "each also under by-hash/SHA256 and by-hash/SHA512 (the uncompressed Packages listed in the Release, "
                     "not served: the upstream serves none)")  # fmt: skip
    lines += [f"- note: {n}" for n in fig.notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shape", default="debian", choices=[k for k, s in SHAPES.items() if s.written])
    parser.add_argument("--roots", type=int, default=100, help="packages the filtered view names")
    parser.add_argument("--as-is", action="store_true", help="the shape without the added libc6")
    parser.add_argument("--tools", default="aptguard,aptly")
    parser.add_argument("--log", type=Path, help="append every command's output to this file")
    args = parser.parse_args()
    sync_vs_aptly.LOG = args.log
    tools = args.tools.split(",")
    shape = SHAPES[args.shape]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "aptguard")], check=True)
    print(f"Machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="agbench-pub-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        started = dt.datetime.now()
        root, keyring, names = build(work, shape, args.as_is)
        print(
            f"upstream {shape}{'' if args.as_is else ' + libc6'} built in {(dt.datetime.now() - started).total_seconds():.1f} s",
            flush=True,
        )
        step = max(1, shape.count // args.roots)
        roots = [names[i] for i in range(0, shape.count, step)][: args.roots]
        sample = (root / "dists" / SUITE / "main" / "binary-amd64" / "Packages.gz").read_bytes()
        depends = sum(1 for line in gzip.decompress(sample).splitlines() if line.startswith(b"Depends: "))
        print(f"{depends} of {len(names)} stanzas have Depends (e.g. {roots[0]}: "
              + next(ln.decode() for ln in gzip.decompress(sample).split(b"\n\n")[0].splitlines() if ln.startswith(b"Depends"))
              + ")" + (" — no libc6 in the shape: a filtered view cannot resolve" if args.as_is else ""), flush=True)  # fmt: skip
        key = MirrorKey(work)
        www = work / "www"
        www.mkdir()
        (www / "repo").symlink_to(root)
        nginx = Nginx(work / "nginx", www)
        atexit.register(nginx.stop)
        fig = Figures()
        expect: dict[str, object] = {}
        try:
            flags = aptly_sign_flags(work / "aptly-try", nginx, keyring, shape, key) if "aptly" in tools else []
            if "aptly" in tools:
                print(f"aptly signs with -gpg-key {key.fingerprint} {' '.join(flags)}", flush=True)
            for r in range(args.runs):
                order = tools[r % len(tools) :] + tools[: r % len(tools)]
                for name in order:
                    if name == "aptguard":
                        aptguard_run(fig, r, work, nginx, keyring, shape, key, roots, expect)  # type: ignore[arg-type]
                    elif name == "aptly":
                        aptly_run(fig, r, work, nginx, keyring, shape, key, flags, roots, expect)
        finally:
            nginx.stop()
            atexit.unregister(nginx.stop)
            key.close()
        text = render(fig, args.runs, shape, len(roots), expect, args.as_is)
    print()
    print(f"Machine: {machine()}\n\nDate: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n")
    print(text)


if __name__ == "__main__":
    main()
