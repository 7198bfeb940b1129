"""Fusion by distillation (URL: Li, Liu & Bilen, ICCV 2021): the ``erm+kd`` / ``sam+kd`` students.

One ResNet (the zoo's ``config.model``) is trained from scratch on every seen domain at
once and distilled from the zoo's per-domain backbones of one family (ERM teachers for
``erm+kd``, SAM teachers for ``sam+kd``). Each step:

* the domain batches are concatenated and the student runs **once** on the mixed batch
  (its BatchNorm normalises over all domains together); the features ``z`` are split
  back per domain and head ``d`` (linear, with bias) classifies domain ``d``'s slice;
* each frozen teacher runs on its own domain's batch only, BatchNorm in eval mode,
  under ``stop_gradient``, giving features ``t_d`` and logits;
* the loss, summed over domains, is

      CE(head_d(z_d), y_d)
        + lambda_f_d * w_d(t) * (1 - CKA_rbf(normalize(A_d z_d), normalize(t_d)))
        + lambda_p_d * w_d(t) * KL_T(teacher_d || student_d)

  with ``A_d`` a per-domain bias-free linear adaptor (dim -> dim, Xavier-normal init) on
  the student side only, ``w_d(t) = max(0, 1 - t / (P * k_d))`` (P the restart period,
  ``k_d`` ``config.fusion.distill.anneal``) and ``KL_T`` the temperature-T KL divergence
  of the softened logits times T^2 divided by the batch size;
* the student (trunk + heads) steps with SGD 0.9 + coupled weight decay and the
  warm-restart cosine schedule (training/optim.py), the adaptors with Adam (coupled L2 decay) on
  the same schedule. For ``sam+kd`` the gradient is SAM's (``sam.sam_gradient`` on the
  total loss, rho of the general domain; perturbation over everything trained,
  adaptors included; BN statistics from the clean pass); the teachers run once.

The loss terms (CKA, KL, annealing) are in ``fusion/kd_losses.py``.

The stored zoo entry ``<benchmark>/<source_domain>/<method>+kd`` is a plain backbone:
the student's trunk with the *general domain's* head (so ``Zoo.load`` builds it with the
general domain's class count). Evaluation uses only the trunk. Validation is NCC on each
seen domain's validation episodes, averaged over domains (URL's criterion); the best
checkpoint is kept. Training resumes exactly like ``training/loop.py`` (Orbax
``CheckpointManager`` with the train state, every domain's input position and the
best-so-far record).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

from flatfsc_jax import config_lib, models, sam
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, pipeline
from flatfsc_jax.fusion import kd_losses
from flatfsc_jax.training import loop as loop_lib
from flatfsc_jax.training import optim
from flatfsc_jax.training import step as step_lib
from flatfsc_jax.training.resumable import Cadence, ResumableRun, run_steps

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# The student step
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The static per-domain part of the distillation loss (``config.fusion.distill``)."""

    domains: tuple[str, ...]
    lambda_f: tuple[float, ...]
    lambda_p: tuple[float, ...]
    anneal: tuple[float, ...]
    restart_period: int
    temperature: float

    @classmethod
    def from_config(cls, config) -> Recipe:
        d = config.fusion.distill
        domains = tuple(config.domains)
        return cls(
            domains=domains,
            lambda_f=tuple(float(d.lambda_f[x]) for x in domains),
            lambda_p=tuple(float(d.lambda_p[x]) for x in domains),
            anneal=tuple(float(d.anneal[x]) for x in domains),
            restart_period=int(d.restart_period),
            temperature=float(d.temperature),
        )


def init_params(student: models.Model, num_classes: dict[str, int], rng, sample) -> tuple:
    """``({"trunk", "heads", "adaptors"}, batch_stats)`` of a fresh student.

    Heads are initialised like the zoo backbones' ``nn.Dense`` head (LeCun normal, zero
    bias); adaptors are ``[dim, dim]`` Xavier-normal matrices (URL: a bias-free 1x1
    convolution, ``nn.init.xavier_normal_``), applied as ``z @ A``.
    """
    trunk_rng, rng = jax.random.split(rng)
    variables = jax.jit(student.init)(trunk_rng, sample)
    dim = student.embedding_dim
    heads, adaptors = {}, {}
    xavier = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")
    for i, (domain, n) in enumerate(num_classes.items()):
        head_rng, ad_rng = jax.random.split(jax.random.fold_in(rng, i))
        heads[domain] = {
            "kernel": nn.initializers.lecun_normal()(head_rng, (dim, n), jnp.float32),
            "bias": jnp.zeros((n,), jnp.float32),
        }
        adaptors[domain] = xavier(ad_rng, (dim, dim), jnp.float32)
    params = {"trunk": variables["params"], "heads": heads, "adaptors": adaptors}
    return params, variables.get("batch_stats", {})


