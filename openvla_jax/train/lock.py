"""`WorkdirLock`: one trainer per work dir.

    with WorkdirLock(workdir):      # raises WorkdirLocked naming the holder's pid and host
        train ...

Two trainers on one work dir would delete each other's in-flight saves (a starting checkpointer
clears orbax's temp dirs and moves unfinished step dirs aside) and interleave `metrics.jsonl`.
The lock is `flock` on `workdir/train.lock`: the kernel drops it when its process ends, however it
ends (SIGKILL, OOM, a lost host), so a stale lock never blocks a resume. The file also records the
holder (pid, host, start time) for the message the second trainer prints. On a filesystem without
`flock` (some FUSE mounts) the run goes on with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_FILE = "train.lock"


class WorkdirLocked(RuntimeError):
    """Another live process holds the work dir's lock; the message names it."""


class WorkdirLock:
    def __init__(self, workdir):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLocked(
                    f"{self.path.parent} is in use by another trainer ({_describe(holder)}, lock file "
                    f"{self.path}): stop it, or train into another --workdir"
                ) from None
            log.warning("cannot lock %s (%s): a second trainer on this work dir would not be stopped", self.path, e)
            return self
        # Ours now: record who holds it (the previous holder's record, if any, is stale).
        os.ftruncate(fd, 0)
        info = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)  # the file stays: deleting it would race with a trainer opening it

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}  # being rewritten by its new holder this instant, or not ours


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"
