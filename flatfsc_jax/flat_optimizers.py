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

**The one-line swap.** A ``sam_update`` user replaces that call by :func:`flat_update`
(and creates the method's state once)::

    flat = flat_optimizers.FlatMethod(method="msam", rho=0.5)
    flat_gradient = flat_optimizers.make_flat_gradient(flat)
    flat_state = flat_optimizers.init_state(flat, params)
    ...
    # was: params, opt_state, aux, diag = sam.sam_update(
    #          loss_fn, params, opt_state, batch, tx, rho=rho)
    params, opt_state, flat_state, aux, diag = flat_optimizers.flat_update(
        flat_gradient, loss_fn, params, opt_state, flat_state, batch, tx, step
    )

A ``sam_gradient`` user replaces the gradient call; the optimiser, the loss and the
rest of the step stay as they are::

    flat = flat_optimizers.FlatMethod(method="looksam", rho=0.05, k=5)
    flat_gradient = flat_optimizers.make_flat_gradient(flat)
    flat_state = flat_optimizers.init_state(flat, params)        # once, before training
    ...
    # was: grads, aux, diag = sam.sam_gradient(loss_fn, params, batch, rho=0.05)
    grads, aux, diag, flat_state = flat_gradient(loss_fn, params, batch, flat_state, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

``step`` is the index of the step being taken (0 for the first), a Python int or a
traced int32; ``flat_gradient`` is pure and jit-able (bind nothing: ``settings`` is
closed over, so it is static). The per-method functions (``looksam_gradient``, ...) are
the same algorithms with plain keyword arguments, for users who want no settings object.

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

Why one module: the methods share their two-pass core, their diagnostics and one
settings object, and the dispatcher that training selects them by must see them all;
each method is a short function, so eight files would hold little but imports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from flatfsc_jax import sam
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


# --------------------------------------------------------------------------------------
# Settings and the dispatcher


@dataclasses.dataclass(frozen=True)
class FlatMethod:
    """One flat-minima method and its settings; every field has one meaning.

    Attributes:
      method: one of :data:`METHODS`.
      rho: radius of the weight perturbation (SAM-family, ``msam``; GSAM's largest
        radius). ``hparams["rho"]`` overrides it per run.
      eps: guards every normalisation (zero gradients give zero perturbations).
      adaptive: ASAM's ``|w|``-scaled ball for the SAM ascent (``sam``, ``sam_late``,
        ``sam_every_k``, ``looksam``, ``gsam``).
      m: m-sharpness chunk size (``sam`` only; ``None``: the whole batch).
      start_step: first SAM step of ``sam_late`` (``hparams["start_step"]`` overrides).
      k: period of the full SAM step (``sam_every_k``, ``looksam``).
      looksam_alpha: LookSAM's weight of the reused component ``g_v``.
      momentum: decay of MSAM's momentum buffer (match the base optimiser's).
      weight_decay: coupled weight decay inside MSAM's buffer (match the optimiser's).
      noise_std: RWP's noise scale relative to each filter's norm (0: ERM).
      clean_mix: RWP's weight of the clean gradient (0: plain RWP, one gradient).
      gsam_alpha: GSAM's weight of the surrogate-gap ascent (0: SAM).
      gsam_rho_min: GSAM's smallest radius (``None``: constant ``rho``); needs
        ``hparams["current_learning_rate"]`` and ``["peak_learning_rate"]``.
      gsam_min_learning_rate: the learning rate at which GSAM's radius is
        ``gsam_rho_min`` (the schedule's floor: 0 for the warm-restart cosine).
      clean_statistics: ``msam``/noise-only ``rwp``: one forward pass at ``w`` for the
        BatchNorm statistics and the clean loss (module docstring).
      seed: seed of RWP's noise (the state's key).
      average: weight averaging of the iterates: ``none``, ``ema`` or ``swa``.
      average_decay: EMA decay per step.
      average_start: the first step whose weights enter the average (EMA and SWA); an
        EMA tracks the weights exactly before it.
      average_period: SWA averages every ``average_period``-th step from
        ``average_start``.
    """

    method: str = "sam"
    rho: float = 0.05
    eps: float = 1e-12
    adaptive: bool = False
    m: int | None = None
    start_step: int = 0
    k: int = 5
    looksam_alpha: float = 0.7
    momentum: float = 0.9
    weight_decay: float = 0.0
    noise_std: float = 0.01
    clean_mix: float = 0.5
    gsam_alpha: float = 0.1
    gsam_rho_min: float | None = None
    gsam_min_learning_rate: float = 0.0
    clean_statistics: bool = True
    seed: int = 0
    average: str = "none"
    average_decay: float = 0.999
    average_start: int = 0
    average_period: int = 1

    def __post_init__(self):
        validate_flat_method(self)

    @classmethod
    def from_config(
        cls, values: Mapping[str, Any], *, prefix: str = "", error: type[Exception] = ValueError
    ) -> FlatMethod:
        """Settings from a mapping (e.g. ``config.flat``; missing keys take the defaults).

        Unknown keys and unusable values raise ``error`` naming ``prefix + key``, so a
        ``--dry_run`` names the config key (``prefix="config.flat."``).
        """
        values = dict(values.items())
        fields = dataclasses.fields(cls)
        unknown = sorted(set(values) - {f.name for f in fields})
        if unknown:
            raise error(
                f"{prefix}{unknown[0]} is not a flat-method setting; the settings are "
                f"{sorted(f.name for f in fields)}"
            )
        settings = object.__new__(cls)  # validated below, with the caller's names
        for f in fields:
            object.__setattr__(settings, f.name, values.get(f.name, f.default))
        validate_flat_method(settings, prefix=prefix, error=error)
        return settings


def validate_flat_method(
    settings: FlatMethod, *, prefix: str = "", error: type[Exception] = ValueError
) -> None:
    """Raises ``error`` naming ``prefix + field`` for the first unusable setting.

    The integrator calls it with ``prefix="config.flat."`` and its ``ConfigError`` so a
    ``--dry_run`` names the config key.
    """
    s, p = settings, prefix
    if s.method not in METHODS:
        raise error(f"{p}method must be one of {METHODS}, got {s.method!r}")
    if s.average not in AVERAGES:
        raise error(f"{p}average must be one of {AVERAGES}, got {s.average!r}")
    check_number(f"{p}rho", s.rho, error=error, hint=" (0 disables the perturbation)")
    check_number(f"{p}eps", s.eps, positive=True, error=error)
    check_int(f"{p}m", s.m, none="one perturbation from the whole batch", error=error)
    if s.m is not None and s.method != "sam":
        raise error(f"{p}m (m-sharpness) is supported by method 'sam' only; set it to None")
    check_int(f"{p}start_step", s.start_step, minimum=0, error=error)
    check_int(f"{p}k", s.k, error=error)
    check_number(f"{p}looksam_alpha", s.looksam_alpha, error=error)
    check_number(f"{p}momentum", s.momentum, below=1.0, error=error)
    check_number(f"{p}weight_decay", s.weight_decay, error=error)
    check_number(f"{p}noise_std", s.noise_std, error=error, hint=" (0 is ERM)")
    check_number(f"{p}clean_mix", s.clean_mix, error=error)
    if s.clean_mix > 1:
        raise error(f"{p}clean_mix must be in [0, 1], got {s.clean_mix!r}")
    check_number(f"{p}gsam_alpha", s.gsam_alpha, error=error)
    check_number(f"{p}gsam_rho_min", s.gsam_rho_min, none="constant rho", error=error)
    if s.gsam_rho_min is not None and s.gsam_rho_min > s.rho:
        raise error(f"{p}gsam_rho_min={s.gsam_rho_min} must be <= {p}rho={s.rho}")
    check_number(f"{p}gsam_min_learning_rate", s.gsam_min_learning_rate, error=error)
    check_int(f"{p}seed", s.seed, minimum=0, error=error)
    check_number(f"{p}average_decay", s.average_decay, below=1.0, error=error)
    check_int(f"{p}average_start", s.average_start, minimum=0, error=error)
    check_int(f"{p}average_period", s.average_period, error=error)
    for name in ("adaptive", "clean_statistics"):
        if not isinstance(getattr(s, name), bool):
            raise error(f"{p}{name} must be True or False, got {getattr(s, name)!r}")


def init_state(settings: FlatMethod, params: Any) -> dict:
    """The state ``flat_gradient`` threads through training (``{}`` when stateless)."""
    if settings.method == "looksam":
        return looksam_init(params)
    if settings.method == "msam":
        return momentum_sam_init(params)
    if settings.method == "rwp":
        return {"key": jax.random.key(settings.seed)}
    return {}


def gradient_evaluations(settings: FlatMethod, step: int | np.ndarray) -> int | np.ndarray:
    """Forward-backward passes ``flat_gradient`` takes at ``step`` (host-side accounting).

    ``step`` may be a NumPy array of steps; ``gradient_evaluations(s, np.arange(n)).sum()``
    is a run's total, e.g. to give ERM the same compute as SAM. The forward-only pass of
    ``clean_statistics`` is not a gradient evaluation and is not counted. Counts follow
    ``settings``; an ``hparams["rho"]`` (traced) always runs the two-pass program of
    ``sam``, even where ``settings.rho`` is 0.
    """
    s, step = settings, np.asarray(step)
    if s.method in ("sam", "gsam"):
        count = np.full_like(step, 1 if s.method == "sam" and s.rho == 0 else 2)
    elif s.method == "sam_late":
        count = np.where(step >= s.start_step, 2, 1)
    elif s.method in ("sam_every_k", "looksam"):
        count = np.where(step % s.k == 0, 2, 1)
    elif s.method == "rwp":
        count = np.full_like(step, 1 if s.noise_std == 0 or s.clean_mix == 0 else 2)
    else:  # erm, msam
        count = np.ones_like(step)
    return int(count) if count.ndim == 0 else count.astype(np.int64)


def takes_sam_step(settings: FlatMethod, step: int) -> bool:
    """Whether ``flat_gradient`` takes its two-pass branch at ``step`` (host side).

    For the switching methods the value to pass as ``sam_step``; for the others it only
    says whether the step makes a perturbed pass (``sam_step`` is ignored by them).
    """
    check_int("step", step, minimum=0)
    s = settings
    if s.method == "sam_late":
        return step >= s.start_step
    if s.method in ("sam_every_k", "looksam"):
        return step % s.k == 0
    return gradient_evaluations(s, step) == 2


FlatGradient = Callable[..., tuple[Any, Any, FlatDiagnostics, dict]]


def make_flat_gradient(settings: FlatMethod) -> FlatGradient:
    """``flat_gradient(loss_fn, params, batch, state, step, hparams=None)``.

    Returns ``(grads, aux, diagnostics, new_state)`` for the method of ``settings``
    (static: one program per method). ``state`` comes from :func:`init_state`; ``step``
    is the index of this step (int or traced int32). ``hparams`` optionally carries
    per-run values as data (traced scalars), each overriding one setting:

    * ``"rho"``: the radius (``settings.rho``);
    * ``"start_step"``: ``sam_late``'s switch step (``settings.start_step``);
    * ``"current_learning_rate"``, ``"peak_learning_rate"``: this step's and the peak learning
      rate, for GSAM's radius schedule (``gsam_rho_min`` set; required then).

    ``sam_step`` (keyword, a static Python bool): for the switching methods, the branch
    decided on the host by :func:`takes_sam_step` instead of from ``step`` (module
    docstring); ignored by the other methods.
    """
    validate_flat_method(settings)
    s = settings

    def flat_gradient(loss_fn, params, batch, state, step, hparams=None, *, sam_step=None):
        hp = dict(hparams or {})
        check_hparams(hp)
        rho = hp.get("rho", s.rho)
        if s.method == "erm":
            grads, aux, diag = _erm(loss_fn, params, batch)
        elif s.method == "sam":
            grads, aux, sd = sam.sam_gradient(
                loss_fn, params, batch, rho=rho, eps=s.eps, adaptive=s.adaptive, m=s.m
            )
            evaluations = 1 if is_real(rho) and rho == 0 else 2
            diag = FlatDiagnostics(*sd, jnp.asarray(evaluations, jnp.float32))
        elif s.method == "sam_late":
            grads, aux, diag = sam_late_gradient(
                loss_fn,
                params,
                batch,
                step,
                start_step=hp.get("start_step", s.start_step),
                rho=rho,
                eps=s.eps,
                adaptive=s.adaptive,
                sam_step=sam_step,
            )
        elif s.method == "sam_every_k":
            grads, aux, diag = every_k_gradient(
                loss_fn,
                params,
                batch,
                step,
                k=s.k,
                rho=rho,
                eps=s.eps,
                adaptive=s.adaptive,
                sam_step=sam_step,
            )
        elif s.method == "looksam":
            return looksam_gradient(
                loss_fn,
                params,
                batch,
                state,
                step,
                k=s.k,
                alpha=s.looksam_alpha,
                rho=rho,
                eps=s.eps,
                adaptive=s.adaptive,
                sam_step=sam_step,
            )
        elif s.method == "msam":
            return momentum_sam_gradient(
                loss_fn,
                params,
                batch,
                state,
                rho=rho,
                momentum=s.momentum,
                weight_decay=s.weight_decay,
                eps=s.eps,
                clean_statistics=s.clean_statistics,
            )
        elif s.method == "rwp":
            _check_step("step", step)
            key = jax.random.fold_in(state["key"], step)  # a fresh draw every step
            grads, aux, diag = rwp_gradient(
                loss_fn,
                params,
                batch,
                key,
                noise_std=s.noise_std,
                clean_mix=s.clean_mix,
                clean_statistics=s.clean_statistics,
            )
        else:  # gsam
            grads, aux, diag = gsam_gradient(
                loss_fn,
                params,
                batch,
                rho=rho,
                alpha=s.gsam_alpha,
                eps=s.eps,
                adaptive=s.adaptive,
                rho_min=s.gsam_rho_min,
                current_learning_rate=hp.get("current_learning_rate"),
                peak_learning_rate=hp.get("peak_learning_rate"),
                min_learning_rate=s.gsam_min_learning_rate,
            )
        return grads, aux, diag, state

    return flat_gradient


def flat_update(
    flat_gradient: FlatGradient,
    loss_fn: LossFn,
    params: Any,
    opt_state: optax.OptState,
    state: dict,
    batch: Any,
    tx: optax.GradientTransformation,
    step: int | jax.Array,
    hparams: Mapping[str, Any] | None = None,
    *,
    sam_step: bool | None = None,
) -> tuple[Any, optax.OptState, dict, Any, FlatDiagnostics]:
    """One step of ``tx`` with ``flat_gradient``: ``(params, opt_state, state, aux, diag)``.

    ``sam.sam_update``'s counterpart: the base optimiser steps from the clean weights and
    sees them (e.g. for weight decay).
    """
    grads, aux, diag, state = flat_gradient(
        loss_fn, params, batch, state, step, hparams, sam_step=sam_step
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, state, aux, diag


# --------------------------------------------------------------------------------------
# Weight averaging


def init_average(settings: FlatMethod, params: Any) -> dict:
    """The averaging state: ``{"params": copy of params, "count": 0}`` (``{}`` if none)."""
    if settings.average == "none":
        return {}
    return {"params": jax.tree.map(jnp.array, params), "count": jnp.zeros((), jnp.int32)}


def update_average(settings: FlatMethod, average: dict, params: Any, step: int | jax.Array) -> dict:
    """The average after the optimiser step that produced ``params``.

    ``step`` is the number of optimiser steps taken, that one included (``state.step``
    after the update). EMA: ``avg <- decay * avg + (1 - decay) * w`` from
    ``average_start`` on, ``avg = w`` before. SWA: the running mean of the weights of
    steps ``average_start + j * average_period``. ``count`` is the number of weights the
    SWA mean holds (the EMA counts its updates). Pure and jit-able.
    """
    s = settings
    if s.average == "none":
        return average
    _check_step("step", step)
    step = jnp.asarray(step, jnp.int32)
    active = step >= s.average_start
    if s.average == "ema":
        step_size = jnp.where(active, 1.0 - s.average_decay, 1.0)
        count = average["count"] + active.astype(jnp.int32)
    else:
        take = active & ((step - s.average_start) % s.average_period == 0)
        count = average["count"] + jnp.asarray(take, jnp.int32)
        step_size = jnp.where(take, 1.0 / jnp.maximum(count, 1).astype(jnp.float32), 0.0)
    new = optax.incremental_update(params, average["params"], step_size)
    # A float32 step size would promote low-precision weights: keep the average's dtype.
    return {"params": otu.tree_cast_like(new, average["params"]), "count": count}


def check_hparams(hparams: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` for an ``hparams`` key ``flat_gradient`` does not read."""
    unknown = set(hparams) - set(HPARAM_KEYS)
    if unknown:
        raise ValueError(f"hparams keys must be among {HPARAM_KEYS}, got {sorted(unknown)}")
