"""Training one zoo entry: resumable per-domain backbone training with best-val checkpoints.

``train_and_evaluate(config, zoo, domain, method)`` trains the backbone of one seen domain
with ERM or SAM (or fine-tunes a given backbone: fusion), validates every restart period
on ``config.validation.episodes`` episodes of the domain's *valid* classes (NCC, 10 x
cosine, frozen embeddings), keeps the best checkpoint in the zoo and logs to the console
(progress bar) and to ``metrics.jsonl`` in the entry directory.

Compilation is shared: the model's classification head is padded to
``config.model.head_classes`` (when set) with the padded logits masked, and the learning
rate, restart period, rho and class count travel in ``TrainState.hparams`` as data
(steps.py), so every entry of one architecture, batch size and method runs one compiled
program (``_compiled_step`` caches it for the process). The stored backbone's head is cut
back to the domain's classes, so zoo entries do not depend on the padding.

Resumption: an Orbax ``CheckpointManager`` in ``<entry>/train`` saves the train state, the
input iterator's position and the best-so-far record every ``config.checkpoint_every``
steps. Step randomness is ``fold_in(seed, step)`` and the input pipeline is a pure
function of (seed, position), so a run killed at any point and restarted with the same
command ends with exactly the parameters of an uninterrupted run (tests/training/test_loop.py).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from flatfsc_jax import config_lib, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, pipeline, sources
from flatfsc_jax.data.episodes import EpisodeBatch
from flatfsc_jax.evaluation.ncc import FewShotEvaluator
from flatfsc_jax.profiling import PROFILE
from flatfsc_jax.training import metrics_writer, optim
from flatfsc_jax.training import step as step_lib

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
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


def check_finite_loss(loss: float, step: int, desc: str, advice, *, bar=None) -> None:
    """Raises ``NonFiniteError`` when a logged loss is NaN/inf (the check of every log).

    ``advice()`` (called only then) says what to do; ``bar``, the run's progress bar, is
    closed first so that the message is not interleaved with it.
    """
    if not math.isfinite(loss):
        if bar is not None:
            bar.close()
        raise NonFiniteError(f"{desc}: non-finite loss {loss} at step {step}. {advice()}")


def _check_finite(state, where: str, advice: str) -> None:
    bad = non_finite_leaves(state)
    if bad:
        raise NonFiniteError(
            f"{where}: {len(bad)} arrays of the train state are NaN/inf (e.g. "
            f"{', '.join(bad[:3])}). {advice}"
        )


def _divergence_advice(cfg, domain: str, fused: bool, manager, entry_dir) -> str:
    lr_key = "config.fusion.lr" if fused else f"config.per_domain.{domain}.lr"
    return (
        f"The last good checkpoint (step {manager.latest_step()}; every saved one is finite) "
        f"is kept in {str(entry_dir / 'train')!r} and nothing was marked complete. Lower "
        f"{lr_key} (now {cfg.lr}) or config.per_domain.{domain}.rho (now {cfg.sam.rho}) "
        "and re-run (an unfinished run with other settings is restarted)."
    )


def validation_evaluator(config, valid_split: sources.SplitData) -> FewShotEvaluator:
    """The fixed validation episodes of a domain (same episodes at every validation)."""
    batch = EpisodeBatch.sample(valid_split, config.validation.episodes, seed=config.seed + 1)
    return FewShotEvaluator(
        valid_split,
        batch,
        metric=config.validation.metric,
        batch_size=config.validation.batch_size,
    )


def head_width(config, num_classes: int) -> int:
    """Width of the trained classification head: ``config.model.head_classes`` (shared
    by every domain so they share one compiled step) or the domain's own class count."""
    width = int(config.model.get("head_classes", 0) or 0)
    if not width:
        return int(num_classes)
    if width < num_classes:
        raise ValueError(
            f"config.model.head_classes={width} is smaller than the {num_classes} training "
            f"classes of this domain; set it to at least {num_classes} (or None: no padding)"
        )
    return width


# One compiled training step per (model, optimiser, SAM settings, batch, mesh) for the
# whole process: the entries of a job differ only in data (TrainState.hparams).
_COMPILED_STEPS: dict = {}


