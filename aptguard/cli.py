"""The command line of SPEC §2: a thin shell over config, sync, snapshot, status and serve.

Exit codes: 0 done, 1 refused (a sync rejected, fsck found damage), 2 usage or config error.
"""

from __future__ import annotations

import asyncio
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import typer

from aptguard.config import Config, UpstreamConfig, find_config, load_config, parse_listen
from aptguard.reasons import ADVICE, UsageError
from aptguard.store import FileStore

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="aptguard: an APT mirror that verifies every signature and hash before it serves a snapshot.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@dataclass
class _Context:
    config_path: str | None

    def config(self) -> Config:
        return load_config(find_config(self.config_path))


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"aptguard: {message}", err=True)
    raise typer.Exit(code)


def _ctx(ctx: typer.Context) -> _Context:
    return ctx.obj


def _load(ctx: typer.Context) -> tuple[Config, FileStore]:
    try:
        config = _ctx(ctx).config()
    except UsageError as exc:
        _fail(str(exc))
    return config, FileStore(config.data_dir)


def _upstream(config: Config, name: str) -> UpstreamConfig:
    if name not in config.upstreams:
        known = ", ".join(config.upstreams) or "none"
        _fail(f"{config.path}: no upstream named {name!r} (configured: {known})")
    return config.upstreams[name]


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=False))


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="config file (default: $APTGUARD_CONFIG, ./aptguard.toml)")
    ] = None,
) -> None:
    ctx.obj = _Context(config)


@app.command()
def sync(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="upstreams to sync (default: all)")] = None,
    no_promote: Annotated[bool, typer.Option("--no-promote", help="verify and store, do not promote")] = False,
    allow_release_change: Annotated[
        bool, typer.Option("--allow-release-change", help="accept an Origin, Label or Codename change")
    ] = False,
) -> None:
    """Fetch, verify, store and promote a new snapshot of every (or each named) upstream."""
    from aptguard.keyring import Keyring
    from aptguard.sync import sync_upstream

    config, store = _load(ctx)
    selected = [_upstream(config, n) for n in names] if names else list(config.upstreams.values())
    if not selected:
        _fail(f"{config.path}: no [upstreams.NAME] configured; nothing to sync")
    with ExitStack() as stack:
        keyrings = {}
        for up in selected:  # every keyring is read before any network or disk work
            try:
                keyrings[up.name] = stack.enter_context(Keyring(up.keyring))
            except UsageError as exc:
                _fail(f"{exc} (upstreams.{up.name}.keyring in {config.path})")
        try:
            store.ensure()
        except OSError as exc:
            _fail(f"{config.path}: data_dir {config.data_dir}: {exc.strerror}; check the path and its permissions", 1)

        def log(message: str) -> None:
            typer.echo(message, err=True)

        async def run_all() -> list[Any]:
            results = []
            for up in selected:
                results.append(
                    await sync_upstream(
                        up,
                        store,
                        promote=not no_promote,
                        allow_release_change=allow_release_change,
                        keyring=keyrings[up.name],
                        log=log,
                    )
                )
            return results

        results = asyncio.run(run_all())
    failed = False
    for r in results:
        stats = r.stats
        if r.outcome == "rejected":
            failed = True
            typer.echo(f"{r.name}: rejected [{r.reason}] {r.detail}")
            typer.echo(f"{r.name}:   what to do: {ADVICE[r.reason]}; clients keep the previous snapshot")
        elif r.outcome == "unchanged":
            typer.echo(f"{r.name}: unchanged, current snapshot {r.snapshot} ({stats.get('seconds')} s)")
        else:
            size = stats.get("bytes", 0) / 1e6
            got = stats.get("downloaded", 0) / 1e6
            typer.echo(
                f"{r.name}: {r.outcome} {r.snapshot}: {stats.get('files')} files, {size:.1f} MB "
                f"({got:.1f} MB downloaded) in {stats.get('seconds')} s" + (f"; {r.detail}" if r.detail else "")
            )
    raise typer.Exit(1 if failed else 0)


@app.command()
def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT (default: [server] listen)")] = None,
) -> None:
    """Serve current snapshots, snapshots, pins, /status and / over HTTP."""
    from aptguard.serve import run

    config, store = _load(ctx)
    try:
        host, port = parse_listen(listen or config.listen, "--listen" if listen else f"{config.path}: server.listen")
    except UsageError as exc:
        _fail(str(exc))
    store.ensure()
    run(config, store, host, port)


@app.command()
def status(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Per upstream: current snapshot, hold, last sync outcome, and warnings."""
    from aptguard.status import status as build

    config, store = _load(ctx)
    report = build(config, store)
    if as_json:
        _print_json(report)
        return
    for name, st in report["upstreams"].items():
        last = st["last_sync"]
        line = f"{name}: current {st['current'] or '-'}" + (" (HOLD)" if st["hold"] else "")
        if last:
            line += f"; last sync {last['at']}: {last['outcome']}"
            if last["reason"]:
                line += f" [{last['reason']}] {last['detail']}"
        typer.echo(line)
        for suite, info in st["suites"].items():
            typer.echo(f"  {suite}: Release {info['date']}, Valid-Until {info['valid_until'] or 'none'}")
        for warning in st["warnings"]:
            typer.echo(f"  WARNING: {warning}")


@app.command()
def snapshots(ctx: typer.Context, name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The snapshots of an upstream, newest first."""
    from aptguard.snapshot import list_snapshots

    config, store = _load(ctx)
    _upstream(config, name)
    listing = list_snapshots(store, name)
    if as_json:
        _print_json(listing)
        return
    if not listing:
        typer.echo(f"{name}: no snapshots yet (run `aptguard sync {name}`)")
    for snap in listing:
        marks = (" current" if snap["current"] else "") + "".join(f" pin:{p}" for p in snap["pins"])
        suites = ", ".join(
            f"{s} {i['date']}" + (f" valid-until {i['valid_until']}" if i["valid_until"] else "")
            for s, i in snap["suites"].items()
        )
        typer.echo(f"{snap['id']}{marks}  {snap['files']} files {snap['bytes']} bytes  {suites}")


@app.command()
def promote(ctx: typer.Context, name: str, snap_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Make a verified snapshot current; clears a hold."""
    from aptguard.snapshot import promote as do_promote

    config, store = _load(ctx)
    _upstream(config, name)
    try:
        old = do_promote(store, name, snap_id)
    except UsageError as exc:
        _fail(str(exc))
    typer.echo(f"{name}: current is now {snap_id} (was {old or 'none'}); hold cleared")


def main() -> None:
    try:
        app()
    except UsageError as exc:
        typer.echo(f"aptguard: {exc}", err=True)
        sys.exit(2)
