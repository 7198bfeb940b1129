"""Test-time adaptation: fine-tune the backbone on an episode's support set, then NCC.

The paper's "simple adaptation" (the paper): starting from the selected backbone,
train on the support set with the NCC loss, then classify the queries by nearest
centroid with the adapted backbone. Two parameterisations:

* ``mode="full"``: every backbone parameter (collection ``'params'``) is trained.
* ``mode="lora"``: only low-rank adapters on every convolution (collection ``'lora'``,
  built by :func:`with_lora`; they start as the identity) are trained; the pre-trained
  weights stay bit-identical.

NCC loss (the URL/TSA recipe): support embeddings are classified against prototypes
computed from the same support embeddings (``10 * cos``), cross-entropy averaged over the
unmasked support examples. BatchNorm stays in eval mode (running statistics frozen): a
few-shot support set is far too small (down to 5 images) to estimate batch statistics,
and eval-mode BN keeps the adapted network a smooth function of its weights only.
Each optimiser step is one jitted call on fixed padded shapes (a Python loop, not
``lax.fori_loop``: see ``_adapt``); masks remove the padding from the loss. The learning
rate is data, not a compile-time constant, so every rate shares one compilation.
Optional SAM (``sam_rho > 0``) uses ``flatfsc_jax.sam.sam_gradient``.

The options of every entry point are the fields of :class:`AdaptOptions`. The default
learning rates (the paper did not publish its recipe) were chosen on a small check with
real glyph images (docs/evaluation.md#default-learning-rates). Episodes are looped over
rather than vmapped (docs/performance.md#xla-cpu-loops), one per local device at a time
(``episode_devices``). Adadelta uses PyTorch's ``rho=0.9, eps=1e-6`` (URL's PA / TSA
optimiser); 40 steps is the URL/TSA budget (the paper).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flatfsc_jax.checks import check_int, check_number
from flatfsc_jax.evaluation import episode_devices, ncc
from flatfsc_jax.evaluation.ncc import check_metric, prototype_logits

MODES = ("full", "lora")
OPTIMIZERS = ("adam", "sgd", "adadelta")
DEFAULT_STEPS = 40
DEFAULT_LORA_RANK = 4
# (mode, optimizer) -> learning rate; chosen on the glyph check
# (docs/evaluation.md#default-learning-rates).
DEFAULT_LEARNING_RATES = {
    ("full", "adam"): 1e-4,
    ("lora", "adam"): 1e-3,
    ("full", "sgd"): 3e-3,
    ("lora", "sgd"): 3e-2,
    ("full", "adadelta"): 0.1,
    ("lora", "adadelta"): 0.3,
}


@dataclasses.dataclass(frozen=True)
class AdaptOptions:
    """How to fine-tune on a support set; checked on construction (``ValueError``).

    ``learning_rate=None`` takes ``DEFAULT_LEARNING_RATES[(mode, optimizer)]``.
    """

    mode: str = "full"
    steps: int = DEFAULT_STEPS
    optimizer: str = "adam"
    learning_rate: float | None = None
    sam_rho: float = 0.0
    metric: str = "cosine"
    lora_rank: int = DEFAULT_LORA_RANK

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is unknown; choose one of {MODES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        check_metric(self.metric)
        check_int("steps", self.steps, minimum=0)
        check_number("learning_rate", self.learning_rate, positive=True, none="the default")
        check_number("sam_rho", self.sam_rho)
        if self.mode == "lora":
            check_int("lora_rank", self.lora_rank)
        if self.sam_rho > 0:
            _sam_gradient()  # fail before compiling if the SAM module is missing

    @property
    def lr(self) -> float:
        """The learning rate in use: ``learning_rate`` or the default for the mode."""
        if self.learning_rate is None:
            return DEFAULT_LEARNING_RATES[(self.mode, self.optimizer)]
        return float(self.learning_rate)

    def step_key(self) -> AdaptOptions:
        """What the jitted step depends on: the learning rate is data and the number of
        steps is the Python loop's, so neither enters the compilation key."""
        return dataclasses.replace(self, steps=0, learning_rate=None)


def _options(options: AdaptOptions | None, fields: dict) -> AdaptOptions:
    """``options`` with ``fields`` replaced (``AdaptOptions(**fields)`` without it)."""
    if options is None:
        return AdaptOptions(**fields)
    return dataclasses.replace(options, **fields) if fields else options


def make_optimizer(name: str, learning_rate) -> optax.GradientTransformation:
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adadelta":
        return optax.adadelta(learning_rate, rho=0.9, eps=1e-6)
    raise ValueError(f"optimizer={name!r} is unknown; choose one of {OPTIMIZERS}")


def _sam_gradient():
    try:
        from flatfsc_jax.sam import sam_gradient
    except ImportError as e:
        raise ValueError(
            "sam_rho > 0 needs flatfsc_jax.sam.sam_gradient, which could not be imported "
            f"({e}); use sam_rho=0.0"
        ) from e
    return sam_gradient


