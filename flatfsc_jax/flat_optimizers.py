"""Cheaper routes to flat minima, as pure functions of a loss function (beside ``sam.py``).

Every method here takes the same ``loss_fn(params, batch) -> (loss, aux)`` as
``sam.sam_gradient`` and returns a gradient for any optax transform, plus
:class:`FlatDiagnostics` and, where the method keeps memory between steps, its new state
(an explicit pytree: in as an argument, out as a result, never hidden).

=================  ==============================================================  =============
method             what one step does                                              gradients
=================  ==============================================================  =============
``erm``            ``grad L(w)``                                                   1
``sam``            ``sam.sam_gradient`` (Foret et al. 2021)                        2
``sam_late``       ERM before ``start_step``, SAM from it on (Zhou et al. 2025)    1, then 2
``sam_every_k``    SAM on steps ``t % k == 0``, ERM in between                     1 + 1/k
``looksam``        SAM every k; in between ``g + a*||g||/||g_v|| * g_v`` with      1 + 1/k
                   the stored ``g_v`` (Liu et al. 2022)
``msam``           one gradient at ``w - rho * v/||v||``, ``v`` the momentum        1
                   buffer (Becker et al. 2024)
``rwp``            gradient at ``w + z``, ``z`` filter-wise Gaussian noise, mixed   1 or 2
                   with the clean gradient (Li et al. 2022)
``gsam``           ``g_s - alpha * g_perp``: SAM plus surrogate-gap ascent          2
                   (Zhuang et al. 2022), rho may follow the learning rate
=================  ==============================================================  =============

Weight averaging (EMA, SWA) is a separate pure state update of the *weights after* the
optimiser step (:func:`update_average`, built on ``optax.incremental_update``); it
composes with every method above.

The settings object, the dispatcher that selects a method by name and the weight
averaging live in :mod:`flatfsc_jax.flat_methods` (the one-line swap from
``sam.sam_update`` is shown there).

**BatchNorm.** As in ``sam.py``, ``aux`` (the new running statistics) always comes from a
forward pass at the *clean* weights ``w``; perturbed and noisy passes still normalise
with their own batch statistics, and their ``aux`` is dropped. The 1x methods (``msam``,
``rwp`` with ``clean_mix=0``) take no clean gradient, so with ``clean_statistics=True``
(the default) they run one extra forward-only pass at ``w`` for the statistics (and the
clean loss); ``clean_statistics=False`` skips it and returns the perturbed pass's
``aux`` (what the MSAM reference code does, where the weights live at the perturbed
point). :func:`gradient_evaluations` counts gradients only; that forward pass comes on
top.

**Switching methods** (``sam_late``, ``sam_every_k``, ``looksam``) take the two-pass
branch on some steps only. With a traced ``step`` the branch is a ``lax.cond``, which
runs only the taken branch but, on XLA:CPU, runs a gradient inside a conditional
several times slower than the same gradient outside one.
So a training loop decides on the host instead: it compiles the step twice, with
``sam_step=True`` and ``sam_step=False`` as a static argument, and calls
``takes_sam_step(settings, step)`` each step to pick the program. Where the ``cond``
costs nothing extra (time it with ``bench/flat_methods.py``), one program with a traced
``step`` serves every step.

m-sharpness (``sam.sam_gradient(m=...)``) is available through ``method="sam"`` only;
the other methods perturb from the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from optax import tree_utils as otu

from flatfsc_jax.checks import check_int, check_number, is_int, is_real
from flatfsc_jax.sam import LossFn, check_sam_arguments, global_norm, sam_perturbation

METHODS = ("erm", "sam", "sam_late", "sam_every_k", "looksam", "msam", "rwp", "gsam")
# Methods whose two-pass branch depends on the step (``sam_step``, ``takes_sam_step``).
SWITCHING_METHODS = ("sam_late", "sam_every_k", "looksam")
AVERAGES = ("none", "ema", "swa")
# Keys ``flat_gradient``'s ``hparams`` may carry (traced per-run values; module docstring).
HPARAM_KEYS = ("rho", "start_step", "current_learning_rate", "peak_learning_rate")


class FlatDiagnostics(NamedTuple):
    """Scalars describing one step of any method.

    Attributes:
      loss: loss at the clean weights ``w`` (for ``msam``/``rwp`` with
        ``clean_statistics=False``, which make no clean pass: the perturbed pass's loss).
      perturbed_loss: loss at the perturbed (or noisy) weights; equals ``loss`` on
        steps that make no perturbed pass.
      sharpness: ``perturbed_loss - loss`` (0 on steps without a perturbed pass).
      grad_norm: L2 norm of the first gradient the step computed (the clean one, except
        for ``msam`` and noise-only ``rwp``, whose only gradient is the perturbed one).
      gradient_evaluations: forward-backward passes this step took (float32, so it
        can be logged and summed with the other metrics).
    """

    loss: jax.Array
    perturbed_loss: jax.Array
    sharpness: jax.Array
    grad_norm: jax.Array
    gradient_evaluations: jax.Array


def _diag(loss, perturbed_loss, grad_norm, evaluations) -> FlatDiagnostics:
    return FlatDiagnostics(
        loss,
        perturbed_loss,
        perturbed_loss - loss,
        grad_norm,
        jnp.asarray(evaluations, jnp.float32),
    )


def _tree_vdot(a: Any, b: Any) -> jax.Array:
    """<a, b> over all leaves, accumulated in float32 (as ``sam.global_norm``)."""
    return otu.tree_vdot(otu.tree_cast(a, jnp.float32), otu.tree_cast(b, jnp.float32))


def _axpy(a, x, y):
    """``a * x + y`` leaf-wise, in the dtype of ``y``."""
    return jax.tree.map(lambda xi, yi: (a * xi + yi).astype(yi.dtype), x, y)


def _erm(loss_fn, params, batch):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return grads, aux, _diag(loss, loss, global_norm(grads), 1)


def _clean_and_perturbed(loss_fn, params, batch, rho, eps, adaptive):
    """Both SAM passes: ``(loss, aux, g, perturbed_loss, g_s)`` with ``aux`` of ``w``."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), clean = grad_fn(params, batch)
    perturbation = sam_perturbation(params, clean, rho=rho, eps=eps, adaptive=adaptive)
    (perturbed_loss, _), perturbed = grad_fn(jax.tree.map(jnp.add, params, perturbation), batch)
    return loss, aux, clean, perturbed_loss, perturbed


def _sam(loss_fn, params, batch, rho, eps, adaptive):
    loss, aux, clean, perturbed_loss, grads = _clean_and_perturbed(
        loss_fn, params, batch, rho, eps, adaptive
    )
    return grads, aux, _diag(loss, perturbed_loss, global_norm(clean), 2)


def _branch(predicate, sam_step, when_true: Callable, when_false: Callable, *operands):
    """``when_true(*operands)`` if ``predicate`` else ``when_false(*operands)``.

    ``sam_step`` (a Python bool from the host, see :func:`takes_sam_step`) replaces the
    predicate. A concrete predicate is decided in Python (one program, no ``cond``); a
    traced one with ``lax.cond``, which runs only the taken branch.
    """
    if sam_step is not None:
        if not isinstance(sam_step, bool):
            raise ValueError(
                f"sam_step must be None (decide from step) or a Python bool, got {sam_step!r}"
            )
        predicate = sam_step
    if isinstance(predicate, bool | np.bool_):
        return when_true(*operands) if predicate else when_false(*operands)
    return jax.lax.cond(predicate, when_true, when_false, *operands)


def _check_step(name: str, value) -> None:
    """A Python/NumPy int >= 0, or an integer array (possibly traced: not checked)."""
    if hasattr(value, "dtype") and not is_int(value):
        if not jnp.issubdtype(value.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer (a step index), got dtype {value.dtype}")
        return
    check_int(name, value, minimum=0)


def _check_probability(name: str, value) -> None:
    check_number(name, value)
    if value > 1:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_traceable_number(name: str, value, **kwargs) -> None:
    """Checks a concrete number; an array (the value as data, maybe traced) passes."""
    if is_real(value) or not hasattr(value, "shape"):
        check_number(name, value, **kwargs)


# --------------------------------------------------------------------------------------
# SAM late in training, SAM every k steps


def sam_late_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    step: int | jax.Array,
    *,
    start_step: int | jax.Array,
    rho: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    sam_step: bool | None = None,
) -> tuple[Any, Any, FlatDiagnostics]:
    """ERM before ``start_step``, SAM from it on (Zhou et al., ICLR 2025).

    With the warm-restart schedule, ``start_step`` is the first step of the final cycle.
    ``start_step=0`` is SAM on every step; a ``start_step`` past the last step is ERM.
    Both ``step`` and ``start_step`` may be traced; the switch is then a ``lax.cond``.
    ``sam_step`` (a Python bool) takes the decision from the host instead (module
    docstring, "Switching methods").
    """
    check_sam_arguments(rho, eps)
    _check_step("step", step)
    _check_step("start_step", start_step)
    return _branch(
        step >= start_step,
        sam_step,
        lambda p, b: _sam(loss_fn, p, b, rho, eps, adaptive),
        lambda p, b: _erm(loss_fn, p, b),
        params,
        batch,
    )


def final_cycle_start(num_steps: int, restart_period: int) -> int:
    """First step of the last warm-restart cycle of a ``num_steps`` run: SAM-late's
    ``start_step`` when "late" means the final cycle (a partial one counts)."""
    check_int("num_steps", num_steps)
    check_int("restart_period", restart_period)
    return (num_steps - 1) // restart_period * restart_period


def every_k_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    step: int | jax.Array,
    *,
    k: int,
    rho: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    sam_step: bool | None = None,
) -> tuple[Any, Any, FlatDiagnostics]:
    """SAM on steps ``step % k == 0`` (the first step included), ERM on the others.

    The naive baseline LookSAM improves on; ``k=1`` is SAM on every step.
    ``sam_step`` as in :func:`sam_late_gradient`.
    """
    check_sam_arguments(rho, eps)
    check_int("k", k)
    _check_step("step", step)
    return _branch(
        step % k == 0,
        sam_step,
        lambda p, b: _sam(loss_fn, p, b, rho, eps, adaptive),
        lambda p, b: _erm(loss_fn, p, b),
        params,
        batch,
    )


