"""The command line of SPEC §2: a thin shell over config, sync, snapshot, status and serve.

Exit codes: 0 done, 1 refused (a sync rejected, fsck found damage), 2 usage or config error.

This module is the entry point and holds what a plain `sync` or `promote` runs, without typer:
start-up is part of every sync (see _plain_sync_args). Every other command, and the help, is
the typer app of aptguard.commands.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, NoReturn

from aptguard.config import Config, UpstreamConfig, find_config, load_config
from aptguard.reasons import ADVICE, UsageError
from aptguard.store import FileStore, StoreError, open_store


@dataclass
class _Context:
    config_path: str | None

    def config(self) -> Config:
        return load_config(find_config(self.config_path))


def _fail(message: str, code: int = 2) -> NoReturn:
    echo(f"aptguard: {message}", err=True)
    raise SystemExit(code)


def _load(ctx: Any) -> tuple[Config, FileStore]:
    """The config and store of a command's context (typer's, or main's for a plain sync)."""
    try:
        config = ctx.obj.config()
    except UsageError as exc:
        _fail(str(exc))
    return config, open_store(config)


def _upstream(config: Config, name: str) -> UpstreamConfig:
    if name not in config.upstreams:
        known = ", ".join(config.upstreams) or "none"
        _fail(f"{config.path}: no upstream named {name!r} (configured: {known})")
    return config.upstreams[name]


def _print_json(value: Any) -> None:
    echo(json.dumps(value, indent=2, sort_keys=False))


def echo(text: str, *, err: bool = False, nl: bool = True) -> None:
    """Print a line of output, at once (as click.echo does: stdout and stderr keep their order)."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n" if nl else text)
    stream.flush()


def run_sync(
    ctx: Any, names: list[str] | None, *, no_promote: bool, allow_release_change: bool, log_format: str
) -> None:
    """Fetch, verify, store and promote a new snapshot of every (or each named) upstream."""
    import asyncio

    from aptguard.keyring import read_keyring
    from aptguard.sync import sync_all

    if log_format not in ("text", "json"):
        _fail(f"--log-format: expected text or json, got {log_format!r}")
    config, store = _load(ctx)
    selected = [_upstream(config, n) for n in names] if names else list(config.upstreams.values())
    if not selected:
        _fail(f"{config.path}: no [upstreams.NAME] configured; nothing to sync")
    for up in selected:  # every keyring is read before any network or disk work
        try:
            read_keyring(up.keyring)
        except UsageError as exc:
            _fail(f"{exc} (upstreams.{up.name}.keyring in {config.path})")
    with ExitStack() as stack:
        try:
            store.ensure()
        except OSError as exc:
            _fail(f"{config.path}: data_dir {config.data_dir}: {exc.strerror}; check the path and its permissions", 1)

        progress = _sync_progress(log_format, [up.name for up in selected])
        stack.callback(progress.close)
        results = asyncio.run(
            sync_all(
                selected,
                store,
                limits=config.limits,
                promote=not no_promote,
                allow_release_change=allow_release_change,
                log=progress.log,
                progress=progress,
            )
        )
    raise SystemExit(1 if report_results(results, store, log_format) else 0)


def report_results(results: list[Any], store: FileStore, log_format: str) -> bool:
    """Print each upstream's outcome (a line each, or a JSON object); True if any was rejected."""
    failed = False
    for r in results:
        stats = r.stats
        if log_format == "json":
            failed = failed or r.outcome == "rejected"
            _json_result(r)
        elif r.outcome == "rejected":
            failed = True
            echo(f"{r.name}: rejected [{r.reason}] {r.detail}")
            echo(f"{r.name}:   what to do: {ADVICE[r.reason]}; clients keep the previous snapshot")
        elif r.outcome == "unchanged":
            current = store.current(r.name)
            where = (
                f"current snapshot {current}"
                if current == r.snapshot
                else f"newest snapshot {r.snapshot}, current {current}"
            )
            echo(f"{r.name}: unchanged, {where} ({stats.get('seconds')} s)")
        else:
            size = stats.get("bytes", 0) / 1e6
            got = stats.get("downloaded", 0) / 1e6
            echo(
                f"{r.name}: {r.outcome} {r.snapshot}: {stats.get('files')} files, {size:.1f} MB "
                f"({got:.1f} MB downloaded) in {stats.get('seconds')} s" + (f"; {r.detail}" if r.detail else "")
            )
            for line in stats.get("changes") or ["no package changes"]:
                echo(f"{r.name}:   {line}")
    return failed


def run_promote(ctx: Any, name: str, snap_id: str) -> None:
    """Make a verified snapshot current; clears a hold."""
    from aptguard.snapshot import Refused
    from aptguard.snapshot import promote as do_promote

    config, store = _load(ctx)
    up = _upstream(config, name)
    try:
        with resigning(store, up) as resign:
            old, now = do_promote(store, name, snap_id, resign)
    except UsageError as exc:
        _fail(str(exc))
    except Refused as exc:
        _fail(str(exc), 1)
    copy = f" (a copy of {snap_id} re-signed: apt ignores an older Release)" if now != snap_id else ""
    echo(f"{name}: current is now {now}{copy} (was {old or 'none'}); hold cleared")


@contextlib.contextmanager
def resigning(store: FileStore, up: Any) -> Iterator[Any]:
    """For an upstream with a published view: the hook that makes a re-signed copy of an older
    view before promote or rollback switches to it (under the shared collection lock, as a
    sync builds a snapshot); None otherwise. A view that cannot be re-signed is Refused."""
    if up.publish is None:
        yield None
        return
    from datetime import UTC, datetime

    from aptguard import publish
    from aptguard.reasons import Rejected
    from aptguard.snapshot import Refused

    def resign(target: str, current: str | None) -> str:
        older = publish.older_view(store, up.name, target, current)
        if older is None:
            return target
        try:
            return publish.resigned_copy(store, up, older, datetime.now(UTC))
        except Rejected as exc:
            raise Refused(f"{up.name}: {target} was not made current: {exc.reason}: {exc.detail}") from None

    with store.collection_lock(exclusive=False, wait_message=f"{up.name}: waiting for a running gc to finish"):
        yield resign


