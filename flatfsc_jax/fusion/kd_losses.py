"""The distillation losses of URL (Li, Liu & Bilen, ICCV 2021), as pure jnp functions.

CKA follows URL's ``models/cka.py``: RBF kernels with bandwidth
``sqrt(median of the non-zero squared distances)`` computed for each side separately
(the *lower* median, as ``torch.median``; clamped at 1e-12) with no gradient through it,
HSIC with the centring ``H = I - 11^T / n``, and the HSIC self-terms clamped at 1e-12
before the square root. The student step (``fusion/distill.py``) combines them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# URL's clamps (models/cka.py): the squared bandwidth and the HSIC self-terms.
_CLAMP = 1e-12


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Rows divided by ``max(||row||, eps)`` (``torch.nn.functional.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def squared_distances(x: jax.Array) -> jax.Array:
    """``[n, n]`` squared Euclidean distances from the Gram matrix (exact zero diagonal)."""
    gram = x @ x.T
    half = jnp.diag(gram)[None, :] - gram  # [i, j] = |x_j|^2 - <x_i, x_j>
    return half + half.T


def median_bandwidth(sq_dists: jax.Array) -> jax.Array:
    """``sqrt(lower median of the non-zero entries)``, clamped, without gradient.

    Every pair appears twice in the symmetric matrix and the diagonal is zero, so this
    is the lower median over pairs. No non-zero entry (all rows equal): the clamp.
    """
    sq_dists = jax.lax.stop_gradient(sq_dists)
    flat = sq_dists.reshape(-1)
    nonzero = flat != 0
    count = jnp.sum(nonzero)
    ordered = jnp.sort(jnp.where(nonzero, flat, jnp.inf))
    median = jnp.where(count > 0, ordered[jnp.maximum(count - 1, 0) // 2], 0.0)
    return jnp.sqrt(jnp.maximum(median, _CLAMP))


def rbf_kernel(x: jax.Array) -> jax.Array:
    """RBF kernel matrix of the rows of ``x`` with the median-heuristic bandwidth."""
    sq = squared_distances(x)
    sigma = median_bandwidth(sq)
    return jnp.exp(sq * (-0.5 / (sigma * sigma)))


def center(k: jax.Array) -> jax.Array:
    """``H K H`` with ``H = I - 11^T / n``, as row/column mean subtraction."""
    k = k - jnp.mean(k, axis=0, keepdims=True)
    return k - jnp.mean(k, axis=1, keepdims=True)


def cka_rbf(x: jax.Array, y: jax.Array) -> jax.Array:
    """RBF-kernel CKA of two sets of features of the same ``n`` examples, in [0, 1]."""
    kx, ky = center(rbf_kernel(x)), center(rbf_kernel(y))
    hsic_xy = jnp.sum(kx * ky)
    var_x = jnp.sqrt(jnp.maximum(jnp.sum(kx * kx), _CLAMP))
    var_y = jnp.sqrt(jnp.maximum(jnp.sum(ky * ky), _CLAMP))
    return hsic_xy / (var_x * var_y)


def kl_distillation(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
    """``sum KL(softmax(t / T) || softmax(s / T)) * T^2 / batch`` (URL's ``DistillKL``)."""
    log_p_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s))
    return kl * temperature**2 / student_logits.shape[0]


def annealing_weight(step, restart_period: int, k: float) -> jax.Array:
    """``max(0, 1 - step / (restart_period * k))``: KD fades out after ``k`` periods."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.maximum(0.0, 1.0 - step / (restart_period * k))
