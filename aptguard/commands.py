"""The typer app: every command of SPEC §2, with its options and help.

A plain `sync` or `promote` does not come here (aptguard.cli.main parses those itself); their
options are declared here too, so that help, errors and every other spelling are typer's.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from aptguard.cli import _Context, _fail, _load, _print_json, _upstream, resigning, run_promote, run_sync
from aptguard.config import parse_listen
from aptguard.reasons import UsageError
from aptguard.store import FileStore

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="aptguard: an APT mirror that verifies every signature and hash before it serves a snapshot.",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


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
    log_format: Annotated[
        str, typer.Option("--log-format", help="text, or json: one JSON object per line for log collectors")
    ] = "text",
) -> None:
    """Fetch, verify, store and promote a new snapshot of every (or each named) upstream."""
    run_sync(ctx, names, no_promote=no_promote, allow_release_change=allow_release_change, log_format=log_format)


@app.command()
def serve(
    ctx: typer.Context,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT (default: [server] listen)")] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, max=256, help="processes sharing the port (one per CPU is a start)")
    ] = 1,
) -> None:
    """Serve current snapshots, snapshots, pins, /status and / over HTTP."""
    import shutil
    import tempfile

    config, store = _load(ctx)
    try:
        host, port = parse_listen(listen or config.listen, "--listen" if listen else f"{config.path}: server.listen")
    except UsageError as exc:
        _fail(str(exc))
    if config.sync_interval is not None:  # as `sync` does: every keyring read before serving starts
        from aptguard.keyring import read_keyring

        for up in config.upstreams.values():
            try:
                read_keyring(up.keyring)
            except UsageError as exc:
                _fail(f"{exc} (upstreams.{up.name}.keyring in {config.path})")
    store.ensure()
    from aptguard.ondemand import discard_dead_work

    discard_dead_work(store.root / "tmp")  # on-demand downloads of a killed server
    shared = None
    if workers > 1:  # before prometheus_client is imported: it picks its mode then (metrics.py)
        shared = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="aptguard-metrics-")
    try:
        from aptguard.serve import listen, run

        try:
            sockets = listen(host, port, workers)
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --listen or [server] listen")
        run(config, store, sockets)
    finally:
        if shared:
            shutil.rmtree(shared, ignore_errors=True)


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
        listed = snap.get("on_demand")
        on_demand = f" (+{listed['files']} on demand, {listed['bytes']} bytes)" if listed else ""
        view = snap.get("published")
        if view:
            suites += f"; published view of {view['packages']} packages, valid-until {view['valid_until']}"
        typer.echo(f"{snap['id']}{marks}  {snap['files']} files {snap['bytes']} bytes{on_demand}  {suites}")


@app.command()
def promote(ctx: typer.Context, name: str, snap_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Make a verified snapshot current; clears a hold."""
    run_promote(ctx, name, snap_id)


@app.command("nginx-config")
def nginx_config(
    ctx: typer.Context,
    listen: Annotated[str, typer.Option("--listen", help="nginx's listen address (HOST:PORT or PORT)")] = "80",
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="`aptguard serve` for /, /status, /metrics (default: [server] listen)"),
    ] = None,
    runtime_dir: Annotated[
        str, typer.Option("--runtime-dir", help="pid, logs and temp files of a standalone nginx")
    ] = "/run/aptguard-nginx",
    user: Annotated[str | None, typer.Option("--user", help="user the nginx workers run as")] = None,
    server_only: Annotated[
        bool, typer.Option("--server-only", help="print only the server block (for /etc/nginx/conf.d)")
    ] = False,
) -> None:
    """Print an nginx config that serves this mirror's URLs from its data folder (see the README, "Serving a fleet")."""
    from pathlib import Path

    from aptguard.nginx import render

    config, _store = _load(ctx)
    if config.storage.backend != "local":
        _fail(
            f"{config.path}: storage.backend = {config.storage.backend!r}: nginx serves a local data folder; "
            "with an object store, put nginx or any load balancer in front of `aptguard serve` "
            '(README, "Deployment")'
        )
    typer.echo(
        render(
            config.data_dir,
            listen,
            backend or config.listen,
            Path(runtime_dir),
            user=user,
            server_only=server_only,
            on_demand=any(up.policy == "on-demand" for up in config.upstreams.values()),
        ),
        nl=False,
    )


