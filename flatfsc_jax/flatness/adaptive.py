"""Adaptive sharpness (Andriushchenko et al., ICML 2023): average- and worst-case.

Both measure the loss increase when the weights move inside a ball scaled element-wise
by ``|w|`` (coordinates ``gamma = delta / |w|``), which makes them invariant to the
rescalings that leave a ReLU or BatchNorm network's function unchanged. The worst case
is found by APGD in ``gamma``; :mod:`flatfsc_jax.flatness.sharpness` states the
simplifications and scores whole backbones with these functions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from flatfsc_jax.checks import check_int, check_number

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]
NORMS = ("linf", "l2")


def _scaled_point(params: PyTree, gamma: PyTree) -> PyTree:
    """``w + |w| * gamma``: the adaptive perturbation, element by element."""
    return jax.tree.map(lambda w, g: w + jnp.abs(w) * g.astype(w.dtype), params, gamma)


def adaptive_loss_at(loss_fn: LossFn, params: PyTree, gamma: PyTree) -> jax.Array:
    """``loss_fn(params + |params| * gamma)``."""
    return loss_fn(_scaled_point(params, gamma))


def adaptive_ascent_step(
    loss_fn: LossFn, norm: str, params: PyTree, gamma: PyTree, prev: PyTree, step, rho, momentum
):
    """One momentum step of APGD in the relative coordinates ``gamma = delta / |w|``.

    ``z = P(gamma + step * d)`` with ``d = sign(g)`` (``linf``) or ``g / ||g||`` (``l2``),
    ``g`` the gradient of ``gamma -> L(w + |w| gamma)`` and ``P`` the projection onto
    ``||gamma||_p <= rho``; then ``momentum * z + (1 - momentum) * prev``, the convex
    combination Andriushchenko et al.'s code uses (``prev`` is the iterate before
    ``gamma``), which stays inside the ball. Returns ``(L at gamma, next gamma)``.
    """
    value, grad = jax.value_and_grad(lambda g: adaptive_loss_at(loss_fn, params, g))(gamma)
    if norm == "linf":
        moved = jax.tree.map(lambda x, d: jnp.clip(x + step * jnp.sign(d), -rho, rho), gamma, grad)
    else:
        grad_norm = otu.tree_norm(grad)
        scale = jnp.where(grad_norm > 0, step / jnp.where(grad_norm > 0, grad_norm, 1.0), 0.0)
        moved = otu.tree_add_scale(gamma, scale, grad)
        moved_norm = otu.tree_norm(moved)
        moved = otu.tree_scale(jnp.minimum(1.0, rho / jnp.maximum(moved_norm, 1e-30)), moved)
    mixed = jax.tree.map(lambda z, p: momentum * z + (1.0 - momentum) * p, moved, prev)
    return value, otu.tree_cast_like(mixed, gamma)


class AdaptiveSteps(NamedTuple):
    """The jitted steps of the adaptive measures.

    Attributes:
      loss_at: ``(params, gamma) -> L(params + |params| * gamma)``.
      ascent: ``(params, gamma, prev, step, rho, momentum) -> (L at gamma, next gamma)``
        (:func:`adaptive_ascent_step`).
      norm: the ball of ``ascent``, ``"linf"`` or ``"l2"``.
    """

    loss_at: Callable
    ascent: Callable
    norm: str


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def adaptive_steps(loss_fn: LossFn, norm: str = "linf") -> AdaptiveSteps:
    """:class:`AdaptiveSteps` of any ``loss_fn(params) -> scalar`` (compiled on first use)."""
    _check_norm(norm)
    return AdaptiveSteps(
        loss_at=jax.jit(functools.partial(adaptive_loss_at, loss_fn)),
        ascent=jax.jit(functools.partial(adaptive_ascent_step, loss_fn, norm)),
        norm=norm,
    )


def _steps_of(loss_fn: LossFn | AdaptiveSteps, norm: str | None = None) -> AdaptiveSteps:
    """``loss_fn``'s steps; ``norm=None`` (only ``loss_at`` is used) accepts any ball."""
    if isinstance(loss_fn, AdaptiveSteps):
        if norm is not None and loss_fn.norm != norm:
            raise ValueError(
                f"the AdaptiveSteps were built for norm={loss_fn.norm!r}, not {norm!r}"
            )
        return loss_fn
    return adaptive_steps(loss_fn, norm or "linf")


def _gaussian_like(rng: np.random.Generator, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x: rng.standard_normal(np.shape(x), dtype=np.float32), like)