# --------------------------------------------------------------------------------------
# LookSAM


def looksam_init(params: Any) -> dict:
    """LookSAM's state: the stored orthogonal component ``g_v`` (zeros: none yet)."""
    return {"g_v": jax.tree.map(jnp.zeros_like, params)}


def looksam_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    state: dict,
    step: int | jax.Array,
    *,
    k: int,
    alpha: float | jax.Array,
    rho: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    sam_step: bool | None = None,
) -> tuple[Any, Any, FlatDiagnostics, dict]:
    """LookSAM (Liu et al., CVPR 2022, Algorithm 1): ``(grads, aux, diag, new_state)``.

    On steps ``step % k == 0``: the SAM gradient ``g_s`` at ``w + e`` is the update, and
    its component orthogonal to the clean gradient ``g``,
    ``g_v = g_s - (<g, g_s> / ||g||^2) g``, is stored. On the other steps only ``g`` is
    computed and ``g + alpha * (||g|| / ||g_v||) * g_v`` is the update: the stored
    direction that changes slowly, rescaled to the current gradient. ``k=1`` is SAM.
    A zero ``g_v`` (e.g. a run resumed off a multiple of ``k`` with a fresh state)
    leaves ``g`` unchanged. ``sam_step`` as in :func:`sam_late_gradient`.
    """
    check_sam_arguments(rho, eps)
    check_int("k", k)
    _check_traceable_number("alpha", alpha)
    _check_step("step", step)
    if set(state) != {"g_v"}:
        raise ValueError(f"state must be looksam_init(params), got keys {sorted(state)}")

    def two_pass_step(p, b, state):
        loss, aux, g, perturbed_loss, g_s = _clean_and_perturbed(loss_fn, p, b, rho, eps, adaptive)
        coefficient = _tree_vdot(g, g_s) / (_tree_vdot(g, g) + eps)
        g_v = _axpy(-coefficient, g, g_s)
        diag = _diag(loss, perturbed_loss, global_norm(g), 2)
        return g_s, aux, diag, {"g_v": g_v}

    def reuse_step(p, b, state):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b)
        g_norm = global_norm(g)
        scale = alpha * g_norm / (global_norm(state["g_v"]) + eps)
        return _axpy(scale, state["g_v"], g), aux, _diag(loss, loss, g_norm, 1), state

    return _branch(step % k == 0, sam_step, two_pass_step, reuse_step, params, batch, state)


