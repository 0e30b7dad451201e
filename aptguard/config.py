"""The TOML config of SPEC §1, checked whole before any network or disk work.

Every error names the file, the key and what was expected, and raises UsageError (exit 2).
Functions receive the parts of the config they need; nothing reads a global config.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from aptguard.reasons import UsageError

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
RESERVED = frozenset({"snapshots", "pins", "status", "metrics"})
# A suite, component, architecture or language is one path word of a repository.
WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream repository to mirror."""

    name: str
    url: str  # always ends with "/"
    suites: tuple[str, ...]
    components: tuple[str, ...]
    architectures: tuple[str, ...]
    keyring: Path
    sources: bool = False
    languages: tuple[str, ...] = ("en",)
    contents: bool = False
    policy: str = "immediate"
    publish: Publish | None = None  # [upstreams.NAME.publish]: serve a re-signed view (SPEC §7)


@dataclass(frozen=True)
class Publish:
    """[upstreams.NAME.publish]: the view clients get instead of the upstream's own signed files."""

    sign_with: tuple[Path, ...]  # ASCII-armored secret keys; each signs every published Release
    passphrase_file: Path | None = None  # for keys that have a passphrase (all the same one)
    packages: tuple[str, ...] = ()  # () = every package; else these and what they depend on
    keep_versions: int = 0  # 0 = every version; N = the newest N of each package
    valid_days: float = 7.0  # Valid-Until = Date + valid_days; refreshed once half of it passed
    resolve_with: tuple[str, ...] = ()  # other upstreams whose current snapshots satisfy dependencies


@dataclass(frozen=True)
class Limits:
    """What a hostile or broken upstream may cost one sync (SPEC §1 [limits])."""

    sync_timeout: float = 6 * 3600.0  # seconds: one upstream's sync ends as `unreachable` after this
    min_rate: int = 1024  # bytes per second, averaged over 60 s; 0 turns the rule off
    max_index_bytes: int = 2 * 1024**3  # no index is decompressed past this


@dataclass(frozen=True)
class Storage:
    """[storage]: where snapshots live (SPEC §6), and how a server of the s3 backend reads them."""

    backend: str = "local"  # "local": data_dir | "s3": one bucket under prefix
    endpoint: str | None = None  # None: the AWS default for the region
    bucket: str = ""
    prefix: str = "aptguard/"
    region: str = "us-east-1"
    refresh_seconds: float = 5.0  # [server]: how often a server re-reads the pointers
    pool: str = "serve"  # [server]: "serve" streams pool files, "redirect" answers 302 to a presigned URL
    cache_bytes: int = 2 * 1024**3  # [server]: this server's cache of objects


@dataclass(frozen=True)
class Config:
    path: Path
    data_dir: Path
    listen: str = "127.0.0.1:8080"
    keep_last: int = 5
    keep_days: int = 14
    valid_until_margin_hours: float = 48.0
    key_expiry_margin_days: float = 30.0
    stale_sync_hours: float = 48.0
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    sync_interval: float | None = None  # [schedule] interval: `serve` also syncs this often (seconds)
    storage: Storage = field(default_factory=Storage)