def make_optimizer(config) -> optax.GradientTransformation:
    """SGD (trunk + heads, optim.py) and Adam (adaptors), same warm-restart schedule."""
    d = config.fusion.distill
    student_tx = optim.make_optimizer(
        learning_rate=d.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        restart_period=d.restart_period,
        num_steps=d.num_steps,
    )
    adaptor_schedule = optim.make_schedule(
        learning_rate=d.adaptor_lr, restart_period=d.restart_period
    )
    # torch.optim.Adam(weight_decay=) adds the decay to the gradient (coupled L2).
    adaptor_tx = optax.chain(
        optax.add_decayed_weights(d.adaptor_weight_decay),
        optax.scale_by_adam(),
        optax.scale_by_learning_rate(adaptor_schedule),
    )

    def labels(params):
        return {
            k: jax.tree.map(lambda _, group=("adaptor" if k == "adaptors" else "student"): group, v)
            for k, v in params.items()
        }

    return optax.multi_transform({"student": student_tx, "adaptor": adaptor_tx}, labels)


def distill_step(
    state: step_lib.TrainState,
    batch: dict,
    teachers: dict,
    *,
    student: models.Model,
    teacher_models: dict,
    recipe: Recipe,
    tx: optax.GradientTransformation,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
) -> tuple[step_lib.TrainState, dict]:
    """One student step. ``batch[d] = {"images", "labels"}`` per domain, in recipe order.

    ``state.params`` is ``{"trunk", "heads", "adaptors"}``; ``teachers[d]`` the frozen
    variables of domain ``d``'s teacher (``teacher_models[d]``).
    """
    domains = recipe.domains
    images = {d: step_lib._as_float_images(batch[d]["images"]) for d in domains}
    labels = {d: batch[d]["labels"] for d in domains}
    targets = {}
    for d in domains:
        (t_logits, t_feats), _ = teacher_models[d].apply(teachers[d], images[d], train=False)
        targets[d] = jax.lax.stop_gradient(
            (t_logits.astype(jnp.float32), kd_losses.l2_normalize(t_feats.astype(jnp.float32)))
        )
    weights = {
        d: kd_losses.annealing_weight(state.step, recipe.restart_period, k)
        for d, k in zip(domains, recipe.anneal, strict=True)
    }
    sizes = [images[d].shape[0] for d in domains]

    def loss_fn(trained, data):
        x = jnp.concatenate([data["images"][d] for d in domains], axis=0)
        variables = {"params": trained["trunk"], "batch_stats": state.batch_stats}
        (_, z), new_batch_stats = student.apply(variables, x, train=True)
        z = z.astype(jnp.float32)
        total, aux = jnp.zeros((), jnp.float32), {"batch_stats": new_batch_stats}
        start = 0
        for d, n, lf, lp in zip(domains, sizes, recipe.lambda_f, recipe.lambda_p, strict=True):
            z_d = z[start : start + n]
            start += n
            head = trained["heads"][d]
            logits = z_d @ head["kernel"] + head["bias"]
            ce = jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, data["labels"][d])
            )
            t_logits, t_feats = targets[d]
            cka = kd_losses.cka_rbf(kd_losses.l2_normalize(z_d @ trained["adaptors"][d]), t_feats)
            kl = kd_losses.kl_distillation(logits, t_logits, recipe.temperature)
            total = total + ce + weights[d] * (lf * (1.0 - cka) + lp * kl)
            aux[f"ce/{d}"], aux[f"cka/{d}"], aux[f"kl/{d}"] = ce, cka, kl
            aux[f"accuracy/{d}"] = jnp.mean(
                (jnp.argmax(logits, -1) == data["labels"][d]).astype(jnp.float32)
            )
        return total, aux

    trained = state.params
    grads, aux, diag = sam.sam_gradient(
        loss_fn, trained, {"images": images, "labels": labels}, rho=rho, eps=eps, adaptive=adaptive
    )
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(trained, updates),
        batch_stats=aux.pop("batch_stats"),
        opt_state=opt_state,
    )
    metrics = dict(
        aux,
        loss=diag.loss,
        perturbed_loss=diag.perturbed_loss,
        sharpness=diag.sharpness,
        grad_norm=diag.grad_norm,
        **{f"kd_weight/{d}": w for d, w in weights.items()},
    )
    return new_state, metrics