# ---------------------------------------------------------------- operating the mirror (issue 3)


@app.command()
def rollback(
    ctx: typer.Context,
    name: str,
    to: Annotated[str | None, typer.Option("--to", metavar="ID", help="roll back to this snapshot instead")] = None,
) -> None:
    """Make the previously current snapshot current again, and hold the upstream until `promote`."""
    from aptguard.snapshot import Refused
    from aptguard.snapshot import rollback as do_rollback

    config, store = _load(ctx)
    up = _upstream(config, name)
    try:
        with resigning(store, up) as resign:
            old, now = do_rollback(store, name, to, resign)
    except Refused as exc:
        _fail(str(exc), 1)
    typer.echo(f"{name}: current is now {now} (was {old or 'none'}); on hold: syncs store but do not promote")
    if up.publish is not None:
        typer.echo(
            f"{name}:   a published view: every host takes it at its next update (re-signed with a newer Date "
            f"when it was older). `aptguard promote {name} ID` ends the hold."
        )
        return
    typer.echo(
        f"{name}:   hosts that already fetched the newer lists keep them (apt ignores an older Release); "
        f"point them at /snapshots/{name}/{now}/ or a pin. `aptguard promote {name} ID` ends the hold."
    )


@app.command()
def pin(
    ctx: typer.Context,
    pin_name: Annotated[str, typer.Argument(metavar="PIN")],
    name: str,
    snap_id: Annotated[str, typer.Argument(metavar="ID")],
) -> None:
    """Give one snapshot a stable URL, /pins/PIN/ (for CI); pinned snapshots are never collected."""
    from aptguard.snapshot import Refused
    from aptguard.snapshot import pin as do_pin

    config, store = _load(ctx)
    _upstream(config, name)
    try:
        old = do_pin(store, pin_name, name, snap_id)
    except UsageError as exc:
        _fail(str(exc))
    except Refused as exc:
        _fail(str(exc), 1)
    moved = f" (moved from {old[0]}/{old[1]})" if old and old != (name, snap_id) else ""
    typer.echo(f"pin {pin_name}: {name}/{snap_id}{moved}; served at /pins/{pin_name}/")


@app.command()
def unpin(ctx: typer.Context, pin_name: Annotated[str, typer.Argument(metavar="PIN")]) -> None:
    """Remove a pin; its snapshot is then kept only if retention or another reference wants it."""
    from aptguard.snapshot import Refused
    from aptguard.snapshot import unpin as do_unpin

    _config, store = _load(ctx)
    try:
        name, snap_id = do_unpin(store, pin_name)
    except UsageError as exc:
        _fail(str(exc))
    except Refused as exc:
        _fail(str(exc), 1)
    typer.echo(f"pin {pin_name} removed (was {name}/{snap_id})")


def _snapshot_ref(store: FileStore, name: str, ref: str) -> str:
    """A snapshot id, or `current` / `previous` (the rollback target)."""
    from aptguard.snapshot import require_snapshot

    if ref == "current":
        found = store.current(name)
    elif ref == "previous":
        from aptguard.snapshot import rollback_target

        found = rollback_target(store, name)
    else:
        found = ref
    if found is None:
        _fail(f"upstream {name!r} has no {ref} snapshot")
    try:
        require_snapshot(store, name, found)
    except UsageError as exc:
        _fail(str(exc))
    return found


