"""Shared pytest fixtures: keys, repositories, an HTTP upstream and an apt client.

Keys and .deb files are made once per session (they are slow-ish and immutable); every
repository, upstream and client is per test, so no test can see another's state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.apt import AptClient
from fixtures.keys import SigningKey, make_key
from fixtures.repo import Repo
from fixtures.s3 import MotoServer
from fixtures.upstream import Upstream


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes several seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real S3 API on 127.0.0.1 (moto's server), one per session; each test takes a fresh bucket."""
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def deb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built .deb files, shared by the whole session (build_deb caches by its inputs)."""
    return tmp_path_factory.mktemp("debs")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., SigningKey]]:
    """keys(name, expired=False, revoked=False): a signing key, made once per session."""
    workdir = tmp_path_factory.mktemp("keys")
    made: dict[tuple[str, bool, bool], SigningKey] = {}

    def get(name: str, *, expired: bool = False, revoked: bool = False) -> SigningKey:
        wanted = (name, expired, revoked)
        if wanted not in made:
            if any(k[0] == name for k in made):
                raise ValueError(f"key {name!r} already exists with other properties")
            made[wanted] = make_key(workdir, name, expired=expired, revoked=revoked)
        return made[wanted]

    yield get
    for key in made.values():
        key.close()


@pytest.fixture
def repo(tmp_path: Path, deb_cache: Path) -> Callable[..., Repo]:
    """repo(name="upstream"): a repository tree under this test's tmp_path; the same
    object for the same name, since a Repo keeps its package list in memory."""
    made: dict[str, Repo] = {}

    def make(name: str = "upstream") -> Repo:
        if name not in made:
            made[name] = Repo(tmp_path / "repos" / name, deb_cache)
        return made[name]

    return make


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Upstream]]:
    """serve(repo_or_root, prefix="/"): a started Upstream, stopped after the test."""
    started: list[Upstream] = []

    def start(target: Repo | Path, prefix: str = "/") -> Upstream:
        root = target.root if isinstance(target, Repo) else target
        upstream = Upstream(root, prefix=prefix).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def upstream(serve: Callable[..., Upstream], repo: Callable[..., Repo]) -> Upstream:
    """An Upstream serving the default repository, repo() (which may still be empty)."""
    return serve(repo())


@pytest.fixture
def apt_client(tmp_path: Path) -> Callable[..., AptClient]:
    """apt_client(name="client", arch="amd64", options=None): a real apt-get with a private config."""

    def make(name: str = "client", arch: str = "amd64", options: dict[str, str] | None = None) -> AptClient:
        return AptClient(tmp_path / "apt" / name, arch=arch, options=options)

    return make
