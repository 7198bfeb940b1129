"""Are the SAM backbones of the zoo really flatter? The zoo driver of the flatness measures.

Command: ``python -m flatfsc_jax.cli.flatness --workdir=work`` (after ``./run.sh`` has
filled ``<workdir>/zoo``); :func:`flatness_report.write_flatness_report` writes what it measured.

What is measured, for every complete zoo entry trained with ERM or SAM (``fused=True``
adds the fine-tuned ``erm+ft`` / ``sam+ft`` ... entries): the backbone *with its
classification head* on a fixed, seeded subset of ``examples`` images of its own
domain's training classes (the data it was trained on; the same subset for every
backbone of a domain), cross-entropy with BatchNorm in eval mode
(:func:`measures.model_loss_fn` explains why). Larger = sharper for all measures:

* rho-sharpness: the largest loss increase found in the L2 ball of radius ``rho``
  around the weights (SAM's own notion; :func:`measures.rho_sharpness`, ascent step
  ``rho``). One ``rho`` for all backbones.
* top Hessian eigenvalue (power iteration; the eigenvalue of largest magnitude, which
  is the top one at a minimum) and the Hessian trace (Hutchinson, Rademacher probes).
* the loss along a filter-normalised random direction (Li et al. 2018). Every backbone
  gets its own direction, scaled to its own filters, from the same seed; backbones of
  one domain share parameter shapes, so their directions come from the same Gaussian
  draw and differ only by the filter normalisation.

The jitted iterations of the measures (:mod:`flatfsc_jax.flatness.measures`) are
module-level functions keyed on the model here (:func:`model_steps`), so the ERM and SAM
backbones of a domain share every compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from flatfsc_jax import errors
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.checks import check_int, is_real
from flatfsc_jax.data import benchmarks, sources
from flatfsc_jax.flatness import landscape
from flatfsc_jax.flatness import measures as measures_lib
from flatfsc_jax.flatness import report as flatness_report

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ALPHAS",
    "EmptyZooError",
    "FlatnessSettings",
    "check_landscape_domain",
    "measure_entry",
    "measure_zoo",
    "model_steps",
    "select_entries",
    "training_batch",
]

# Li et al. (2018) plot filter-normalised landscapes on [-1, 1]: at |alpha| = 1 every
# filter moves by its own norm, far enough to leave any basin.
DEFAULT_ALPHAS = tuple(float(a) for a in np.linspace(-1.0, 1.0, 21))


class EmptyZooError(errors.FlatfscError, FileNotFoundError):
    """The zoo holds no complete entry to measure."""


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
        check_int("examples", self.examples, minimum=2)
        if not (is_real(self.rho) and math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a finite number > 0, got {self.rho!r}")
        check_int("sharpness_steps", self.sharpness_steps, minimum=0)
        check_int("power_iters", self.power_iters, minimum=1)
        if self.power_tol is not None and not (
            is_real(self.power_tol) and math.isfinite(self.power_tol) and self.power_tol > 0
        ):
            raise ValueError(f"power_tol must be None or a number > 0, got {self.power_tol!r}")
        check_int("trace_samples", self.trace_samples, minimum=2)
        check_int("grid_2d", self.grid_2d, minimum=2)
        check_int("seed", self.seed, minimum=0)
        if not self.alphas or not all(math.isfinite(a) for a in self.alphas):
            raise ValueError(
                f"alphas must be a non-empty list of finite numbers, got {self.alphas}"
            )


# ----------------------------------------------------------------------------------------
# A backbone on its training batch: the flatness iterations, jitted once per architecture.
# ----------------------------------------------------------------------------------------


def _batch_loss_fn(model, batch, params):
    fixed, images, labels = batch
    return measures_lib.model_loss_fn(model, {**fixed, "params": params}, images, labels)


@functools.partial(jax.jit, static_argnames="model")
def _model_ascent(model, batch, params, e, step, rho):
    return measures_lib.ascent_step(_batch_loss_fn(model, batch, params), params, e, step, rho)


@functools.partial(jax.jit, static_argnames="model")
def _model_curvature(model, batch, params, v):
    return measures_lib.curvature_step(_batch_loss_fn(model, batch, params), params, v)


@functools.partial(jax.jit, static_argnames="model")
def _model_loss_at(model, batch, params, directions, coefficients):
    """Loss and accuracy at ``params + sum_k coefficients[k] * directions[k]``.

    The loss is :func:`flatness.model_loss_fn`'s (eval-mode mean cross-entropy), from
    the same forward pass as the accuracy.
    """
    fixed, images, labels = batch
    point = params
    for k, d in enumerate(directions):
        point = otu.tree_cast_like(otu.tree_add_scale(point, coefficients[k], d), point)
    (logits, _), _ = model.apply({**fixed, "params": point}, images, train=False)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(losses), jnp.mean(jnp.argmax(logits, -1) == labels)


def model_steps(model, batch) -> measures_lib.IterationSteps:
    """:class:`flatness.IterationSteps` of ``model`` on ``batch = (fixed, images, labels)``.

    ``fixed`` holds the variables other than ``'params'`` (BatchNorm statistics). The
    jitted functions are keyed on the model, not on a closure, so every backbone of one
    architecture and batch shape reuses their compilations.
    """
    return measures_lib.IterationSteps(
        ascent=functools.partial(_model_ascent, model, batch),
        curvature=functools.partial(_model_curvature, model, batch),
        loss_at=lambda params, d, c: _model_loss_at(model, batch, params, d, c)[0],
    )


def training_batch(split: sources.SplitData, examples: int, seed: int):
    """``(images float32 [-1, 1], labels, indices)``: a seeded subset of ``split``.

    ``min(examples, len(split))`` images drawn without replacement by
    ``np.random.default_rng(seed)`` and sorted, so a domain's backbones all see the
    same images and any run can regenerate them.
    """
    check_int("examples", examples, minimum=1)
    n = min(examples, len(split))
    indices = np.sort(np.random.default_rng(seed).choice(len(split), size=n, replace=False))
    images = sources.preprocess(split.get_images(indices))
    return images, split.labels[indices], indices


def measure_entry(
    loaded: zoo_lib.LoadedBackbone,
    split: sources.SplitData,
    settings: FlatnessSettings | None = None,
    *,
    landscape_2d: bool = False,
) -> dict[str, Any]:
    """Every flatness measure of one backbone on its training images (module docstring).

    Args:
      loaded: a zoo backbone *with* its classification head (``Zoo.load``).
      split: the training split its head classifies (the entry's domain, "train").
      settings: how to measure (default :class:`FlatnessSettings`).
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
    settings = settings or FlatnessSettings()
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
    steps = model_steps(model, batch)
    # One seed per measure; the same seed gives a domain's backbones the same probes.
    seeds = np.random.SeedSequence(settings.seed).generate_state(5)
    sharp = measures_lib.rho_sharpness(
        steps, params, rho=settings.rho, steps=settings.sharpness_steps, seed=int(seeds[0])
    )
    eigen = measures_lib.top_hessian_eigenvalue(
        steps, params, iters=settings.power_iters, tol=settings.power_tol, seed=int(seeds[1])
    )
    trace = measures_lib.hessian_trace(
        steps, params, samples=settings.trace_samples, seed=int(seeds[2])
    )
    direction = landscape.random_direction(params, jax.random.key(int(seeds[3])))
    losses_1d = landscape.loss_landscape_1d(steps, params, direction, settings.alphas)
    # Accuracy at the unperturbed point: the landscape's forward pass at alpha = 0.
    _, accuracy = _model_loss_at(model, batch, params, [direction], np.zeros(1, np.float32))
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
        "train_accuracy": float(accuracy),
        "sharpness": sharp["sharpness"],
        "perturbed_loss": sharp["perturbed_loss"],
        "perturbation_norm": sharp["perturbation_norm"],
        "top_eigenvalue": eigen["eigenvalue"],
        "eigenvalue_relative_change": eigen["relative_change"],
        "eigenvalue_iterations": eigen["iterations"],
        "eigenvalue_estimates": eigen["estimates"],
        "hessian_trace": trace["trace"],
        "hessian_trace_se": trace["std_error"],
        "landscape_1d": {
            "alphas": np.asarray(settings.alphas, np.float32).tolist(),
            "losses": losses_1d.tolist(),
        },
    }
    if landscape_2d:
        key_x, key_y = jax.random.split(jax.random.key(int(seeds[4])))
        dir_x = landscape.random_direction(params, key_x)
        dir_y = landscape.random_direction(params, key_y)
        grid = np.linspace(-1.0, 1.0, settings.grid_2d, dtype=np.float32)
        surface = landscape.loss_landscape_2d(steps, params, dir_x, dir_y, grid, grid)
        result["landscape_2d"] = {
            "alphas": grid.tolist(),
            "betas": grid.tolist(),
            "losses": surface.tolist(),
        }
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------
# The whole zoo
# ----------------------------------------------------------------------------------------


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
        if base in flatness_report.FLATNESS_BASE_METHODS and (fused or not plus):
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
    return sorted(
        entries, key=lambda e: (e.domain, flatness_report.flatness_method_order(e.method))
    )


