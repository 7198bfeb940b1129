"""Loss landscapes along filter-normalised random directions, and their plots.

The pictures of flatness: the loss along one or two random directions through a trained
network, each direction rescaled filter by filter to the weights (:func:`random_direction`,
Li et al. 2018), so that plots of different networks are comparable despite the scale
invariance that BatchNorm introduces. :func:`loss_landscape_1d` / :func:`loss_landscape_2d`
evaluate the grid, :func:`plot_landscape_1d` / :func:`plot_landscape_2d` draw it.

Landscapes evaluate one point per jitted call (``IterationSteps.loss_at`` of
:mod:`flatfsc_jax.flatness.measures`, so a caller's compiled steps are shared) rather than
``vmap`` over points: vmapping over parameters turns every convolution into a grouped one,
which XLA:CPU runs slowly (docs/performance.md#xla-cpu-loops). The plots draw on an explicit
Agg canvas and import matplotlib lazily, so measuring needs no plotting stack.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flatfsc_jax.checks import check_int
from flatfsc_jax.flatness.measures import IterationSteps, LossFn, PyTree, _steps_of

__all__ = [
    "loss_landscape_1d",
    "loss_landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_direction",
]


# ----------------------------------------------------------------------------- tree helpers


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


# ----------------------------------------------------------------- filter-normalised plots


@functools.partial(jax.jit, static_argnames="ignore_1d")
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
    the norm of the weight vector. Zero weight filters get zero direction. Jitted once
    per parameter structure, so the backbones of one architecture share the compilation.
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

    return jax.tree.map(one_leaf, _tree_random(rng, params), params)


def _as_grid(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a non-empty 1-D array of finite numbers, got {values!r}")
    return array


def _evaluate_grid(
    loss_fn: LossFn | IterationSteps,
    params: PyTree,
    directions: Sequence[PyTree],
    coefficients: np.ndarray,
) -> np.ndarray:
    """``loss_fn(params + sum_k c[i, k] * directions[k])`` for every row ``c[i]``.

    One jitted call per point (the module docstring says why not ``vmap``).
    """
    loss_at = _steps_of(loss_fn).loss_at
    losses = []
    for c in coefficients:
        loss = loss_at(params, list(directions), c)
        if np.shape(loss) != ():
            raise ValueError(f"loss_fn must return a scalar; it returned shape {np.shape(loss)}")
        losses.append(loss)
    return np.asarray(losses, np.float32)


def loss_landscape_1d(
    loss_fn: LossFn | IterationSteps, params: PyTree, direction: PyTree, alphas
) -> np.ndarray:
    """``[loss_fn(params + a * direction) for a in alphas]``, one jitted call per point.

    Returns a float32 numpy array shaped ``(len(alphas),)``.
    """
    alphas = _as_grid("alphas", alphas)
    _check_same_structure("direction", direction, params)
    return _evaluate_grid(loss_fn, params, [direction], alphas[:, None])


def loss_landscape_2d(
    loss_fn: LossFn | IterationSteps,
    params: PyTree,
    dir_x: PyTree,
    dir_y: PyTree,
    alphas,
    betas,
) -> np.ndarray:
    """``losses[i, j] = loss_fn(params + alphas[i] * dir_x + betas[j] * dir_y)``.

    Shape ``(len(alphas), len(betas))``, float32, one jitted call per point.
    """
    alphas, betas = _as_grid("alphas", alphas), _as_grid("betas", betas)
    _check_same_structure("dir_x", dir_x, params)
    _check_same_structure("dir_y", dir_y, params)
    grid_a, grid_b = np.meshgrid(alphas, betas, indexing="ij")
    coefficients = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)
    losses = _evaluate_grid(loss_fn, params, [dir_x, dir_y], coefficients)
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
    check_int("levels", levels, minimum=2)
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
