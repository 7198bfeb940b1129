"""The resumable loop that backbone training and distillation share.

A zoo entry is trained by a Python loop over one jitted step (XLA:CPU runs convolutions
inside ``while`` loops slowly: docs/performance.md#xla-cpu-loops). Around the step, every
trainer needs the same machinery, and it must behave identically for all of them:

* an Orbax ``CheckpointManager`` in ``<entry>/train`` saving the train state, the input
  iterators' positions and the best-so-far record, so that a killed run restarted with
  the same command ends with exactly the parameters of an uninterrupted one;
* finite checks: the logged loss at every log, every array of the state before every
  save, every ``best/`` save, on restore and before completion, so nothing non-finite is
  ever kept and a diverged run is never marked complete;
* ``metrics.jsonl`` + TensorBoard through ``MetricsWriter`` (records after the resumed
  step are dropped, so a resumed run logs each step once);
* the profile sections (``<stage>/compile``, ``steps``, ``validation``, ``checkpoint``).

A trainer supplies only what is its own: ``fresh_state``, the step, the batches and the
validation. :class:`ResumableRun` holds the state; :func:`run_steps` is the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flatfsc_jax import errors
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.profiling import PROFILE
from flatfsc_jax.training import metrics_writer
from flatfsc_jax.training import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(errors.FlatfscError, FloatingPointError):
    """Training produced a NaN/inf loss, parameter or BatchNorm statistic.

    Nothing non-finite is ever saved: the state is checked before every checkpoint,
    every ``best/`` save and completion, so the last checkpoint kept is finite.
    """


def non_finite_leaves(state) -> list[str]:
    """Paths of the float arrays of ``state`` (params, BN stats, LoRA, optimizer) with a
    NaN or inf. Under BatchNorm the loss, computed before the update, can stay finite
    while the updated weights are not: checking the loss alone is not enough."""
    tree = {
        "params": state.params,
        "batch_stats": state.batch_stats,
        "lora": state.lora,
        "opt_state": state.opt_state,
    }
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    floats = [(k, v) for k, v in flat if jnp.issubdtype(v.dtype, jnp.inexact)]
    finite = jax.device_get([jnp.all(jnp.isfinite(v)) for _, v in floats])
    return [jax.tree_util.keystr(k) for (k, _), ok in zip(floats, finite, strict=True) if not ok]


def check_finite_state(state, where: str, advice: str) -> None:
    """Raises ``NonFiniteError`` naming the non-finite arrays of ``state``."""
    bad = non_finite_leaves(state)
    if bad:
        raise NonFiniteError(
            f"{where}: {len(bad)} arrays of the train state are NaN/inf (e.g. "
            f"{', '.join(bad[:3])}). {advice}"
        )


def check_finite_loss(loss: float, step: int, desc: str, advice, *, bar=None) -> None:
    """Raises ``NonFiniteError`` when a logged loss is NaN/inf (the check of every log).

    ``advice()`` (called only then) says what to do; ``bar``, the run's progress bar, is
    closed first so that the message is not interleaved with it.
    """
    if not math.isfinite(loss):
        if bar is not None:
            bar.close()
        raise NonFiniteError(f"{desc}: non-finite loss {loss} at step {step}. {advice()}")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs, checkpoints and validates (every N steps, and at the end)."""

    num_steps: int
    log_every: int
    checkpoint_every: int
    validate_every: int