def find_config(explicit: str | None) -> Path:
    """--config, else $APTGUARD_CONFIG, else ./aptguard.toml."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("APTGUARD_CONFIG")
    if env:
        return Path(env)
    return Path("aptguard.toml")


class _Reader:
    """Reads one table, remembering which keys were used so unknown ones are refused."""

    def __init__(self, path: Path, where: str, table: Any) -> None:
        self.path, self.where = path, where
        if not isinstance(table, dict):
            self.fail(where, f"a table, got {type(table).__name__}")
        self.table: dict[str, Any] = table

    def fail(self, key: str, expected: str, got: Any = None) -> None:
        where = f"{self.where}.{key}" if self.where and key != self.where else (key or self.where)
        got_text = "" if got is None else f", got {got!r}"
        raise UsageError(f"{self.path}: {where}: expected {expected}{got_text}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any, expected: str) -> Any:
        if key not in self.table:
            if default is _REQUIRED:
                self.fail(key, f"{expected} (this key is required)")
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool:
            self.fail(key, expected, value)
        if not isinstance(value, kind):
            self.fail(key, expected, value)
        return value

    def words(self, key: str, default: Any, *, allow_empty: bool = False) -> tuple[str, ...]:
        value = self.take(key, list, default, "a list of names")
        if value is None:
            return ()
        if not value and not allow_empty:
            self.fail(key, "a non-empty list of names", value)
        for item in value:
            if not isinstance(item, str) or not WORD_RE.match(item):
                self.fail(key, "names made of letters, digits and . _ + ~ -", item)
        if len(set(value)) != len(value):
            self.fail(key, "names without duplicates", value)
        return tuple(value)

    def done(self, known: set[str]) -> None:
        unknown = sorted(set(self.table) - known)
        if unknown:
            where = f"[{self.where}]" if self.where else "the top level"
            raise UsageError(
                f"{self.path}: unknown key {unknown[0]!r} in {where}; known keys there: {', '.join(sorted(known))}"
            )


_REQUIRED = object()


def load_config(path: Path) -> Config:
    """Read and check the whole config; UsageError on the first problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found; pass --config PATH or set APTGUARD_CONFIG") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    base = path.resolve().parent
    top = _Reader(path, "", doc)
    data_dir = top.take("data_dir", str, "aptguard-data", "a folder path (string)")
    if not data_dir:
        top.fail("data_dir", "a non-empty folder path", data_dir)

    server = _Reader(path, "server", top.take("server", dict, {}, "a [server] table"))
    listen = server.take("listen", str, "127.0.0.1:8080", "HOST:PORT")
    parse_listen(listen, f"{path}: server.listen")
    storage = _storage(path, _Reader(path, "storage", top.take("storage", dict, {}, "a [storage] table")), server)
    server.done({"listen", "refresh_seconds", "pool", "cache_bytes"})

    retention = _Reader(path, "retention", top.take("retention", dict, {}, "a [retention] table"))
    keep_last = retention.take("keep_last", int, 5, "a whole number >= 1")
    if keep_last < 1:
        retention.fail("keep_last", "a whole number >= 1", keep_last)
    keep_days = retention.take("keep_days", (int, float), 14, "a number of days >= 0")
    if keep_days < 0:
        retention.fail("keep_days", "a number of days >= 0", keep_days)
    retention.done({"keep_last", "keep_days"})

    warn = _Reader(path, "warnings", top.take("warnings", dict, {}, "a [warnings] table"))
    margins = {}
    for key, default in (("valid_until_hours", 48), ("key_expiry_days", 30), ("stale_sync_hours", 48)):
        margins[key] = warn.take(key, (int, float), default, "a number >= 0")
        if margins[key] < 0:
            warn.fail(key, "a number >= 0", margins[key])
    warn.done(set(margins))

    limits = _limits(_Reader(path, "limits", top.take("limits", dict, {}, "a [limits] table")))

    schedule = _Reader(path, "schedule", top.take("schedule", dict, {}, "a [schedule] table"))
    every = 'a duration such as "15m", "4h" or "1h30m", more than 0 and at most 365d'
    text = schedule.take("interval", str, None, every)
    sync_interval = None if text is None else parse_duration(text)
    if text is not None and not (sync_interval and sync_interval <= 365 * 86400):  # sleep() has a bound too
        schedule.fail("interval", every, text)
    schedule.done({"interval"})

    upstreams: dict[str, UpstreamConfig] = {}
    tables = top.take("upstreams", dict, {}, "[upstreams.NAME] tables")
    for name, table in tables.items():
        if not NAME_RE.match(name) or name in RESERVED:
            raise UsageError(
                f"{path}: [upstreams.{name}]: a name must match [a-z0-9][a-z0-9._-]* and not be one of "
                f"{', '.join(sorted(RESERVED))}"
            )
        upstreams[name] = _upstream(path, base, name, table)
    for name, up in upstreams.items():
        for other in up.publish.resolve_with if up.publish else ():
            if other not in upstreams:
                raise UsageError(
                    f"{path}: upstreams.{name}.publish.resolve_with: {other!r} is not an upstream of this config "
                    f"(upstreams: {', '.join(sorted(upstreams))})"
                )
    top.done({"data_dir", "server", "storage", "retention", "warnings", "limits", "schedule", "upstreams"})
    return Config(
        path=path,
        data_dir=(base / data_dir),
        listen=listen,
        keep_last=keep_last,
        keep_days=keep_days,
        valid_until_margin_hours=float(margins["valid_until_hours"]),
        key_expiry_margin_days=float(margins["key_expiry_days"]),
        stale_sync_hours=float(margins["stale_sync_hours"]),
        upstreams=upstreams,
        limits=limits,
        sync_interval=sync_interval,
        storage=storage,
    )


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule for bucket names