def compile_distill_step(
    student: models.Model,
    teacher_models: dict,
    recipe: Recipe,
    tx: optax.GradientTransformation,
    mesh,
    *,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
):
    """``distill_step`` jitted over ``mesh``: ``step(state, batch, teachers)``.

    ``state`` and ``teachers`` replicated (``steps.replicate``), ``state`` donated;
    ``batch`` sharded per domain (``steps.shard_batch`` of the ``{domain: batch}`` dict), so
    every domain's global batch is the concatenation of the processes' slices.
    """
    sam.check_sam_arguments(rho, eps)
    fn = functools.partial(
        distill_step,
        student=student,
        teacher_models=teacher_models,
        recipe=recipe,
        tx=tx,
        rho=float(rho),
        eps=float(eps),
        adaptive=bool(adaptive),
    )
    whole, split = step_lib.replicated(mesh), step_lib.batch_sharding(mesh)
    return jax.jit(
        fn,
        in_shardings=(whole, split, whole),
        out_shardings=(whole, whole),
        donate_argnums=(0,),
    )


# ----------------------------------------------------------------------------------------
# Training one student (a zoo entry)
# ----------------------------------------------------------------------------------------


def entry_method(method: str) -> str:
    """Zoo method name of a student: ``sam`` -> ``sam+kd``."""
    return f"{method}+kd"


def export_variables(params: dict, batch_stats, source: str) -> dict:
    """The plain backbone to store: the trunk with the general domain's head."""
    out = dict(params["trunk"])
    out["head"] = params["heads"][source]
    return jax.device_get({"params": out, "batch_stats": batch_stats})


def student_config(config) -> dict:
    """The keys that define a student (``entry_keys.STUDENT_KEYS``), as stored and compared: its
    recipe, the seen domains and every teacher's row (a teacher trained otherwise is
    another teacher)."""
    c = config.to_dict()
    out = {k: c[k] for k in ("benchmark", "domains", "seed", "momentum", "weight_decay")}
    out.update(model=c["model"], augment=c["augment"], validation=c["validation"])
    out["sam"] = {k: c["sam"][k] for k in ("adaptive", "eps")}
    out["fusion"] = {
        "source_domain": c["fusion"]["source_domain"],
        "distill": c["fusion"]["distill"],
    }
    out["per_domain"] = {d: c["per_domain"][d] for d in config.domains if d in c["per_domain"]}
    return out


def describe_student(config, method: str) -> str:
    """One line of ``method``'s student's effective hyper-parameters (``--dry_run``)."""
    dc = config.fusion.distill
    batch = "+".join(str(dc.batch_size[d]) for d in config.domains)
    rho = config_lib.domain_config(config, config.fusion.source_domain, method).sam.rho
    return (
        f"batch {batch}, lr {dc.lr:g}, steps {dc.num_steps}, restart period "
        f"{dc.restart_period}, rho {rho:g}, teachers: the {method} backbones of "
        f"{', '.join(config.domains)}"
    )


def _teacher_entries(config, zoo: zoo_lib.Zoo, method: str) -> dict[str, zoo_lib.ZooEntry]:
    """The complete teacher of every seen domain; names the missing and damaged ones."""
    missing, damaged = [], []
    for d in config.domains:
        state, problem = zoo.status(config.benchmark, d, method)
        if state == "damaged":
            damaged.append(f"{config.benchmark}/{d}/{method} ({problem})")
        elif state != "complete":
            missing.append(f"{config.benchmark}/{d}/{method}")
    if missing or damaged:
        what = []
        if missing:
            what.append(f"missing or unfinished: {missing}")
        if damaged:
            what.append(f"damaged: {damaged}")
        raise zoo_lib.ZooError(
            f"distillation ({entry_method(method)}) needs the {method} teacher of every seen "
            f"domain in {str(zoo.root)!r}; {'; '.join(what)}. Train them first with the "
            f"train stage (--stages=train,fuse; a damaged teacher is retrained by it)"
        )
    return {d: zoo.get(config.benchmark, d, method) for d in config.domains}


