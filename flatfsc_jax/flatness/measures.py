"""Flatness measures for any loss: sharpness and the Hessian spectrum.

The paper's claim is that SAM backbones sit in *flatter* minima and that flatness is what
transfers to unseen few-shot domains. This module measures flatness so the claim can be
checked on our own backbones. Every function takes a pure ``loss_fn(params) -> scalar``
over an arbitrary parameter pytree, so the same code measures a toy quadratic in the tests
and a ResNet-18 on a fixed batch (:func:`model_loss_fn`) in the notebooks and the zoo
driver (:mod:`flatfsc_jax.flatness.zoo`). Loss landscapes and their plots are in
:mod:`flatfsc_jax.flatness.landscape`.

Measures (all larger = sharper):

* :func:`rho_sharpness` - worst-case loss increase inside the L2 ball of radius ``rho``
  (the quantity SAM minimises, Foret et al. 2021), found by projected gradient ascent that
  starts at SAM's one-step point. ``steps=0`` is exactly SAM's one-step estimate.
* :func:`top_hessian_eigenvalue` - power iteration on Hessian-vector products.
* :func:`hessian_trace` - Hutchinson's estimator with Rademacher probes.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``): one
forward-mode pass through the gradient computation, about the cost of two gradients and
no materialised Hessian.

Python loops of jitted iterations, one landscape point per call: XLA:CPU runs convolutions
inside while loops, and vmapped over parameters, slowly (docs/performance.md#xla-cpu-loops).
So one ascent step (a gradient), one curvature step (a Hessian-vector product) and one
landscape point (a forward pass) are each jitted once (:class:`IterationSteps`), and the
measures drive them from Python. Every measure accepts either a loss or its
:class:`IterationSteps`, so a caller measuring many networks of one architecture (the zoo
driver keys the steps on the model) compiles them once. Random probes are drawn with numpy
from an integer ``seed``, which costs no compilation. The measures therefore run eagerly;
they are not meant to be wrapped in ``jax.jit``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from flatfsc_jax.checks import check_int, check_number

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "IterationSteps",
    "ascent_step",
    "curvature_step",
    "hessian_trace",
    "hessian_vector_product",
    "iteration_steps",
    "model_loss_fn",
    "rho_sharpness",
    "top_hessian_eigenvalue",
]


# ----------------------------------------------------------------------------- tree helpers


def _norm(tree: PyTree) -> jax.Array:
    # sqrt(<x, x>) rather than otu.tree_norm (a sum of squares): the two round differently
    # inside the jitted steps, and this one keeps flatness reports bit-compatible with the
    # earlier ones.
    return jnp.sqrt(otu.tree_vdot(tree, tree))


def _unit(tree: PyTree) -> tuple[PyTree, jax.Array]:
    """``(tree / ||tree||, ||tree||)``; the zero tree maps to itself instead of NaN."""
    norm = _norm(tree)
    inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return otu.tree_cast_like(otu.tree_scale(inv, tree), tree), norm


def _random_like(rng: np.random.Generator, like: PyTree, *, rademacher: bool) -> PyTree:
    """Host-side i.i.d. N(0, 1) or +-1 float32 arrays shaped like ``like``.

    Drawn with numpy: a jitted draw would cost one more XLA compilation per parameter
    structure (seconds on CPU) for a few milliseconds of work.
    """

    def draw(x):
        shape = np.shape(x)
        if rademacher:
            return (2.0 * rng.integers(0, 2, size=shape) - 1.0).astype(np.float32)
        return rng.standard_normal(shape, dtype=np.float32)

    return jax.tree.map(draw, like)


def _unit_numpy(tree: PyTree) -> PyTree:
    # Host-side, accumulated in float64: the random start vectors never touch the device.
    norm = math.sqrt(sum(float(np.vdot(x, x)) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: x / norm, tree)


def _check_positive(name: str, value, *, integer: bool = False, minimum=None) -> None:
    if integer:
        check_int(name, value, minimum=1 if minimum is None else minimum)
    else:
        check_number(name, value, positive=True)


# ------------------------------------------------------------- one iteration of each measure


def hessian_vector_product(loss_fn: LossFn, params: PyTree, vector: PyTree) -> PyTree:
    """``H(params) @ vector`` without forming ``H``: forward-mode JVP of the gradient.

    Forward-over-reverse pushes one tangent through the gradient computation: about
    the cost of two gradients, no second reverse pass and no stored second-order tape,
    the HVP variant JAX's autodiff cookbook recommends as the most efficient.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def ascent_step(loss_fn: LossFn, params: PyTree, e: PyTree, step, rho):
    """``(L(w + e), P(e + step * g / ||g||), ||g||, ||e||)`` with ``g = grad L(w + e)``.

    ``P`` projects onto the ball ``||e|| <= rho``. From ``e = 0`` with ``step = rho`` the
    next point is SAM's ``rho * g / ||g||``, so one function serves the start and every
    ascent step.
    """
    point = otu.tree_cast_like(otu.tree_add(params, e), params)
    value, grad = jax.value_and_grad(loss_fn)(point)
    direction, grad_norm = _unit(grad)
    moved = otu.tree_cast_like(otu.tree_add_scale(e, step, direction), e)
    shrink = jnp.minimum(1.0, rho / jnp.maximum(_norm(moved), 1e-30))
    projected = otu.tree_cast_like(otu.tree_scale(shrink, moved), moved)
    return value, projected, grad_norm, _norm(e)


