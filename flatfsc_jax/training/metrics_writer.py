"""One writer for a run's scalar metrics: ``metrics.jsonl`` and TensorBoard event files.

``MetricsWriter(logdir, resume_step=S)`` appends one JSON record per ``write(step,
scalars)`` to ``<logdir>/metrics.jsonl`` (the machine-readable source of truth, read by
``train.read_metrics``) and the same numbers, as TensorBoard scalars tagged by their
JSONL key, to ``events.out.tfevents.*`` files in the same directory. Both are written
from this one call, so they cannot drift apart; both are flushed after every record, so
a killed run loses nothing it has logged.

Resuming: a run restarted from checkpoint step ``S`` redoes the steps after ``S``, so the
records it had logged for them are dropped: ``metrics.jsonl`` is rewritten without the
records with ``step > S`` (and without a last line cut short by a kill), and the new
event file starts with a TensorBoard *purge* marker at ``S + 1``, which makes TensorBoard
hide the older events with ``step > S``. A resumed run therefore logs every step once.

TensorBoard files are written with ``tensorboardX``'s protos and its synchronous
``EventsWriter``: a small, maintained package whose only dependencies are numpy, protobuf
and packaging, so training needs neither TensorFlow nor TensorBoard (the ``tensorboard``
package, in the ``dev`` and ``tensorboard`` extras, is only needed to *view* the logs:
``tensorboard --logdir work/zoo``). Each record is one event holding all its scalars.

Only process 0 writes (``enabled=False`` elsewhere makes every call a no-op).
"""

from __future__ import annotations

import json
import logging
import os
import time

from etils import epath

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"


def read_jsonl(path) -> list[dict]:
    """The records of a metrics file: JSON objects with an integer ``step``.

    Anything else (a line cut short by a kill, an edited or foreign line) is skipped
    with one warning naming the file, so one bad record never stops a later run.
    """
    path = epath.Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if not isinstance(record, dict) or not _is_step(record.get("step")):
            bad += 1
            continue
        records.append(record)
    if bad:
        log.warning(
            "%s: skipped %d unreadable record(s) (not a JSON object with an integer step; "
            "a line cut by a kill is re-done on resume)",
            path,
            bad,
        )
    return records


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def truncate_after(path, step: int) -> int:
    """Rewrites the JSONL file at ``path`` without records whose step is > ``step``.

    Returns the number of records dropped. The rewrite is atomic (write, then rename),
    so a kill during it leaves either the old or the new file.
    """
    path = epath.Path(path)
    if not path.exists():
        return 0
    records = read_jsonl(path)
    kept = [r for r in records if r["step"] <= step]
    dropped = len(path.read_text().splitlines()) - len(kept)
    if dropped:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
    return dropped


class _EventFile:
    """A TensorBoard event file written synchronously: each record is on disk when
    ``write`` returns (tensorboardX's ``SummaryWriter`` queues events to a thread, and a
    kill would lose what JSONL already holds)."""

    def __init__(self, logdir: epath.Path, purge_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._event_pb2 = event_pb2
        # The suffix makes the name unique per writer: two writers opened within the same
        # second (a quick resume) must not share, and so truncate, one file. File names
        # sort in creation order, the order in which TensorBoard reads them.
        self._events = EventsWriter(
            os.path.join(os.fspath(logdir), "events"), filename_suffix=f".{time.time_ns()}"
        )
        # TensorBoard hides the events of earlier files with step >= purge_step.
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._events.write_event(
            event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start)
        )
        self._events.flush()

    def write(self, step: int, scalars: dict[str, float]) -> None:
        from tensorboardX.summary import Summary

        values = [Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
        event = self._event_pb2.Event(
            wall_time=time.time(), step=step, summary=Summary(value=values)
        )
        self._events.write_event(event)
        self._events.flush()

    def close(self) -> None:
        self._events.close()


def _open_event_file(logdir: epath.Path, purge_step: int) -> _EventFile | None:
    """The run's event file, or None (with a warning) where it cannot be written."""
    try:
        return _EventFile(logdir, purge_step)
    except Exception as e:  # e.g. gs:// without google-cloud-storage installed
        log.warning(
            "TensorBoard logging disabled for %s (%s: %s); metrics.jsonl is still written. "
            "For gs:// or s3:// work directories install google-cloud-storage or boto3.",
            logdir,
            type(e).__name__,
            e,
        )
        return None


class MetricsWriter:
    """Writes scalar records to ``metrics.jsonl`` and TensorBoard, from one place."""

    def __init__(self, logdir, *, resume_step: int = 0, enabled: bool = True):
        self.logdir = epath.Path(logdir)
        self.path = self.logdir / JSONL_NAME
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.logdir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_after(self.path, resume_step)
        if dropped:
            log.info(
                "%s: dropped %d records after step %d (re-done)", self.path, dropped, resume_step
            )
        self._file = self.path.open("a")
        self._tb = _open_event_file(self.logdir, purge_step=resume_step + 1)

    def write(self, step: int, scalars: dict) -> None:
        """Logs ``scalars`` (name -> number) at ``step``: one JSONL record, one TB scalar each."""
        if self._file is None:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in scalars.items() if k != "step"})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            numbers = {
                k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)
            }
            self._tb.write(int(step), numbers)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _plain(value):
    """A JSON-ready Python scalar: numpy/jax scalars become floats, the rest stays."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return float(value)
