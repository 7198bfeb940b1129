"""Flatness diagnostics for any loss: sharpness, Hessian spectrum, loss landscapes.

The paper's claim is that SAM backbones sit in *flatter* minima and that flatness is what
transfers to unseen few-shot domains. This module measures flatness so the claim can be
checked on our own backbones. Every function takes a pure ``loss_fn(params) -> scalar``
over an arbitrary parameter pytree, so the same code measures a toy quadratic in the tests
and a ResNet-18 on a fixed batch (:func:`model_loss_fn`) in the notebooks.

Measures (all larger = sharper):

* :func:`rho_sharpness` - worst-case loss increase inside the L2 ball of radius ``rho``
  (the quantity SAM minimises, Foret et al. 2021), found by projected gradient ascent that
  starts at SAM's one-step point. ``steps=0`` is exactly SAM's one-step estimate.
* :func:`top_hessian_eigenvalue` - power iteration on Hessian-vector products.
* :func:`hessian_trace` - Hutchinson's estimator with Rademacher probes.
* :func:`loss_landscape_1d` / :func:`loss_landscape_2d` - the loss along filter-normalised
  random directions (:func:`random_direction`, Li et al. 2018), which makes plots of
  different networks comparable despite the scale invariance that BatchNorm introduces;
  :func:`plot_landscape_1d` / :func:`plot_landscape_2d` draw them.

Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``): one
forward-mode pass through the gradient computation, about the cost of two gradients and
no materialised Hessian. All computations are traceable (no Python control flow on
values), so they can be wrapped in ``jax.jit`` by the caller; each public function also
jits its own work once per call, with the parameters passed as arguments.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "hessian_trace",
    "hessian_vector_product",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "model_loss_fn",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_direction",
    "rho_sharpness",
    "top_hessian_eigenvalue",
]


# ----------------------------------------------------------------------------- tree algebra


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return functools.reduce(jnp.add, leaves, jnp.zeros((), jnp.float32))


def _tree_norm(tree: PyTree) -> jax.Array:
    return jnp.sqrt(_tree_vdot(tree, tree))


def _tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf-wise."""
    return jax.tree.map(lambda a, b: (alpha * a + b).astype(b.dtype), x, y)


def _tree_scale(alpha, tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: (alpha * x).astype(x.dtype), tree)


def _tree_unit(tree: PyTree) -> tuple[PyTree, jax.Array]:
    """``(tree / ||tree||, ||tree||)``; the zero tree maps to itself instead of NaN."""
    norm = _tree_norm(tree)
    inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return _tree_scale(inv, tree), norm


def _tree_random(rng: jax.Array, like: PyTree, sampler=jax.random.normal) -> PyTree:
    """i.i.d. draws shaped like ``like`` (float32 or wider), from ONE sampler call.

    One draw over the total size, split into leaves, instead of one draw per leaf:
    every ``jax.random`` call is its own threefry kernel, and a per-leaf loop over a
    ResNet's ~60 leaves multiplies compile time several-fold for no statistical gain.
    """
    leaves, treedef = jax.tree.flatten(like)
    sizes = [int(np.size(x)) for x in leaves]
    flat = sampler(rng, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0, *sizes])
    out = [
        flat[start:stop].reshape(np.shape(x)).astype(jnp.result_type(x, jnp.float32))
        for start, stop, x in zip(offsets[:-1], offsets[1:], leaves, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _check_positive(name: str, value, *, integer: bool = False, minimum=None) -> None:
    if integer:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an int, got {value!r}")
        lo = 1 if minimum is None else minimum
        if value < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    else:
        if not (isinstance(value, int | float | np.number) and np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_same_structure(name: str, tree: PyTree, params: PyTree) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(params):
        raise ValueError(
            f"{name} must have the same pytree structure as params; got "
            f"{jax.tree.structure(tree)} vs {jax.tree.structure(params)}"
        )
    for path_leaf, p in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params), strict=True
    ):
        path, leaf = path_leaf
        if np.shape(leaf) != np.shape(p):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path)} has shape {np.shape(leaf)}, "
                f"params has {np.shape(p)}"
            )