class ResumableRun:
    """The checkpointed state of one zoo entry's training run.

    Args:
      entry_dir: the zoo entry's directory (checkpoints in ``train/``, ``best/``, metrics).
      desc: the entry's name in messages (``glyphs/latin/sam``).
      stage: the profile sections' prefix (``train``, ``fuse``, ``distill``).
      mesh: the device mesh the state is replicated over.
      fresh_state: builds a new train state (host arrays); also gives the restore shapes.
      iterators: ``{name: iterator}`` with ``get_state``/``set_state`` (the input positions).
      record: the initial best-so-far record (``best_accuracy`` -1 means none yet).
      fix: what to change after a divergence (e.g. "Lower config.X (now 0.1) and re-run");
        it must work when followed (the callers restart unfinished runs whose settings
        changed). The message adds which checkpoint, if any, is kept.
    """

    def __init__(
        self,
        entry_dir,
        *,
        desc: str,
        stage: str,
        mesh,
        fresh_state: Callable[[], Any],
        iterators: dict[str, Any],
        record: dict,
        fix: str,
    ):
        self.entry_dir = entry_dir
        self.desc = desc
        self.stage = stage
        self.mesh = mesh
        self.iterators = iterators
        self.record = dict(record)
        self._fix = fix
        self.best_save_seconds = 0.0  # of the validations: counted as checkpointing
        self.manager = ocp.CheckpointManager(
            entry_dir / "train",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False
            ),
        )
        latest = self.manager.latest_step()
        if latest is None:
            self.state = jax.device_put(fresh_state(), step_lib.replicated(mesh))
        else:
            self.state = self._restore(latest, fresh_state)
        self.start = int(jax.device_get(self.state.step))
        # metrics.jsonl + TensorBoard events; on resume it drops the records after `start`.
        self.writer = metrics_writer.MetricsWriter(
            entry_dir, resume_step=self.start, enabled=jax.process_index() == 0
        )

    def _restore(self, latest: int, fresh_state):
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, x.dtype, sharding=step_lib.replicated(self.mesh)
            ),
            jax.eval_shape(fresh_state),
        )
        restored = self.manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        for name, it in self.iterators.items():
            it.set_state(restored.data[name])
        self.record = dict(restored.progress)
        check_finite_state(
            restored.state,
            f"{self.desc}: checkpoint step {latest} in {str(self.entry_dir / 'train')!r}",
            f"Delete {str(self.entry_dir)!r} and re-run.",
        )
        log.info("resumed %s at step %d", self.desc, latest)
        return restored.state

    def advice(self) -> str:
        last_good = self.manager.latest_step()
        if last_good is None:
            kept = "No checkpoint was saved"
        else:
            kept = (
                f"The last good checkpoint (step {last_good}; every saved one is finite) is "
                f"kept in {str(self.entry_dir / 'train')!r}"
            )
        return f"{kept} and nothing was marked complete. {self._fix}"

    def check_state(self, where: str) -> None:
        """Never validate, save or finalize a non-finite state."""
        check_finite_state(self.state, f"{self.desc} {where}", self.advice())

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self.state),
                data=ocp.args.JsonSave({n: it.get_state() for n, it in self.iterators.items()}),
                progress=ocp.args.JsonSave(self.record),
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        PROFILE.add(f"{self.stage}/checkpoint", time.perf_counter() - t0)

    def keep_if_best(self, step: int, accuracy: float, ci95: float, variables, **extra) -> bool:
        """Records a validation result; a new best saves ``variables`` to ``best/``."""
        improved = accuracy > self.record["best_accuracy"]
        if improved:
            t0 = time.perf_counter()
            self.record.update(best_accuracy=accuracy, best_step=step, best_ci95=ci95, **extra)
            zoo_lib.save_variables(self.entry_dir / "best", variables)
            self.best_save_seconds += time.perf_counter() - t0
            PROFILE.add(f"{self.stage}/checkpoint", time.perf_counter() - t0)
        return improved

    def write_metrics(self, record: dict) -> None:
        self.writer.write(record["step"], record)

    def best_validation(self, episodes: int) -> dict:
        return dict(
            accuracy=self.record["best_accuracy"],
            ci95=self.record["best_ci95"],
            step=self.record["best_step"],
            episodes=int(episodes),
        )

    def close(self) -> None:
        self.writer.close()


