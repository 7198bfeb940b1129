"""Are the SAM backbones of the zoo really flatter? Sharpness, Hessian and landscapes.

Command (after ``./run.sh`` has filled ``<workdir>/zoo``)::

    python -m flatfsc_jax.measure_flatness --workdir=work [--benchmark=glyphs]
        [--data_dir=<workdir>/data] [--examples=512] [--rho=0.05] [--fused]
        [--landscape_2d=<domain>] [--out=<workdir>/flatness]

writes ``flatness.json`` (everything, landscapes included), ``flatness.md`` (a table:
one row per domain, ERM next to SAM for every measure), ``flatness.csv`` (one row per
backbone), ``landscape_<domain>.png`` (the 1-D landscapes of a domain's backbones on
one plot) and, with ``--landscape_2d``, ``landscape2d_<domain>.png`` (contours).

What is measured, for every complete zoo entry trained with ERM or SAM (``--fused``
adds the fine-tuned ``erm+ft`` / ``sam+ft`` ... entries): the backbone *with its
classification head* on a fixed, seeded subset of ``--examples`` images of its own
domain's training classes (the data it was trained on; the same subset for every
backbone of a domain), cross-entropy with BatchNorm in eval mode
(:func:`flatness.model_loss_fn` explains why). Larger = sharper for all measures:

* rho-sharpness: the largest loss increase found in the L2 ball of radius ``rho``
  around the weights (SAM's own notion; projected normalised gradient ascent from
  SAM's point, as :func:`flatness.rho_sharpness`). One ``rho`` for all backbones.
* top Hessian eigenvalue (power iteration; the eigenvalue of largest magnitude, which
  is the top one at a minimum) and the Hessian trace (Hutchinson, Rademacher probes).
* the loss along a filter-normalised random direction (Li et al. 2018). Every backbone
  gets its own direction, scaled to its own filters, from the same seed; backbones of
  one domain share parameter shapes, so their directions come from the same Gaussian
  draw and differ only by the filter normalisation.

Why the iterative measures are Python loops here rather than calls of
``flatness.rho_sharpness`` / ``top_hessian_eigenvalue`` / ``hessian_trace``: those run
their iterations inside ``lax`` loops, and with jax 0.10.2 XLA:CPU emits the
weight-gradient convolutions of a ResNet inside a while-loop body in non-canonical
layouts that run about 7x slower than the same gradients outside a loop (measured on a
resnet10 over 512 glyphs: 7 gradients 0.8 s from Python, 5.9 s in ``fori_loop``). Here
one ascent step (a gradient), one curvature step (a Hessian-vector product) and one
chunk of landscape points (forward passes) are jitted per architecture and batch shape,
keyed on the model, so the ERM and SAM backbones of a domain share every compilation;
the loops that drive them run in Python, and tests check them against the ``flatness``
versions. Random probes are drawn with numpy (seeded), which costs no compilation.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flatfsc_jax import flatness
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import sources

log = logging.getLogger(__name__)

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "DEFAULT_ALPHAS",
    "MEASURES",
    "EmptyZooError",
    "FlatnessSettings",
    "IterationSteps",
    "format_table",
    "hutchinson_trace",
    "iteration_steps",
    "measure_entry",
    "measure_zoo",
    "power_iteration",
    "rho_sharpness",
    "select_entries",
    "training_batch",
    "write_flatness_report",
]

BASE_METHODS = ("erm", "sam")
# Li et al. (2018) plot filter-normalised landscapes on [-1, 1]: at |alpha| = 1 every
# filter moves by its own norm, far enough to leave any basin.
DEFAULT_ALPHAS = tuple(float(a) for a in np.linspace(-1.0, 1.0, 21))

# (result key, table header, whether the cell carries a 95% interval)
MEASURES = (
    ("train_loss", "train loss", False),
    ("sharpness", "rho-sharpness", False),
    ("top_eigenvalue", "top eigenvalue", False),
    ("hessian_trace", "Hessian trace", True),
)


class EmptyZooError(FileNotFoundError):
    """The zoo holds no complete entry to measure."""


# ----------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlatnessSettings:
    """How every backbone is measured (the same for all, so numbers compare).

    Attributes:
      examples: training images per domain (fewer if the split is smaller).
      rho: radius of the L2 ball of the rho-sharpness (one value for every backbone).
      sharpness_steps: projected ascent steps after SAM's point (0 = SAM's estimate).
      power_iters: most Hessian-vector products of the power iteration.
      power_tol: the power iteration stops once two consecutive estimates agree to
        this relative tolerance (``None``: always ``power_iters``).
      trace_samples: Rademacher probes of the Hutchinson estimate.
      alphas: step sizes of the 1-D landscape along the filter-normalised direction.
      grid_2d: points per axis of the 2-D landscape (on ``[-1, 1]^2``).
      seed: seeds the image subset, the directions and all probes.
    """

    examples: int = 512
    rho: float = 0.05
    sharpness_steps: int = 5
    power_iters: int = 20
    power_tol: float | None = 1e-3
    trace_samples: int = 10
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    grid_2d: int = 11
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "alphas", tuple(float(a) for a in np.ravel(self.alphas)))
        self.validate()

    def validate(self) -> FlatnessSettings:
        _check_int("examples", self.examples, 2)
        if not (_is_real(self.rho) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {self.rho!r}")
        _check_int("sharpness_steps", self.sharpness_steps, 0)
        _check_int("power_iters", self.power_iters, 1)
        if self.power_tol is not None and not (
            _is_real(self.power_tol) and math.isfinite(self.power_tol) and self.power_tol > 0
        ):
            raise ValueError(f"power_tol must be None or a number > 0, got {self.power_tol!r}")
        _check_int("trace_samples", self.trace_samples, 2)
        _check_int("grid_2d", self.grid_2d, 2)
        _check_int("seed", self.seed, 0)
        if not self.alphas or not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(
                f"alphas must be a non-empty list of finite numbers, got {self.alphas}"
            )
        return self


def _is_real(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ----------------------------------------------------------------------------------------
# One iteration of each iterative measure, as a jitted function of a loss.
# ----------------------------------------------------------------------------------------


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves, jnp.zeros((), jnp.float32))


def _unit(tree: PyTree) -> tuple[PyTree, jax.Array]:
    """``(tree / ||tree||, ||tree||)``; a zero tree stays zero instead of becoming NaN."""
    norm = jnp.sqrt(_vdot(tree, tree))
    inv = jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jax.tree.map(lambda x: (inv * x).astype(x.dtype), tree), norm


def _ascent(loss_fn: LossFn, params: PyTree, e: PyTree, rho):
    """``(L(w + e), P(e + rho * g / ||g||), ||g||, ||e||)`` with ``g = grad L(w + e)``.

    ``P`` projects onto the ball ``||e|| <= rho``. From ``e = 0`` the next point is
    SAM's ``rho * g / ||g||``, so one function serves the start and every ascent step.
    """
    point = jax.tree.map(lambda a, w: (a + w).astype(w.dtype), e, params)
    value, grad = jax.value_and_grad(loss_fn)(point)
    direction, grad_norm = _unit(grad)
    moved = jax.tree.map(lambda a, d: (a + rho * d).astype(a.dtype), e, direction)
    moved_norm = jnp.sqrt(_vdot(moved, moved))
    shrink = jnp.minimum(1.0, rho / jnp.maximum(moved_norm, 1e-30))
    projected = jax.tree.map(lambda x: (shrink * x).astype(x.dtype), moved)
    return value, projected, grad_norm, jnp.sqrt(_vdot(e, e))


def _curvature(loss_fn: LossFn, params: PyTree, v: PyTree):
    """``(v . Hv, Hv / ||Hv||)``: a power-iteration step and a Hutchinson probe at once.

    The next iterate stays ``v`` when ``Hv = 0`` (the eigenvalue is then 0).
    """
    hv = flatness.hessian_vector_product(loss_fn, params, v)
    v_next, hv_norm = _unit(hv)
    v_next = jax.tree.map(lambda a, b: jnp.where(hv_norm > 0, a, b), v_next, v)
    return _vdot(v, hv), v_next


class IterationSteps(NamedTuple):
    """The jitted iterations the Python loops of this module drive.

    Attributes:
      ascent: ``(params, e, rho) -> (loss(params + e), next e, grad norm, ||e||)``.
      curvature: ``(params, v) -> (v . Hv, Hv / ||Hv||)``.
    """

    ascent: Callable
    curvature: Callable


def iteration_steps(loss_fn: LossFn) -> IterationSteps:
    """:class:`IterationSteps` of any ``loss_fn(params) -> scalar`` (compiled on first use).

    Backbones use module-level functions keyed on the model instead, so every backbone
    of one architecture and batch shape shares one compilation.
    """
    return IterationSteps(
        ascent=jax.jit(functools.partial(_ascent, loss_fn)),
        curvature=jax.jit(functools.partial(_curvature, loss_fn)),
    )


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
    norm = math.sqrt(sum(float(np.vdot(x, x)) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: x / norm, tree)


# ----------------------------------------------------------------------------------------
# The iterative measures, as Python loops over jitted iterations (module docstring).
# ----------------------------------------------------------------------------------------


def rho_sharpness(
    steps: IterationSteps,
    params: PyTree,
    *,
    rho: float,
    num_steps: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """The largest loss increase found in ``||e|| <= rho``: as :func:`flatness.rho_sharpness`.

    The same algorithm (ascent step size ``rho``): start at SAM's point
    ``rho * g / ||g||`` (a random direction seeded by ``seed`` if ``g = 0``), take
    ``num_steps`` projected normalised ascent steps, keep the best of the
    ``num_steps + 1`` perturbed losses. Returns floats
    ``dict(sharpness, loss, perturbed_loss, perturbation_norm)``.
    """
    if not (_is_real(rho) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    _check_int("num_steps", num_steps, 0)
    rho = float(rho)
    zero = jax.tree.map(jnp.zeros_like, params)
    loss, e, grad_norm, _ = steps.ascent(params, zero, rho)
    if float(grad_norm) == 0:  # critical point: SAM's direction is undefined
        random_unit = _unit_numpy(
            _random_like(np.random.default_rng(seed), params, rademacher=False)
        )
        e = jax.tree.map(lambda x: rho * x, random_unit)
    best_loss, best_norm = -math.inf, math.nan
    for _ in range(num_steps + 1):
        value, next_e, _, e_norm = steps.ascent(params, e, rho)
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


def power_iteration(
    steps: IterationSteps,
    params: PyTree,
    *,
    iters: int = 20,
    tol: float | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The Hessian eigenvalue of largest magnitude, as :func:`flatness.top_hessian_eigenvalue`.

    At most ``iters`` steps ``v <- Hv / ||Hv||`` from a seeded random unit vector; the
    eigenvalue is the Rayleigh quotient of the last iterate (it keeps its sign: at a
    minimum it is the top eigenvalue). With ``tol`` the loop stops once two consecutive
    estimates differ by at most ``tol * |estimate|`` (``flatness``'s rule).

    Returns ``dict(eigenvalue, relative_change, iterations, estimates)``:
    ``relative_change`` is ``|lambda_k - lambda_{k-1}| / |lambda_k|`` of the last two
    estimates (NaN after one iteration), ``estimates`` all Rayleigh quotients in order.
    """
    _check_int("iters", iters, 1)
    if tol is not None and not (_is_real(tol) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be None or a finite number > 0, got {tol!r}")
    v = _unit_numpy(_random_like(np.random.default_rng(seed), params, rademacher=False))
    estimates: list[float] = []
    change = math.nan
    for _ in range(iters):
        eigenvalue, v = steps.curvature(params, v)
        estimates.append(float(eigenvalue))
        if len(estimates) > 1:
            last, previous = estimates[-1], estimates[-2]
            change = abs(last - previous) / abs(last) if last else math.inf
            if tol is not None and abs(last - previous) <= tol * abs(last):
                break
    return {
        "eigenvalue": estimates[-1],
        "relative_change": change,
        "iterations": len(estimates),
        "estimates": estimates,
    }


def hutchinson_trace(
    steps: IterationSteps, params: PyTree, *, samples: int = 10, seed: int = 0
) -> dict[str, float]:
    """Hutchinson's ``tr(H)``, as :func:`flatness.hessian_trace`: ``dict(trace, std_error)``.

    The mean of ``z^T H z`` over ``samples`` seeded Rademacher probes ``z``; the standard
    error is ``std(z^T H z, ddof=1) / sqrt(samples)``.
    """
    _check_int("samples", samples, 2)
    rng = np.random.default_rng(seed)
    values = np.asarray(
        [
            float(steps.curvature(params, _random_like(rng, params, rademacher=True))[0])
            for _ in range(samples)
        ],
        np.float64,
    )
    return {
        "trace": float(values.mean()),
        "std_error": float(values.std(ddof=1) / math.sqrt(samples)),
    }


# ----------------------------------------------------------------------------------------
# A backbone on its training batch: jitted once per architecture (model is static).
# ----------------------------------------------------------------------------------------


def _batch_loss_fn(model, batch, params) -> LossFn:
    fixed, images, labels = batch
    return flatness.model_loss_fn(model, {**fixed, "params": params}, images, labels)


@functools.partial(jax.jit, static_argnames="model")
def _model_ascent(model, batch, params, e, rho):
    return _ascent(_batch_loss_fn(model, batch, params), params, e, rho)


@functools.partial(jax.jit, static_argnames="model")
def _model_curvature(model, batch, params, v):
    return _curvature(_batch_loss_fn(model, batch, params), params, v)


@functools.partial(jax.jit, static_argnames="model")
def _model_loss_at(model, batch, params, directions, coefficients):
    """Loss and accuracy at ``params + sum_k coefficients[k] * directions[k]``.

    The loss is :func:`flatness.model_loss_fn`'s (eval-mode mean cross-entropy), from
    the same forward pass as the accuracy.
    """
    fixed, images, labels = batch
    point = params
    for k, d in enumerate(directions):
        point = jax.tree.map(lambda w, x, k=k: (w + coefficients[k] * x).astype(w.dtype), point, d)
    (logits, _), _ = model.apply({**fixed, "params": point}, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(losses), jnp.mean(jnp.argmax(logits, -1) == labels)


def _landscape(model, batch, params, directions, coefficients: np.ndarray):
    """``(losses, accuracies)`` at every row of ``coefficients`` [P, K], one point a call.

    One point per call rather than ``vmap`` over points as in ``flatness``: vmapping
    over parameters turns every convolution into a grouped one, which XLA:CPU runs
    about 3x slower per image than the plain convolution (measured: 4 vmapped points
    0.95 s vs 4 x 0.08 s for a resnet10 on 512 glyphs).
    """
    out = [_model_loss_at(model, batch, params, directions, c) for c in coefficients]
    return (
        np.asarray([float(loss) for loss, _ in out]),
        np.asarray([float(accuracy) for _, accuracy in out]),
    )


# flatness.random_direction jits a fresh closure per call; one jit of it compiles once
# per parameter structure instead.
_random_direction = jax.jit(flatness.random_direction)


def training_batch(split: sources.SplitData, examples: int, seed: int):
    """``(images float32 [-1, 1], labels, indices)``: a seeded subset of ``split``.

    ``min(examples, len(split))`` images drawn without replacement by
    ``np.random.default_rng(seed)`` and sorted, so a domain's backbones all see the
    same images and any run can regenerate them.
    """
    _check_int("examples", examples, 1)
    n = min(examples, len(split))
    indices = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    images = sources.preprocess(split.get_images(indices))
    return images, split.labels[indices], indices


def measure_entry(
    loaded: zoo_lib.LoadedBackbone,
    split: sources.SplitData,
    *,
    examples: int = 512,
    rho: float = 0.05,
    seed: int = 0,
    sharpness_steps: int = 5,
    power_iters: int = 20,
    power_tol: float | None = 1e-3,
    trace_samples: int = 10,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    landscape_2d: bool = False,
    grid_2d: int = 11,
) -> dict[str, Any]:
    """Every flatness measure of one backbone on its training images (module docstring).

    Args:
      loaded: a zoo backbone *with* its classification head (``Zoo.load``).
      split: the training split its head classifies (the entry's domain, "train").
      examples, rho, seed, ...: see :class:`FlatnessSettings`.
      landscape_2d: also evaluate the loss on a ``grid_2d x grid_2d`` grid of two
        filter-normalised directions over ``[-1, 1]^2``.

    Returns a JSON-ready dict: identification (``key``, ``domain``, ``method``, ``arch``,
    ``num_params``, ``training_rho``), ``examples``, ``train_loss``, ``train_accuracy``,
    ``sharpness``, ``perturbed_loss``, ``perturbation_norm``, ``top_eigenvalue``,
    ``eigenvalue_relative_change``, ``eigenvalue_iterations``, ``eigenvalue_estimates``
    (the power iteration's Rayleigh quotients in order), ``hessian_trace``,
    ``hessian_trace_se``, ``landscape_1d`` (``alphas``, ``losses``), optionally
    ``landscape_2d`` (``alphas``, ``betas``, ``losses``) and ``seconds``.
    """
    settings = FlatnessSettings(
        examples=examples,
        rho=rho,
        sharpness_steps=sharpness_steps,
        power_iters=power_iters,
        power_tol=power_tol,
        trace_samples=trace_samples,
        alphas=tuple(alphas),
        grid_2d=grid_2d,
        seed=seed,
    )
    entry, model = loaded.entry, loaded.model
    num_classes = entry.metadata.get("model", {}).get("num_classes")
    if num_classes is not None and num_classes != split.num_classes:
        raise ValueError(
            f"zoo entry {entry.key} has a head over {num_classes} classes but "
            f"{split.source}/{split.split} has {split.num_classes}: pass the training split "
            f"of the entry's own domain ({entry.domain!r}) from the data_dir it was trained on"
        )
    if len(split) < settings.examples:
        log.warning(
            "%s: its training split has %d images, fewer than examples=%d; measuring on all",
            entry.key,
            len(split),
            settings.examples,
        )
    start = time.perf_counter()
    images, labels, _ = training_batch(split, settings.examples, settings.seed)
    params = loaded.variables["params"]
    fixed = {k: v for k, v in loaded.variables.items() if k != "params"}
    batch = (fixed, jnp.asarray(images), jnp.asarray(labels))
    steps = IterationSteps(
        ascent=functools.partial(_model_ascent, model, batch),
        curvature=functools.partial(_model_curvature, model, batch),
    )
    # One seed per measure; the same seed gives a domain's backbones the same probes.
    seeds = np.random.SeedSequence(settings.seed).generate_state(5)
    sharp = rho_sharpness(
        steps, params, rho=settings.rho, num_steps=settings.sharpness_steps, seed=int(seeds[0])
    )
    eigen = power_iteration(
        steps, params, iters=settings.power_iters, tol=settings.power_tol, seed=int(seeds[1])
    )
    trace = hutchinson_trace(steps, params, samples=settings.trace_samples, seed=int(seeds[2]))
    direction = _random_direction(params, jax.random.key(int(seeds[3])))
    alphas = np.asarray(settings.alphas, np.float32)
    # Row 0 is the unperturbed point (train accuracy); the rest is the landscape.
    coefficients = np.concatenate([[0.0], alphas]).astype(np.float32)[:, None]
    losses_1d, accuracies = _landscape(model, batch, params, [direction], coefficients)
    result = {
        "key": entry.key,
        "benchmark": entry.benchmark,
        "domain": entry.domain,
        "method": entry.method,
        "arch": entry.metadata.get("model", {}).get("arch"),
        "width": entry.metadata.get("model", {}).get("width"),
        "num_params": entry.metadata.get("num_params"),
        "training_rho": entry.metadata.get("rho"),
        "examples": int(len(labels)),
        "train_loss": sharp["loss"],
        "train_accuracy": float(accuracies[0]),
        "sharpness": sharp["sharpness"],
        "perturbed_loss": sharp["perturbed_loss"],
        "perturbation_norm": sharp["perturbation_norm"],
        "top_eigenvalue": eigen["eigenvalue"],
        "eigenvalue_relative_change": eigen["relative_change"],
        "eigenvalue_iterations": eigen["iterations"],
        "eigenvalue_estimates": eigen["estimates"],
        "hessian_trace": trace["trace"],
        "hessian_trace_se": trace["std_error"],
        "landscape_1d": {"alphas": alphas.tolist(), "losses": losses_1d[1:].tolist()},
    }
    if landscape_2d:
        key_x, key_y = jax.random.split(jax.random.key(int(seeds[4])))
        directions = [_random_direction(params, key_x), _random_direction(params, key_y)]
        grid = np.linspace(-1.0, 1.0, settings.grid_2d, dtype=np.float32)
        grid_a, grid_b = np.meshgrid(grid, grid, indexing="ij")
        coefficients = np.stack([grid_a.ravel(), grid_b.ravel()], axis=1)
        surface, _ = _landscape(model, batch, params, directions, coefficients)
        result["landscape_2d"] = {
            "alphas": grid.tolist(),
            "betas": grid.tolist(),
            "losses": surface.reshape(grid.size, grid.size).tolist(),
        }
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------
# The whole zoo
# ----------------------------------------------------------------------------------------


def _method_order(method: str) -> tuple[int, str, int, str]:
    base, _, fusion = method.partition("+")
    rank = BASE_METHODS.index(base) if base in BASE_METHODS else len(BASE_METHODS)
    return (1 if fusion else 0, fusion, rank, method)


def select_entries(
    zoo: zoo_lib.Zoo,
    *,
    benchmark: str = "glyphs",
    fused: bool = False,
    domains: Sequence[str] | None = None,
) -> list[zoo_lib.ZooEntry]:
    """The complete entries to measure: ERM / SAM (and ``erm+*`` / ``sam+*`` if ``fused``).

    Raises :class:`EmptyZooError` (telling to run ``./run.sh``) when there are none, and
    ``ValueError`` when ``domains`` names a domain without such entries.
    """
    entries = []
    for entry in zoo.list(benchmark):
        base, plus, _ = entry.method.partition("+")
        if base in BASE_METHODS and (fused or not plus):
            entries.append(entry)
    wanted = "erm/sam" + (" (and their +fusion variants)" if fused else "")
    if not entries:
        raise EmptyZooError(
            f"no complete {benchmark} {wanted} backbones in the zoo {str(zoo.root)!r}: run "
            "./run.sh first (it trains the zoo into <workdir>/zoo), or point --workdir at a "
            "finished run"
        )
    if domains:
        available = sorted({e.domain for e in entries})
        missing = sorted(set(domains) - set(available))
        if missing:
            raise ValueError(
                f"domains {missing} have no complete {wanted} backbones in "
                f"{str(zoo.root)!r}; available: {available}"
            )
        entries = [e for e in entries if e.domain in set(domains)]
    return sorted(entries, key=lambda e: (e.domain, _method_order(e.method)))


def _check_landscape_domain(entries: Sequence[zoo_lib.ZooEntry], domain: str | None) -> None:
    measured = sorted({e.domain for e in entries})
    if domain is not None and domain not in measured:
        raise ValueError(f"landscape_2d={domain!r} is not among the measured domains {measured}")


def measure_zoo(
    zoo_root,
    data_dir,
    *,
    benchmark: str = "glyphs",
    fused: bool = False,
    domains: Sequence[str] | None = None,
    landscape_2d_domain: str | None = None,
    settings: FlatnessSettings | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`measure_entry` for every selected entry of the zoo at ``zoo_root``.

    Each domain's training split is read once from ``data_dir`` (Glyphs prepares
    missing domains); ``landscape_2d_domain`` adds 2-D landscapes for that domain's
    backbones. The selection, the settings and every split are checked before any
    backbone is loaded. ``progress`` is called with one line per backbone.

    Returns ``dict(benchmark, settings, entries, seconds)``; ``entries`` is sorted by
    domain, then ERM, SAM, fused variants.
    """
    settings = (settings or FlatnessSettings()).validate()
    zoo = zoo_lib.Zoo(zoo_root)
    entries = select_entries(zoo, benchmark=benchmark, fused=fused, domains=domains)
    _check_landscape_domain(entries, landscape_2d_domain)
    start = time.perf_counter()
    # Every split first: a missing source fails before any backbone is measured.
    splits = {
        domain: sources.load(f"{benchmark}/{domain}", "train", data_dir)
        for domain in sorted({e.domain for e in entries})
    }
    results = []
    for entry in entries:
        loaded = zoo.load(entry.benchmark, entry.domain, entry.method)
        result = measure_entry(
            loaded,
            splits[entry.domain],
            examples=settings.examples,
            rho=settings.rho,
            seed=settings.seed,
            sharpness_steps=settings.sharpness_steps,
            power_iters=settings.power_iters,
            power_tol=settings.power_tol,
            trace_samples=settings.trace_samples,
            alphas=settings.alphas,
            landscape_2d=entry.domain == landscape_2d_domain,
            grid_2d=settings.grid_2d,
        )
        results.append(result)
        if progress is not None:
            progress(
                f"{result['key']:28s} loss {result['train_loss']:.4f}  "
                f"rho-sharpness {result['sharpness']:.4g}  "
                f"top eigenvalue {result['top_eigenvalue']:.4g}  "
                f"trace {result['hessian_trace']:.4g}  ({result['seconds']:.1f} s)"
            )
    return {
        "benchmark": benchmark,
        "settings": dataclasses.asdict(settings),
        "entries": results,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def _by_domain(results: dict) -> dict[str, dict[str, dict]]:
    table: dict[str, dict[str, dict]] = {}
    for r in results["entries"]:
        table.setdefault(r["domain"], {})[r["method"]] = r
    return table


def _methods(results: dict) -> list[str]:
    return sorted({r["method"] for r in results["entries"]}, key=_method_order)


def _cell(entry: dict | None, key: str, interval: bool) -> str:
    if entry is None:
        return "-"
    if interval:
        return f"{entry[key]:.4g} ± {1.96 * entry[key + '_se']:.2g}"
    return f"{entry[key]:.4g}"


def _pairs(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(SAM variant, its ERM counterpart) pairs present in ``methods``."""
    return [(m, "erm" + m[3:]) for m in methods if m.startswith("sam") and "erm" + m[3:] in methods]


def format_table(results: dict) -> str:
    """The Markdown report: settings, the per-domain table and a SAM-vs-ERM tally."""
    s = results["settings"]
    methods = _methods(results)
    by_domain = _by_domain(results)
    examples = sorted({r["examples"] for r in results["entries"]})
    lines = [
        f"Flatness of the {results['benchmark']} backbones, each on {'/'.join(map(str, examples))}"
        f" training images of its own domain (seed {s['seed']}, BatchNorm in eval mode). "
        "Larger = sharper.",
        "",
        f"- **rho-sharpness**: largest loss increase found within L2 distance rho = {s['rho']:g}"
        f" of the weights ({s['sharpness_steps']} projected ascent steps from SAM's point).",
        f"- **top eigenvalue**: of the Hessian (power iteration: at most {s['power_iters']}"
        " steps"
        + (
            f", stopped when consecutive estimates agree to {s['power_tol']:g}"
            if s["power_tol"]
            else ""
        )
        + ").",
        f"- **Hessian trace**: Hutchinson estimate ({s['trace_samples']} Rademacher probes)"
        " ± 95% interval.",
        "",
    ]
    header = ["domain"] + [f"{title} {m}" for _, title, _ in MEASURES for m in methods]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" + "|---:" * (len(header) - 1) + "|")
    for domain, row in by_domain.items():
        cells = [_cell(row.get(m), key, ci) for key, _, ci in MEASURES for m in methods]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    for sam, erm in _pairs(methods):
        both = [row for row in by_domain.values() if sam in row and erm in row]
        if not both:
            continue
        tallies = ", ".join(
            f"{sum(row[sam][key] < row[erm][key] for row in both)}/{len(both)} by {title}"
            for key, title, _ in MEASURES[1:]
        )
        lines += ["", f"{sam} is flatter than {erm} (smaller value) on {tallies}."]
    return "\n".join(lines) + "\n"


_CSV_FIELDS = (
    "domain",
    "method",
    "key",
    "arch",
    "num_params",
    "training_rho",
    "examples",
    "train_loss",
    "train_accuracy",
    "sharpness",
    "perturbed_loss",
    "perturbation_norm",
    "top_eigenvalue",
    "eigenvalue_relative_change",
    "eigenvalue_iterations",
    "hessian_trace",
    "hessian_trace_se",
    "seconds",
)


def write_flatness_report(results: dict, out_dir) -> dict[str, Any]:
    """Writes flatness.json/.md/.csv and the landscape PNGs; returns their paths.

    Returns ``dict(json, markdown, csv, landscapes={domain: png}, landscapes_2d=...)``.
    """
    if not results.get("entries"):
        raise ValueError("results hold no entries: nothing to report")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, Any] = {
        "json": os.path.join(out_dir, "flatness.json"),
        "markdown": os.path.join(out_dir, "flatness.md"),
        "csv": os.path.join(out_dir, "flatness.csv"),
        "landscapes": {},
        "landscapes_2d": {},
    }
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(format_table(results))
        f.write(
            "\n1-D landscapes (training loss along one filter-normalised random direction "
            "per backbone): " + ", ".join(f"landscape_{d}.png" for d in _by_domain(results)) + ".\n"
        )
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["entries"])
    for domain, row in _by_domain(results).items():
        curves = {
            method: (r["landscape_1d"]["alphas"], r["landscape_1d"]["losses"])
            for method, r in sorted(row.items(), key=lambda kv: _method_order(kv[0]))
        }
        losses = np.concatenate([np.asarray(c[1]) for c in curves.values()])
        paths["landscapes"][domain] = flatness.plot_landscape_1d(
            curves,
            os.path.join(out_dir, f"landscape_{domain}.png"),
            title=f"{results['benchmark']}/{domain}: training loss along a random direction",
            # The loss explodes at |alpha| ~ 1 and would flatten the basin on a linear axis.
            log_scale=bool(losses.min() > 0 and losses.max() > 10 * losses.min()),
        )
        surfaces = {
            method: (
                r["landscape_2d"]["alphas"],
                r["landscape_2d"]["betas"],
                r["landscape_2d"]["losses"],
            )
            for method, r in sorted(row.items(), key=lambda kv: _method_order(kv[0]))
            if "landscape_2d" in r
        }
        if surfaces:
            paths["landscapes_2d"][domain] = flatness.plot_landscape_2d(
                surfaces,
                os.path.join(out_dir, f"landscape2d_{domain}.png"),
                title=f"{results['benchmark']}/{domain}: training loss, two random directions",
            )
    return paths


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _parse_args(argv):
    defaults = FlatnessSettings()
    p = argparse.ArgumentParser(
        prog="python -m flatfsc_jax.measure_flatness",
        description="Flatness (rho-sharpness, Hessian, loss landscapes) of the zoo's "
        "ERM and SAM backbones.",
    )
    p.add_argument("--workdir", default="work", help="the run's workdir (zoo in <workdir>/zoo)")
    p.add_argument("--benchmark", default="glyphs")
    p.add_argument("--data_dir", default=None, help="default: <workdir>/data")
    p.add_argument("--out", default=None, help="default: <workdir>/flatness")
    p.add_argument("--examples", type=int, default=defaults.examples)
    p.add_argument("--rho", type=float, default=defaults.rho)
    p.add_argument("--sharpness_steps", type=int, default=defaults.sharpness_steps)
    p.add_argument("--power_iters", type=int, default=defaults.power_iters)
    p.add_argument(
        "--power_tol",
        type=float,
        default=defaults.power_tol,
        help="relative tolerance that stops the power iteration early (0: never)",
    )
    p.add_argument("--trace_samples", type=int, default=defaults.trace_samples)
    p.add_argument(
        "--alphas",
        default=None,
        help="1-D landscape grid 'start,stop,num' (default -1,1,21)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--fused", action="store_true", help="also the erm+ft / sam+ft entries")
    p.add_argument("--domains", default=None, help="comma-separated subset of domains")
    p.add_argument(
        "--landscape_2d",
        default=None,
        metavar="DOMAIN",
        help="also draw 2-D landscapes for this domain",
    )
    p.add_argument("--grid_2d", type=int, default=defaults.grid_2d)
    p.add_argument(
        "--compilation_cache",
        default=os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flatfsc_jax", "jax"
        ),
        help="persistent XLA compilation cache ('' disables it)",
    )
    return p.parse_args(argv)


