"""The failures a user can fix from the message alone.

``main`` prints these as one line (the key or path and the fix) and exits with status 2;
any other exception is a bug and keeps its traceback. Each class also keeps the builtin
base that callers caught before (``ValueError``, ``FileNotFoundError``).
"""

from __future__ import annotations


class FlatfscError(Exception):
    """Base of every expected failure (bad config, data, zoo entry, workdir, divergence)."""


class DataError(FlatfscError, FileNotFoundError):
    """Prepared data is missing or damaged (wraps the data package's errors)."""


class WorkdirLockedError(FlatfscError, RuntimeError):
    """Another run holds the workdir's lock."""


class ResultsError(FlatfscError, ValueError):
    """A ``results.json`` (or ``metrics.jsonl`` a report needs) is unreadable."""