# ---------------------------------------------------------------------------- Hessian tools


def hessian_vector_product(loss_fn: LossFn, params: PyTree, vector: PyTree) -> PyTree:
    """``H(params) @ vector`` without forming ``H``: forward-mode JVP of the gradient.

    Forward-over-reverse pushes one tangent through the gradient computation: about
    the cost of two gradients, no second reverse pass and no stored second-order tape,
    the HVP variant JAX's autodiff cookbook recommends as the most efficient.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    params: PyTree,
    *,
    iters: int = 20,
    rng: jax.Array,
    tol: float | None = None,
) -> dict[str, Any]:
    """Dominant Hessian eigenvalue by power iteration on Hessian-vector products.

    Starts from a random unit vector (drawn with ``rng``) and repeats
    ``v <- Hv / ||Hv||`` for at most ``iters`` HVPs, inside ``lax.while_loop``. The
    reported eigenvalue is the Rayleigh quotient ``v^T H v`` of the last iterate, so it
    carries its sign. If ``tol`` is given the loop stops once two consecutive estimates
    differ by at most ``tol * |estimate|``.

    Power iteration converges to the eigenvalue of largest *magnitude*. At (or near) a
    minimum, where the Hessian is (nearly) positive semi-definite, that is the top
    eigenvalue; at a saddle with a dominant negative direction it is that negative value.
    Convergence is geometric with rate ``|lambda_2 / lambda_1|``.

    Returns ``dict(eigenvalue, vector, iterations)``: ``vector`` is the unit-norm
    eigenvector estimate (a pytree like ``params``), ``iterations`` the HVPs used.
    """
    _check_positive("iters", iters, integer=True)
    if tol is not None:
        _check_positive("tol", tol)

    def run(params, rng):
        hvp = functools.partial(hessian_vector_product, loss_fn, params)
        v0, _ = _tree_unit(_tree_random(rng, params))

        def cond(state):
            i, _, eig, prev = state
            if tol is None:
                return i < iters
            converged = (i >= 2) & (jnp.abs(eig - prev) <= tol * jnp.abs(eig))
            return (i < iters) & ~converged

        def body(state):
            i, v, eig, _ = state
            hv = hvp(v)
            new_eig = _tree_vdot(v, hv)  # Rayleigh quotient of the unit vector v
            v_next, hv_norm = _tree_unit(hv)
            # H v = 0 (a flat direction everywhere): keep v, the eigenvalue is 0.
            v_next = jax.tree.map(lambda a, b: jnp.where(hv_norm > 0, a, b), v_next, v)
            return i + 1, v_next, new_eig, eig

        init = (jnp.zeros((), jnp.int32), v0, jnp.zeros(()), jnp.full((), jnp.inf))
        iterations, vector, eigenvalue, _ = jax.lax.while_loop(cond, body, init)
        return {"eigenvalue": eigenvalue, "vector": vector, "iterations": iterations}

    return jax.jit(run)(params, rng)


def hessian_trace(
    loss_fn: LossFn, params: PyTree, *, samples: int = 20, rng: jax.Array
) -> dict[str, jax.Array]:
    """Hutchinson estimate of ``tr(H)``: the mean of ``z^T H z`` over Rademacher ``z``.

    Rademacher probes (entries +-1) give the minimum-variance unbiased estimator among
    i.i.d. probes; for a diagonal Hessian every probe returns the exact trace, because
    ``z_i^2 = 1``. Probes run sequentially (``lax.map``) so memory does not grow with
    ``samples``. Returns ``dict(trace, std_error)``, the standard error being
    ``std(z^T H z) / sqrt(samples)`` (unbiased std), so ``trace +- 2 * std_error`` is an
    approximate 95% interval.
    """
    _check_positive("samples", samples, integer=True, minimum=2)

    def run(params, rng):
        def quadratic_form(key):
            z = _tree_random(key, params, jax.random.rademacher)
            return _tree_vdot(z, hessian_vector_product(loss_fn, params, z))

        estimates = jax.lax.map(quadratic_form, jax.random.split(rng, samples))
        return {
            "trace": jnp.mean(estimates),
            "std_error": jnp.std(estimates, ddof=1) / jnp.sqrt(samples),
        }

    return jax.jit(run)(params, rng)


# ------------------------------------------------------------------------------- sharpness


def rho_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    *,
    rho: float,
    steps: int = 10,
    step_size: float | None = None,
    rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
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
    is not monotone on non-convex losses, the largest loss over all visited points is
    reported, so more steps never lower the estimate.

    At an exact critical point ``g = 0`` and SAM's direction is undefined; the start is
    then a random unit direction drawn with ``rng`` (default ``jax.random.key(0)``).

    Returns ``dict(sharpness, loss, perturbed_loss, perturbation_norm)``:
    ``sharpness = max(perturbed_loss - loss, 0)``, ``perturbed_loss`` the largest loss
    found, ``perturbation_norm`` the norm of the perturbation that achieved it.
    """
    _check_positive("rho", rho)
    _check_positive("steps", steps, integer=True, minimum=0)
    if step_size is not None:
        _check_positive("step_size", step_size)
    step = float(rho if step_size is None else step_size)
    rho = float(rho)
    if rng is None:
        rng = jax.random.key(0)

    def run(params, rng):
        value_and_grad = jax.value_and_grad(loss_fn)
        select = lambda cond, a, b: jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)
        random_dir, _ = _tree_unit(_tree_random(rng, params))

        def project(e):
            norm = _tree_norm(e)
            return _tree_scale(jnp.minimum(1.0, rho / jnp.maximum(norm, 1e-30)), e)

        # One loop over a single value_and_grad, so the (possibly large) gradient graph
        # is compiled once: iteration 0 evaluates the clean point (e = 0) and jumps to
        # SAM's point; iterations 1..steps+1 evaluate perturbed points and ascend (the
        # gradient of the last one is unused).
        def body(i, state):
            e, loss, best_loss, best_e = state
            value, grad = value_and_grad(_tree_axpy(1.0, e, params))
            grad_dir, grad_norm = _tree_unit(grad)
            is_clean = i == 0
            loss = jnp.where(is_clean, value, loss)
            better = ~is_clean & (value > best_loss)
            best_loss = jnp.where(better, value, best_loss)
            best_e = select(better, e, best_e)
            sam_start = _tree_scale(rho, select(grad_norm > 0, grad_dir, random_dir))
            ascended = project(_tree_axpy(step, grad_dir, e))
            return select(is_clean, sam_start, ascended), loss, best_loss, best_e

        zeros = jax.tree.map(jnp.zeros_like, params)
        dtype = jnp.result_type(*jax.tree.leaves(params), jnp.float32)
        init = (zeros, jnp.zeros((), dtype), jnp.full((), -jnp.inf, dtype), zeros)
        _, loss, best_loss, best_e = jax.lax.fori_loop(0, steps + 2, body, init)
        return {
            "sharpness": jnp.maximum(best_loss - loss, 0.0),
            "loss": loss,
            "perturbed_loss": best_loss,
            "perturbation_norm": _tree_norm(best_e),
        }

    return jax.jit(run)(params, rng)