def curvature_step(loss_fn: LossFn, params: PyTree, v: PyTree):
    """``(v . Hv, Hv / ||Hv||)``: a power-iteration step and a Hutchinson probe at once.

    The next iterate stays ``v`` when ``Hv = 0`` (a flat direction: the eigenvalue is 0).
    """
    hv = hessian_vector_product(loss_fn, params, v)
    v_next, hv_norm = _unit(hv)
    return otu.tree_vdot(v, hv), otu.tree_where(hv_norm > 0, v_next, v)


def _loss_at(loss_fn: LossFn, params: PyTree, directions, coefficients):
    """``loss_fn(params + sum_k coefficients[k] * directions[k])``."""
    point = params
    for k, d in enumerate(directions):
        point = otu.tree_cast_like(otu.tree_add_scale(point, coefficients[k], d), point)
    return loss_fn(point)


class IterationSteps(NamedTuple):
    """The jitted iterations that the measures of this module drive from Python.

    Attributes:
      ascent: ``(params, e, step, rho) -> (loss(params + e), next e, ||g||, ||e||)``, the
        next ``e`` being ``e + step * g / ||g||`` projected onto ``||e|| <= rho``.
      curvature: ``(params, v) -> (v . Hv, Hv / ||Hv||)``.
      loss_at: ``(params, directions, coefficients) -> loss`` at
        ``params + sum_k coefficients[k] * directions[k]`` (a list of direction trees).
    """

    ascent: Callable
    curvature: Callable
    loss_at: Callable


def iteration_steps(loss_fn: LossFn) -> IterationSteps:
    """:class:`IterationSteps` of any ``loss_fn(params) -> scalar`` (compiled on first use).

    Build it once and pass it to several measures instead of ``loss_fn`` to share the
    compilations; the zoo driver builds its own, keyed on the model, so every
    backbone of one architecture and batch shape shares them.
    """
    return IterationSteps(
        ascent=jax.jit(functools.partial(ascent_step, loss_fn)),
        curvature=jax.jit(functools.partial(curvature_step, loss_fn)),
        loss_at=jax.jit(functools.partial(_loss_at, loss_fn)),
    )


def _steps_of(loss_fn: LossFn | IterationSteps) -> IterationSteps:
    return loss_fn if isinstance(loss_fn, IterationSteps) else iteration_steps(loss_fn)


# ---------------------------------------------------------------------------- Hessian tools


