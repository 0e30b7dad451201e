"""A bad config is refused before any network or disk work: exit 2, the file, the key, what was expected."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from aptguard.config import Limits, format_rate, load_config, parse_rate
from fixtures.keys import SigningKey, write_keyring
from fixtures.upstream import Upstream
from tests.mirror import Mirror

GOOD = """
data_dir = "data"
[upstreams.docker]
url = "{url}"
suites = ["bookworm"]
components = ["stable"]
architectures = ["amd64"]
keyring = "keys/docker.asc"
"""

CASES = {
    "unknown top-level key": ('data_dir = "data"\ndatadir = "x"\n', ["datadir", "known keys"]),
    "unknown upstream key": (GOOD + 'suits = ["x"]\n', ["suits", "upstreams.docker"]),
    "wrong type": (GOOD.replace('suites = ["bookworm"]', 'suites = "bookworm"'), ["upstreams.docker.suites", "list"]),
    "missing keyring file": (GOOD.replace("keys/docker.asc", "keys/missing.asc"), ["keyring", "missing.asc"]),
    "bad name": (GOOD.replace("[upstreams.docker]", "[upstreams.Docker_CE]"), ["Docker_CE", "[a-z0-9]"]),
    "reserved name": (GOOD.replace("[upstreams.docker]", "[upstreams.snapshots]"), ["snapshots"]),
    "not http": (GOOD.replace("{url}", "ftp://mirror.example/debian"), ["url", "http"]),
    "missing url": (GOOD.replace('url = "{url}"\n', ""), ["url", "required"]),
    "bad retention": ('data_dir = "data"\n[retention]\nkeep_last = 0\n', ["retention.keep_last", ">= 1"]),
    "bad listen": ('[server]\nlisten = "localhost"\n', ["server.listen", "HOST:PORT"]),
    "not toml": ("data_dir = \n", ["not valid TOML"]),
    "unknown policy": (GOOD + 'policy = "lazy"\n', ["policy", "immediate"]),
    "unknown backend": ('[storage]\nbackend = "nfs"\n', ["storage.backend", '"s3"']),
    "s3 without bucket": ('[storage]\nbackend = "s3"\n', ["storage.bucket", "required"]),
    "bad bucket": ('[storage]\nbackend = "s3"\nbucket = "My_Bucket"\n', ["storage.bucket", "lowercase"]),
    "bad prefix": ('[storage]\nbackend = "s3"\nbucket = "apt"\nprefix = "/x"\n', ["storage.prefix", "ending in"]),
    "bad endpoint": ('[storage]\nbackend = "s3"\nbucket = "apt"\nendpoint = "s3.example"\n', ["storage.endpoint"]),
    "s3 key on local": ('[storage]\nbucket = "apt"\n', ["storage.bucket", 'backend = "s3"']),
    "redirect on local": ('[server]\npool = "redirect"\n', ["server.pool", "object store"]),
    "bad refresh": ("[server]\nrefresh_seconds = 0\n", ["server.refresh_seconds", "at least 0.1"]),
    "bad cache size": ('[server]\ncache_bytes = "lots"\n', ["server.cache_bytes", "2GiB"]),
}


@pytest.fixture
def setup(tmp_path: Path, keys: Callable[..., SigningKey], upstream: Upstream) -> tuple[Mirror, Upstream]:
    mirror = Mirror(tmp_path / "m")
    write_keyring(mirror.workdir / "keys" / "docker.asc", [keys("upstream")])
    return mirror, upstream


@pytest.mark.parametrize("case", list(CASES))
def test_bad_config_exits_2_naming_file_and_key_and_touches_nothing(setup, case: str) -> None:
    mirror, upstream = setup
    text, words = CASES[case]
    mirror.config.write_text(text.replace("{url}", upstream.url))
    for command in (["sync"], ["status"], ["serve", "--listen", "127.0.0.1:1"]):
        run = mirror.run(*command)
        assert run.returncode == 2, (command, run.output)
        assert str(mirror.config) in run.stderr, run.stderr
        for word in words:
            assert word in run.stderr, (word, run.stderr)
    assert not mirror.data.exists(), "a bad config must not create the data folder"
    assert upstream.requests == [], "a bad config must not reach the network"


def test_keyring_without_keys_is_a_config_error_before_any_request(setup) -> None:
    mirror, upstream = setup
    (mirror.workdir / "keys" / "docker.asc").write_text("this is not a key\n")
    mirror.config.write_text(GOOD.replace("{url}", upstream.url))
    run = mirror.sync()
    assert run.returncode == 2, run.output
    assert "docker.asc" in run.stderr and "no OpenPGP public key" in run.stderr
    assert upstream.requests == [] and not mirror.data.exists()


def test_missing_config_file_says_how_to_give_one(tmp_path: Path) -> None:
    mirror = Mirror(tmp_path / "m")
    mirror.config.unlink()
    run = mirror.run("status")
    assert run.returncode == 2 and "config file not found" in run.stderr and "--config" in run.stderr


def test_unknown_upstream_name_on_the_command_line(setup) -> None:
    mirror, upstream = setup
    mirror.config.write_text(GOOD.replace("{url}", upstream.url))
    run = mirror.run("sync", "dokcer")
    assert run.returncode == 2 and "dokcer" in run.stderr and "docker" in run.stderr
    assert upstream.requests == []


def test_relative_paths_are_relative_to_the_config_folder(setup, tmp_path: Path) -> None:
    """Run from another folder: data_dir and keyring still resolve beside the config file."""
    mirror, upstream = setup
    mirror.config.write_text(GOOD.replace("{url}", upstream.url))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = mirror.run("sync", cwd=elsewhere)
    assert "rejected [signature-missing]" in run.stdout, run.output  # the empty upstream has no Release
    assert (mirror.workdir / "data" / "state" / "docker.json").exists()
    assert not (elsewhere / "data").exists()


LIMITS_CASES = {
    "min_rate without a unit": ('min_rate = "1024"', ["limits.min_rate", "'1024'", "1KiB/s"]),
    "min_rate per minute": ('min_rate = "1KiB/m"', ["limits.min_rate", "'1KiB/m'", "500B/s"]),
    "sync_timeout in words": ('sync_timeout = "six hours"', ["limits.sync_timeout", "'six hours'", "1h30m"]),
    "sync_timeout zero": ('sync_timeout = "0s"', ["limits.sync_timeout", "'0s'", "more than 0"]),
    "sync_timeout as a number": ("sync_timeout = 3600", ["limits.sync_timeout", "3600", '"6h"']),
    "max_index_bytes exponent": ('max_index_bytes = "1e9"', ["limits.max_index_bytes", "'1e9'", "2GiB"]),
    "max_index_bytes lowercase unit": ('max_index_bytes = "2gib"', ["limits.max_index_bytes", "'2gib'", "500MiB"]),
    "max_index_bytes negative": ("max_index_bytes = -1", ["limits.max_index_bytes", "-1"]),
    "max_index_bytes superscript": ('max_index_bytes = "²"', ["limits.max_index_bytes", "'²'"]),
    "unknown limit": ('max_rate = "1KiB/s"', ["max_rate", "[limits]", "min_rate"]),
}


@pytest.mark.parametrize("case", list(LIMITS_CASES))
def test_bad_limits_exit_2_naming_file_key_value_and_expectation(setup, case: str) -> None:
    mirror, upstream = setup
    line, words = LIMITS_CASES[case]
    mirror.config.write_text(GOOD.replace("{url}", upstream.url).replace("[upstreams", f"[limits]\n{line}\n[upstreams"))
    run = mirror.run("sync")
    assert run.returncode == 2, run.output
    assert str(mirror.config) in run.stderr, run.stderr
    for word in words:
        assert word in run.stderr, (word, run.stderr)
    assert not mirror.data.exists() and upstream.requests == []


def _limits_of(tmp_path: Path, text: str) -> Limits:
    path = tmp_path / "aptguard.toml"
    path.write_text(f'data_dir = "data"\n[limits]\n{text}\n')
    return load_config(path).limits


def test_limits_default_to_the_spec_values(tmp_path: Path) -> None:
    assert Limits() == Limits(sync_timeout=6 * 3600.0, min_rate=1024, max_index_bytes=2 * 1024**3)
    assert _limits_of(tmp_path, "") == Limits()
    path = tmp_path / "bare.toml"
    path.write_text('data_dir = "data"\n')
    assert load_config(path).limits == Limits()


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ('sync_timeout = "6h"', "sync_timeout", 21600.0),
        ('sync_timeout = "15m"', "sync_timeout", 900.0),
        ('sync_timeout = "30s"', "sync_timeout", 30.0),
        ('sync_timeout = "1h30m"', "sync_timeout", 5400.0),
        ('sync_timeout = "1d"', "sync_timeout", 86400.0),
        ('min_rate = "1KiB/s"', "min_rate", 1024),
        ('min_rate = "500B/s"', "min_rate", 500),
        ('min_rate = "2MiB/s"', "min_rate", 2 * 1024 * 1024),
        ('min_rate = "1MB/s"', "min_rate", 1_000_000),
        ('min_rate = "0B/s"', "min_rate", 0),
        ('max_index_bytes = "2GiB"', "max_index_bytes", 2 * 1024**3),
        ('max_index_bytes = "500MiB"', "max_index_bytes", 500 * 1024**2),
        ('max_index_bytes = "1000000"', "max_index_bytes", 1_000_000),
        ("max_index_bytes = 1000000", "max_index_bytes", 1_000_000),
        ('max_index_bytes = "1.5GB"', "max_index_bytes", 1_500_000_000),
    ],
)
def test_limits_are_read_in_operator_units(tmp_path: Path, text: str, field: str, value: float) -> None:
    limits = _limits_of(tmp_path, text)
    assert getattr(limits, field) == value and type(getattr(limits, field)) is type(value)
    assert replace(limits, **{field: getattr(Limits(), field)}) == Limits(), "the other limits keep their defaults"


def test_a_rate_is_printed_as_the_operator_writes_it() -> None:
    assert [format_rate(r) for r in (1024, 500, 2 * 1024 * 1024, 1000, 1536)] == [
        "1KiB/s",
        "500B/s",
        "2MiB/s",
        "1000B/s",
        "1536B/s",
    ]
    assert all(parse_rate(format_rate(r)) == r for r in (1, 1000, 1024, 3 * 1024**3, 12345))
