"""TSA: task-specific adapters (Li, Liu & Bilen, CVPR 2022), residual-matrix form + PA.

Per task, the frozen backbone (weights and BN running statistics; BN in eval mode) gets
a residual 1x1 adapter ``alpha`` beside every 3x3 convolution of its four stages
(models.py, collection ``'tsa'``; 16 in ResNet-18), starting at ``1e-4 * I``, and a PA map
``beta`` [D, D] (pa.py), starting at the identity, on top of the embedding. Both are
trained jointly on the whole support set with the NCC loss of the mapped support
embeddings against their own prototypes (``10 * cos``), then the queries are classified
by nearest centroid on the adapted, mapped embeddings. Recipe (TSA's reference code):

* 40 full-batch Adadelta steps (``rho=0.9, eps=1e-6``), adapters reset for every task;
* learning rates ``alpha / beta`` = 0.05 / 0.1 on a seen domain and 0.5 / 1.0 on an
  unseen one (:data:`LEARNING_RATES`): like PA, the rate uses the domain's role.

Cost: every step is a forward and backward pass of the backbone over the support set,
so a task costs about 40 backbone passes (as test-time fine-tuning does). Each step is
one jitted call driven from Python (a Python loop of jitted steps, as in adapt.py:
docs/performance.md#xla-cpu-loops). Episodes run one per local device at a time
(``episode_devices``), their support and query sets padded to fixed widths
(``episodes.compact_episode``: power-of-two buckets), so one compilation serves every
episode of a padded shape; the learning rates are traced, so seen and unseen domains
share it.
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
from flatfsc_jax.evaluation import episode_devices, ncc, pa

DEFAULT_STEPS = 40
# TSA's rates (test_extractor_tsa.py): (alpha, beta) by whether the domain was seen.
LEARNING_RATES = {"seen": (0.05, 0.1), "unseen": (0.5, 1.0)}


def learning_rates(seen: bool) -> tuple[float, float]:
    """TSA's ``(alpha, beta)`` learning rates for a seen (True) or unseen (False) domain."""
    return LEARNING_RATES["seen" if seen else "unseen"]


def with_tsa(model, variables: dict, sample_images):
    """The same backbone with TSA adapters, and its variables with a fresh ``'tsa'``.

    ``sample_images`` [n, H, W, C] only fixes the input channels. The pre-trained
    collections are copied in unchanged; the adapters take their initial value
    (``1e-4 * I``), so calling this again resets them.
    """
    tsa_model = model.with_tsa(True)
    sample = jax.ShapeDtypeStruct((1, *np.shape(sample_images)[1:]), jnp.float32)
    init_shapes = jax.eval_shape(tsa_model.init, jax.random.PRNGKey(0), sample)
    shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
    if shapes(init_shapes["params"]) != shapes(variables["params"]):
        raise ValueError(
            "variables['params'] does not match the model's parameter tree; pass the "
            "trunk variables this model was built for"
        )
    # Only the adapters are returned, so XLA drops the forward pass of the init.
    init = jax.jit(
        lambda r: tsa_model.init(r, jnp.zeros(sample.shape, sample.dtype))["tsa"],
    )
    frozen = {k: v for k, v in variables.items() if k != "tsa"}
    return tsa_model, {**frozen, "tsa": init(jax.random.PRNGKey(0))}


def _optimizer(lr_alpha, lr_beta) -> optax.GradientTransformation:
    def labels(trainable):
        return {"tsa": jax.tree.map(lambda _: "alpha", trainable["tsa"]), "beta": "beta"}

    return optax.multi_transform(
        {
            "alpha": optax.adadelta(lr_alpha, **pa.ADADELTA),
            "beta": optax.adadelta(lr_beta, **pa.ADADELTA),
        },
        labels,
    )


def _loss(model, frozen, max_ways, trainable, images, labels, mask):
    emb = model.embed({**frozen, "tsa": trainable["tsa"]}, images)
    return pa.support_ncc_loss(pa.apply_map(emb, trainable["beta"]), labels, mask, max_ways)


def _step_fn(
    trainable, opt_state, frozen, images, labels, mask, lr_alpha, lr_beta, *, model, max_ways
):
    """One Adadelta step on (adapters, PA map); returns the loss *before* the step."""
    loss_fn = functools.partial(_loss, model, frozen, max_ways)
    loss, grads = jax.value_and_grad(loss_fn)(trainable, images, labels, mask)
    updates, opt_state = _optimizer(lr_alpha, lr_beta).update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


_step = jax.jit(_step_fn, static_argnames=("model", "max_ways"))


def _start(model, variables) -> dict:
    """The trainable start of every task: the adapters of ``with_tsa`` and beta = I."""
    return {"tsa": variables["tsa"], "beta": jnp.eye(model.embedding_dim, dtype=jnp.float32)}