def _compiled_step(model, cfg, mesh, *, train_lora: bool):
    key = (
        model,
        float(cfg.momentum),
        float(cfg.weight_decay),
        float(cfg.sam.rho) > 0,
        bool(cfg.sam.adaptive),
        cfg.sam.m,
        float(cfg.sam.eps),
        float(cfg.label_smoothing),
        bool(train_lora),
        int(cfg.batch_size),
        tuple(mesh.devices.flat),
    )
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = step_lib.compile_train_step(
            model,
            optim.make_direction(momentum=cfg.momentum, weight_decay=cfg.weight_decay),
            mesh,
            # The static rho only selects ERM (one pass) or SAM; the radius is data.
            rho=1.0 if cfg.sam.rho > 0 else 0.0,
            adaptive=cfg.sam.adaptive,
            m=cfg.sam.m,
            eps=cfg.sam.eps,
            label_smoothing=cfg.label_smoothing,
            train_lora=train_lora,
            batch_size=cfg.batch_size,
        )
        _COMPILED_STEPS[key].fresh = True
    return _COMPILED_STEPS[key]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    zoo: zoo_lib.Zoo,
    domain: str,
    method: str,
    *,
    init_variables: dict | None = None,
    lora_rank: int = 0,
    entry_method: str | None = None,
    extra_metadata: dict | None = None,
    progress: bool = True,
    stage: str = "train",
) -> zoo_lib.ZooEntry:
    """Trains (or resumes) one zoo entry and returns it once complete.

    Args:
      config: a full config (``configs/*.py``); its per-domain row is applied here.
      zoo: where the entry lives.
      domain: the seen domain whose train classes are learnt.
      method: ``"erm"`` or ``"sam"``.
      init_variables: start from these trunk weights (fusion by fine-tuning) instead of
        a random initialisation; the classification head is always new.
      lora_rank: > 0 trains only LoRA adapters of this rank (and the new head) on top of
        the frozen ``init_variables`` trunk; the adapters are merged into the stored weights.
      entry_method: the zoo method name (default ``method``; fusion uses ``sam+ft``).
      stage: the profile sections' prefix (``train`` or ``fuse``; profiling.py).
    """
    t_setup = time.perf_counter()
    cfg = config_lib.domain_config(config, domain, method)
    entry_method = entry_method or method
    mesh = step_lib.make_mesh()
    config_lib.validate(cfg, num_devices=mesh.size)
    entry_dir = zoo.entry_dir(cfg.benchmark, domain, entry_method)

    train_split = benchmarks.load_split(cfg.benchmark, domain, "train", cfg.data_dir)
    valid_split = benchmarks.load_split(cfg.benchmark, domain, "valid", cfg.data_dir)
    image_shape = train_split.image_shape
    model_config = models.model_metadata(cfg, train_split.num_classes)
    if lora_rank > 0 and init_variables is None:
        raise ValueError("LoRA training (config.fusion.mode='lora') needs a pre-trained backbone")
    train_lora = lora_rank > 0
    num_classes = int(train_split.num_classes)
    model = models.build_model_from_config(
        cfg.model, head_width(cfg, num_classes), lora_rank=lora_rank
    )
    eval_every = cfg.validation.every or cfg.restart_period
    evaluator = validation_evaluator(cfg, valid_split)

    train_step = _compiled_step(model, cfg, mesh, train_lora=lora_rank > 0)
    tx = optim.make_direction(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    hparams = step_lib.make_hparams(
        learning_rate=cfg.lr,
        restart_period=cfg.restart_period,
        rho=cfg.sam.rho,
        num_classes=num_classes,
    )
    schedule = optim.make_schedule(
        learning_rate=cfg.lr, restart_period=cfg.restart_period, num_steps=cfg.num_steps
    )
    sample = jnp.zeros((1, *image_shape), jnp.float32)
    rng = jax.random.key(cfg.seed)
    init_rng, step_rng = jax.random.split(rng)

    def fresh_state():
        state = step_lib.create_train_state(model, tx, init_rng, sample, train_lora=train_lora)
        if init_variables is not None:
            state = _load_trunk(state, init_variables, tx, train_lora)
        return state.replace(hparams=hparams)

    process_index, process_count = jax.process_index(), jax.process_count()
    iterator = pipeline.make_train_iterator(
        train_split,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        augment=pipeline.AugmentConfig(**cfg.augment.to_dict()),
        process_index=process_index,
        process_count=process_count,
    )

    manager = ocp.CheckpointManager(
        entry_dir / "train",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, enable_async_checkpointing=False
        ),
    )
    progress_record = {"best_accuracy": -1.0, "best_step": -1, "best_ci95": 0.0}
    latest = manager.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(fresh_state)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=step_lib.replicated(mesh)),
            abstract,
        )
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                progress=ocp.args.JsonRestore(),
            ),
        )
        # The hyper-parameters are the config's, not the checkpoint's (as when the
        # optimiser carried its schedule): the same command resumes the same run.
        state = restored.state.replace(hparams=step_lib.replicate(hparams, mesh))
        iterator.set_state(restored.data)
        progress_record = dict(restored.progress)
        _check_finite(
            state,
            f"{cfg.benchmark}/{domain}/{entry_method}: checkpoint step {latest} in "
            f"{str(entry_dir / 'train')!r}",
            f"Delete {str(entry_dir)!r} and re-run.",
        )
        log.info("resumed %s/%s/%s at step %d", cfg.benchmark, domain, entry_method, latest)
    else:
        state = jax.device_put(fresh_state(), step_lib.replicated(mesh))
    start = int(jax.device_get(state.step))
    # metrics.jsonl + TensorBoard events; on resume it drops the records after `start`.
    writer = metrics_writer.MetricsWriter(entry_dir, resume_step=start, enabled=process_index == 0)

    def write_metrics(record):
        writer.write(record["step"], record)

    def save_checkpoint(step):
        t0 = time.perf_counter()
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(iterator.get_state()),
                progress=ocp.args.JsonSave(progress_record),
            ),
            force=True,
        )
        manager.wait_until_finished()
        PROFILE.add(f"{stage}/checkpoint", time.perf_counter() - t0)

    def validate_now(step):
        t0 = time.perf_counter()
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.lora:
            variables["lora"] = state.lora
        result = evaluator.run(model, variables)
        acc, ci = float(result["mean"]), float(result["ci95"])
        improved = acc > progress_record["best_accuracy"]
        t1 = time.perf_counter()
        if improved:
            progress_record.update(best_accuracy=acc, best_step=step, best_ci95=ci)
            zoo_lib.save_variables(entry_dir / "best", export_variables(state, num_classes))
        PROFILE.add(f"{stage}/validation", t1 - t0)
        PROFILE.add(f"{stage}/checkpoint", time.perf_counter() - t1)
        write_metrics({"step": step, "val_accuracy": acc, "val_ci95": ci, "best": improved})
        return acc

    desc = f"{cfg.benchmark}/{domain}/{entry_method}"
    bar = tqdm(
        total=cfg.num_steps,
        initial=start,
        desc=desc,
        disable=not progress,
        dynamic_ncols=True,
        leave=True,
        mininterval=1.0,
    )
    last_val = progress_record["best_accuracy"]
    PROFILE.add(f"{stage}/setup", time.perf_counter() - t_setup)
    t0, steps_done = time.perf_counter(), 0
    t_steps = time.perf_counter()  # start of the current run of training steps
    step = start
    while step < cfg.num_steps:
        host = next(iterator)
        batch = step_lib.shard_batch({"images": host["image"], "labels": host["label"]}, mesh)
        if getattr(train_step, "fresh", False):
            # The first call of a program compiles it: time it apart from the steps.
            t_compile = time.perf_counter()
            state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
            jax.block_until_ready(metrics)
            PROFILE.add(f"{stage}/compile", time.perf_counter() - t_compile)
            train_step.fresh = False
            t_steps = time.perf_counter()
        else:
            state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
        step += 1
        steps_done += 1
        bar.update(1)
        log_now = step % cfg.log_every == 0 or step == cfg.num_steps
        save_now = step % cfg.checkpoint_every == 0 or step == cfg.num_steps
        val_now = step % eval_every == 0 or step == cfg.num_steps
        if log_now or save_now or val_now:
            m = step_lib.host_metrics(metrics)  # waits for the step: closes the steps section
            PROFILE.add(f"{stage}/steps", time.perf_counter() - t_steps)
            check_finite_loss(
                m["loss"],
                step,
                desc,
                lambda: _divergence_advice(cfg, domain, entry_method != method, manager, entry_dir),
                bar=bar,
            )
            if save_now or val_now:  # never validate, save or finalize a non-finite state
                if non_finite_leaves(state):
                    bar.close()
                    _check_finite(
                        state,
                        f"{desc} at step {step}",
                        _divergence_advice(cfg, domain, entry_method != method, manager, entry_dir),
                    )
            m.update(step=step, learning_rate=float(schedule(step - 1)))
            if val_now:
                last_val = validate_now(step)
            if log_now:
                elapsed = time.perf_counter() - t0
                m["images_per_s"] = steps_done * cfg.batch_size / max(elapsed, 1e-9)
                write_metrics(m)
                bar.set_postfix(
                    loss=f"{m['loss']:.3f}",
                    sharp=f"{m.get('sharpness', 0.0):.3f}",
                    val=f"{100 * last_val:.1f}%" if last_val >= 0 else "-",
                    refresh=False,
                )
            if save_now:
                save_checkpoint(step)
            t_steps = time.perf_counter()
    bar.close()
    writer.close()

    metadata = dict(
        config=cfg.to_dict(),
        rho=float(cfg.sam.rho),
        num_steps=int(cfg.num_steps),
        batch_size=int(cfg.batch_size),
        train_classes=int(train_split.num_classes),
        best_validation=dict(
            accuracy=progress_record["best_accuracy"],
            ci95=progress_record["best_ci95"],
            step=progress_record["best_step"],
            episodes=int(cfg.validation.episodes),
        ),
        devices=mesh.size,
    )
    metadata.update(extra_metadata or {})
    _check_finite(state, f"{desc}: final state", f"Delete {str(entry_dir)!r} and re-run.")
    if process_index == 0:
        zoo.finalize(
            cfg.benchmark,
            domain,
            entry_method,
            variables=export_variables(state, num_classes),
            model_config=model_config,
            image_shape=image_shape,
            metadata=metadata,
        )
    return zoo.get(cfg.benchmark, domain, entry_method)