def run_steps(
    run: ResumableRun,
    cadence: Cadence,
    *,
    next_batch: Callable[[], Any],
    train_step: Callable[[Any, int, Any], tuple[Any, Any]],
    validate: Callable[[int], float],
    schedule: Callable[[int], Any],
    images_per_step: int,
    first_call_compiles: bool | Callable[[int], bool],
    postfix: tuple[str, ...] = (),
    progress: bool = True,
    t_setup: float | None = None,
) -> int:
    """Steps ``run`` from its start to ``cadence.num_steps``; returns the steps taken.

    ``train_step(state, step, batch) -> (state, metrics)`` is the jitted step; the calls
    that compile are timed as ``<stage>/compile``, apart from the steps: the first call
    when ``first_call_compiles`` is True, or every step for which it, a predicate of the
    step index, says so (a method that switches programs compiles its second one mid-run);
    ``validate(step)`` validates ``run.state``, keeps the best and returns the accuracy;
    ``postfix`` names the metrics shown on the progress bar beside loss and validation.
    """
    stage = run.stage
    bar = tqdm(
        total=cadence.num_steps,
        initial=run.start,
        desc=run.desc,
        disable=not progress,
        dynamic_ncols=True,
        leave=True,
        mininterval=1.0,
    )
    last_val = run.record["best_accuracy"]
    if t_setup is not None:
        PROFILE.add(f"{stage}/setup", time.perf_counter() - t_setup)
    if callable(first_call_compiles):
        compiles = first_call_compiles
    else:
        compiles = lambda step: first_call_compiles and step == run.start  # noqa: E731
    t0, steps_done = time.perf_counter(), 0
    t_steps = time.perf_counter()  # start of the current run of training steps
    timed = 0  # steps in the open steps section: its count (seconds per step = ratio)
    step = run.start
    try:
        while step < cadence.num_steps:
            batch = next_batch()
            if compiles(step):
                jax.block_until_ready(run.state)  # close the open steps section first
                PROFILE.add(f"{stage}/steps", time.perf_counter() - t_steps, count=timed)
                timed = 0
                t_compile = time.perf_counter()
                run.state, metrics = train_step(run.state, step, batch)
                jax.block_until_ready(metrics)
                PROFILE.add(f"{stage}/compile", time.perf_counter() - t_compile)
                t_steps = time.perf_counter()
            else:
                run.state, metrics = train_step(run.state, step, batch)
                timed += 1
            step += 1
            steps_done += 1
            bar.update(1)
            end = step == cadence.num_steps
            log_now = step % cadence.log_every == 0 or end
            save_now = step % cadence.checkpoint_every == 0 or end
            val_now = step % cadence.validate_every == 0 or end
            if not (log_now or save_now or val_now):
                continue
            m = step_lib.host_metrics(metrics)  # waits for the step: closes the steps section
            PROFILE.add(f"{stage}/steps", time.perf_counter() - t_steps, count=timed)
            timed = 0
            check_finite_loss(m["loss"], step, run.desc, run.advice, bar=bar)
            if save_now or val_now:
                if non_finite_leaves(run.state):
                    bar.close()
                    run.check_state(f"at step {step}")
            m.update(step=step, learning_rate=float(schedule(step - 1)))
            if val_now:
                t_val, saved = time.perf_counter(), run.best_save_seconds
                last_val = validate(step)
                spent = time.perf_counter() - t_val - (run.best_save_seconds - saved)
                PROFILE.add(f"{stage}/validation", spent)
            if log_now:
                elapsed = time.perf_counter() - t0
                m["images_per_s"] = steps_done * images_per_step / max(elapsed, 1e-9)
                run.write_metrics(m)
                bar.set_postfix(
                    loss=f"{m['loss']:.3f}",
                    **{k: f"{m.get(k, 0.0):.3f}" for k in postfix},
                    val=f"{100 * last_val:.1f}%" if last_val >= 0 else "-",
                    refresh=False,
                )
            if save_now:
                run.save(step)
            t_steps = time.perf_counter()
    finally:
        bar.close()
    return steps_done
