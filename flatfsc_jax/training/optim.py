"""The paper's base optimiser as a plain optax chain (docs/design.md#shared-settings).

SGD with momentum 0.9 and *coupled* weight decay 7e-4: the decay term ``wd * w`` is
added to the gradient before the momentum buffer, as ``torch.optim.SGD(weight_decay=)``
does (not AdamW-style decoupled decay). The learning rate follows cosine annealing with
warm restarts (PyTorch ``CosineAnnealingWarmRestarts`` with ``T_mult=1``,
``eta_min=0``), stepped every iteration:

    lr_t = lr * 0.5 * (1 + cos(pi * (t mod T0) / T0))

so the rate restarts at ``lr`` every ``T0`` iterations. PyTorch semantics per step:

    buf <- momentum * buf + (g + wd * w);   w <- w - lr_t * buf

Weight decay applies to *every* parameter, BatchNorm scales/biases and the classifier
head included, because the paper's PyTorch code passes ``model.parameters()`` whole.
With SAM, ``g`` is the perturbed gradient and ``w`` the clean weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from flatfsc_jax.checks import check_int, check_number


def make_schedule(
    *, learning_rate: float, restart_period: int, num_steps: int | None = None
) -> optax.Schedule:
    """Cosine annealing with warm restarts: period ``restart_period`` steps, floor 0.

    ``num_steps`` is only validated (the schedule is periodic, see ``make_optimizer``).
    """
    _check_lr(learning_rate, restart_period)
    if num_steps is not None:
        _check_num_steps(num_steps)

    def schedule(step):
        return cosine_restart_rate(step, learning_rate, restart_period)

    return schedule


def cosine_restart_rate(step, learning_rate, restart_period):
    """The warm-restart cosine rate at ``step``; every argument may be a traced array
    (``steps.TrainState.hparams`` keeps the rate and period as data)."""
    period = jnp.asarray(restart_period, jnp.int32)
    phase = jnp.mod(jnp.asarray(step, jnp.int32), period).astype(jnp.float32)
    return learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * phase / period.astype(jnp.float32)))


def make_direction(
    *, momentum: float = 0.9, weight_decay: float = 7e-4, nesterov: bool = False
) -> optax.GradientTransformation:
    """The optimiser without its learning rate: coupled weight decay + momentum buffer.

    ``make_optimizer`` is this chain followed by the scheduled rate; the training loop
    uses it directly when the rate is data (``steps.TrainState.hparams``).
    """
    check_number("momentum", momentum, below=1.0)
    check_number("weight_decay", weight_decay)
    return optax.chain(
        optax.add_decayed_weights(weight_decay),  # coupled: enters the momentum buffer
        optax.trace(decay=momentum, nesterov=nesterov),
    )


def make_optimizer(
    *,
    learning_rate: float,
    momentum: float = 0.9,
    weight_decay: float = 7e-4,
    restart_period: int,
    num_steps: int,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """SGD + momentum with coupled weight decay and the warm-restart cosine schedule.

    The schedule is periodic and does not depend on ``num_steps`` (a run may stop
    mid-period, e.g. a short smoke run); ``num_steps`` is validated here with the rest
    so a bad config fails before any compilation.
    """
    _check_lr(learning_rate, restart_period)
    _check_num_steps(num_steps)
    direction = make_direction(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    schedule = make_schedule(
        learning_rate=learning_rate, restart_period=restart_period, num_steps=num_steps
    )
    return optax.chain(direction, optax.scale_by_learning_rate(schedule))


def _check_lr(learning_rate, restart_period) -> None:
    check_number("learning_rate", learning_rate, positive=True)
    check_int("restart_period", restart_period)


def _check_num_steps(num_steps) -> None:
    check_int("num_steps", num_steps)