def export_variables(state, num_classes: int | None = None) -> dict:
    """The plain-backbone variables to store: LoRA adapters merged into the kernels and
    a padded head (``config.model.head_classes``) cut back to ``num_classes``."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if state.lora:
        variables = models.merge_lora(dict(variables, lora=state.lora))
    variables = jax.device_get(variables)
    head = variables["params"].get("head")
    if num_classes is not None and head is not None and head["kernel"].shape[-1] > num_classes:
        params = dict(variables["params"])
        params["head"] = {
            "kernel": head["kernel"][:, :num_classes],
            "bias": head["bias"][:num_classes],
        }
        variables = dict(variables, params=params)
    return variables


def _load_trunk(state, init_variables: dict, tx, train_lora: bool) -> Any:
    """Copies trunk params and BN statistics of ``init_variables`` into a fresh state."""
    params = dict(state.params)
    for k, v in init_variables["params"].items():
        if k == "head":
            continue  # the target domain has its own classes: always a new head
        if k not in params or jax.tree.structure(params[k]) != jax.tree.structure(v):
            raise zoo_lib.IncompatibleCheckpointError(
                f"the initial backbone's parameter {k!r} does not fit the model "
                f"{state.__class__.__name__}; fusion needs the same config.model"
            )
        params[k] = v
    state = state.replace(params=params, batch_stats=init_variables["batch_stats"])
    return state.replace(opt_state=tx.init(step_lib.trainable(state, train_lora)))


def read_metrics(entry_dir) -> list[dict]:
    path = entry_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