# --------------------------------------------------------------------------------------
# Momentum-SAM


def momentum_sam_init(params: Any) -> dict:
    """MSAM's state: its momentum buffer ``v`` (zeros, so the first step is ERM)."""
    return {"momentum": jax.tree.map(jnp.zeros_like, params)}


def momentum_sam_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    state: dict,
    *,
    rho: float | jax.Array,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eps: float = 1e-12,
    clean_statistics: bool = True,
) -> tuple[Any, Any, FlatDiagnostics, dict]:
    """Momentum-SAM (Becker et al. 2024): one gradient, at ``w - rho * v / ||v||``.

    ``v`` is the SGD momentum buffer ``v <- momentum * v + g + weight_decay * w``: the
    accumulated descent direction, so ``-v`` is the step the optimiser is about to take
    and the perturbation looks that far along it (the reference code's sign). The
    buffer lives in ``state`` because optax transforms do not expose theirs; with
    ``tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.trace(momentum))``
    (``optim.make_direction``) it equals ``tx``'s trace exactly. ``rho`` is on a
    different scale from SAM's (the MSAM authors use about 15x SAM's radius).

    Returns ``(grads, aux, diag, new_state)``; see the module docstring for
    ``clean_statistics`` (BatchNorm statistics from one extra forward pass at ``w``).
    """
    check_sam_arguments(rho, eps)
    check_number("momentum", momentum, below=1.0)
    check_number("weight_decay", weight_decay)
    if set(state) != {"momentum"}:
        raise ValueError(f"state must be momentum_sam_init(params), got keys {sorted(state)}")
    v = state["momentum"]
    scale = rho / (global_norm(v) + eps)
    perturbed = _axpy(-scale, v, params)
    (perturbed_loss, perturbed_aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        perturbed, batch
    )
    if clean_statistics:
        loss, aux = loss_fn(params, batch)  # forward only: statistics and loss at w
    else:
        loss, aux = perturbed_loss, perturbed_aux
    new_v = jax.tree.map(
        lambda vi, g, w: (momentum * vi + g + weight_decay * w).astype(vi.dtype), v, grads, params
    )
    return grads, aux, _diag(loss, perturbed_loss, global_norm(grads), 1), {"momentum": new_v}


