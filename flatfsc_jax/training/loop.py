"""Training one zoo entry: resumable per-domain backbone training with best-val checkpoints.

``train_and_evaluate(config, zoo, domain, method)`` trains the backbone of one seen domain
with ERM or SAM (or fine-tunes a given backbone: fusion), validates every restart period
on ``config.validation.episodes`` episodes of the domain's *valid* classes (NCC, 10 x
cosine, frozen embeddings), keeps the best checkpoint in the zoo and logs to the console
(progress bar) and to ``metrics.jsonl`` in the entry directory.

Compilation is shared: the model's classification head is padded to
``config.model.head_classes`` (when set) with the padded logits masked, and the learning
rate, restart period, rho and class count travel in ``TrainState.hparams`` as data
(training/step.py), so every entry of one architecture, batch size and method runs one compiled
program (``_compiled_step`` caches it for the process). The stored backbone's head is cut
back to the domain's classes, so zoo entries do not depend on the padding.

Resumption: an Orbax ``CheckpointManager`` in ``<entry>/train`` saves the train state, the
input iterator's position and the best-so-far record every ``config.checkpoint_every``
steps. Step randomness is ``fold_in(seed, step)`` and the input pipeline is a pure
function of (seed, position), so a run killed at any point and restarted with the same
command ends with exactly the parameters of an uninterrupted run (tests/training/test_loop.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from flatfsc_jax import config_lib, flat_methods, models
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, pipeline, sources
from flatfsc_jax.data.episodes import EpisodeBatch
from flatfsc_jax.evaluation.ncc import FewShotEvaluator
from flatfsc_jax.training import metrics_writer, optim
from flatfsc_jax.training import step as step_lib
from flatfsc_jax.training.resumable import Cadence, ResumableRun, run_steps

log = logging.getLogger(__name__)


def _divergence_fix(cfg, domain: str, fused: bool) -> str:
    lr_key = "config.fusion.lr" if fused else f"config.per_domain.{domain}.lr"
    return (
        f"Lower {lr_key} (now {cfg.lr}) or config.per_domain.{domain}.rho (now {cfg.sam.rho}) "
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


def _compiled_step(model, cfg, mesh, *, train_lora: bool, flat=None):
    if step_lib.is_plain(flat):
        flat = None  # plain ERM/SAM: the program that existed before the flat methods
    elif flat is not None:
        # The seed only seeds the method's state (flat_methods.init_state), never the
        # step: one program serves every seed.
        flat = dataclasses.replace(flat, seed=0)
    key = (
        flat,
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
            use_sam=cfg.sam.rho > 0,  # the radius is data: TrainState.hparams["rho"]
            adaptive=cfg.sam.adaptive,
            m=cfg.sam.m,
            eps=cfg.sam.eps,
            label_smoothing=cfg.label_smoothing,
            train_lora=train_lora,
            batch_size=cfg.batch_size,
            flat=flat,
        )
        _COMPILED_STEPS[key].used = set()  # the programs (sam_step values) run so far
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
    mesh = step_lib.make_mesh(batch_size=int(cfg.batch_size))
    config_lib.validate(cfg, num_processes=jax.process_count(), evaluation=False)
    entry_dir = zoo.entry_dir(cfg.benchmark, domain, entry_method)

    options = benchmarks.split_options(cfg.benchmark, cfg.data.class_splits)
    train_split = benchmarks.load_split(cfg.benchmark, domain, "train", cfg.data_dir, **options)
    valid_split = benchmarks.load_split(cfg.benchmark, domain, "valid", cfg.data_dir, **options)
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

    # The flat method of a "sam" entry (None for ERM); config.flat.* (docs/flat_methods.md).
    flat = config_lib.flat_settings(cfg)
    train_step = _compiled_step(model, cfg, mesh, train_lora=lora_rank > 0, flat=flat)
    switching = flat is not None and flat.method in flat_methods.SWITCHING_METHODS
    averaged = flat is not None and flat.average != "none"
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
        if flat is not None and not step_lib.is_plain(flat):
            trained = step_lib.trainable(state, train_lora)
            state = state.replace(
                flat=flat_methods.init_state(flat, trained),
                average=flat_methods.init_average(flat, trained),
            )
        return state.replace(hparams=hparams)

    process_index = jax.process_index()
    augment = pipeline.AugmentConfig(**cfg.augment.to_dict())
    # This process's rows of every global batch, read off the batch sharding.
    block, blocks = pipeline.process_block(step_lib.batch_sharding(mesh), cfg.batch_size)
    iterator = pipeline.make_train_iterator(
        train_split,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        augment=augment,
        process_index=block,
        process_count=blocks,
        **config_lib.data_settings(cfg),
    )

    desc = f"{cfg.benchmark}/{domain}/{entry_method}"
    run = ResumableRun(
        entry_dir,
        desc=desc,
        stage=stage,
        mesh=mesh,
        fresh_state=fresh_state,
        iterators={"train": iterator},
        record={"best_accuracy": -1.0, "best_step": -1, "best_ci95": 0.0},
        fix=_divergence_fix(cfg, domain, entry_method != method),
    )
    # The hyper-parameters are the config's, not the checkpoint's: the same command
    # resumes the same run.
    run.state = run.state.replace(hparams=step_lib.replicate(hparams, mesh))

    def next_batch():
        return pipeline.to_step_batch(step_lib.shard_batch(next(iterator), mesh), pad=augment.pad)

    def one_step(state, step, batch):
        rng = jax.random.fold_in(step_rng, step)
        if switching:  # two programs: the host picks this step's (training/step.py)
            return train_step(state, batch, rng, sam_step=flat_methods.takes_sam_step(flat, step))
        return train_step(state, batch, rng)

    def compiles_at(step):
        """Whether this step's call compiles: the first use of its program in the process."""
        program = flat_methods.takes_sam_step(flat, step) if switching else None
        if program in train_step.used:
            return False
        train_step.used.add(program)
        return True

    def stored(state):
        """The weights to validate and store: the EMA/SWA average when there is one."""
        return state.replace(params=state.average["params"]) if averaged else state

    def validate(step):
        state = stored(run.state)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.lora:
            variables["lora"] = state.lora
        result = evaluator.run(model, variables)
        acc, ci = float(result["mean"]), float(result["ci95"])
        best = run.keep_if_best(step, acc, ci, export_variables(state, num_classes))
        run.write_metrics({"step": step, "val_accuracy": acc, "val_ci95": ci, "best": best})
        return acc

    run_steps(
        run,
        Cadence(cfg.num_steps, cfg.log_every, cfg.checkpoint_every, eval_every),
        next_batch=next_batch,
        train_step=one_step,
        validate=validate,
        schedule=schedule,
        images_per_step=cfg.batch_size,
        first_call_compiles=compiles_at,
        postfix=("sharpness",),
        progress=progress,
        t_setup=t_setup,
    )
    run.close()
    state = stored(run.state)

    metadata = dict(
        config=cfg.to_dict(),
        rho=float(cfg.sam.rho),
        num_steps=int(cfg.num_steps),
        batch_size=int(cfg.batch_size),
        train_classes=int(train_split.num_classes),
        best_validation=run.best_validation(cfg.validation.episodes),
        devices=mesh.size,
    )
    metadata.update(extra_metadata or {})
    run.check_state("final state")
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
    """The run's metric records (bad lines skipped with one warning naming the file)."""
    return metrics_writer.read_jsonl(entry_dir / metrics_writer.JSONL_NAME)