def with_lora(model, variables: dict, sample_images, *, rank: int = DEFAULT_LORA_RANK, rng=None):
    """The same backbone with rank-``rank`` LoRA adapters, and its variables.

    The pre-trained ``params``/``batch_stats`` are copied in unchanged; the new ``'lora'``
    collection starts as the identity (``B = 0``), so embeddings are unchanged at init.
    ``sample_images`` [n, H, W, C] only fixes the input channels (n and H, W are free).
    A model that already has adapters is returned as is.
    """
    if model.lora_rank > 0:
        if "lora" not in variables:
            raise ValueError("model has LoRA adapters but variables has no 'lora' collection")
        return model, variables
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {rank!r}")
    lora_model = model.with_lora_rank(rank)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    # The parameter tree is checked abstractly; the jitted init below returns only the
    # adapters, so XLA drops the forward pass it would otherwise compute.
    sample = jax.ShapeDtypeStruct((1, *np.shape(sample_images)[1:]), jnp.float32)
    init_shapes = jax.eval_shape(lora_model.init, rng, sample)
    if jax.tree.structure(init_shapes["params"]) != jax.tree.structure(variables["params"]):
        raise ValueError(
            "variables['params'] does not match the model's parameter tree; pass the "
            "variables this model was initialised or trained with"
        )
    lora = jax.jit(lambda r: lora_model.init(r, jnp.zeros(sample.shape, sample.dtype))["lora"])(rng)
    return lora_model, {**variables, "lora": lora}


def _ncc_loss(model, trainable_key, frozen, max_ways, metric, trainable, batch):
    images, labels, mask = batch
    emb = model.embed({**frozen, trainable_key: trainable}, images)
    logits = prototype_logits(emb, labels, mask, emb, max_ways, metric=metric)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    maskf = mask.astype(ce.dtype)
    loss = jnp.sum(ce * maskf) / jnp.maximum(maskf.sum(), 1.0)
    return loss, loss


def _adapt_step_fn(
    trainable,
    opt_state,
    frozen,
    support_images,
    support_labels,
    support_mask,
    learning_rate,
    *,
    model,
    max_ways,
    options: AdaptOptions,
):
    """One optimiser step on the support NCC loss; returns the loss *before* the step.

    ``options`` is ``AdaptOptions.step_key()``: the learning rate comes as data.
    """
    trainable_key = "params" if options.mode == "full" else "lora"
    loss_fn = functools.partial(_ncc_loss, model, trainable_key, frozen, max_ways, options.metric)
    batch = (support_images, support_labels, support_mask)
    tx = make_optimizer(options.optimizer, learning_rate)
    if options.sam_rho > 0:
        grads, loss, _ = _sam_gradient()(loss_fn, trainable, batch, rho=options.sam_rho)
    else:
        grads, loss = jax.grad(loss_fn, has_aux=True)(trainable, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


_adapt_step = jax.jit(_adapt_step_fn, static_argnames=("model", "max_ways", "options"))


def _adapt(variables, support_images, support_labels, support_mask, *, model, max_ways, options):
    """``options.steps`` jitted optimiser steps driven from Python.

    Deliberately not a ``lax.fori_loop``: XLA:CPU runs convolutions inside while loops
    slowly (docs/performance.md#xla-cpu-loops), and dispatching 40 steps from Python is
    cheap.
    """
    trainable_key = "params" if options.mode == "full" else "lora"
    frozen = {k: v for k, v in variables.items() if k != trainable_key}
    trainable = variables[trainable_key]
    opt_state = make_optimizer(options.optimizer, options.lr).init(trainable)
    learning_rate = jnp.asarray(options.lr, jnp.float32)
    step_key = options.step_key()
    losses = []
    for _ in range(options.steps):
        trainable, opt_state, loss = _adapt_step(
            trainable,
            opt_state,
            frozen,
            support_images,
            support_labels,
            support_mask,
            learning_rate,
            model=model,
            max_ways=max_ways,
            options=step_key,
        )
        losses.append(loss)
    losses = jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)
    return {**variables, trainable_key: trainable}, losses


def adapt_backbone(
    model,
    variables: dict,
    support_images,
    support_labels,
    support_mask,
    max_ways: int,
    *,
    options: AdaptOptions | None = None,
    rng=None,
    **fields,
):
    """Fine-tunes on one support set. Returns ``(model, variables, support_losses [steps])``.

    ``options`` (an :class:`AdaptOptions`) and/or its ``fields`` as keywords (mode, steps,
    optimizer, learning_rate, sam_rho, metric, lora_rank) set the recipe.
    ``support_images`` are float32 [S, H, W, C] in [-1, 1]; ``support_losses[i]`` is the
    NCC loss before step ``i``. In ``mode="lora"`` the returned model is the LoRA model.
    """
    opts = _options(options, fields)
    if opts.mode == "lora":
        model, variables = with_lora(model, variables, support_images, rank=opts.lora_rank, rng=rng)
    adapted, losses = _adapt(
        variables,
        jnp.asarray(support_images, jnp.float32),
        jnp.asarray(support_labels, jnp.int32),
        jnp.asarray(support_mask, bool),
        model=model,
        max_ways=int(max_ways),
        options=opts,
    )
    return model, adapted, losses