# ----------------------------------------------------------------- filter-normalised plots


def random_direction(params: PyTree, rng: jax.Array, *, ignore_1d: bool = True) -> PyTree:
    """A Gaussian direction rescaled filter-wise to the weights (Li et al. 2018).

    A *filter* is everything that feeds one output unit: the slice ``kernel[..., o]`` of a
    convolution kernel (HWIO, so the last axis) or the column ``kernel[:, o]`` of a dense
    kernel (in, out). Each filter of the direction gets the L2 norm of the corresponding
    weight filter. This removes the scale ambiguity of networks with BatchNorm (a filter
    followed by BN can be scaled freely without changing the function), so a step of
    ``alpha`` means the same relative change in every layer and in every network.

    Parameters with at most one axis (biases, BatchNorm scale/offset) get a zero direction
    if ``ignore_1d`` (the usual choice, as these parameters are few and their scale
    differs in kind); otherwise the whole vector is treated as one filter and scaled to
    the norm of the weight vector. Zero weight filters get zero direction.
    """

    def one_leaf(d, w):
        if w.ndim <= 1:
            if ignore_1d:
                return jnp.zeros_like(w)
            d_norm, w_norm = jnp.linalg.norm(d), jnp.linalg.norm(w)
        else:
            axes = tuple(range(w.ndim - 1))  # every axis but the output (filter) axis
            d_norm = jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True))
            w_norm = jnp.sqrt(jnp.sum(w * w, axis=axes, keepdims=True))
        scale = jnp.where(d_norm > 0, w_norm / jnp.where(d_norm > 0, d_norm, 1.0), 0.0)
        return (d * scale).astype(w.dtype)

    def run(params, rng):
        return jax.tree.map(one_leaf, _tree_random(rng, params), params)

    return jax.jit(run)(jax.tree.map(jnp.asarray, params), rng)


