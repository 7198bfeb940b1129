"""The jitted, data-parallel training step (ERM, SAM and the flat methods) and its state.

``train_step`` is a pure function ``(state, batch, rng) -> (state, metrics)``; model,
optimiser and SAM settings are static and bound with ``functools.partial``.
``compile_train_step`` jits it over a one-axis device mesh: the batch is sharded along
``"data"``, the state is replicated, and the state buffers are donated. Under ``jax.jit``
the program has *global* semantics, so BatchNorm statistics and the SAM gradient norm
are computed over the global batch, identical (to float rounding) on 1 or 8 devices;
XLA inserts the cross-device reductions. No ``pmap``.

A batch is a dict ``{"images": [B, H, W, C], "labels": int32 [B]}``; images are
float32 in [-1, 1] or uint8 (then preprocessed on the device, which moves 4x fewer
bytes from the host).

Per-run hyper-parameters as data (``TrainState.hparams``). A program compiled with the
learning rate, restart period, SAM radius and class count baked in as constants serves
one zoo entry only; the Glyphs job trains 18 entries with a handful of architectures.
When the state carries ``hparams = {"learning_rate", "restart_period", "rho",
"num_classes"}`` (replicated scalars, see ``make_hparams``), the step reads them as
traced values: the warm-restart cosine rate is computed from ``state.step`` in the
graph, ``rho`` is the traced SAM radius (the static ``rho`` only selects the ERM or the
SAM program), and logits of classes ``>= num_classes`` are masked, so a classification
head padded to a shared width learns exactly what an unpadded one would. Every entry of
one architecture, batch shape and method then runs the *same* compiled program
(``compiled_train_step`` caches it). ``tx`` must then be the optimiser's direction
without its learning rate (``optim.make_direction``). With ``hparams={}`` (the default)
``tx`` carries its own schedule, as for any optax user.

LoRA fine-tuning (``train_lora=True``) differentiates only the adapters (collection
``'lora'``) and the classifier head; the trunk weights (BatchNorm scales and biases
included) stay frozen and get no gradient computed, while BatchNorm running statistics
still update. SAM then perturbs, and normalises over, only what is trained.

Flat methods (``flat=FlatMethod(...)``, flatfsc_jax/flat_methods.py): any method other
than plain ERM/SAM replaces ``sam.sam_gradient`` by its ``flat_gradient``, with its
state in ``TrainState.flat`` and, for EMA/SWA, the averaged weights in
``TrainState.average`` (updated after the optimiser step). ``flat=None`` (or method
``erm``/``sam`` without averaging) is the plain ERM/SAM program, unchanged to the bit.
The switching methods (``flat_methods.SWITCHING_METHODS``) are compiled twice, with
``sam_step`` True and False, and the caller picks per step (``flat_methods.takes_sam_step``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatfsc_jax import flat_methods, sam
from flatfsc_jax.checks import check_number
from flatfsc_jax.data.sources import preprocess
from flatfsc_jax.models import Model
from flatfsc_jax.training import optim

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries between steps (plain pytree data).

    Attributes:
      step: int32 scalar, number of optimiser steps taken.
      params: the model's ``'params'`` collection.
      batch_stats: BatchNorm running statistics (``{}`` for models without BN).
      opt_state: optimiser state over the *trained* variables (see ``trainable``).
      lora: LoRA adapters (collection ``'lora'``), ``{}`` for models without them.
      hparams: per-run hyper-parameters read as traced values (module docstring), or
        ``{}`` when ``tx`` carries its own schedule.
      flat: a flat method's state (``flat_methods.init_state``; ``{}`` for ERM/SAM).
      average: EMA/SWA of the trained variables (``flat_methods.init_average``; ``{}``
        without averaging).
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    lora: Any = flax.struct.field(default_factory=dict)
    hparams: Any = flax.struct.field(default_factory=dict)
    flat: Any = flax.struct.field(default_factory=dict)
    average: Any = flax.struct.field(default_factory=dict)


HPARAM_KEYS = ("learning_rate", "restart_period", "rho", "num_classes")

# Logit of a padded head class (index >= num_classes): finite, so the softmax never
# produces NaN, and far below any real logit, so it gets zero probability and gradient.
_MASKED_LOGIT = -1e30


def make_hparams(*, learning_rate, restart_period, rho, num_classes) -> dict:
    """``TrainState.hparams`` for one run (float32 / int32 scalars)."""
    return {
        "learning_rate": jnp.asarray(learning_rate, jnp.float32),
        "restart_period": jnp.asarray(restart_period, jnp.int32),
        "rho": jnp.asarray(rho, jnp.float32),
        "num_classes": jnp.asarray(num_classes, jnp.int32),
    }


def trainable(state: TrainState, train_lora: bool = False) -> Any:
    """The variables the optimiser updates: all params, or LoRA adapters + head."""
    if not train_lora:
        return state.params
    return {"lora": state.lora, "head": state.params.get("head", {})}


def _with_trained(state: TrainState, trained: Any, train_lora: bool) -> tuple[Any, Any]:
    """``(params, lora)`` after replacing the trained part by ``trained``."""
    if not train_lora:
        return trained, state.lora
    params = dict(state.params)
    if trained["head"]:
        params["head"] = trained["head"]
    return params, trained["lora"]


def create_train_state(
    model: Model,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    sample_images: Any,
    *,
    train_lora: bool = False,
) -> TrainState:
    """Fresh variables from ``model.init`` and the optimiser state for them."""
    # Jitted: eager flax initialisation dispatches op by op and is several times slower.
    variables = jax.jit(model.init)(rng, _as_float_images(jnp.asarray(sample_images)))
    if train_lora and not variables.get("lora"):
        raise ValueError("train_lora=True needs LoRA adapters: build the model with lora_rank > 0")
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        opt_state=None,
        lora=variables.get("lora", {}),
    )
    return state.replace(opt_state=tx.init(trainable(state, train_lora)))


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    model: Model,
    tx: optax.GradientTransformation,
    use_sam: bool,
    rho: float | None = None,
    adaptive: bool = False,
    m: int | None = None,
    eps: float = 1e-12,
    label_smoothing: float = 0.0,
    train_lora: bool = False,
    flat: flat_methods.FlatMethod | None = None,
    sam_step: bool | None = None,
) -> tuple[TrainState, dict]:
    """One ERM (``use_sam=False``: one pass) or SAM step on mean softmax cross-entropy.

    ``rho`` is SAM's radius. It is data, so one compiled SAM program serves every radius:
    a state with ``hparams`` (zoo training) carries it in ``hparams["rho"]`` and ``rho``
    must be None; a plain state takes it from ``rho``.

    ``rng`` is reserved for stochastic layers and on-device augmentation; the current
    models are deterministic in training mode and ignore it.

    Returns the new state and scalar metrics: ``loss`` (clean), ``perturbed_loss``,
    ``sharpness``, ``grad_norm`` (clean), ``accuracy`` (clean pass, training-mode BN)
    and ``param_norm`` (of the trained variables, before the step), and
    ``gradient_evaluations``. The learning rate is a function of ``state.step`` only;
    the caller evaluates its schedule.

    ``flat`` selects a flat method (module docstring); its ``rho`` is ignored in favour
    of this step's radius, and ``sam_step`` is the host's branch for the switching ones.
    """
    del rng  # see docstring: no stochastic layers yet
    images = _as_float_images(batch["images"])
    labels = batch["labels"]
    hp = state.hparams
    if hp and set(hp) != set(HPARAM_KEYS):
        raise ValueError(f"TrainState.hparams must have keys {HPARAM_KEYS}, got {sorted(hp)}")
    radius = _radius(use_sam, rho, hp)

    def loss_fn(trained, data):
        params, lora = _with_trained(state, trained, train_lora)
        variables = {"params": params, "batch_stats": state.batch_stats}
        if lora:
            variables["lora"] = lora
        (logits, _), new_batch_stats = model.apply(variables, data["images"], train=True)
        logits = logits.astype(jnp.float32)
        if hp:
            valid = jnp.arange(logits.shape[-1]) < hp["num_classes"]
            logits = jnp.where(valid, logits, _MASKED_LOGIT)
            # Smoothing spreads its mass over the real classes only.
            onehot = jax.nn.one_hot(data["labels"], logits.shape[-1])
            uniform = valid.astype(jnp.float32) / hp["num_classes"].astype(jnp.float32)
            targets = (1.0 - label_smoothing) * onehot + label_smoothing * uniform
        else:
            targets = optax.smooth_labels(
                jax.nn.one_hot(data["labels"], logits.shape[-1]), label_smoothing
            )
        loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        accuracy = jnp.mean((jnp.argmax(logits, -1) == data["labels"]).astype(jnp.float32))
        return loss, {"batch_stats": new_batch_stats, "accuracy": accuracy}

    trained = trainable(state, train_lora)
    data = {"images": images, "labels": labels}
    extra = {}
    # Before the gradient: GSAM's radius follows this step's rate.
    rate = (
        optim.cosine_restart_rate(state.step, hp["learning_rate"], hp["restart_period"])
        if hp
        else None
    )
    new_flat = state.flat
    if is_plain(flat):
        grads, aux, diag = sam.sam_gradient(
            loss_fn, trained, data, rho=radius, eps=eps, adaptive=adaptive, m=m
        )
        evaluations = jnp.float32(1.0 if not use_sam else 2.0)
    else:
        flat_hp = {"rho": radius}
        if flat.gsam_rho_min is not None:
            if rate is None:
                raise ValueError(
                    "flat.gsam_rho_min (a GSAM radius schedule) needs a state with hparams "
                    "(the learning rate as data); leave it None for a constant radius"
                )
            flat_hp.update(current_learning_rate=rate, peak_learning_rate=hp["learning_rate"])
        grads, aux, diag, new_flat = flat_methods.make_flat_gradient(flat)(
            loss_fn, trained, data, state.flat, state.step, flat_hp, sam_step=sam_step
        )
        evaluations = diag.gradient_evaluations
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    if hp:  # tx is the direction only: scale by this step's warm-restart cosine rate
        updates = jax.tree.map(lambda u: -rate * u, updates)
        extra["learning_rate"] = rate
    new_trained = optax.apply_updates(trained, updates)
    average = state.average
    if flat is not None and flat.average != "none":
        average = flat_methods.update_average(flat, average, new_trained, state.step + 1)
    params, lora = _with_trained(state, new_trained, train_lora)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        lora=lora,
        batch_stats=aux["batch_stats"],
        opt_state=opt_state,
        flat=new_flat,
        average=average,
    )
    metrics = {
        "loss": diag.loss,
        "perturbed_loss": diag.perturbed_loss,
        "sharpness": diag.sharpness,
        "grad_norm": diag.grad_norm,
        "accuracy": aux["accuracy"],
        "param_norm": sam.global_norm(trained),
        "gradient_evaluations": evaluations,
        **extra,
    }
    return new_state, metrics


def host_metrics(metrics: dict) -> dict:
    """A step's metrics as Python floats, for logging (waits for the step to finish)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def make_mesh(devices: Any = None, *, batch_size: int | None = None) -> Mesh:
    """A one-axis (``"data"``) mesh by ``jax.make_mesh`` (devices ordered by process, as
    the data pipeline's process slices assume; data/pipeline.py).

    ``devices``: default all devices of every host. With ``batch_size`` the mesh takes,
    on every process, the first ``gcd(batch_size / process_count, local devices)`` local
    devices, so a batch never has to divide by the device count: batch 8 on 16 GPUs runs
    on 8 of them instead of being rejected. Every device is used by running entries
    concurrently instead (docs/scale.md#one-process-per-gpu).
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    if batch_size is not None:
        processes = sorted({d.process_index for d in devices})
        if batch_size % len(processes):
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {len(processes)} processes: "
                f"every process loads batch_size / {len(processes)} examples; use a multiple"
            )
        local = {p: [d for d in devices if d.process_index == p] for p in processes}
        per = math.gcd(batch_size // len(processes), min(len(v) for v in local.values()))
        devices = [d for p in processes for d in local[p][:per]]
    # Auto axes: the step's shardings are given explicitly (batch_sharding, replicated),
    # as with the plain Mesh this replaced; make_mesh's default is Explicit.
    auto = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) axis split over ``"data"``, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device of ``mesh`` (train state, rng keys)."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the batch (host arrays) -> global ``jax.Array``s.

    Each process passes its own examples; the global batch is their concatenation in
    process order (``jax.make_array_from_process_local_data``), so the same code runs on
    one host or many.
    """
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_devices:
            raise ValueError(
                f"batch: this process's batch of {x.shape[:1]} examples does not "
                f"split over its {local_devices} devices; use a global batch divisible by "
                f"{mesh.size}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of ``tree`` on every device of ``mesh``.

    Always fresh buffers (never an alias of ``tree``), so donating the result to a step
    leaves ``tree`` usable.
    """
    return jax.device_put(tree, replicated(mesh), may_alias=False)


def is_plain(flat: flat_methods.FlatMethod | None) -> bool:
    """Whether ``flat`` is plain ERM/SAM: the unchanged ``sam.sam_gradient`` program."""
    return flat is None or (flat.method in ("erm", "sam") and flat.average == "none")


def _radius(use_sam: bool, rho, hp):
    if not use_sam:
        if rho:
            raise ValueError(f"rho={rho!r} with use_sam=False: ERM has no radius")
        return 0.0
    if hp:
        if rho is not None:
            raise ValueError("the state's hparams carry rho: pass rho=None")
        return hp["rho"]
    if rho is None:
        raise ValueError("use_sam=True needs a radius: rho=..., or a state with hparams")
    return rho


def compile_train_step(
    model: Model,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    use_sam: bool,
    rho: float | None = None,
    adaptive: bool = False,
    m: int | None = None,
    eps: float = 1e-12,
    label_smoothing: float = 0.0,
    train_lora: bool = False,
    batch_size: int | None = None,
    flat: flat_methods.FlatMethod | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step`` jitted over ``mesh`` with donated state.

    Returns ``step(state, batch, rng) -> (state, metrics)``; ``state`` and ``rng`` must
    be replicated (``replicate``) and ``batch`` sharded (``shard_batch``). ``state`` is
    donated: do not reuse the argument after the call. Configuration errors (including a
    global ``batch_size`` the mesh or ``m`` cannot split, when given here; otherwise at
    the first call) raise ``ValueError`` before anything compiles. The jitted function is
    ``step.jitted`` (e.g. for ``.lower(...)``).

    ``flat`` (static) selects a flat method. For the switching methods two programs are
    compiled (lazily, each at its first use) and ``step(state, batch, rng, sam_step=...)``
    must say which (``flat_methods.takes_sam_step(flat, host_step)``); ``step.jitted``
    is then a dict ``{True: ..., False: ...}``.
    """
    sam.check_sam_arguments(0.0 if rho is None else rho, eps, m)
    if flat is not None and not is_plain(flat):
        if m is not None:
            raise ValueError(f"m-sharpness (m={m}) is supported by flat method 'sam' only")
        if train_lora and flat.average != "none":
            raise ValueError("weight averaging (flat.average) is not supported with LoRA")
    if batch_size is not None:
        sam.check_batch_split(batch_size, m=m, num_devices=mesh.size)
    check_number("label_smoothing", label_smoothing, below=1.0)
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        use_sam=bool(use_sam),
        rho=None if rho is None else float(rho),
        adaptive=bool(adaptive),
        m=m,
        eps=float(eps),
        label_smoothing=float(label_smoothing),
        train_lora=bool(train_lora),
    )
    if flat is not None and not is_plain(flat):
        step_fn = functools.partial(step_fn, flat=flat)
    whole, split = replicated(mesh), batch_sharding(mesh)

    def jit(fn):
        return jax.jit(
            fn,
            in_shardings=(whole, split, whole),
            out_shardings=(whole, whole),
            donate_argnums=(0,),
        )

    switching = flat is not None and flat.method in flat_methods.SWITCHING_METHODS
    if switching:
        jitted = {b: jit(functools.partial(step_fn, sam_step=b)) for b in (True, False)}
    else:
        jitted = jit(step_fn)

    def step(state: TrainState, batch: dict, rng: jax.Array, *, sam_step: bool | None = None):
        # Shapes are static: checking them costs nothing and beats an XLA sharding error.
        sam.check_batch_split(int(batch["labels"].shape[0]), m=m, num_devices=mesh.size)
        if not switching:
            return jitted(state, batch, rng)
        if not isinstance(sam_step, bool):
            raise ValueError(
                f"flat method {flat.method!r} switches programs per step: pass "
                f"sam_step=flat_methods.takes_sam_step(flat, step), got {sam_step!r}"
            )
        return jitted[sam_step](state, batch, rng)

    step.jitted = jitted
    return step


def _as_float_images(images: jax.Array) -> jax.Array:
    if images.dtype == jnp.uint8:
        return preprocess(images)
    return images