# --------------------------------------------------------------------------------------
# Random weight perturbation


def rwp_noise(params: Any, key: jax.Array, *, noise_std: float | jax.Array) -> Any:
    """Filter-wise Gaussian weight noise (Li et al. 2022): ``z ~ N(0, (noise_std*||f||)^2)``.

    ``||f||`` is the L2 norm of the filter the entry belongs to: of each output unit
    (the last axis, flax's layout) of a kernel with 2 or more axes, of the whole leaf for
    vectors and scalars (biases, BatchNorm scales). Scaling a filter scales its noise
    alike, so the noise is invariant to per-filter rescaling of the weights.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))

    def one(w, leaf_key):
        w32 = w.astype(jnp.float32)
        axes = tuple(range(w.ndim - 1)) if w.ndim >= 2 else None
        norm = jnp.sqrt(jnp.sum(jnp.square(w32), axis=axes, keepdims=w.ndim >= 2))
        return (noise_std * norm * jax.random.normal(leaf_key, w.shape, jnp.float32)).astype(
            w.dtype
        )

    return jax.tree.unflatten(treedef, [one(w, k) for w, k in zip(leaves, keys, strict=True)])


def rwp_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    noise_std: float | jax.Array,
    clean_mix: float = 0.5,
    clean_statistics: bool = True,
) -> tuple[Any, Any, FlatDiagnostics]:
    """Random weight perturbation: ``(1 - clean_mix) grad L(w + z) + clean_mix grad L(w)``.

    ``z = rwp_noise(params, key, noise_std=noise_std)``; use a fresh ``key`` every step.
    ``clean_mix > 0`` is m-RWP (two independent gradients: 2x, or ~1x on two devices);
    ``clean_mix = 0`` is plain RWP, one gradient. The reference code's mixing weight
    ``alpha`` (of the noisy gradient) is ``1 - clean_mix``; it computes the two gradients
    on two devices' different batches, this function on the one batch it is given. A
    Python ``noise_std = 0`` is ERM (one pass); a traced 0 gives the same numbers (``z``
    is exactly 0).
    """
    _check_traceable_number("noise_std", noise_std, hint=" (0 is ERM)")
    _check_probability("clean_mix", clean_mix)
    if is_real(noise_std) and noise_std == 0:
        return _erm(loss_fn, params, batch)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    noisy = jax.tree.map(jnp.add, params, rwp_noise(params, key, noise_std=noise_std))
    (noisy_loss, noisy_aux), noisy_grads = grad_fn(noisy, batch)
    if clean_mix == 0:
        if clean_statistics:
            loss, aux = loss_fn(params, batch)
        else:
            loss, aux = noisy_loss, noisy_aux
        return noisy_grads, aux, _diag(loss, noisy_loss, global_norm(noisy_grads), 1)
    (loss, aux), clean = grad_fn(params, batch)
    grads = jax.tree.map(
        lambda n, c: ((1.0 - clean_mix) * n + clean_mix * c).astype(c.dtype), noisy_grads, clean
    )
    return grads, aux, _diag(loss, noisy_loss, global_norm(clean), 2)


# --------------------------------------------------------------------------------------
# GSAM


def gsam_radius(
    rho: float | jax.Array,
    *,
    rho_min: float | None = None,
    current_learning_rate: float | jax.Array | None = None,
    peak_learning_rate: float | jax.Array | None = None,
    min_learning_rate: float = 0.0,
) -> float | jax.Array:
    """GSAM's radius: ``rho`` or, with ``rho_min``, linear in the learning rate.

    ``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)``, so the
    radius shrinks with the rate (big_vision's schedule; ``rho`` plays its ``rho_max``).
    """
    if rho_min is None:
        return rho
    check_number("rho_min", rho_min)
    if is_real(rho) and rho_min > rho:
        raise ValueError(f"rho_min={rho_min} must be <= rho={rho} (rho is the largest radius)")
    if current_learning_rate is None or peak_learning_rate is None:
        raise ValueError(
            "a GSAM radius schedule (rho_min set) needs current_learning_rate (this step's "
            "rate) and peak_learning_rate; pass both, or rho_min=None for a constant radius"
        )
    if is_real(peak_learning_rate) and peak_learning_rate <= min_learning_rate:
        raise ValueError(
            f"peak_learning_rate={peak_learning_rate} must exceed "
            f"min_learning_rate={min_learning_rate}"
        )
    fraction = (current_learning_rate - min_learning_rate) / (
        peak_learning_rate - min_learning_rate
    )
    return rho_min + (rho - rho_min) * fraction


def gsam_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    *,
    rho: float | jax.Array,
    alpha: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    rho_min: float | None = None,
    current_learning_rate: float | jax.Array | None = None,
    peak_learning_rate: float | jax.Array | None = None,
    min_learning_rate: float = 0.0,
) -> tuple[Any, Any, FlatDiagnostics]:
    """GSAM (Zhuang et al., ICLR 2022): ``g_s - alpha * g_perp``.

    ``g_s`` is SAM's gradient at ``w + e`` (radius :func:`gsam_radius`), ``g_perp`` the
    part of the clean gradient ``g`` perpendicular to ``g_s``:
    ``g_perp = g - <g, u> u`` with ``u = g_s / ||g_s||``. Descending ``-g_perp`` raises the
    clean loss along a direction that leaves the perturbed loss unchanged to first
    order, i.e. it shrinks the surrogate gap ``L(w + e) - L(w)``. ``alpha = 0`` is SAM.
    This is the paper's default (big_vision's ``minimize_fp=True``); ``adaptive`` uses
    ``sam.py``'s ASAM ball, not big_vision's ``|w|``-scaled one.
    """
    check_sam_arguments(rho, eps)
    _check_traceable_number("alpha", alpha)
    radius = gsam_radius(
        rho,
        rho_min=rho_min,
        current_learning_rate=current_learning_rate,
        peak_learning_rate=peak_learning_rate,
        min_learning_rate=min_learning_rate,
    )
    loss, aux, g, perturbed_loss, g_s = _clean_and_perturbed(
        loss_fn, params, batch, radius, eps, adaptive
    )
    u_scale = 1.0 / (global_norm(g_s) + eps)
    projection = _tree_vdot(g, g_s) * u_scale  # <g, u>
    g_perp = _axpy(-projection * u_scale, g_s, g)
    grads = _axpy(-alpha, g_perp, g_s)
    return grads, aux, _diag(loss, perturbed_loss, global_norm(g), 2)
