"""A forked twin of the sync process, for the bulk of a large pool.

One Python process fetches, hashes and stores at most one core's worth: its event loop and the
worker threads that write files share one GIL, and a cold sync of small files spends as much
time handing that lock over as working (README, "Benchmarks"). A twin made by fork() has its own
interpreter and its own GIL. It inherits everything the sync has built (config, store, snapshot
builder, the imported aiohttp), runs `job` in a fresh thread with a fresh event loop, and sends
its news to this process as JSON lines through a pipe.

fork() is taken only where no other thread can hold a lock the twin needs: the sync's worker
threads idle between steps, no import running (the caller has imported what the twin will use).
The twin shares no socket or loop with its parent: it opens its own. It dies with its parent
(PR_SET_PDEATHSIG), so a killed sync leaves no twin writing behind the next sync's back, and
its parent kills and reaps it before undoing what it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import signal
import threading
import traceback
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

Send = Callable[[dict[str, Any]], None]

_PR_SET_PDEATHSIG = 1


class Twin:
    """The parent's handle on a running twin."""

    def __init__(self, pid: int, read_fd: int) -> None:
        self.pid = pid
        self._read = os.fdopen(read_fd, "rb", buffering=0)
        self.status: int | None = None  # once reaped
        self._reading = False  # messages() has the pipe (and closes it)

    @classmethod
    def start(cls, job: Callable[[Send], None]) -> Twin:
        """Fork; the twin runs `job(send)` and exits (0 when `job` returned, 70 otherwise)."""
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        # Frozen objects are left alone by the twin's collector, so the pages it inherits stay
        # shared with this process instead of being copied as the collector walks them.
        gc.freeze()
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns of fork() in a threaded process; the module docstring says
                # why this one is taken where it is safe.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        finally:
            if os.getpid() == parent:
                gc.unfreeze()
        if pid == 0:  # the twin: never returns
            code = 70
            try:
                os.close(read_fd)
                _die_with(parent)
                out = os.fdopen(write_fd, "wb", buffering=0)

                def send(message: dict[str, Any]) -> None:
                    out.write(json.dumps(message).encode() + b"\n")

                def run() -> None:
                    nonlocal code
                    try:
                        job(send)
                        code = 0
                    except BaseException as exc:
                        with contextlib.suppress(BaseException):
                            send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})

                # A fresh thread has no running event loop: the forked one belongs to the parent.
                worker = threading.Thread(target=run, name="aptguard-twin")
                worker.start()
                worker.join()
            finally:
                os._exit(code)
        os.close(write_fd)
        return cls(pid, read_fd)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """What the twin sends, until it closes the pipe (it ended, or it was killed)."""
        self._reading = True
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self._read)
        try:
            while line := await reader.readline():
                yield json.loads(line)
        finally:
            transport.close()

    def stop(self) -> int:
        """Kill the twin if it still runs and reap it: nothing it does outlives this call. Its
        exit status (negative: the signal that ended it). A twin that has said its last word
        ("end") has nothing left to do but exit: killing it then loses nothing."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._reap()
        if not self._reading:
            self._read.close()
        assert self.status is not None
        return self.status

    def _reap(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        self.status = os.waitstatus_to_exitcode(status)


def _die_with(parent: int) -> None:
    """Be killed when the parent dies (Linux); a parent already gone ends the twin now."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(parent, signal.SIGKILL)


def die_with_parent(parent: int, signum: int) -> None:
    """Receive `signum` when the parent dies (Linux's PR_SET_PDEATHSIG); a parent already gone
    (this process was orphaned before it could ask) sends it now."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
