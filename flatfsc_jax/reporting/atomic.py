"""Reports are replaced whole or not at all.

A report is rendered into a temporary directory next to its target; only when every file
rendered does each one replace its previous version (``os.replace``, atomic on one file
system). A failing plot or a full disk therefore leaves the previous report as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def staged(out_dir):
    """Yields a temporary directory; on success moves its files into ``out_dir``."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        yield tmp
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def final_path(path: str, tmp: str, out_dir) -> str:
    """Where a file rendered at ``path`` inside ``tmp`` lands in ``out_dir``."""
    return os.path.join(os.fspath(out_dir), os.path.relpath(path, tmp))
