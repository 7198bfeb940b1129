"""One writer per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

Held for a whole run (``experiment.run``) and by the command-line tools that write into a
workdir (``cli.report``, ``cli.flatness``); the holder's pid is written in the file so a
second run can name it. The kernel releases the lock when the process exits, kill -9
included, so a stale ``.lock`` file never blocks a later run. With several processes
(multi-host), only process 0 takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from flatfsc_jax import errors


@contextlib.contextmanager
def workdir_lock(workdir: str, *, take: bool = True):
    """Holds the exclusive lock of ``workdir`` (created if needed) inside the block."""
    if not take:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise errors.WorkdirLockedError(
                f"another run (pid {pid}) uses this workdir {workdir!r}; wait for it to "
                "finish, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