def _as_grid(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a non-empty 1-D array of finite numbers, got {values!r}")
    return array


def _evaluate_grid(
    loss_fn: LossFn,
    params: PyTree,
    directions: Sequence[PyTree],
    coefficients: np.ndarray,
    batch_size: int | None,
) -> np.ndarray:
    """``loss_fn(params + sum_k c[i, k] * directions[k])`` for every row ``c[i]``."""

    def run(params, directions, coefficients):
        def at(c):
            point = params
            for k, d in enumerate(directions):
                point = _tree_axpy(c[k], d, point)
            return loss_fn(point)

        if batch_size is None:
            return jax.vmap(at)(coefficients)
        return jax.lax.map(at, coefficients, batch_size=batch_size)

    losses = np.asarray(jax.jit(run)(params, list(directions), jnp.asarray(coefficients)))
    if losses.shape != (coefficients.shape[0],):
        raise ValueError(
            f"loss_fn must return a scalar; over the grid it returned shape {losses.shape}"
        )
    return losses


def loss_landscape_1d(
    loss_fn: LossFn,
    params: PyTree,
    direction: PyTree,
    alphas,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """``[loss_fn(params + a * direction) for a in alphas]`` as one jitted evaluation.

    The grid is evaluated with ``vmap``; ``batch_size`` bounds how many points run at
    once (``lax.map`` over vmapped chunks). ``None`` evaluates all points together,
    fastest for small models; memory grows linearly with it, so pass a small number for
    real backbones. Returns a float32 numpy array shaped ``(len(alphas),)``.
    """
    alphas = _as_grid("alphas", alphas)
    _check_same_structure("direction", direction, params)
    if batch_size is not None:
        _check_positive("batch_size", batch_size, integer=True)
    return _evaluate_grid(loss_fn, params, [direction], alphas[:, None], batch_size)


def loss_landscape_2d(
    loss_fn: LossFn,
    params: PyTree,
    dir_x: PyTree,
    dir_y: PyTree,
    alphas,
    betas,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """``losses[i, j] = loss_fn(params + alphas[i] * dir_x + betas[j] * dir_y)``.

    Shape ``(len(alphas), len(betas))``; ``batch_size`` as in :func:`loss_landscape_1d`.
    """
    alphas, betas = _as_grid("alphas", alphas), _as_grid("betas", betas)
    _check_same_structure("dir_x", dir_x, params)
    _check_same_structure("dir_y", dir_y, params)
    if batch_size is not None:
        _check_positive("batch_size", batch_size, integer=True)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    coefficients = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)
    losses = _evaluate_grid(loss_fn, params, [dir_x, dir_y], coefficients, batch_size)
    return losses.reshape(alphas.size, betas.size)


def _new_figure(ncols: int, panel_size: tuple[float, float]):
    # An explicit Agg canvas instead of pyplot: no global backend switch, no figure
    # registry, safe to call from notebooks, threads and headless machines alike.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_landscape_1d(
    curves: Mapping[str, tuple[Any, Any]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = r"$\alpha$ (filter-normalised direction)",
    ylabel: str = "loss",
    log_scale: bool = False,
) -> str:
    """One line per ``label -> (alphas, losses)`` in a single PNG at ``path``.

    Returns ``path`` as a string. ``log_scale`` puts the loss axis on a log scale,
    which helps when a sharp curve would dwarf a flat one.
    """
    if not curves:
        raise ValueError("curves must map at least one label to (alphas, losses)")
    checked = {}
    for label, (alphas, losses) in curves.items():
        a = _as_grid(f"curves[{label!r}] alphas", alphas)
        y = np.asarray(losses, dtype=np.float64)
        if y.shape != a.shape:
            raise ValueError(
                f"curves[{label!r}]: losses have shape {y.shape}, alphas have {a.shape}"
            )
        checked[label] = (a, y)
    fig = _new_figure(1, (6.0, 4.0))
    ax = fig.add_subplot()
    for label, (a, y) in checked.items():
        ax.plot(a, y, label=str(label), linewidth=1.8)
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(os.fspath(path), format="png", dpi=120)
    return os.fspath(path)


def plot_landscape_2d(
    surfaces: Mapping[str, tuple[Any, Any, Any]],
    path: str | os.PathLike,
    *,
    levels: int = 20,
    title: str | None = None,
) -> str:
    """Contour panels, one per ``label -> (alphas, betas, losses)``, in one PNG.

    ``losses[i, j]`` is the loss at ``(alphas[i], betas[j])`` (the layout of
    :func:`loss_landscape_2d`). All panels share the same contour levels and colour
    scale, so a sharper basin shows as more tightly packed contours. Returns ``path``.
    """
    if not surfaces:
        raise ValueError("surfaces must map at least one label to (alphas, betas, losses)")
    _check_positive("levels", levels, integer=True, minimum=2)
    checked = {}
    for label, (alphas, betas, losses) in surfaces.items():
        a = _as_grid(f"surfaces[{label!r}] alphas", alphas)
        b = _as_grid(f"surfaces[{label!r}] betas", betas)
        z = np.asarray(losses, dtype=np.float64)
        if z.shape != (a.size, b.size):
            raise ValueError(
                f"surfaces[{label!r}]: losses have shape {z.shape}, expected "
                f"(len(alphas), len(betas)) = {(a.size, b.size)}"
            )
        checked[label] = (a, b, z)
    finite = np.concatenate([z[np.isfinite(z)] for _, _, z in checked.values()])
    if finite.size == 0:
        raise ValueError("surfaces contain no finite loss values to plot")
    lo, hi = float(finite.min()), float(finite.max())
    contour_levels = np.linspace(lo, hi if hi > lo else lo + 1.0, levels)
    fig = _new_figure(len(checked), (4.5, 4.0))
    axes = fig.subplots(1, len(checked), squeeze=False)[0]
    filled = None
    for ax, (label, (a, b, z)) in zip(axes, checked.items(), strict=True):
        # contourf wants Z[y, x]; our layout is losses[alpha (x), beta (y)].
        filled = ax.contourf(a, b, z.T, levels=contour_levels, cmap="viridis", extend="both")
        ax.contour(a, b, z.T, levels=contour_levels, colors="k", linewidths=0.3)
        ax.plot([0.0], [0.0], marker="*", color="w", markersize=9)
        ax.set_title(str(label))
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(r"$\beta$")
        ax.set_aspect("equal", adjustable="box")
    fig.colorbar(filled, ax=list(axes), label="loss")
    if title:
        fig.suptitle(title)
    fig.savefig(os.fspath(path), format="png", dpi=120)
    return os.fspath(path)


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