def _storage(path: Path, r: _Reader, server: _Reader) -> Storage:
    backend = r.take("backend", str, "local", '"local" or "s3"')
    if backend not in ("local", "s3"):
        r.fail("backend", '"local" (data_dir on this machine) or "s3" (an S3-compatible store)', backend)
    values: dict[str, Any] = {"backend": backend}
    s3_keys = ("endpoint", "bucket", "prefix", "region")
    if backend == "local":
        for key in s3_keys:
            if key in r.table:
                r.fail(key, 'nothing with backend = "local" (this key is for backend = "s3")', r.table[key])
    else:
        endpoint = r.take("endpoint", str, None, "an http:// or https:// URL of the S3 API")
        if endpoint is not None and not re.match(r"^https?://[^/\s]+/?$", endpoint):
            r.fail("endpoint", "an http:// or https:// URL of the S3 API, without a path", endpoint)
        bucket = r.take("bucket", str, _REQUIRED, "a bucket name")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            r.fail("bucket", "a bucket name of 3 to 63 lowercase letters, digits, dots and hyphens", bucket)
        prefix = r.take("prefix", str, "aptguard/", 'a key prefix such as "aptguard/" ("" for the whole bucket)')
        if prefix and (not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix or ".." in prefix):
            r.fail("prefix", 'a key prefix ending in "/" such as "aptguard/", or ""', prefix)
        region = r.take("region", str, "us-east-1", "a region name such as us-east-1")
        values |= {"endpoint": endpoint, "bucket": bucket, "prefix": prefix, "region": region}
    r.done({"backend", *s3_keys})
    refresh = server.take("refresh_seconds", (int, float), 5, "a number of seconds, at least 0.1 and at most 3600")
    if not 0.1 <= refresh <= 3600:
        server.fail("refresh_seconds", "a number of seconds, at least 0.1 and at most 3600", refresh)
    pool = server.take("pool", str, "serve", '"serve" or "redirect"')
    if pool not in ("serve", "redirect"):
        server.fail("pool", '"serve" (stream pool files) or "redirect" (302 to a presigned store URL)', pool)
    cache_text = server.take("cache_bytes", (str, int), "2GiB", 'a size such as "2GiB" or "500MiB"')
    cache_bytes = parse_size(str(cache_text))
    if cache_bytes is None or cache_bytes < 1024**2:
        server.fail("cache_bytes", 'a size of at least "1MiB" such as "2GiB"', cache_text)
    if backend == "local" and pool != "serve":
        server.fail("pool", '"serve" with backend = "local" (a redirect needs an object store)', pool)
    return Storage(**values, refresh_seconds=float(refresh), pool=pool, cache_bytes=cache_bytes)