def top_hessian_eigenvalue(
    loss_fn: LossFn | IterationSteps,
    params: PyTree,
    *,
    iters: int = 20,
    tol: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Dominant Hessian eigenvalue by power iteration on Hessian-vector products.

    Starts from a random unit vector (numpy, seeded by ``seed``) and repeats
    ``v <- Hv / ||Hv||`` for at most ``iters`` HVPs. The reported eigenvalue is the
    Rayleigh quotient ``v^T H v`` of the last iterate, so it carries its sign. If ``tol``
    is given the loop stops once two consecutive estimates differ by at most
    ``tol * |estimate|``.

    Power iteration converges to the eigenvalue of largest *magnitude*. At (or near) a
    minimum, where the Hessian is (nearly) positive semi-definite, that is the top
    eigenvalue; at a saddle with a dominant negative direction it is that negative value.
    Convergence is geometric with rate ``|lambda_2 / lambda_1|``.

    Returns ``dict(eigenvalue, vector, iterations, relative_change, estimates)``:
    ``vector`` is the unit-norm eigenvector estimate (a pytree like ``params``),
    ``iterations`` the HVPs used, ``relative_change`` ``|lambda_k - lambda_{k-1}| /
    |lambda_k|`` of the last two estimates (NaN after one iteration) and ``estimates``
    all Rayleigh quotients in order.
    """
    _check_positive("iters", iters, integer=True)
    if tol is not None:
        _check_positive("tol", tol)
    curvature = _steps_of(loss_fn).curvature
    v = _unit_numpy(_random_like(np.random.default_rng(seed), params, rademacher=False))
    estimates: list[float] = []
    change = math.nan
    for _ in range(iters):
        eigenvalue, v = curvature(params, v)
        estimates.append(float(eigenvalue))
        if len(estimates) > 1:
            last, previous = estimates[-1], estimates[-2]
            change = abs(last - previous) / abs(last) if last else math.inf
            if tol is not None and abs(last - previous) <= tol * abs(last):
                break
    return {
        "eigenvalue": estimates[-1],
        "vector": v,
        "iterations": len(estimates),
        "relative_change": change,
        "estimates": estimates,
    }


def hessian_trace(
    loss_fn: LossFn | IterationSteps, params: PyTree, *, samples: int = 20, seed: int = 0
) -> dict[str, float]:
    """Hutchinson estimate of ``tr(H)``: the mean of ``z^T H z`` over Rademacher ``z``.

    Rademacher probes (entries +-1, numpy, seeded by ``seed``) give the minimum-variance
    unbiased estimator among i.i.d. probes; for a diagonal Hessian every probe returns the
    exact trace, because ``z_i^2 = 1``. Returns ``dict(trace, std_error)``, the standard
    error being ``std(z^T H z) / sqrt(samples)`` (unbiased std), so
    ``trace +- 2 * std_error`` is an approximate 95% interval.
    """
    _check_positive("samples", samples, integer=True, minimum=2)
    curvature = _steps_of(loss_fn).curvature
    rng = np.random.default_rng(seed)
    values = np.asarray(
        [
            float(curvature(params, _random_like(rng, params, rademacher=True))[0])
            for _ in range(samples)
        ],
        np.float64,
    )
    return {
        "trace": float(values.mean()),
        "std_error": float(values.std(ddof=1) / math.sqrt(samples)),
    }


# ------------------------------------------------------------------------------- sharpness


def rho_sharpness(
    loss_fn: LossFn | IterationSteps,
    params: PyTree,
    *,
    rho: float,
    steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Worst-case loss increase in the L2 ball ``||e|| <= rho`` around ``params``.

    ``max_{||e|| <= rho} L(w + e) - L(w)`` is the sharpness SAM minimises (the ball is
    the global L2 ball over the whole pytree, as in SAM). The maximiser is approximated by
    projected *normalised* gradient ascent:

    1. start at SAM's point ``e_0 = rho * g / ||g||``, ``g = grad L(w)``;
    2. ``e_{k+1} = P(e_k + step_size * g_k / ||g_k||)`` with ``g_k = grad L(w + e_k)`` and
       ``P`` the projection onto the ball, for ``k < steps``.

    Normalising the ascent direction makes ``step_size`` a distance in parameter space,
    independent of the loss scale; the default ``step_size = rho`` lets one step cross
    half the ball. ``steps=0`` reproduces SAM's one-step estimate exactly. Since ascent
    is not monotone on non-convex losses, the largest loss over the ``steps + 1``
    perturbed points is reported, so more steps never lower the estimate.

    At an exact critical point ``g = 0`` and SAM's direction is undefined; the start is
    then a random unit direction (numpy, seeded by ``seed``).

    Returns floats ``dict(sharpness, loss, perturbed_loss, perturbation_norm)``:
    ``sharpness = max(perturbed_loss - loss, 0)``, ``perturbed_loss`` the largest loss
    found, ``perturbation_norm`` the norm of the perturbation that achieved it.
    """
    _check_positive("rho", rho)
    _check_positive("steps", steps, integer=True, minimum=0)
    if step_size is not None:
        _check_positive("step_size", step_size)
    rho = float(rho)
    step = rho if step_size is None else float(step_size)
    ascent = _steps_of(loss_fn).ascent
    loss, e, grad_norm, _ = ascent(params, otu.tree_zeros_like(params), rho, rho)
    if float(grad_norm) == 0:  # critical point: SAM's direction is undefined
        random_unit = _unit_numpy(
            _random_like(np.random.default_rng(seed), params, rademacher=False)
        )
        e = otu.tree_scale(rho, random_unit)
    best_loss, best_norm = -math.inf, math.nan
    for _ in range(steps + 1):
        value, next_e, _, e_norm = ascent(params, e, step, rho)
        if float(value) > best_loss:
            best_loss, best_norm = float(value), float(e_norm)
        e = next_e
    loss = float(loss)
    return {
        "sharpness": max(best_loss - loss, 0.0),
        "loss": loss,
        "perturbed_loss": best_loss,
        "perturbation_norm": best_norm,
    }


# ------------------------------------------------------------------------ model adapter


def model_loss_fn(model, variables: Mapping, images, labels) -> LossFn:
    """``params -> mean cross-entropy`` of ``model`` on the fixed batch ``(images, labels)``.

    ``model`` is a :class:`flatfsc_jax.models.Model` with a classification head;
    ``variables`` its full variable dict, of which only ``'params'`` is replaced by the
    argument (``batch_stats`` and any ``'lora'`` adapters stay fixed).

    The network runs with ``train=False``: BatchNorm normalises with its *running*
    statistics. That makes the loss a deterministic function of the parameters alone,
    which is what every measure here assumes. In train mode each evaluation would
    re-normalise with the statistics of the perturbed batch, which (i) makes the
    pre-BN weights exactly scale invariant, so a perturbation of a conv filter is
    partly undone by BN and the landscape looks flatter than the deployed network is,
    (ii) ties the value to the batch composition, and (iii) would call for updating
    running statistics. Eval mode measures the function that is actually deployed
    (the frozen backbone used for few-shot embeddings), as Li et al. (2018) do.
    """
    images = jnp.asarray(images)
    labels = jnp.asarray(labels)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    if labels.shape != (images.shape[0],) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"labels must be integer class ids shaped ({images.shape[0]},), "
            f"got dtype {labels.dtype} shape {labels.shape}"
        )
    if "params" not in variables:
        raise ValueError(f"variables must contain 'params'; got keys {sorted(variables)}")
    (logits, _), _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False), dict(variables), images
    )
    if logits is None:
        raise ValueError(
            "model has no classification head (built with num_classes=0); build it with "
            "the domain's number of classes to define a loss"
        )
    fixed = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(params):
        (logits, _), _ = model.apply({**fixed, "params": params}, images, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return jnp.mean(losses)

    return loss_fn
