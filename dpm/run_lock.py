"""The run dir's lock: one process runs a run dir at a time, and anyone can ask whether one does.

`run.lock` is held with flock for the whole run and names its holder ("pid N on HOST since T").
The kernel drops a flock with its process, so a lock file whose process is gone is held by nobody:
a killed run never blocks the next one, and a report never calls a dead run "running"."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from dpm.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# How long a run waits for the lock before refusing: a report probing the lock (lock_holder) holds
# it for microseconds, and must never make a run that starts at that instant fail.
LOCK_PATIENCE_S = 2.0


class RunDirBusy(UserError):
    """A live process holds the run dir's lock: `holder` says who ("pid N on HOST since T"). A sweep
    skips such a run (the holder runs and reports it); a single run stops with the message."""

    def __init__(self, run_dir: Path, holder: str):
        super().__init__(
            f"{run_dir} is in use by another process ({holder}): wait for it to finish, "
            f"or give this run another run_id / hydra.run.dir"
        )
        self.run_dir, self.holder = run_dir, holder


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold `run_dir/run.lock` (flock, with pid and host inside) for the run: a second process
    pointed at the same run dir is refused. A lock left by a dead process is not held by anyone
    (the kernel drops flocks with their process) and is taken over with a note. Raises RunDirBusy
    when a live process holds it for longer than LOCK_PATIENCE_S."""
    path = run_dir / LOCK_NAME
    with open(path, "a+") as f:
        f.seek(0)
        holder = f.read().strip()
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunDirBusy(run_dir, holder or "unknown") from None
                time.sleep(0.05)
        if holder:
            log.info("taking over the stale lock of a process that is gone (%s)", holder)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def lock_holder(run_dir: Path) -> str | None:
    """Who runs `run_dir` now ("pid N on HOST since T"), or None when no live process holds its lock
    (never started, finished, or killed). Probes with a shared flock that is released at once."""
    path = run_dir / LOCK_NAME
    try:
        with open(path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "a process that did not say who it is"
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:  # no lock file (or unreadable): nobody is running it
        return None
    return None