@app.command()
def diff(
    ctx: typer.Context,
    name: str,
    old: Annotated[str, typer.Argument(metavar="A", help="snapshot id, `current` or `previous`")],
    new: Annotated[str, typer.Argument(metavar="B", help="snapshot id, `current` or `previous`")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Packages added, removed, upgraded and downgraded from snapshot A to B, per suite, component and arch."""
    from aptguard.diff import detail_lines
    from aptguard.diff import diff as build

    config, store = _load(ctx)
    _upstream(config, name)
    changes = build(store, name, _snapshot_ref(store, name, old), _snapshot_ref(store, name, new))
    if as_json:
        _print_json(changes)
        return
    lines = detail_lines(changes)
    typer.echo("\n".join(lines) if lines else f"{name}: no package changes from {changes['from']} to {changes['to']}")


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would go, delete nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Apply [retention], then delete every stored file that no snapshot uses."""
    from aptguard.gc import collect

    config, store = _load(ctx)
    if not store.exists():
        typer.echo(f"gc: {store} does not exist yet; nothing to collect")
        return
    store.ensure()
    report = collect(config, store, dry_run=dry_run, log=lambda m: None if as_json else typer.echo(m))
    if as_json:
        _print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    for snap in report["removed"]:
        typer.echo(
            f"gc: {verb} snapshot {snap['upstream']}/{snap['id']} (created {snap['created']}, "
            f"{snap['files']} files, {snap['bytes']} bytes)"
        )
    for name, kept in report["kept"].items():
        for snap_id, why in kept.items():
            typer.echo(f"gc: kept {name}/{snap_id}: {', '.join(why)}")
    if dry_run and report["leftovers"]:
        typer.echo(f"gc: would discard {len(report['leftovers'])} leftovers of interrupted runs")
    mb = report["bytes"] / 1e6
    typer.echo(f"gc: {verb} {report['objects']} unused stored files; {report['bytes']} bytes ({mb:.1f} MB) freed")


@app.command()
def prefetch(
    ctx: typer.Context,
    name: str,
    packages: Annotated[list[str] | None, typer.Argument(metavar="[PACKAGE]...")] = None,
    snapshot: Annotated[str, typer.Option("--snapshot", help="snapshot id, `current` or `previous`")] = "current",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """On-demand upstreams: fetch and verify now the pool files of a snapshot (all, or these packages and their dependencies)."""
    import asyncio

    from aptguard.ondemand import prefetch as fetch_now
    from aptguard.reasons import Rejected

    config, store = _load(ctx)
    up = _upstream(config, name)
    if up.policy != "on-demand":
        _fail(f'{config.path}: upstreams.{name}.policy is "{up.policy}": its snapshots hold every pool file already')
    snap_id = _snapshot_ref(store, name, snapshot)
    store.ensure()
    try:
        report = asyncio.run(
            fetch_now(config, store, (name, snap_id), packages or [], log=lambda m: None if as_json else typer.echo(m))
        )
    except Rejected as exc:  # a stored index this snapshot lists no longer reads (too large, damaged)
        _fail(f"{name}: snapshot {snap_id}: {exc.reason}: {exc.detail}", 1)
    if as_json:
        _print_json(report)
    else:
        for path, why in report["failed"].items():
            typer.echo(f"{name}: {path}: {why}")
        typer.echo(
            f"{name}: snapshot {snap_id}: {report['files']} files wanted, {report['fetched']} fetched and verified "
            f"({report['bytes']} bytes), {len(report['failed'])} failed"
        )
    if report["failed"]:
        raise SystemExit(1)


@app.command()
def migrate(
    ctx: typer.Context,
    source: Annotated[str, typer.Option("--from", help="the data folder of the local mirror to copy")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Copy a local mirror (snapshots, state, current, pins) into the config's object store."""
    from pathlib import Path

    from aptguard.migrate import migrate as copy

    config, store = _load(ctx)
    if not store.remote:
        _fail(f'{config.path}: [storage] backend = "s3" is needed: migrate copies a data folder into a bucket')
    local = FileStore(Path(source))
    if not (local.root / "meta").is_dir() or not (local.root / "snapshots").is_dir():
        _fail(f"--from {source}: not an aptguard data folder (no snapshots/ and meta/ in it)")
    store.ensure()
    with local.collection_lock(exclusive=False, wait_message="migrate: waiting for a running gc to finish"):
        report = copy(local, store, log=lambda m: None if as_json else typer.echo(f"migrate: {m}"))  # type: ignore[arg-type]
    if as_json:
        _print_json(report)
        return
    for pointer in report["pointers"]:
        typer.echo(f"migrate: set {pointer}")
    typer.echo(
        f"migrate: {report['snapshots']} snapshots copied ({report['skipped']} already in the store), "
        f"{report['objects']} objects uploaded ({report['bytes']} bytes)"
    )


@app.command()
def fsck(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="one upstream (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Re-hash everything stored against what was verified; exit 1 naming each damaged file."""
    from aptguard.fsck import check
    from aptguard.gc import upstream_names

    config, store = _load(ctx)
    names = [_upstream(config, name).name] if name else upstream_names(config, store)
    report = check(store, names)
    if as_json:
        _print_json(report)
    else:
        for damage in report["damaged"]:
            typer.echo(f"damaged: {damage['path']}: {damage['problem']}")
        if report["leftovers"]:
            typer.echo(
                f"note: {len(report['leftovers'])} leftovers of interrupted runs "
                f"({', '.join(report['leftovers'][:3])}{', ...' if len(report['leftovers']) > 3 else ''}); "
                "not damage: nothing serves them, and the next sync or gc discards them"
            )
        summary = f"{report['snapshots']} snapshots, {report['files']} files, {report['bytes']} bytes checked"
        if report["damaged"]:
            typer.echo(
                f"fsck: {len(report['damaged'])} problems; {summary}. Damaged files no longer hold what was verified "
                "and clients fail on them: restore the data folder from a backup, or remove the affected snapshots "
                "and their objects, then sync again"
            )
        else:
            typer.echo(f"fsck: clean; {summary}")
    raise typer.Exit(1 if report["damaged"] else 0)


@app.command()
def sources(
    ctx: typer.Context,
    name: str,
    snapshot: Annotated[str | None, typer.Option("--snapshot", metavar="ID", help="a fixed snapshot")] = None,
    pin_name: Annotated[str | None, typer.Option("--pin", metavar="PIN", help="a pinned snapshot")] = None,
    base_url: Annotated[
        str | None, typer.Option("--base-url", help="how clients reach this mirror (default: from [server] listen)")
    ] = None,
    signed_by: Annotated[
        str | None, typer.Option("--signed-by", help="keyring path on the clients (default: the upstream keyring)")
    ] = None,
) -> None:
    """Print a deb822 .sources stanza for clients of this mirror."""
    from aptguard.snapshot import require_snapshot
    from aptguard.sources import default_base_url, embedded_keys, stanza

    config, store = _load(ctx)
    up = _upstream(config, name)
    if snapshot and pin_name:
        _fail("give --snapshot or --pin, not both")
    base = (base_url or default_base_url(config.listen)).rstrip("/")
    manifest = None
    if snapshot:
        try:
            require_snapshot(store, name, snapshot)
        except UsageError as exc:
            _fail(str(exc))
        uri = f"{base}/snapshots/{name}/{snapshot}"
        manifest = store.read_manifest(name, snapshot)
    elif pin_name:
        target = store.pin_target(pin_name)
        if target is None:
            _fail(f"no pin named {pin_name!r} (pins: {', '.join(store.pins()) or 'none'})")
        if target[0] != name:
            _fail(f"pin {pin_name} is a snapshot of {target[0]}, not of {name}")
        uri = f"{base}/pins/{pin_name}"
        manifest = store.read_manifest(*target)
    else:
        uri = f"{base}/{name}"
    if up.publish is not None and signed_by is None:  # clients verify with the mirror's keys (SPEC §7)
        from aptguard.reasons import Rejected
        from aptguard.signer import Signer

        try:
            with Signer(up.publish) as signer:
                signed_by = embedded_keys(signer.public_keys())
        except Rejected as exc:
            _fail(f"{name}: {exc.detail}")
    typer.echo(stanza(up, uri, fixed_manifest=manifest, signed_by=signed_by), nl=False)