def _ncc_logits_fn(
    variables,
    support_images,
    support_labels,
    support_mask,
    query_images,
    *,
    model,
    max_ways,
    metric="cosine",
):
    """Query logits [Q, max_ways] of the frozen-backbone nearest-centroid classifier."""
    return prototype_logits(
        model.embed(variables, support_images),
        support_labels,
        support_mask,
        model.embed(variables, query_images),
        max_ways,
        metric=metric,
    )


ncc_logits = jax.jit(_ncc_logits_fn, static_argnames=("model", "max_ways", "metric"))


def finetune_and_classify(
    model,
    variables: dict,
    support_images,
    support_labels,
    support_mask,
    query_images,
    max_ways: int,
    *,
    options: AdaptOptions | None = None,
    rng=None,
    **fields,
):
    """Fine-tunes on the support set, then returns NCC query logits [Q, max_ways].

    Options as :func:`adapt_backbone`. Images are float32 NHWC in [-1, 1]; ``steps=0`` is
    plain NCC with the given backbone.
    """
    opts = _options(options, fields)
    model, adapted, _ = adapt_backbone(
        model,
        variables,
        support_images,
        support_labels,
        support_mask,
        max_ways,
        options=opts,
        rng=rng,
    )
    return ncc_logits(
        adapted,
        jnp.asarray(support_images, jnp.float32),
        jnp.asarray(support_labels, jnp.int32),
        jnp.asarray(support_mask, bool),
        jnp.asarray(query_images, jnp.float32),
        model=model,
        max_ways=int(max_ways),
        metric=opts.metric,
    )


@dataclasses.dataclass(frozen=True)
class _FineTuneProgram:
    """Fine-tune-then-NCC of one episode (``episode_devices.EpisodeProgram``); ``shared``
    is ``{"variables", "learning_rate"}``."""

    model: Any
    max_ways: int
    options: AdaptOptions  # AdaptOptions.step_key()

    @property
    def trainable_key(self) -> str:
        return "params" if self.options.mode == "full" else "lora"

    def _frozen(self, shared) -> dict:
        return {k: v for k, v in shared["variables"].items() if k != self.trainable_key}

    def init(self, shared, episode, carry):
        trainable = shared["variables"][self.trainable_key]
        tx = make_optimizer(self.options.optimizer, shared["learning_rate"])
        return trainable, tx.init(trainable)

    def step(self, shared, episode, carry):
        trainable, opt_state, _ = _adapt_step_fn(
            *carry,
            self._frozen(shared),
            *episode_devices.support(episode),
            shared["learning_rate"],
            model=self.model,
            max_ways=self.max_ways,
            options=self.options,
        )
        return trainable, opt_state

    def accuracy(self, shared, episode, carry):
        logits = _ncc_logits_fn(
            {**self._frozen(shared), self.trainable_key: carry[0]},
            *episode_devices.support(episode),
            episode["query_images"],
            model=self.model,
            max_ways=self.max_ways,
            metric=self.options.metric,
        )
        return episode_devices.query_accuracy(logits, episode)


def adapt_episodes(
    model,
    variables: dict,
    split_data,
    episodes,
    *,
    options: AdaptOptions | None = None,
    rng=None,
    bucket: bool = True,
    **fields,
) -> np.ndarray:
    """Query accuracy [E] of fine-tune-then-NCC on every episode (each from the same start).

    Options as :func:`adapt_backbone`. Episodes run one per local device at a time
    (``episode_devices``). ``bucket=True`` pads each episode's support and query sets to
    the next power of two (capped by the batch's padded widths) instead of the full padded
    width: variable-size episodes then need at most ~log2(width) compilations and waste
    < 2x compute on padding, whereas full-width padding compiles once but can waste 10x on
    small episodes.
    """
    opts = _options(options, fields)
    arrays = ncc.check_episodes(episodes, len(split_data))  # before LoRA's compilation
    if opts.mode == "lora":
        sample = np.zeros((1, *split_data.image_shape), np.float32)
        model, variables = with_lora(model, variables, sample, rank=opts.lora_rank, rng=rng)
    program = _FineTuneProgram(model, int(episodes.max_ways), opts.step_key())
    shared = {"variables": variables, "learning_rate": jnp.float32(opts.lr)}
    return episode_devices.episode_accuracies(
        program, shared, split_data, arrays, steps=opts.steps, bucket=bucket
    )


def describe_defaults() -> dict[str, Any]:
    """The default adaptation recipe (for logs and configs)."""
    return dict(
        steps=DEFAULT_STEPS,
        lora_rank=DEFAULT_LORA_RANK,
        learning_rates={f"{m}/{o}": lr for (m, o), lr in DEFAULT_LEARNING_RATES.items()},
        loss="NCC (support vs support prototypes, 10 * cosine), BN in eval mode",
    )