def adaptive_average_sharpness(
    loss_fn: LossFn | AdaptiveSteps,
    params: PyTree,
    *,
    rho: float,
    samples: int = 20,
    antithetic: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Adaptive average-case sharpness ``E_z L(w + rho |w| z) - L(w)``, ``z ~ N(0, I)``.

    Andriushchenko et al.'s ``avg_l2 --adaptive``: Gaussian noise of standard deviation
    ``rho * |w_i|`` on every parameter, ``samples`` Monte-Carlo draws (NumPy, seeded).
    With ``antithetic`` each draw ``z`` is paired with ``-z`` (two losses per sample): the
    first-order term ``g . (|w| z)``, which is pure noise with mean zero away from an
    exact minimum, cancels in every pair, while the expectation is unchanged because
    ``z`` and ``-z`` have the same law. For a quadratic loss the estimate has mean
    ``0.5 rho^2 sum_i H_ii w_i^2``.

    Returns ``dict(sharpness, std_error, loss)``: ``std_error`` is the standard error of
    the mean over the ``samples`` (pair) differences, ``loss`` is ``L(w)``. Away from a
    minimum the value can be negative (the loss may curve down on average).
    """
    check_number("rho", rho, positive=True)
    check_int("samples", samples, minimum=2)
    loss_at = _steps_of(loss_fn).loss_at
    base = float(loss_at(params, otu.tree_zeros_like(params)))
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(samples):
        z = _gaussian_like(rng, params)
        plus = float(loss_at(params, jax.tree.map(lambda x: rho * x, z)))
        if antithetic:
            minus = float(loss_at(params, jax.tree.map(lambda x: -rho * x, z)))
            plus = 0.5 * (plus + minus)
        diffs.append(plus - base)
    diffs = np.asarray(diffs, np.float64)
    return {
        "sharpness": float(diffs.mean()),
        "std_error": float(diffs.std(ddof=1) / math.sqrt(samples)),
        "loss": base,
    }


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step (Croce & Hein 2020).

    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, checkpoints
    ``ceil(p_j * steps)`` for ``j >= 1``, the schedule of Andriushchenko et al.'s code.
    """
    check_int("steps", steps, minimum=1)
    p = [0.0, 0.22]
    w = [0, math.ceil(steps * 0.22)]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * steps))
    return w[1:]


def adaptive_worst_sharpness(
    loss_fn: LossFn | AdaptiveSteps,
    params: PyTree,
    *,
    rho: float,
    steps: int = 20,
    norm: str = "linf",
    momentum: float = 0.75,
    min_update_ratio: float = 0.75,
) -> dict[str, float]:
    """Adaptive worst-case sharpness ``max_{||gamma||_p <= rho} L(w + |w| gamma) - L(w)``.

    Andriushchenko et al.'s ``m_apgd_linf --adaptive`` (``norm="linf"``) by a lighter
    APGD (Croce & Hein 2020) in the relative coordinates ``gamma``:

    * start at ``gamma = 0`` (their default, no random start), step ``2 rho``;
    * :func:`adaptive_ascent_step` ``steps`` times (sign-gradient for ``linf``,
      normalised gradient for ``l2``, momentum ``0.75`` as their convex combination);
    * at the :func:`apgd_checkpoints`, halve the step if fewer than ``min_update_ratio``
      of the steps since the last checkpoint raised the best loss, or if neither the
      step nor the best loss changed, and go back to the best point;
    * report the largest loss seen (so the value is ``>= 0`` and more steps never lower it).

    Simplifications against their APGD: one run (no restarts); the step-size rule
    restarts the iterate itself from the best point (their code reloads the best weights
    for one gradient only); ``l2`` is plain projected gradient ascent in ``gamma`` (their
    ``l2`` steps along the weight gradient and projects ``delta`` onto the ellipsoid
    ``||delta / |w| ||_2 <= rho`` in ``delta`` coordinates, which reaches a different
    point when weights differ in size). The ball and the objective are theirs in both
    cases, and for ``linf`` the iteration is too: sign steps and clipping act
    element-wise, so both coordinate systems agree.

    One ``loss_fn`` is one batch: their ``E_S max`` over batches of ``m`` examples is
    the mean of this over batches (:func:`measure_backbone` does that).

    Returns ``dict(sharpness, loss, perturbed_loss)``.
    """
    check_number("rho", rho, positive=True)
    check_int("steps", steps, minimum=1)
    _check_norm(norm)
    check_number("momentum", momentum, positive=True)
    if momentum > 1:
        raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
    check_number("min_update_ratio", min_update_ratio, minimum=0.0)
    run = _steps_of(loss_fn, norm)
    checkpoints = set(apgd_checkpoints(steps))
    gamma = otu.tree_zeros_like(params)
    prev = gamma
    base = float(run.loss_at(params, gamma))
    best_loss, best_gamma = base, gamma
    step = prev_step = 2.0 * rho
    prev_best, prev_checkpoint, updates = base, 0, 0
    for i in range(steps):
        _, moved = run.ascent(params, gamma, prev, step, rho, momentum)
        prev, gamma = gamma, moved
        value = float(run.loss_at(params, gamma))
        if value > best_loss:
            best_loss, best_gamma, updates = value, gamma, updates + 1
        if i in checkpoints:
            stalled = updates < min_update_ratio * (i - prev_checkpoint)
            stuck = prev_step == step and prev_best == best_loss
            prev_step, prev_best, prev_checkpoint, updates = step, best_loss, i, 0
            if stalled or stuck:
                step *= 0.5
                gamma = prev = best_gamma
    return {"sharpness": best_loss - base, "loss": base, "perturbed_loss": best_loss}