def teacher_checksums(config, zoo: zoo_lib.Zoo, method: str) -> dict[str, str]:
    """``{domain: sha256 of the teacher's best/}``: what the student was distilled from."""
    return {d: e.best_sha256 for d, e in _teacher_entries(config, zoo, method).items()}


def teachers_retrained(current: dict[str, str], entry: zoo_lib.ZooEntry) -> str | None:
    """Why a complete student no longer matches its teachers, or None."""
    recorded = entry.metadata.get("fusion", {}).get("teachers_sha256")
    if recorded is None or recorded == current:  # None: written before it was recorded
        return None
    changed = sorted(d for d in current if recorded.get(d) != current[d])
    return f"its teachers were retrained ({', '.join(changed)})"


def _load_teachers(config, zoo: zoo_lib.Zoo, method: str) -> dict:
    _teacher_entries(config, zoo, method)
    teachers = {d: zoo.load(config.benchmark, d, method) for d in config.domains}
    for t in teachers.values():
        m = t.entry.metadata["model"]
        if (m["arch"], float(m["width"])) != (config.model.arch, float(config.model.width)):
            raise zoo_lib.IncompatibleCheckpointError(
                f"teacher {t.entry.key} is {m['arch']} x{m['width']} but the student is "
                f"config.model {config.model.arch} x{config.model.width}: distillation "
                f"needs teachers of the student's architecture (same trunk width)"
            )
    return teachers