def _parse_alphas(text: str | None) -> tuple[float, ...]:
    if text is None:
        return DEFAULT_ALPHAS
    try:
        start, stop, num = text.split(",")
        return tuple(float(a) for a in np.linspace(float(start), float(stop), int(num)))
    except ValueError as e:
        raise ValueError(f"alphas={text!r} must be 'start,stop,num', e.g. -1,1,21") from e


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line; returns the written paths."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = FlatnessSettings(
            examples=args.examples,
            rho=args.rho,
            sharpness_steps=args.sharpness_steps,
            power_iters=args.power_iters,
            power_tol=args.power_tol or None,
            trace_samples=args.trace_samples,
            alphas=_parse_alphas(args.alphas),
            grid_2d=args.grid_2d,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"measure_flatness: --{e}") from e
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    data_dir = args.data_dir or os.path.join(args.workdir, "data")
    out = args.out or os.path.join(args.workdir, "flatness")
    domains = [d for d in args.domains.split(",") if d] if args.domains else None
    zoo_root = os.path.join(args.workdir, "zoo")
    try:  # the user's mistakes become one-line messages; anything later is a real error
        entries = select_entries(
            zoo_lib.Zoo(zoo_root), benchmark=args.benchmark, fused=args.fused, domains=domains
        )
        _check_landscape_domain(entries, args.landscape_2d)
    except (EmptyZooError, ValueError) as e:
        raise SystemExit(f"measure_flatness: {e}") from e
    results = measure_zoo(
        zoo_root,
        data_dir,
        benchmark=args.benchmark,
        fused=args.fused,
        domains=domains,
        landscape_2d_domain=args.landscape_2d,
        settings=settings,
        progress=lambda line: print(line, flush=True),
    )
    paths = write_flatness_report(results, out)
    print()
    print(format_table(results))
    print(f"measured {len(results['entries'])} backbones in {results['seconds']:.1f} s; written:")
    for name in ("json", "markdown", "csv"):
        print("  " + paths[name])
    for path in [*paths["landscapes"].values(), *paths["landscapes_2d"].values()]:
        print("  " + path)
    return paths


if __name__ == "__main__":
    main()