def adapt_task(
    model,
    variables: dict,
    support_images,
    support_labels,
    support_mask,
    max_ways: int,
    *,
    lr_alpha: float,
    lr_beta: float,
    steps: int = DEFAULT_STEPS,
):
    """Trains fresh adapters and a PA map on one support set.

    ``model`` / ``variables`` come from :func:`with_tsa` (their adapters are the start).
    Returns ``(variables with the trained 'tsa', beta [D, D], support losses [steps])``;
    ``losses[i]`` is the loss before step ``i``.
    """
    if not model.tsa or "tsa" not in variables:
        raise ValueError("adapt_task needs the model and variables returned by tsa.with_tsa")
    frozen = {k: v for k, v in variables.items() if k != "tsa"}
    trainable = _start(model, variables)
    lr_a, lr_b = jnp.float32(lr_alpha), jnp.float32(lr_beta)
    opt_state = _optimizer(lr_a, lr_b).init(trainable)
    batch = (
        jnp.asarray(support_images, jnp.float32),
        jnp.asarray(support_labels, jnp.int32),
        jnp.asarray(support_mask, bool),
    )
    losses = []
    for _ in range(steps):  # Python loop of jitted steps: see the module docstring
        trainable, opt_state, loss = _step(
            trainable, opt_state, frozen, *batch, lr_a, lr_b, model=model, max_ways=max_ways
        )
        losses.append(loss)
    losses = jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)
    return {**frozen, "tsa": trainable["tsa"]}, trainable["beta"], losses


def _classify_fn(
    variables, beta, support_images, support_labels, support_mask, query_images, *, model, max_ways
):
    """Query logits [Q, max_ways]: NCC on the adapted backbone's PA-mapped embeddings."""
    return ncc.prototype_logits(
        pa.apply_map(model.embed(variables, support_images), beta),
        support_labels,
        support_mask,
        pa.apply_map(model.embed(variables, query_images), beta),
        max_ways,
        metric="cosine",
        scale=pa.SCALE,
    )


classify = jax.jit(_classify_fn, static_argnames=("model", "max_ways"))


def _check(steps, lr_alpha, lr_beta):
    check_int("steps", steps, minimum=0)
    check_number("lr_alpha", lr_alpha, positive=True)
    check_number("lr_beta", lr_beta, positive=True)


@dataclasses.dataclass(frozen=True)
class _TSAProgram:
    """TSA-then-NCC of one episode (``episode_devices.EpisodeProgram``); ``shared`` is
    ``{"variables"`` (with ``with_tsa``'s adapters), ``"lr_alpha"``, ``"lr_beta"}``."""

    model: Any
    max_ways: int

    @staticmethod
    def _frozen(shared) -> dict:
        return {k: v for k, v in shared["variables"].items() if k != "tsa"}

    def init(self, shared, episode, carry):
        trainable = _start(self.model, shared["variables"])
        return trainable, _optimizer(shared["lr_alpha"], shared["lr_beta"]).init(trainable)

    def step(self, shared, episode, carry):
        trainable, opt_state, _ = _step_fn(
            *carry,
            self._frozen(shared),
            *episode_devices.support(episode),
            shared["lr_alpha"],
            shared["lr_beta"],
            model=self.model,
            max_ways=self.max_ways,
        )
        return trainable, opt_state

    def accuracy(self, shared, episode, carry):
        trainable = carry[0]
        logits = _classify_fn(
            {**self._frozen(shared), "tsa": trainable["tsa"]},
            trainable["beta"],
            *episode_devices.support(episode),
            episode["query_images"],
            model=self.model,
            max_ways=self.max_ways,
        )
        return episode_devices.query_accuracy(logits, episode)


def episode_accuracies(
    model,
    variables: dict,
    split_data,
    episodes,
    *,
    lr_alpha: float,
    lr_beta: float,
    steps: int = DEFAULT_STEPS,
    bucket: bool = True,
) -> np.ndarray:
    """TSA-then-NCC query accuracy [E] of every episode, adapters reset for each.

    ``model`` / ``variables`` are the plain trunk (no ``'tsa'``); ``bucket`` pads support
    and query sets to powers of two (as ``adapt.adapt_episodes``) or, with False, to the
    batch's padded widths (one compilation for all episodes). Episodes run one per local
    device at a time (``episode_devices``).
    """
    _check(steps, lr_alpha, lr_beta)
    arrays = ncc.check_episodes(episodes, len(split_data))  # before TSA's compilation
    sample = np.zeros((1, *split_data.image_shape), np.float32)
    tsa_model, tsa_vars = with_tsa(model, variables, sample)
    shared = {
        "variables": tsa_vars,
        "lr_alpha": jnp.float32(lr_alpha),
        "lr_beta": jnp.float32(lr_beta),
    }
    return episode_devices.episode_accuracies(
        _TSAProgram(tsa_model, int(episodes.max_ways)),
        shared,
        split_data,
        arrays,
        steps=steps,
        bucket=bucket,
    )