def distill(
    config: ml_collections.ConfigDict,
    zoo: zoo_lib.Zoo,
    method: str,
    *,
    progress: bool = True,
) -> zoo_lib.ZooEntry:
    """Trains (or resumes) the ``<method>+kd`` student and returns its zoo entry."""
    config_lib.validate(config, num_processes=jax.process_count(), evaluation=False)
    config_lib.validate_distill(config, num_processes=jax.process_count())
    # One mesh shards every domain's batch: gcd of the batches (step.make_mesh).
    batches = [int(config.fusion.distill.batch_size[d]) for d in config.domains]
    mesh = step_lib.make_mesh(batch_size=math.gcd(*batches))
    if method not in config_lib.METHODS:
        raise ValueError(f"method {method!r} must be one of {config_lib.METHODS}")
    dc = config.fusion.distill
    source = config.fusion.source_domain
    name = entry_method(method)
    domains = tuple(config.domains)
    entry_dir = zoo.entry_dir(config.benchmark, source, name)
    desc = f"{config.benchmark}/{source}/{name}"

    teachers = _load_teachers(config, zoo, method)
    options = benchmarks.split_options(config.benchmark, config.data.class_splits)
    train_splits = {
        d: benchmarks.load_split(config.benchmark, d, "train", config.data_dir, **options)
        for d in domains
    }
    valid_splits = {
        d: benchmarks.load_split(config.benchmark, d, "valid", config.data_dir, **options)
        for d in domains
    }
    num_classes = {d: train_splits[d].num_classes for d in domains}
    for d in domains:
        t_classes = teachers[d].entry.metadata["model"]["num_classes"]
        if t_classes != num_classes[d]:
            raise zoo_lib.IncompatibleCheckpointError(
                f"teacher {teachers[d].entry.key} has {t_classes} classes but the {d} "
                f"train split has {num_classes[d]}: the zoo and the data disagree"
            )
    image_shape = train_splits[source].image_shape
    # The general domain's rho for sam+kd (its per-domain row, or config.sam.rho).
    rho = config_lib.domain_config(config, source, method).sam.rho

    student = models.build_model_from_config(config.model, 0, lora_rank=0)
    recipe = Recipe.from_config(config)
    tx = make_optimizer(config)
    schedule = optim.make_schedule(learning_rate=dc.lr, restart_period=dc.restart_period)
    sample = jnp.zeros((1, *image_shape), jnp.float32)

    def fresh_state():
        params, batch_stats = init_params(student, num_classes, jax.random.key(config.seed), sample)
        return step_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=tx.init(params),
        )

    process_index = jax.process_index()
    augment = pipeline.AugmentConfig(**config.augment.to_dict())
    data_settings = config_lib.data_settings(config)
    iterators = {}
    for i, d in enumerate(domains):
        # This process's rows of every global batch, read off the batch sharding.
        block, blocks = pipeline.process_block(step_lib.batch_sharding(mesh), int(dc.batch_size[d]))
        iterators[d] = pipeline.make_train_iterator(
            train_splits[d],
            global_batch_size=int(dc.batch_size[d]),
            seed=config.seed + i,  # distinct augmentation streams per domain
            augment=augment,
            process_index=block,
            process_count=blocks,
            **data_settings,
        )
    run = ResumableRun(
        entry_dir,
        desc=desc,
        stage="distill",
        mesh=mesh,
        fresh_state=fresh_state,
        iterators=iterators,
        record={"best_accuracy": -1.0, "best_step": -1, "best_ci95": 0.0, "best_per_domain": {}},
        fix=(
            f"Lower config.fusion.distill.lr (now {dc.lr}) or config.fusion.distill.adaptor_lr "
            f"(now {dc.adaptor_lr}) and re-run (an unfinished student with other settings is "
            "restarted)."
        ),
    )
    teacher_vars = step_lib.replicate({d: t.variables for d, t in teachers.items()}, mesh)
    teacher_models = {d: t.model for d, t in teachers.items()}
    step_fn = compile_distill_step(
        student,
        teacher_models,
        recipe,
        tx,
        mesh,
        rho=rho,
        eps=config.sam.eps,
        adaptive=config.sam.adaptive,
    )
    evaluators = {d: loop_lib.validation_evaluator(config, valid_splits[d]) for d in domains}

    def next_batch():
        host = {d: next(it) for d, it in iterators.items()}
        return {
            d: pipeline.to_step_batch(b, pad=augment.pad)
            for d, b in step_lib.shard_batch(host, mesh).items()
        }

    def validate(step):
        state = run.state
        variables = {"params": state.params["trunk"], "batch_stats": state.batch_stats}
        per_domain, cis = {}, []
        for d, ev in evaluators.items():
            result = ev.run(student, variables)
            per_domain[d] = float(result["mean"])
            cis.append(float(result["ci95"]))
        acc = float(np.mean(list(per_domain.values())))
        # The domains' episodes are independent: the mean's CI adds their variances.
        ci = float(math.sqrt(sum(c * c for c in cis)) / len(cis))
        best = run.keep_if_best(
            step,
            acc,
            ci,
            export_variables(state.params, state.batch_stats, source),
            best_per_domain=per_domain,
        )
        run.write_metrics(
            {"step": step, "val_accuracy": acc, "val_ci95": ci, "best": best}
            | {f"val_accuracy/{d}": a for d, a in per_domain.items()}
        )
        return acc

    num_steps = int(dc.num_steps)
    run_steps(
        run,
        Cadence(
            num_steps,
            config.log_every,
            config.checkpoint_every,
            int(dc.validation_every or dc.restart_period),
        ),
        next_batch=next_batch,
        train_step=lambda state, step, batch: step_fn(state, batch, teacher_vars),
        validate=validate,
        schedule=schedule,
        images_per_step=sum(int(dc.batch_size[d]) for d in domains),
        first_call_compiles=True,
        progress=progress,
    )
    for it in iterators.values():
        it.close()
    run.close()
    state = run.state
    record = run.record

    metadata = dict(
        config=student_config(config),
        rho=float(rho),
        num_steps=num_steps,
        batch_size={d: int(dc.batch_size[d]) for d in domains},
        train_classes=int(num_classes[source]),
        best_validation=run.best_validation(config.validation.episodes)
        | dict(
            per_domain=record["best_per_domain"],
            criterion="mean NCC accuracy over the seen domains' validation episodes",
        ),
        devices=mesh.size,
        fusion=dict(
            mode="distill",
            source=f"{config.benchmark}/{source}",
            teachers=[f"{config.benchmark}/{d}/{method}" for d in domains],
            teachers_sha256={d: t.entry.best_sha256 for d, t in teachers.items()},
            head=f"the {source} head of the student (evaluation uses only the trunk)",
        ),
    )
    run.check_state("final state")
    if process_index == 0:
        zoo.finalize(
            config.benchmark,
            source,
            name,
            variables=export_variables(state.params, state.batch_stats, source),
            model_config=models.model_metadata(config, num_classes[source]),
            image_shape=image_shape,
            metadata=metadata,
        )
    return zoo.get(config.benchmark, source, name)
