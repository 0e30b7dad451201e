"""A bad config is refused before any network or disk work: exit 2, the file, the key, what was expected."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

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
