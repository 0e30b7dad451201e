"""aptguard judges InRelease framing and Packages parsing exactly as the real apt does.

SPEC §2: "Framing and field parsing are apt's ... what apt refuses, aptguard refuses; a
field is read the way apt reads it". This is checked differentially, over a generated
corpus (fixtures/mutants.py): hundreds of mutants of a good InRelease and of a good
Packages index, each served as a repository of its own by one HTTP upstream.

- apt's verdict: ONE isolated `apt-get update` with one sources line per mutant; every
  Err:/W:/E: line is attributed to its mutant by URL or list file name. For Packages
  mutants, what apt believes in is what it downloads: `apt-get download --print-uris`
  (which URL, for which package) and a real `apt-get download` (did the bytes verify).
- aptguard's verdict: ONE `aptguard sync` of all mutants as upstreams, `status --json`
  for each outcome and reason, and the pool files of each promoted snapshot.

Every mutant must get the same verdict from both; for Packages mutants the pool files
aptguard stored must be the files apt downloads. Where aptguard is knowingly stricter than
apt, the difference is a named class in INTENDED, with the reason; nothing else is excused.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import urllib.parse
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aptguard.store import FileStore
from fixtures.apt import AptClient
from fixtures.keys import SigningKey, write_keyring
from fixtures.mutants import ARCH, COMPONENT, SUITE, Corpus, Mutant, build_corpus
from fixtures.upstream import Upstream
from tests.mirror import Mirror

PoolFiles = frozenset[tuple[str, int, str]]  # (path in the repository, size, sha256)

# A mutant named in apt's output: in a URL (http://127.0.0.1:PORT/m017 bookworm ...,
# .../m017/pool/...) or in a list file name (127.0.0.1:PORT_m017_dists_...).
_MUTANT_IN_TEXT = re.compile(r"127\.0\.0\.1:\d+[/_](m\d+)(?=[/_\s'])")
# Lines apt prints once for the whole run, about no source in particular.
_GENERIC = (
    "W: Some index files failed to download. They have been ignored, or old ones used instead.",
    "E: The package lists or status file could not be parsed or opened.",
)
MAX_CRASHES = 5  # upstreams that crash `aptguard sync`, after which the rest are not judged


@dataclass
class AptVerdict:
    accepted: bool
    messages: list[str] = field(default_factory=list)
    files: PoolFiles = frozenset()  # Packages mutants: what apt downloaded and verified
    offered: set[str] = field(default_factory=set)  # Packages mutants: the packages apt would download


@dataclass
class GuardVerdict:
    outcome: str  # promoted, rejected, or "crashed" (the sync died before judging it)
    reason: str | None = None
    detail: str = ""
    files: PoolFiles = frozenset()

    @property
    def accepted(self) -> bool:
        return self.outcome in ("promoted", "unchanged", "stored")

    def __str__(self) -> str:
        if self.accepted:
            return self.outcome
        return f"{self.outcome} [{self.reason}] {self.detail}".strip()


@dataclass(frozen=True)
class Intended:
    """A class of mutants where aptguard knowingly differs from apt, and why."""

    name: str
    why: str
    applies: Callable[[Mutant, AptVerdict, GuardVerdict], bool]


def _stanza_has(m: Mutant, field_name: str) -> bool:
    """Whether the mutated stanza (the first) has this field, name compared without case."""
    first = (m.packages or b"").split(b"\n\n")[0]
    return re.search(rb"^" + field_name.encode() + rb":", first, re.MULTILINE | re.IGNORECASE) is not None


def _skipped_stanza_files(m: Mutant, apt: AptVerdict, guard: GuardVerdict) -> bool:
    """aptguard stored what apt stored plus files of the mutated stanza, a stanza apt skipped
    without a word (not for this architecture, no Version): apt offers no package for it."""
    return (
        m.family == "packages"
        and apt.accepted
        and guard.accepted
        and apt.files < guard.files
        and f"{m.name}-a" not in apt.offered
    )


INTENDED = [
    Intended(
        "sha256-required",
        "aptguard stores pool files by their SHA256 and verifies each before it promotes a snapshot, "
        "so a stanza that lists no SHA256 is refused at sync time (index-mismatch); apt accepts the "
        "index and checks the strong hash it does list (SHA512) only when it downloads the file.",
        lambda m, apt, guard: (
            m.family == "packages"
            and not _stanza_has(m, "SHA256")
            and apt.accepted
            and guard.reason == "index-mismatch"
        ),
    ),
    Intended(
        "files-of-skipped-stanzas",
        "aptguard fetches and verifies the file of every stanza of an index it serves; where apt "
        "silently skips a stanza (another architecture, no Version), aptguard holds one verified file "
        "more than any client fetches. A superset can only make it stricter (a broken extra file "
        "would show as 'apt accepts, aptguard rejects', which is not excused), never serve a wrong byte.",
        _skipped_stanza_files,
    ),
]


# ---------------------------------------------------------------- apt's verdicts


class _Problems:
    """apt's Err:/W:/E: lines per mutant; an Err: line's indented message lines go with it."""

    def __init__(self) -> None:
        self.by_mutant: dict[str, list[str]] = defaultdict(list)
        self.unattributed: list[str] = []

    def read(self, output: str) -> None:
        current: set[str] = set()
        pending: list[str] = []  # unattributed E: lines; a "Problem with MergeList F" line claims them
        for line in output.splitlines():
            names = set(_MUTANT_IN_TEXT.findall(line))
            if line.startswith("  ") and current:
                for name in current:
                    self.by_mutant[name].append(line.strip())
                continue
            current = set()
            if not line.startswith(("Err:", "W:", "E:")) or line in _GENERIC:
                continue
            if not names:
                pending.append(line)
                continue
            if "Problem with MergeList" in line:
                for name in names:
                    self.by_mutant[name] += pending
                pending = []
            for name in names:
                self.by_mutant[name].append(line)
            if line.startswith("Err:"):
                current = names
        self.unattributed += pending


def _list_file(client: AptClient, url: str, rel: str) -> Path:
    """Where apt keeps a downloaded index: the URL with '/' as '_', without the scheme."""
    return client.workdir / "state" / "lists" / (url.split("://", 1)[1] + rel).replace("/", "_")


def apt_verdicts(client: AptClient, corpus: Corpus, url: str) -> tuple[dict[str, AptVerdict], list[str]]:
    """Run apt once over the whole corpus; (verdict per mutant, problem lines no mutant owns)."""
    problems = _Problems()
    update = client.update()
    problems.read(update.output)
    # A stanza apt cannot parse makes it refuse that list when it builds its cache, and stop
    # there: set that list aside (its mutant is refused) and build again, until the cache builds.
    output = update.output
    for _ in corpus.mutants:
        merge = re.search(r"^E: Problem with MergeList (\S+)", output, re.MULTILINE)
        if merge is None:
            break
        Path(merge.group(1)).unlink()
        output = client.run("gencaches", tool="apt-cache").output
        problems.read(output)
    verdicts = {}
    for m in corpus.mutants:
        lists = [f"dists/{SUITE}/InRelease", f"dists/{SUITE}/{COMPONENT}/binary-{ARCH}/Packages"]
        stored = all(_list_file(client, f"{url}{m.name}/", rel).exists() for rel in lists)
        messages = problems.by_mutant.get(m.name, [])
        if not stored and not messages:
            messages = ["(no error printed, but apt stored no lists for it)"]
        verdicts[m.name] = AptVerdict(stored and not messages, list(messages))
    _apt_downloads(client, corpus, url, verdicts)
    return verdicts, problems.unattributed


def _apt_downloads(client: AptClient, corpus: Corpus, url: str, verdicts: dict[str, AptVerdict]) -> None:
    """For Packages mutants: which URLs apt would fetch (--print-uris), then whether the bytes it
    gets there verify (a real download). A failed download is apt refusing that mutant."""
    packages = {m.name for m in corpus.family("packages")}
    known = client.run("pkgnames", tool="apt-cache").output.split()
    names = sorted(n for n in known if n.split("-", 1)[0] in packages)
    # Some versions fail the whole command: one apt does not offer for this architecture ("Unable
    # to locate"), one it refuses to fetch (no Filename, no Size). Note them, drop them, ask again.
    uris: dict[str, tuple[str, str]] = {}  # package -> (URL, file name apt saves it as)
    for _ in range(len(names) + 1):
        run = client.run("-q", "download", "--print-uris", *names, cwd=client.downloads)
        if run.returncode == 0:
            for found in re.finditer(r"^'([^']*)' (\S+) \d+ ", run.output, re.MULTILINE):
                package = found.group(2).split("_", 1)[0]
                uris[package] = (found.group(1), found.group(2))
                verdicts[package.split("-", 1)[0]].offered.add(package)
            break
        failing = set()
        for line in run.output.splitlines():
            if not line.startswith("E:"):
                continue
            for n in names:
                if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", line):
                    failing.add(n)
                    owner = verdicts[n.split("-", 1)[0]]
                    owner.messages.append(line)
                    if not line.startswith("E: Unable to locate package"):
                        owner.accepted = False
        assert failing, f"apt-get download --print-uris failed, naming no package:\n{run.output[-3000:]}"
        names = [n for n in names if n not in failing]
    shutil.rmtree(client.downloads)
    client.downloads.mkdir()
    fetched = client.run("-q", "download", *names, cwd=client.downloads)
    problems = _Problems()
    problems.read(fetched.output)
    for name, messages in problems.by_mutant.items():
        verdicts[name].messages += messages
    for package, (uri, saved) in uris.items():
        owner = package.split("-", 1)[0]
        mutant_url = f"{url}{owner}/"
        assert uri.startswith(mutant_url), (package, uri)
        path = client.downloads / saved
        if not path.exists():
            verdicts[owner].accepted = False
            if not problems.by_mutant.get(owner):
                verdicts[owner].messages.append(f"{package}: not downloaded ({uri})")
            continue
        data = path.read_bytes()
        path_in_repo = urllib.parse.unquote(uri[len(mutant_url) :])  # apt quotes what a URL cannot hold
        verdicts[owner].files |= {(path_in_repo, len(data), hashlib.sha256(data).hexdigest())}
    for name in packages:
        if problems.by_mutant.get(name):
            verdicts[name].accepted = False


# ---------------------------------------------------------------- aptguard's verdicts


def guard_verdicts(mirror: Mirror, names: list[str]) -> tuple[dict[str, GuardVerdict], int]:
    """One `aptguard sync` of every upstream; (verdict per upstream, sync runs it took). A sync
    that dies leaves the upstreams it had not judged yet without an outcome: the first of those
    is synced alone (if that dies too, it is the one that crashes aptguard), then the rest again.
    After MAX_CRASHES such upstreams the rest are left unjudged: aptguard is broken for all."""
    verdicts: dict[str, GuardVerdict] = {}
    run = mirror.sync(timeout=900)
    runs, crashes = 1, 0
    while True:
        status = mirror.status()["upstreams"]
        for name in names:
            last = status.get(name, {}).get("last_sync")
            if name not in verdicts and last is not None:
                verdicts[name] = GuardVerdict(last["outcome"], last.get("reason"), last.get("detail") or "")
        left = [n for n in names if n not in verdicts]
        if not left:
            break
        if crashes == MAX_CRASHES:
            for name in left:
                verdicts[name] = GuardVerdict(
                    "crashed", "not judged", f"aptguard crashed on {crashes} upstreams before"
                )
            break
        alone = mirror.sync(left[0], timeout=300)
        runs += 1
        if mirror.status()["upstreams"].get(left[0], {}).get("last_sync") is None:
            crashes += 1
            tail = [line for line in (alone.stderr or run.stderr).splitlines() if line.strip()]
            verdicts[left[0]] = GuardVerdict("crashed", "traceback", tail[-1] if tail else f"exit {alone.returncode}")
        if len(left) > 1:
            run = mirror.sync(*left[1:], timeout=900)
            runs += 1
    store = FileStore(mirror.data)
    for name, verdict in verdicts.items():
        current = store.current(name)
        if verdict.accepted and current is not None:
            served = {
                rel: Path(found).read_bytes()
                for rel in store.read_manifest(name, current).files
                if rel.startswith("pool/") and (found := store.served_file("current", (name,), rel.split("/")))
            }
            verdict.files = frozenset(
                (rel, len(body), hashlib.sha256(body).hexdigest()) for rel, body in sorted(served.items())
            )
    return verdicts, runs


# ---------------------------------------------------------------- the comparison


@dataclass
class Disagreement:
    mutant: Mutant
    kind: str
    apt: AptVerdict
    guard: GuardVerdict

    def __str__(self) -> str:
        apt_said = "accepts" if self.apt.accepted else "refuses"
        lines = [
            f"{self.mutant.describe}",
            f"    {self.kind}",
            f"    apt {apt_said}: {' | '.join(self.apt.messages[:3])[:400]}",
            f"    aptguard: {str(self.guard)[:400]}",
        ]
        if self.apt.files != self.guard.files and self.mutant.family == "packages":
            lines.append(f"    apt's files:      {sorted(self.apt.files)}")
            lines.append(f"    aptguard's files: {sorted(self.guard.files)}")
        return "\n".join(lines)


def compare(m: Mutant, apt: AptVerdict, guard: GuardVerdict) -> str | None:
    """The kind of disagreement, or None when both judge the mutant alike."""
    if guard.outcome == "crashed":
        return "aptguard crashed (no verdict)"
    if apt.accepted and not guard.accepted:
        return "apt accepts, aptguard rejects"
    if guard.accepted and not apt.accepted:
        return "apt refuses, aptguard promotes"
    if m.family == "packages" and apt.accepted and apt.files != guard.files:
        return "both accept, different pool files"
    return None


def _table(corpus: Corpus, apt: dict[str, AptVerdict], guard: dict[str, GuardVerdict], differ: set[str]) -> str:
    """Mutants tried, apt's and aptguard's verdicts, and disagreements, per family."""
    head = ("family", "mutants", "apt ok", "apt no", "ag ok", "ag no", "differ")
    rows = [" ".join(f"{h:>9}" for h in head)]
    for family in ("inrelease", "packages", "all"):
        names = [m.name for m in (corpus.mutants if family == "all" else corpus.family(family))]
        apt_ok = sum(apt[n].accepted for n in names)
        guard_ok = sum(guard[n].accepted for n in names)
        cells = (family, len(names), apt_ok, len(names) - apt_ok, guard_ok, len(names) - guard_ok)
        rows.append(" ".join(f"{c:>9}" for c in (*cells, sum(n in differ for n in names))))
    return "\n".join(rows)


def _groups(found: list[Disagreement]) -> list[str]:
    """One line per (family, class of mutation, kind of disagreement): a count and an example."""
    groups: dict[tuple[str, str, str], list[Disagreement]] = defaultdict(list)
    for d in found:
        groups[(d.mutant.family, d.mutant.kind, d.kind)].append(d)
    lines = []
    for (family, kind, how), ds in sorted(groups.items()):
        first = ds[0]
        said = (first.apt.messages or ["-"])[-1] if not first.apt.accepted else "accepted"
        lines.append(f"{len(ds):4d} x {family}/{kind}: {how}")
        lines.append(f"         e.g. {first.mutant.name}: {first.mutant.detail}")
        lines.append(f"              apt: {said[:160]} / aptguard: {str(first.guard)[:160]}")
    return lines


@pytest.fixture
def corpus(tmp_path: Path, deb_cache: Path, keys: Callable[..., SigningKey]) -> Corpus:
    return build_corpus(tmp_path / "upstream", deb_cache, keys("differential"), keys("stranger"))


@pytest.mark.slow
def test_aptguard_accepts_exactly_what_apt_accepts_over_the_mutant_corpus(
    tmp_path: Path, corpus: Corpus, keys: Callable[..., SigningKey], serve, capsys: pytest.CaptureFixture[str]
) -> None:
    keyring = write_keyring(tmp_path / "keys" / "differential.asc", [keys("differential")])
    upstream: Upstream = serve(corpus.root)

    client = AptClient(tmp_path / "apt")
    client.set_sources(
        [AptClient.source_line(f"{upstream.url}{m.name}", SUITE, [COMPONENT], keyring) for m in corpus.mutants]
    )
    apt, unattributed = apt_verdicts(client, corpus, upstream.url)
    assert not unattributed, "apt problem lines no mutant owns (the harness cannot judge):\n" + "\n".join(unattributed)
    # The corpus is sound: apt accepts the good files, and in each family accepts some and refuses some.
    assert all(apt[m.name].accepted for m in corpus.mutants if m.kind.startswith("unchanged"))
    for family in ("inrelease", "packages"):
        assert len({apt[m.name].accepted for m in corpus.family(family)}) == 2, family

    settings = {
        "suites": [SUITE],
        "components": [COMPONENT],
        "architectures": [ARCH],
        "keyring": keyring,
        "languages": [],
    }
    mirror = Mirror(
        tmp_path / "mirror", {m.name: {"url": f"{upstream.url}{m.name}", **settings} for m in corpus.mutants}
    )
    guard, runs = guard_verdicts(mirror, [m.name for m in corpus.mutants])

    found: list[Disagreement] = []
    excused: dict[str, list[Disagreement]] = defaultdict(list)
    for m in corpus.mutants:
        kind = compare(m, apt[m.name], guard[m.name])
        if kind is None:
            continue
        d = Disagreement(m, kind, apt[m.name], guard[m.name])
        why = next((i for i in INTENDED if i.applies(m, d.apt, d.guard)), None)
        if why is None:
            found.append(d)
        else:
            excused[why.name].append(d)

    report = [
        "differential corpus against the real apt (ok: accepted / promoted, no: refused / rejected)",
        _table(corpus, apt, guard, {d.mutant.name for d in found}),
        f"aptguard sync runs: {runs} (a run that crashes leaves the upstreams after it to another run)",
        *(f"intended, {name}: {', '.join(d.mutant.name for d in ds)}" for name, ds in sorted(excused.items())),
        *_groups(found),
    ]
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not found, "\n".join(report) + "\n\nevery disagreement:\n" + "\n".join(str(d) for d in found)