def _limits(r: _Reader) -> Limits:
    expected = {
        "sync_timeout": 'a duration such as "6h", "15m", "30s" or "1h30m", more than 0',
        "min_rate": 'a rate such as "1KiB/s", "500B/s" or "2MiB/s" ("0B/s": no minimum)',
        "max_index_bytes": 'a size such as "2GiB", "500MiB" or "1000000" (bytes), more than 0',
    }
    values: dict[str, Any] = {}
    for key, parse in (("sync_timeout", parse_duration), ("min_rate", parse_rate), ("max_index_bytes", parse_size)):
        text = r.take(key, (str, int) if key == "max_index_bytes" else str, None, expected[key])
        if text is None:
            continue
        value = parse(str(text))
        if value is None or (value <= 0 and key != "min_rate"):
            r.fail(key, expected[key], text)
        values[key] = value
    r.done(set(expected))
    return Limits(**values)


_DURATION_RE = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([KMGT]i?B|kB|B)?")
_UNITS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4}
_UNITS |= {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def parse_duration(text: str) -> float | None:
    """Seconds in "6h", "15m", "30s", "1h30m", "2d"; None if `text` is not such a duration."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not text.strip() or match is None or len(text) > 40:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_size(text: str) -> int | None:
    """Bytes in "2GiB", "500MiB", "1.5GB", "1000000"; None if `text` is not such a size."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None or len(match.group(1)) > 30:
        return None
    return int(Fraction(match.group(1)) * _UNITS[match.group(2) or "B"])


def parse_rate(text: str) -> int | None:
    """Bytes per second in "1KiB/s", "500B/s", "2MiB/s"; None if `text` is not such a rate."""
    size, slash, per = text.strip().rpartition("/")
    if not slash or per != "s":
        return None
    return parse_size(size)


def format_rate(rate: int) -> str:
    """The shortest exact spelling of a rate, as parse_rate reads it: 1024 -> "1KiB/s"."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if rate and rate % _UNITS[unit] == 0:
            return f"{rate // _UNITS[unit]}{unit}/s"
    return f"{rate}B/s"


def _upstream(path: Path, base: Path, name: str, table: Any) -> UpstreamConfig:
    r = _Reader(path, f"upstreams.{name}", table)
    url = r.take("url", str, _REQUIRED, "an http:// or https:// URL")
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
        r.fail("url", "an http:// or https:// URL", url)
    suites = r.take("suites", list, _REQUIRED, "a non-empty list of suite names")
    if not suites:
        r.fail("suites", "a non-empty list of suite names", suites)
    for suite in suites:
        if not isinstance(suite, str) or not _suite_ok(suite):
            r.fail("suites", 'suite names such as "bookworm" or "stable/updates", or "/" for a flat repository', suite)
    if len(set(suites)) != len(suites):
        r.fail("suites", "suite names without duplicates", suites)
    flat = any(s.endswith("/") for s in suites)
    components = r.words("components", [] if flat else _REQUIRED, allow_empty=flat)
    if flat and components:
        r.fail("components", 'an empty list for a flat repository (suites = ["/"])', list(components))
    architectures = r.words("architectures", _REQUIRED)
    keyring_text = r.take("keyring", str, _REQUIRED, "the path of a keyring file (.asc or .gpg)")
    keyring = (base / keyring_text).resolve()
    if not keyring.is_file():
        r.fail("keyring", f"an existing keyring file; {keyring} does not exist", keyring_text)
    if not os.access(keyring, os.R_OK):
        r.fail("keyring", f"a readable keyring file; {keyring} cannot be read", keyring_text)
    sources = r.take("sources", bool, False, "true or false")
    languages = r.words("languages", ["en"], allow_empty=True)
    contents = r.take("contents", bool, False, "true or false")
    policy = r.take("policy", str, "immediate", '"immediate" or "on-demand"')
    if policy not in ("immediate", "on-demand"):
        r.fail(
            "policy",
            '"immediate" (every pool file fetched and verified before promotion) or "on-demand" '
            "(fetched and verified at a client's first request)",
            policy,
        )
    publish = None
    if "publish" in r.table:
        publish = _publish(path, base, name, r.table["publish"])
        if sources or contents:
            r.fail(
                "sources" if sources else "contents",
                f"false with [upstreams.{name}.publish] (a published view rewrites binary Packages indices only)",
                True,
            )
    r.done(
        {"url", "suites", "components", "architectures", "keyring", "sources", "languages", "contents", "policy"}
        | {"publish"}
    )
    return UpstreamConfig(
        name=name,
        url=url if url.endswith("/") else url + "/",
        suites=tuple(suites),
        components=components,
        architectures=architectures,
        keyring=keyring,
        sources=sources,
        languages=languages,
        contents=contents,
        policy=policy,
        publish=publish,
    )


def _readable_file(r: _Reader, key: str, base: Path, text: Any, what: str) -> Path:
    if not isinstance(text, str) or not text:
        r.fail(key, f"the path of {what}", text)
    found = (base / text).resolve()
    if not found.is_file():
        r.fail(key, f"an existing file ({what}); {found} does not exist", text)
    if not os.access(found, os.R_OK):
        r.fail(key, f"a readable file ({what}); {found} cannot be read", text)
    return found


def _publish(path: Path, base: Path, name: str, table: Any) -> Publish:
    from aptguard.resolve import parse_root

    r = _Reader(path, f"upstreams.{name}.publish", table)
    keys = r.take("sign_with", list, _REQUIRED, "a non-empty list of ASCII-armored secret key files")
    if not keys:
        r.fail("sign_with", "a non-empty list of ASCII-armored secret key files", keys)
    sign_with = tuple(_readable_file(r, "sign_with", base, k, "an ASCII-armored secret key") for k in keys)
    if len(set(sign_with)) != len(sign_with):
        r.fail("sign_with", "key files without duplicates", keys)
    passphrase = r.take("passphrase_file", str, None, "the path of a file holding the keys' passphrase")
    passphrase_file = None
    if passphrase is not None:
        passphrase_file = _readable_file(r, "passphrase_file", base, passphrase, "the keys' passphrase")
    packages = r.take("packages", list, [], 'a list of package names such as ["docker-ce", "tool (>= 1.2)"]')
    for item in packages:
        problem = parse_root(item) if isinstance(item, str) else "not a string"
        if problem:
            r.fail(
                "packages",
                f'package names, optionally with one version relation such as "tool (>= 1.2)" ({problem})',
                item,
            )
    if len(set(packages)) != len(packages):
        r.fail("packages", "package relations without duplicates", packages)
    keep = r.take("keep_versions", int, 0, "a whole number >= 0 (0: every version)")
    if keep < 0:
        r.fail("keep_versions", "a whole number >= 0 (0: every version)", keep)
    valid_days = r.take("valid_days", (int, float), 7, "a number of days, more than 0 and at most 3650")
    if not 0 < valid_days <= 3650:
        r.fail("valid_days", "a number of days, more than 0 and at most 3650", valid_days)
    resolve_with = r.take("resolve_with", list, [], 'a list of other upstreams\' names such as ["debian"]')
    for other in resolve_with:
        if not isinstance(other, str) or not NAME_RE.match(other) or other == name:
            r.fail("resolve_with", "names of other upstreams of this config", other)
    r.done({"sign_with", "passphrase_file", "packages", "keep_versions", "valid_days", "resolve_with"})
    return Publish(
        sign_with=sign_with,
        passphrase_file=passphrase_file,
        packages=tuple(packages),
        keep_versions=keep,
        valid_days=float(valid_days),
        resolve_with=tuple(resolve_with),
    )


def _suite_ok(suite: str) -> bool:
    """A suite is one or more path words ("bookworm", "bookworm/updates"), or a flat "DIR/"."""
    if suite == "/":
        return True
    parts = suite[:-1].split("/") if suite.endswith("/") else suite.split("/")
    return all(WORD_RE.match(p) for p in parts)


def parse_listen(text: str, where: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{where}: expected HOST:PORT such as 127.0.0.1:8080, got {text!r}")
    return host.strip("[]"), int(port)
