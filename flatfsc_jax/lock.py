"""One writer per workdir: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``.

Held for a whole run (``experiment.run``) and by the command-line tools that write into a
workdir (``cli.report``, ``cli.flatness``); the holder's pid is written in the file so a
second run can name it. The kernel releases the lock when the process exits, kill -9
included, so a stale ``.lock`` file never blocks a later run. With several processes
(multi-host), only process 0 takes it.

Processes that each fill a share of one zoo (``--entries=k/n``, one per GPU) run together
by design: they take the lock *shared* (every share may hold it; a whole run may not, nor
the reverse) and rely on the zoo's per-entry locks against writing one entry twice. Cloud
storage (``gs://``) has no ``flock``: there the lock is not taken (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from flatfsc_jax import errors


@contextlib.contextmanager
def workdir_lock(workdir: str, *, take: bool = True, shared: bool = False):
    """Holds the lock of ``workdir`` (created if needed) inside the block: exclusive, or
    ``shared`` with the other shares of one zoo."""
    if not take or "://" in str(workdir):
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "pid ?"
            raise errors.WorkdirLockedError(
                f"another run ({holder}) uses this workdir {workdir!r}; wait for it to "
                "finish, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)  # the holder's name, for a second run's message
        share = ", one of the --entries shares" if shared else ""
        os.pwrite(fd, f"pid {os.getpid()}{share}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
