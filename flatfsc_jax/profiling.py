"""Wall-time accounting of the main job: where the minutes of ``./run.sh`` go.

The job's stages add the seconds they spend to named sections of one process-wide
:class:`Profile` (``PROFILE``): ``train/steps``, ``train/compile``, ``train/validation``,
``train/checkpoint``, the same under ``fuse/`` and ``distill/`` (the distilled
student), ``evaluate/embed``, ``evaluate/parc``,
... ``experiment.run`` resets it at the start and prints the split at the end (and
writes ``<workdir>/report/profile.json``), with the share of the job spent in training
steps as the headline ratio. Sections are wall time; jitted work is dispatched
asynchronously, so a section that ends with device work in flight is closed only after
a value is fetched (the training loop fetches metrics at every log, validation and
checkpoint, which is where it closes its step section).
"""

from __future__ import annotations

import collections
import contextlib
import time

# Sections that count as "training steps" for the headline ratio, and the overheads of
# the training stages (compilation, validation, checkpointing).
STEP_SECTIONS = ("train/steps", "fuse/steps", "distill/steps")
OVERHEAD_SECTIONS = tuple(
    f"{stage}/{part}"
    for stage in ("train", "fuse", "distill")
    for part in ("compile", "validation", "checkpoint")
)


class Profile:
    """Named wall-time sections (seconds) and counters."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.counts: dict[str, int] = collections.defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        self.seconds[name] += float(seconds)
        self.counts[name] += count

    @contextlib.contextmanager
    def section(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def summary(self, total_seconds: float) -> dict:
        """Plain data: per-section seconds and the headline ratios."""
        sec = dict(sorted(self.seconds.items()))
        # Every stage whose sections the step and overhead shares count (distill too).
        training_stage = sum(
            v for k, v in sec.items() if k.split("/")[0] in ("train", "fuse", "distill")
        )
        steps = sum(sec.get(k, 0.0) for k in STEP_SECTIONS)
        overhead = sum(sec.get(k, 0.0) for k in OVERHEAD_SECTIONS)
        return {
            "total_seconds": float(total_seconds),
            "sections": sec,
            "counts": dict(sorted(self.counts.items())),
            "training_step_share": steps / total_seconds if total_seconds > 0 else 0.0,
            "training_stage_seconds": training_stage,
            "overhead_share_of_training_stage": (
                overhead / training_stage if training_stage > 0 else 0.0
            ),
        }


def format_summary(summary: dict) -> str:
    """The split as a console table, headline ratios last."""
    total = summary["total_seconds"]
    lines = [f"{'section':28s} {'seconds':>9s} {'share':>7s}", "-" * 46]
    for name, s in summary["sections"].items():
        lines.append(f"{name:28s} {s:9.1f} {100 * s / max(total, 1e-9):6.1f}%")
    rest = total - sum(summary["sections"].values())
    lines.append(f"{'(unaccounted)':28s} {rest:9.1f} {100 * rest / max(total, 1e-9):6.1f}%")
    lines.append(f"{'total':28s} {total:9.1f}")
    lines.append(
        f"training steps: {100 * summary['training_step_share']:.1f}% of the job; "
        f"compilation + validation + checkpointing: "
        f"{100 * summary['overhead_share_of_training_stage']:.1f}% of the training stages"
    )
    return "\n".join(lines)


PROFILE = Profile()
