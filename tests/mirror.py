"""Drive aptguard the way an operator does: a config file, the CLI, and its HTTP server.

`Mirror` runs the real `aptguard` command in a subprocess (exit codes and output as users see
them) and the real embedded server, and reads back everything it serves for byte comparisons.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aptguard.config import load_config
from aptguard.store import open_store

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


class Mirror:
    """An aptguard instance under `workdir`: config, data folder, CLI and server."""

    def __init__(self, workdir: Path, upstreams: dict[str, dict[str, Any]] | None = None, **top: Any) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "aptguard.toml"
        self.upstreams: dict[str, dict[str, Any]] = dict(upstreams or {})
        self.top: dict[str, Any] = {"data_dir": "data", **top}
        self.server: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.env: dict[str, str] = {}  # more environment for the CLI (e.g. TMPDIR and HOME outside the data folder)
        self.write_config()

    @classmethod
    def single(
        cls,
        workdir: Path,
        url: str,
        keyring: Path,
        *,
        name: str = "up",
        suites: list[str] | None = None,
        components: list[str] | None = None,
        architectures: list[str] | None = None,
        top: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Mirror:
        """A mirror of one upstream NAME (by default: bookworm, main, amd64); `top`: other config
        tables or keys ([retention], [warnings], ...); `settings`: more keys of the upstream."""
        upstream = {
            "url": url,
            "suites": suites or ["bookworm"],
            "components": ["main"] if components is None else components,
            "architectures": architectures or ["amd64"],
            "keyring": keyring,
            **settings,
        }
        return cls(workdir, {name: upstream}, **(top or {}))

    @property
    def data(self) -> Path:
        return self.workdir / str(self.top["data_dir"])

    def write_config(self) -> None:
        lines = []
        tables: dict[str, dict[str, Any]] = {}
        for key, value in self.top.items():
            if isinstance(value, dict):
                tables[key] = value
            else:
                lines.append(f"{key} = {_toml(value)}")
        for table, values in tables.items():
            lines.append(f"\n[{table}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        for name, values in self.upstreams.items():
            lines.append(f"\n[upstreams.{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items() if not isinstance(v, dict)]
            for sub, table in values.items():  # [upstreams.NAME.publish]
                if isinstance(table, dict):
                    lines.append(f"\n[upstreams.{name}.{sub}]")
                    lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        self.config.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ CLI

    def run(self, *args: str, fsize_limit: int | None = None, timeout: float = 180, cwd: Path | None = None) -> Run:
        """`aptguard --config CONFIG ARGS`; `fsize_limit` caps file sizes (RLIMIT_FSIZE) like a full disk."""

        def limit() -> None:
            if fsize_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.pop("APTGUARD_CONFIG", None)
        env.update(self.env)
        proc = subprocess.run(
            [sys.executable, "-m", "aptguard", "--config", str(self.config), *args],
            cwd=cwd or self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=limit,
            check=False,
        )
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def sync(self, *args: str, **kw: Any) -> Run:
        return self.run("sync", *args, **kw)

    def status(self) -> dict[str, Any]:
        run = self.run("status", "--json")
        assert run.returncode == 0, run.output
        return json.loads(run.stdout)

    def last_sync(self, name: str) -> dict[str, Any]:
        return self.status()["upstreams"][name]["last_sync"]

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        run = self.run("snapshots", name, "--json")
        assert run.returncode == 0, run.output
        return json.loads(run.stdout)

    def current(self, name: str) -> str | None:
        return self.status()["upstreams"][name]["current"]

    # ------------------------------------------------------------ server

    @property
    def url(self) -> str:
        assert self.port is not None, "start_server() first"
        return f"http://127.0.0.1:{self.port}"

    def start_server(self, soft_nofile: int | None = None, workers: int = 1) -> str:
        """`aptguard serve` on a free port, once it answers; `soft_nofile`: its soft open-files limit."""
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

        def limit() -> None:
            if soft_nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft_nofile, hard))

        self.port = free_port()
        self.server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aptguard",
                "--config",
                str(self.config),
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(workers),
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "serve.log", "ab"),  # noqa: SIM115 - the child owns it
            preexec_fn=limit,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/status", timeout=1).read()
                return self.url
            except OSError:
                if self.server.poll() is not None:
                    log = (self.workdir / "serve.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"aptguard serve exited:\n{log}") from None
                time.sleep(0.05)
        raise RuntimeError("aptguard serve did not answer within 20 s")

    def stop_server(self) -> None:
        if self.server is not None:
            stop_process(self.server)
            self.server = None

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a path of the server: (status, body)."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def served(self, name: str) -> dict[str, bytes]:
        """Every file of the current snapshot of NAME (as its manifest lists them), fetched over
        HTTP from /NAME/: the client's view."""
        store = open_store(load_config(self.config))
        current = store.current(name)
        found: dict[str, bytes] = {}
        if current is None:
            return found
        for rel in sorted(store.read_manifest(name, current).files):
            status, body = self.get(f"/{name}/{rel}")
            assert status == 200, f"/{name}/{rel}: HTTP {status}"
            found[rel] = body
        return found

    def served_paths(self, name: str) -> list[str]:
        """The paths the current snapshot of NAME lists (its manifest)."""
        current = self.current(name)
        return [] if current is None else self.store_paths(name, current)

    def store_paths(self, name: str, snap_id: str, *, carried: bool = True) -> list[str]:
        """The paths a snapshot lists (its manifest); without the by-hash entries carried from
        older snapshots unless `carried` (a client of this snapshot asks only for its own)."""
        manifest = open_store(load_config(self.config)).read_manifest(name, snap_id)
        own = set(manifest.by_hash_own)
        return sorted(p for p in manifest.files if carried or "/by-hash/" not in p or p in own)

    def record(self, name: str, path: str) -> dict[str, Any]:
        """The manifest record (size, hashes) of a path of the current snapshot of NAME."""
        store = open_store(load_config(self.config))
        current = store.current(name)
        assert current is not None
        return dict(store.read_manifest(name, current).files[path])

    def source_line(self, name: str, suite: str, components: list[str], keyring: Path) -> str:
        return f"deb [signed-by={keyring}] {self.url}/{name} {suite} {' '.join(components)}".rstrip()