def _sync_progress(log_format: str, names: list[str]) -> Any:
    """A bar on a terminal; plain phase lines otherwise; JSON lines for log collectors."""
    if log_format == "json":
        from aptguard.progress import JsonLog

        return JsonLog(names)
    if sys.stderr.isatty():
        from aptguard.progress import terminal_progress

        return terminal_progress(names)
    from aptguard.progress import Progress

    return Progress()


def _json_result(r: Any) -> None:
    """One JSON object per upstream on stdout: the outcome, and for a new snapshot its package changes."""
    from datetime import UTC, datetime

    record: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "event": "result",
        "upstream": r.name,
        "outcome": r.outcome,
        "reason": r.reason,
        "detail": r.detail,
        "snapshot": r.snapshot,
        **{
            k: v
            for k, v in r.stats.items()
            if k
            in (
                "files",
                "bytes",
                "downloaded",
                "seconds",
                "written",
                "pool_processes",
                "steps",
                "on_demand",
                "published",
            )
        },
    }
    if r.outcome in ("promoted", "stored") and r.snapshot:
        record["changes"] = r.stats.get("changes", [])
    echo(json.dumps(record))


def _plain_sync_args(argv: list[str]) -> dict[str, Any] | None:
    """The arguments of a plain `[--config F] sync [--no-promote] [--allow-release-change]
    [--log-format F] [NAME...]` or `[--config F] promote NAME ID`, or None for anything else
    (help, another command, an unknown option), which typer parses.

    Start-up is part of every sync, so these two run here, without importing typer at all
    (aptguard.commands holds the app; importing typer alone costs 40-50 ms on 2 CPUs). typer
    0.29 coerces every parameter that is not a bool flag through a pydantic TypeAdapter
    (typer/_coercion.py build_runtime_param, typer/_adapters.py), so parsing `--config F sync`
    imports pydantic (~48 ms) and its plugin loader (importlib.metadata, ~9 ms), and builds the
    whole click command (~7 ms). pydantic is a hard requirement of typer, imported whatever
    rich_markup_mode or pretty_exceptions_enable say. Measured (median of 10 runs, 2 CPUs,
    typer 0.29.2, pydantic 2.14), this parser vs `app()`: `aptguard --config /nonexistent.toml
    sync` 147 vs 236 ms; `--config TINY sync` (no upstreams) 148 vs 231 ms; `promote NAME ID`
    116 vs 202 ms; a no-op sync of one upstream 187 vs 269 ms (+44 %). Exit codes and output
    were the same for 28 argument lists, from --config=F and repeated flags to bad values."""
    args: dict[str, Any] = {"config": None, "names": [], "no_promote": False, "allow_release_change": False}
    args["log_format"] = "text"
    words = iter(argv)
    command = False
    for word in words:
        key, eq, value = word.partition("=")
        if not command and key in ("--config", "-c"):
            args["config"] = value if eq else next(words, None)
            if args["config"] is None:
                return None
        elif not command and word == "sync":
            command = True
        elif (
            not command
            and word == "promote"
            and len(rest := [w for w in words]) == 2
            and "-" not in rest[0][:1] + rest[1][:1]
        ):
            return {"command": "promote", "config": args["config"], "name": rest[0], "snap_id": rest[1]}
        elif command and word in ("--no-promote", "--allow-release-change"):
            args[word[2:].replace("-", "_")] = True
        elif command and key == "--log-format":
            args["log_format"] = value if eq else next(words, None)
            if args["log_format"] is None:
                return None
        elif command and word and not word.startswith("-"):
            args["names"].append(word)
        else:
            return None
    return args if command else None


def main() -> None:
    """The `aptguard` command; ends the process with its exit code (see _finish)."""
    _finish(_run(sys.argv[1:]))


def _run(argv: list[str]) -> int:
    try:
        plain = _plain_sync_args(argv)
        if plain is None:
            from aptguard.commands import app

            app()  # exits, as click does, with SystemExit
        else:
            ctx = type("Ctx", (), {"obj": _Context(plain.pop("config"))})()  # what commands read of their context
            if plain.pop("command", None) == "promote":
                run_promote(ctx, **plain)
            else:
                run_sync(ctx, plain.pop("names") or None, **plain)
        return 0
    except UsageError as exc:
        echo(f"aptguard: {exc}", err=True)
        return 2
    except StoreError as exc:  # the object store failed under a command: what was stored is unchanged
        echo(f"aptguard: storage-error: {exc}; check [storage] in the config and that the store answers", err=True)
        return 1
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        echo(str(exc.code), err=True)
        return 1


def _finish(code: int) -> NoReturn:
    """Flush the output, run the atexit handlers, and end the process at once.

    An interpreter's own exit tears down every module it imported, one object at a time: for
    the modules a sync imports (asyncio, aiohttp, python-gnupg, ...) that is 40-60 ms (2 CPUs,
    Python 3.11, `import aptguard.cli, aptguard.sync, gnupg` then exit: 243-415 ms against
    272-316 ms with os._exit), paid by every sync and every command of a script. Nothing is
    lost by skipping it: every file aptguard writes is written, flushed and closed (or renamed
    into place) before a command returns, and no thread of ours outlives its command.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away (`aptguard status | head`)
            code = code or 1
    os._exit(code)