def check_landscape_domain(entries: Sequence[zoo_lib.ZooEntry], domain: str | None) -> None:
    """Raises ``ValueError`` unless ``domain`` (the 2-D landscape's) is ``None`` or measured."""
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
    class_splits: str = "shipped",
) -> dict[str, Any]:
    """:func:`measure_entry` for every selected entry of the zoo at ``zoo_root``.

    ``class_splits``: Meta-Dataset's "shipped" class splits or the "prepared" ones
    (``config.data.class_splits``).

    Each domain's training split is read once from ``data_dir`` (Glyphs prepares
    missing domains); ``landscape_2d_domain`` adds 2-D landscapes for that domain's
    backbones. The selection, the settings and every split are checked before any
    backbone is loaded. ``progress`` is called with one line per backbone.

    Returns ``dict(benchmark, settings, entries, seconds)``; ``entries`` is sorted by
    domain, then ERM, SAM, fused variants.
    """
    settings = settings or FlatnessSettings()
    zoo = zoo_lib.Zoo(zoo_root)
    entries = select_entries(zoo, benchmark=benchmark, fused=fused, domains=domains)
    check_landscape_domain(entries, landscape_2d_domain)
    start = time.perf_counter()
    # Every split first: a missing source fails before any backbone is measured.
    splits = {
        domain: benchmarks.load_split(
            benchmark,
            domain,
            "train",
            data_dir,
            **benchmarks.split_options(benchmark, class_splits),
        )
        for domain in sorted({e.domain for e in entries})
    }
    results = []
    for entry in entries:
        loaded = zoo.load(entry.benchmark, entry.domain, entry.method)
        result = measure_entry(
            loaded,
            splits[entry.domain],
            settings,
            landscape_2d=entry.domain == landscape_2d_domain,
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
