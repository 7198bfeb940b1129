"""Sharpness-Aware Minimisation as pure functions of a loss function.

SAM (Foret et al., ICLR 2021) minimises the worst-case loss in an L2 ball of radius
``rho`` around the weights, approximated to first order:

    g  = grad L(w)                              # clean pass
    e  = rho * g / (||g||_2 + eps)              # ascent direction, scaled to the ball
    g' = grad L(w + e)                          # perturbed pass
    w  <- base_optimiser(w, g')                 # step from w, not from w + e

Everything here takes a ``loss_fn(params, batch) -> (loss, aux)`` and knows nothing
about models, so it works for any loss (classification, few-shot fine-tuning, a toy
quadratic). Extensions the paper's code lacks:

* ``adaptive=True``: ASAM (Kwon et al., ICML 2021) scales the ball element-wise by
  ``|w|``: ``e = rho * w**2 * g / (|| |w| * g || + eps)``, making sharpness invariant to
  per-parameter rescaling (the variant of davda54/sam, without ASAM's ``eta`` offset).
  ASAM's ball is larger in parameter space; it usually wants a larger ``rho``.
* ``m``: m-sharpness. The batch is split into chunks of ``m`` examples, each chunk gets
  its own perturbation from its own gradient, and the chunk gradients at their
  perturbed points are averaged. The original JAX SAM got this implicitly from
  per-device gradients (m = per-device batch); here ``m`` is explicit and independent
  of the device count.
* ``eps`` guards the normalisation, so a zero gradient gives a zero perturbation
  instead of NaNs.

BatchNorm: ``loss_fn`` runs the model in training mode and returns the new running
statistics in ``aux``. Only the *clean* pass's ``aux`` is returned, so running
statistics never see the perturbed weights (the perturbed pass still normalises with
its own batch statistics, as in training). With ``m`` set, each chunk's forward pass
normalises over its own ``m`` examples (ghost batches), exactly like per-device BN
in the original JAX SAM; the returned running statistics are the average over chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree_utils as otu

from flatfsc_jax.checks import check_int, check_number, is_real

LossFn = Callable[[Any, Any], tuple[jax.Array, Any]]


class SamDiagnostics(NamedTuple):
    """Scalars describing one SAM step (means over m-chunks when ``m`` is set).

    Attributes:
      loss: loss at the clean weights ``w``.
      perturbed_loss: loss at ``w + e`` (equals ``loss`` when ``rho == 0``).
      sharpness: ``perturbed_loss - loss``, the first-order rho-ball sharpness.
      grad_norm: L2 norm of the clean gradient (of the chunk-averaged clean gradient
        when ``m`` is set, so it is comparable with and without m-sharpness).
    """

    loss: jax.Array
    perturbed_loss: jax.Array
    sharpness: jax.Array
    grad_norm: jax.Array


def global_norm(tree: Any) -> jax.Array:
    """L2 norm of all leaves of ``tree`` together, accumulated in float32."""
    return otu.tree_norm(otu.tree_cast(tree, jnp.float32))


def check_sam_arguments(rho: float, eps: float = 1e-12, m: int | None = None) -> None:
    """Raises ``ValueError`` naming the argument (``rho``, ``eps``, ``m``) that is unusable.

    An array ``rho`` (the radius as data, possibly traced) is not checked.
    """
    if is_real(rho) or not hasattr(rho, "shape"):
        check_number("rho", rho, hint=" (0 disables SAM)")
    check_number("eps", eps, positive=True)
    check_int("m", m, none="one perturbation from the whole batch")


def check_batch_split(
    batch_size: int, *, m: int | None = None, num_devices: int | None = None
) -> None:
    """Raises ``ValueError`` unless the global ``batch_size`` splits into chunks of ``m``
    examples (m-sharpness) and evenly over ``num_devices``."""
    check_int("batch_size", batch_size)
    check_int("num_devices", num_devices, none="no mesh")
    if m is not None and batch_size % m:
        raise ValueError(
            f"m={m} must divide batch_size={batch_size} (m-sharpness splits the batch into "
            f"chunks of m examples); choose m among the divisors of {batch_size} or m=None"
        )
    if num_devices is not None and batch_size % num_devices:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the {num_devices} devices of the "
            f"mesh; use a multiple of {num_devices}"
        )


def sam_gradient(
    loss_fn: LossFn,
    params: Any,
    batch: Any,
    *,
    rho: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    m: int | None = None,
) -> tuple[Any, Any, SamDiagnostics]:
    """The SAM gradient ``grad L(w + e)`` with the clean pass's ``aux``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> (scalar loss, aux)``, differentiable in
        ``params``.
      params: the weights ``w`` (any pytree of float arrays).
      batch: any pytree; with ``m`` set every leaf is split along its leading axis.
      rho: radius of the ball. A Python ``0`` returns the plain (ERM) gradient without
        a second pass; a traced 0 gives the same numbers because ``e`` is exactly 0.
      eps: added to the gradient norm so a zero gradient gives a zero perturbation.
      adaptive: ASAM's element-wise ``|w|``-scaled ball.
      m: m-sharpness chunk size (examples per perturbation), or ``None`` for one
        perturbation from the whole batch. Ignored when ``rho`` is a Python 0: there is
        no perturbation to split, and ERM uses the whole batch.

    Returns:
      ``(grads, aux, diagnostics)``: gradient to feed the base optimiser, ``aux`` of the
      clean pass (floating leaves averaged over chunks; other leaves stacked with a
      leading chunk axis), and :class:`SamDiagnostics`.
    """
    check_sam_arguments(rho, eps, m)
    if is_real(rho) and rho == 0:
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        zero = jnp.zeros_like(loss)
        return grads, aux, SamDiagnostics(loss, loss, zero, global_norm(grads))
    if m is None:
        clean_grads, grads, aux, diag = _sam_one_perturbation(
            loss_fn, params, batch, rho, eps, adaptive
        )
        return grads, aux, diag

    batch_size = _leading_size(batch)
    check_batch_split(batch_size, m=m)
    chunked = jax.tree.map(lambda x: x.reshape(batch_size // m, m, *x.shape[1:]), batch)
    per_chunk = jax.vmap(
        lambda chunk: _sam_one_perturbation(loss_fn, params, chunk, rho, eps, adaptive)
    )
    clean_grads, grads, aux, diag = per_chunk(chunked)
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)  # noqa: E731
    clean_grads, grads = mean(clean_grads), mean(grads)
    aux = jax.tree.map(
        lambda x: jnp.mean(x, axis=0) if jnp.issubdtype(x.dtype, jnp.floating) else x, aux
    )
    loss, perturbed_loss = jnp.mean(diag.loss), jnp.mean(diag.perturbed_loss)
    diag = SamDiagnostics(loss, perturbed_loss, perturbed_loss - loss, global_norm(clean_grads))
    return grads, aux, diag


def sam_update(
    loss_fn: LossFn,
    params: Any,
    opt_state: optax.OptState,
    batch: Any,
    tx: optax.GradientTransformation,
    *,
    rho: float | jax.Array,
    eps: float = 1e-12,
    adaptive: bool = False,
    m: int | None = None,
) -> tuple[Any, optax.OptState, Any, SamDiagnostics]:
    """One SAM step of the base optimiser ``tx``: ``(params, opt_state, aux, diag)``.

    The base optimiser steps from the clean weights with the perturbed gradient; ``tx``
    sees the clean ``params`` (e.g. for weight decay). Pure: bind the keywords with
    ``functools.partial`` and ``jax.jit`` it.
    """
    grads, aux, diag = sam_gradient(
        loss_fn, params, batch, rho=rho, eps=eps, adaptive=adaptive, m=m
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux, diag


def sam_perturbation(
    params: Any, grads: Any, *, rho: float | jax.Array, eps: float = 1e-12, adaptive: bool = False
) -> Any:
    """The ascent step ``e`` (same tree as ``params``) for the clean gradient ``grads``."""
    if adaptive:
        # ASAM: normalise |w| * g, then map back with another |w| (T_w^2 g / ||T_w g||).
        scaled = jax.tree.map(lambda w, g: jnp.abs(w) * g, params, grads)
        scale = rho / (global_norm(scaled) + eps)
        return jax.tree.map(lambda w, s: (scale * jnp.abs(w) * s).astype(w.dtype), params, scaled)
    scale = rho / (global_norm(grads) + eps)
    return jax.tree.map(lambda w, g: (scale * g).astype(w.dtype), params, grads)


def _sam_one_perturbation(loss_fn, params, batch, rho, eps, adaptive):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), clean_grads = grad_fn(params, batch)
    perturbation = sam_perturbation(params, clean_grads, rho=rho, eps=eps, adaptive=adaptive)
    perturbed_params = jax.tree.map(jnp.add, params, perturbation)
    # The perturbed pass's aux (BatchNorm statistics of w + e) is deliberately dropped.
    (perturbed_loss, _), grads = grad_fn(perturbed_params, batch)
    diag = SamDiagnostics(loss, perturbed_loss, perturbed_loss - loss, global_norm(clean_grads))
    return clean_grads, grads, aux, diag


def _leading_size(batch: Any) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(
            f"m-sharpness needs every batch leaf to share its leading (example) axis; "
            f"got leading sizes {sorted(sizes)}"
        )
    return sizes.pop()
