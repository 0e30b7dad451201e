"""How a long sync shows it is alive: a progress bar on a terminal, log lines elsewhere.

The syncer reports pool downloads through a `Progress` (files and bytes); the CLI picks the
rendering. `rich` is imported only by `terminal_progress`, so a sync run from a timer (no
terminal) never pays its start-up cost.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any


class Progress:
    """Silent progress: what the syncer calls when nobody watches a bar."""

    def begin(self, name: str, files: int, nbytes: int) -> None:
        """The pool download of upstream `name` starts: `files` files, `nbytes` bytes."""

    def advance(self, name: str, *, files: int = 0, nbytes: int = 0) -> None:
        """Some bytes arrived, or some files were verified and stored."""

    def end(self, name: str) -> None:
        """The upstream's sync is over (whatever its outcome)."""

    def log(self, message: str) -> None:
        """One phase line ("NAME: ..."), printed so that it does not tear a bar."""
        print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Stop drawing; called once after every upstream."""


class JsonLog(Progress):
    """One JSON object per line for log collectors (journald, Loki, Elasticsearch)."""

    def __init__(self, upstreams: list[str], stream: IO[str] | None = None) -> None:
        self.upstreams = set(upstreams)
        self.stream = stream or sys.stderr

    def emit(self, event: str, **fields: Any) -> None:
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"), "event": event}
        record.update(fields)
        self.stream.write(json.dumps(record, sort_keys=False) + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        name, sep, text = message.partition(": ")
        if sep and name in self.upstreams:
            self.emit("phase", upstream=name, message=text)
        else:
            self.emit("phase", message=message)

    def begin(self, name: str, files: int, nbytes: int) -> None:
        self.emit("download", upstream=name, files=files, bytes=nbytes)


def terminal_progress(upstreams: list[str], stream: IO[str] | None = None) -> Progress:
    """A rich progress bar per upstream: files done, bytes, transfer rate, time left."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TaskID,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as Bars

    class TerminalProgress(Progress):
        def __init__(self) -> None:
            self.console = Console(file=stream or sys.stderr)
            self.bars = Bars(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[done]}/{task.fields[files]} files"),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.tasks: dict[str, TaskID] = {}
            self.bars.start()

        def _task(self, name: str) -> TaskID:
            if name not in self.tasks:
                self.tasks[name] = self.bars.add_task(name, total=None, done=0, files=0)
            return self.tasks[name]

        def begin(self, name: str, files: int, nbytes: int) -> None:
            self.bars.update(self._task(name), total=nbytes, completed=0, done=0, files=files)

        def advance(self, name: str, *, files: int = 0, nbytes: int = 0) -> None:
            task = self._task(name)
            if files:
                done = self.bars.tasks[self.bars.task_ids.index(task)].fields["done"]
                self.bars.update(task, done=done + files)
            if nbytes and self.bars.tasks[self.bars.task_ids.index(task)].total is not None:
                self.bars.advance(task, nbytes)

        def end(self, name: str) -> None:
            if name in self.tasks:
                task = self.tasks[name]
                info = self.bars.tasks[self.bars.task_ids.index(task)]
                self.bars.update(task, total=info.total or 1, completed=info.total or 1)

        def log(self, message: str) -> None:
            self.console.print(message, markup=False, highlight=False)

        def close(self) -> None:
            self.bars.stop()

    return TerminalProgress()
