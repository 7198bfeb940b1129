"""Reparametrisation-aware sharpness and feature-geometry baselines for the flatness study.

``flatfsc_jax.flatness.sharpness``: the study measures that ``flatness.measures``
(Hessian trace, top eigenvalue, rho-sharpness) does not have, and :func:`measure_backbone`,
which scores one zoo backbone on all of them in BatchNorm eval mode for the study driver.

Plain Hessian and rho-ball measures change when a ReLU or BatchNorm network is
reparametrised without changing its function (Dinh et al. 2017): scale one layer by ``a``
and the next by ``1/a`` and the trace moves by ``a^2``. The measures here are the
field's answers to that, each a pure function of a ``loss_fn(params) -> scalar`` closure
(or of a feature matrix), like the rest of the package:

* :func:`adaptive_average_sharpness` and :func:`adaptive_worst_sharpness`: Andriushchenko
  et al. (ICML 2023, "A modern look at the relationship between sharpness and
  generalization"), the *adaptive* (Kwon et al. 2021) element-wise variant. A perturbation
  is ``delta = |w| * gamma``, so every weight moves relative to its own magnitude:

  - average case: ``E_z L(w + rho |w| z) - L(w)``, ``z ~ N(0, I)``;
  - worst case: ``max_{||gamma||_p <= rho} L(w + |w| gamma) - L(w)``, ``p = inf`` in their
    headline results (``m_apgd_linf``), ``p = 2`` also offered.

  Both perturb *every* parameter, BatchNorm affine parameters and biases included, as
  their code does.
* :func:`relative_flatness`: Petzka et al. (NeurIPS 2021). For the feature layer ``W``
  (the head's kernel, ``(features, classes)`` in Flax, column ``w_s`` feeds class ``s``)
  ``kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})``, ``H_{s,s'}`` the Hessian block of the
  loss between columns ``s`` and ``s'``. Scaling ``W`` by ``a`` and the features by
  ``1/a`` leaves it unchanged.
* :func:`sam_gap`: SAM's one-step loss gap ``L(w + rho g/||g||) - L(w)``, which is
  ``measures.rho_sharpness`` with ``steps=0``; named here so the study's tables say what
  they report.
* :func:`weight_norms`: the weight norm Jiang et al. (2020) list beside sharpness.
* Non-flatness baselines on embeddings: :func:`cdnv` (Galanti et al. 2022) and
  :func:`effective_rank` (Roy & Vetterli 2007).

Like ``flatness.measures``, the iterative measures drive jitted single steps from Python
(that module's docstring says why not ``lax`` loops on XLA:CPU) and draw their random
numbers with NumPy from an integer ``seed``; :class:`AdaptiveSteps` holds the jitted steps
so that :func:`measure_backbone`, which keys them on the model, compiles them once per
architecture and batch shape.

Why one module: the measures are the columns of one table and are read together;
:func:`measure_backbone` is their one driver and needs the model-keyed twins of the
adaptive steps, which would otherwise be exported only to be imported once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.spatial.distance
import scipy.stats

from flatfsc_jax.checks import check_int, check_number
from flatfsc_jax.flatness import measures
from flatfsc_jax.flatness import zoo as zoo_flatness
from flatfsc_jax.flatness.adaptive import (
    AdaptiveSteps,
    _check_norm,
    adaptive_ascent_step,
    adaptive_average_sharpness,
    adaptive_loss_at,
    adaptive_steps,
    adaptive_worst_sharpness,
    apgd_checkpoints,
)

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

__all__ = [
    "AdaptiveSteps",
    "SharpnessSettings",
    "adaptive_ascent_step",
    "adaptive_average_sharpness",
    "adaptive_loss_at",
    "adaptive_steps",
    "adaptive_worst_sharpness",
    "apgd_checkpoints",
    "cdnv",
    "effective_rank",
    "linear_head_loss",
    "measure_backbone",
    "measure_split_backbone",
    "model_adaptive_steps",
    "relative_flatness",
    "sam_gap",
    "weight_norms",
]


def sam_gap(
    loss_fn: LossFn | measures.IterationSteps, params: PyTree, *, rho: float
) -> dict[str, float]:
    """SAM's loss gap ``L(w + rho g / ||g||) - L(w)``: ``measures.rho_sharpness(steps=0)``."""
    return measures.rho_sharpness(loss_fn, params, rho=rho, steps=0)


# ---------------------------------------------------------------------- relative flatness


def linear_head_loss(features, labels, bias=None) -> LossFn:
    """``kernel -> mean cross-entropy of features @ kernel + bias``: the loss of a head.

    With the network frozen below the head, its features do not depend on the head's
    kernel, so this is the exact loss of the feature layer that
    :func:`relative_flatness` differentiates twice.
    """
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels)

    def loss_fn(kernel):
        logits = features @ kernel
        if bias is not None:
            logits = logits + bias
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return loss_fn


def relative_flatness(
    loss_fn: LossFn,
    kernel,
    *,
    samples: int = 100,
    seed: int = 0,
    exact_max: int = 4096,
) -> dict[str, float]:
    """Petzka et al.'s relative flatness ``kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})``.

    ``kernel`` is the feature layer's ``(in, out)`` matrix (Flax layout: column ``w_s``
    feeds output ``s``), ``loss_fn(kernel) -> scalar`` the loss with everything else fixed
    (:func:`linear_head_loss` for a head on frozen features). With ``G = W^T W`` and ``H``
    the Hessian in ``kernel``, ``kappa = sum_{i,s,s'} G[s,s'] H[(i,s),(i,s')] = Tr(H M)``,
    ``M = I_in (x) G``, which is what the code computes:

    * ``kernel.size <= exact_max``: exactly, from the full Hessian (``jax.hessian``);
    * otherwise Hutchinson: ``kappa = E_z <z G, H z>`` over Rademacher ``z`` shaped like
      ``kernel`` (``(z G)[i, s] = sum_s' G[s, s'] z[i, s']`` is ``M z``), one
      Hessian-vector product per probe, ``samples`` probes (NumPy, seeded).

    Returns ``dict(relative_flatness, std_error)``; ``std_error`` is 0 when exact.
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be a 2-D (in, out) matrix, got shape {kernel.shape}")
    check_int("exact_max", exact_max, minimum=0)
    gram = kernel.T @ kernel
    if kernel.size <= exact_max:
        hessian = jax.jit(jax.hessian(loss_fn))(kernel)  # (in, out, in, out)
        value = jnp.einsum("isit,st->", hessian, gram)
        return {"relative_flatness": float(value), "std_error": 0.0}
    check_int("samples", samples, minimum=2)

    # All probes in one vmapped call: the head's loss is small, a call per probe is not.
    probes = jax.jit(
        jax.vmap(lambda z: jnp.vdot(z @ gram, measures.hessian_vector_product(loss_fn, kernel, z)))
    )
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.integers(0, 2, (samples, *kernel.shape)) - 1.0
    values = np.asarray(probes(jnp.asarray(z, kernel.dtype)), np.float64)
    return {
        "relative_flatness": float(values.mean()),
        "std_error": float(values.std(ddof=1) / math.sqrt(samples)),
    }


# --------------------------------------------------------------------- norms and features


def weight_norms(params: PyTree) -> dict[str, float]:
    """Global L2 norms: ``weight_norm`` over every parameter, ``kernel_norm`` over kernels.

    ``kernel_norm`` keeps only leaves with at least two axes (convolution and dense
    kernels), leaving out biases and BatchNorm scales/offsets, whose size says little
    about the function in eval mode (BN's scale absorbs the kernel's).
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params has no leaves")
    total = sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in leaves)
    kernels = sum(
        float(np.sum(np.square(np.asarray(x, np.float64)))) for x in leaves if np.ndim(x) >= 2
    )
    return {"weight_norm": math.sqrt(total), "kernel_norm": math.sqrt(kernels)}


def _check_features(features, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be a 2-D (examples, dim) matrix, got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or inf")
    if labels is None:
        return features, None
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be shaped ({features.shape[0]},), got {labels.shape}")
    return features, labels


def cdnv(features, labels) -> float:
    """Class-distance normalised variance (Galanti et al. 2022), mean over class pairs.

    ``V(i, j) = (Var_i + Var_j) / (2 ||mu_i - mu_j||^2)``, ``mu_c`` the class mean and
    ``Var_c = mean_x ||f(x) - mu_c||^2`` (the 1/n variance of the paper's definition),
    averaged over the unordered pairs ``i < j`` of the classes present. Smaller means
    tighter, better separated classes; two classes with the same mean give ``inf``.
    """
    features, labels = _check_features(features, labels)
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"cdnv needs at least 2 classes, labels hold {classes.size}")
    means = np.stack([features[labels == c].mean(0) for c in classes])
    variances = np.asarray(
        [
            np.mean(np.sum((features[labels == c] - m) ** 2, axis=1))
            for c, m in zip(classes, means, strict=True)
        ]
    )
    distances = scipy.spatial.distance.pdist(means, "sqeuclidean")
    rows, cols = np.triu_indices(classes.size, k=1)  # pdist's pair order
    with np.errstate(divide="ignore"):
        ratios = (variances[rows] + variances[cols]) / (2.0 * distances)
    return float(np.mean(ratios))


def effective_rank(features, *, center: bool = False) -> float:
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p = s / sum(s)``.

    ``s`` are the singular values of the ``(examples, dim)`` matrix and ``H`` the Shannon
    entropy (natural log, ``0 log 0 = 0``); it lies in ``[1, rank]``. ``center``
    subtracts the mean feature first, so a shared offset (ReLU features are all
    positive) does not count as a direction.
    """
    features, _ = _check_features(features)
    if center:
        features = features - features.mean(0)
    s = np.linalg.svd(features, compute_uv=False)
    if not s.sum() > 0:
        raise ValueError("effective_rank of an all-zero matrix is undefined")
    return float(np.exp(scipy.stats.entropy(s / s.sum())))


# ---------------------------------------------------------------------- one zoo backbone


def _normalize_logits(logits):
    # Andriushchenko et al.'s --normalize_logits: centred, unit-L2 logits, so the loss
    # cannot be changed by scaling the head (their remedy for logit-scale invariance).
    logits = logits - jnp.mean(logits, axis=-1, keepdims=True)
    norm = jnp.linalg.norm(logits, axis=-1, keepdims=True)
    return logits / jnp.maximum(norm, 1e-10)


def _model_loss(model, normalize_logits, batch, params):
    fixed, images, labels = batch
    (logits, _), _ = model.apply({**fixed, "params": params}, images, train=False)
    logits = logits.astype(jnp.float32)
    if normalize_logits:
        logits = _normalize_logits(logits)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@functools.partial(jax.jit, static_argnames=("model", "normalize_logits"))
def _model_loss_at(model, normalize_logits, batch, params, gamma):
    return adaptive_loss_at(
        functools.partial(_model_loss, model, normalize_logits, batch), params, gamma
    )


@functools.partial(jax.jit, static_argnames=("model", "normalize_logits", "norm"))
def _model_ascent(model, normalize_logits, norm, batch, params, gamma, prev, step, rho, momentum):
    loss_fn = functools.partial(_model_loss, model, normalize_logits, batch)
    return adaptive_ascent_step(loss_fn, norm, params, gamma, prev, step, rho, momentum)


@functools.partial(jax.jit, static_argnames="model")
def _model_outputs(model, variables, images):
    (logits, embedding), _ = model.apply(variables, images, train=False)
    return logits, embedding


def model_adaptive_steps(model, batch, *, norm: str = "linf", normalize_logits: bool = True):
    """:class:`AdaptiveSteps` of ``model`` on ``batch = (fixed, images, labels)``.

    Keyed on the model (like ``measure_flatness.model_steps``), so every backbone of one
    architecture and batch shape shares the compilations. The loss is the eval-mode mean
    cross-entropy, on normalised logits if ``normalize_logits``.
    """
    _check_norm(norm)
    return AdaptiveSteps(
        loss_at=functools.partial(_model_loss_at, model, normalize_logits, batch),
        ascent=functools.partial(_model_ascent, model, normalize_logits, norm, batch),
        norm=norm,
    )


@dataclasses.dataclass(frozen=True)
class SharpnessSettings:
    """How :func:`measure_backbone` scores every backbone (the same for all).

    Defaults follow Andriushchenko et al.'s CIFAR-10 ResNet recipe where they have one
    (their ``eval_sharpness_final.sh``): ``avg_l2 --adaptive`` over 20 draws,
    ``m_apgd_linf --adaptive --normalize_logits`` for 20 iterations on batches of 128,
    radii from the middle of their grids.

    Attributes:
      average_rho: standard deviation (relative to ``|w|``) of the average-case noise.
      average_samples: Monte-Carlo draws (antithetic pairs) of the average case.
      worst_rho: radius of the worst-case ball in relative coordinates.
      worst_norm: ``"linf"`` (their headline) or ``"l2"``.
      worst_steps: APGD iterations per batch.
      worst_batch: examples per batch ``m`` of the worst case (the images are cut into
        ``len(images) // worst_batch`` batches, the remainder dropped).
      normalize_logits: adaptive measures on centred unit-norm logits (their recipe).
      common_rho: the SAM gap's radius shared by every backbone (also reported at the
        backbone's own training rho when it is given).
      relative_flatness_samples: Hutchinson probes when the head is too large for the
        exact Hessian (``relative_flatness_exact_max`` kernel entries).
      trace_samples: Hutchinson probes of the Hessian trace (0: skip trace and eigenvalue).
      power_iters: most power-iteration steps of the top eigenvalue.
      seed: seeds every random draw.
    """

    average_rho: float = 0.1
    average_samples: int = 20
    worst_rho: float = 0.002
    worst_norm: str = "linf"
    worst_steps: int = 20
    worst_batch: int = 128
    normalize_logits: bool = True
    common_rho: float = 0.05
    relative_flatness_samples: int = 100
    relative_flatness_exact_max: int = 4096
    trace_samples: int = 10
    power_iters: int = 20
    seed: int = 0

    def __post_init__(self):
        check_number("average_rho", self.average_rho, positive=True)
        check_int("average_samples", self.average_samples, minimum=2)
        check_number("worst_rho", self.worst_rho, positive=True)
        _check_norm(self.worst_norm)
        check_int("worst_steps", self.worst_steps, minimum=1)
        check_int("worst_batch", self.worst_batch, minimum=1)
        check_number("common_rho", self.common_rho, positive=True)
        check_int("relative_flatness_samples", self.relative_flatness_samples, minimum=2)
        check_int("relative_flatness_exact_max", self.relative_flatness_exact_max, minimum=0)
        if self.trace_samples != 0:
            check_int("trace_samples", self.trace_samples, minimum=2)
        check_int("power_iters", self.power_iters, minimum=1)
        check_int("seed", self.seed, minimum=0)


def _head_of(variables: Mapping) -> Mapping:
    head = variables.get("params", {}).get("head")
    if head is None:
        raise ValueError(
            "variables must hold params with a 'head' (load the zoo entry with its "
            "classification head)"
        )
    return head


def _features_in_batches(feature_fn, variables, images, batch: int = 512) -> np.ndarray:
    images = np.asarray(images)
    chunks = [
        np.asarray(feature_fn(variables, jnp.asarray(images[i : i + batch])), np.float64)
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(chunks)


def measure_backbone(
    model,
    variables: Mapping,
    images,
    labels,
    *,
    heldout_images,
    heldout_labels,
    feature_fn: Callable | None = None,
    training_rho: float | None = None,
    settings: SharpnessSettings | None = None,
) -> dict[str, float]:
    """Every measure of this module, and the Hessian ones, for one backbone.

    Args:
      model: a ``models.Model`` *with* its classification head.
      variables: its variables (``params``, ``batch_stats``); BatchNorm runs in eval mode.
      images, labels: the fixed source training images (NHWC float, as
        ``measure_flatness.training_batch`` returns them) and their class ids.
      heldout_images, heldout_labels: images of source classes the backbone did not
        train on, for CDNV and the effective rank.
      feature_fn: ``(variables, images) -> (n, dim)`` embeddings for CDNV and the
        effective rank (default: the embedding the head reads, as ``model.embed``).
      training_rho: the backbone's own SAM radius; when given and > 0 adds
        ``sam_gap_training_rho``.
      settings: :class:`SharpnessSettings` (default: its defaults).

    Returns a flat dict of floats: ``loss``, ``accuracy``, ``loss_normalized_logits``
    (the loss the adaptive measures perturb); ``sam_gap_common_rho`` (and
    ``sam_gap_training_rho``); ``hessian_trace``, ``hessian_trace_se``,
    ``top_eigenvalue`` (unless ``trace_samples=0``); ``adaptive_average_sharpness`` and
    ``_se``; ``adaptive_worst_sharpness`` and ``_se`` (over batches; NaN with one
    batch); ``relative_flatness`` and ``_se`` (0 when exact); ``weight_norm``,
    ``kernel_norm``; ``cdnv``, ``effective_rank``, ``effective_rank_centered``;
    ``worst_batches``, ``examples`` and ``seconds``. Larger = sharper for every
    flatness measure; ``loss`` and the Hessian measures are those of
    ``measure_flatness`` (plain cross-entropy), the adaptive ones use
    ``settings.normalize_logits``.
    """
    settings = settings or SharpnessSettings()
    if training_rho is not None:
        check_number("training_rho", training_rho, minimum=0.0)
    _head_of(variables)
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels)
    n = int(images.shape[0])
    if n < settings.worst_batch:
        raise ValueError(
            f"worst_batch={settings.worst_batch} is larger than the {n} images; lower "
            "worst_batch or pass more images"
        )
    if feature_fn is None:  # the head's input, compiled once per architecture

        def feature_fn(v, x):
            return _model_outputs(model, v, x)[1]

    start = time.perf_counter()
    params = variables["params"]
    fixed = {k: v for k, v in variables.items() if k != "params"}
    batch = (fixed, images, labels)
    seeds = [int(s) for s in np.random.SeedSequence(settings.seed).generate_state(5)]

    logits, embedding = _model_outputs(model, dict(variables), images)
    out: dict[str, float] = {
        "examples": float(n),
        "accuracy": float(jnp.mean(jnp.argmax(logits, -1) == labels)),
    }
    steps = zoo_flatness.model_steps(model, batch)
    common = sam_gap(steps, params, rho=settings.common_rho)
    out["loss"] = common["loss"]
    out["sam_gap_common_rho"] = common["sharpness"]
    if training_rho:
        out["sam_gap_training_rho"] = (
            common["sharpness"]
            if training_rho == settings.common_rho
            else sam_gap(steps, params, rho=training_rho)["sharpness"]
        )
    if settings.trace_samples:
        trace = measures.hessian_trace(steps, params, samples=settings.trace_samples, seed=seeds[0])
        out["hessian_trace"], out["hessian_trace_se"] = trace["trace"], trace["std_error"]
        out["top_eigenvalue"] = measures.top_hessian_eigenvalue(
            steps, params, iters=settings.power_iters, tol=1e-3, seed=seeds[1]
        )["eigenvalue"]

    average = adaptive_average_sharpness(
        model_adaptive_steps(model, batch, normalize_logits=settings.normalize_logits),
        params,
        rho=settings.average_rho,
        samples=settings.average_samples,
        seed=seeds[2],
    )
    out["loss_normalized_logits"] = average["loss"]
    out["adaptive_average_sharpness"] = average["sharpness"]
    out["adaptive_average_sharpness_se"] = average["std_error"]

    # Batches of a seeded permutation: a split stored class by class (and the sorted
    # subsets of measure_flatness.training_batch) would otherwise give one-class batches.
    m = settings.worst_batch
    order = np.random.default_rng(seeds[4]).permutation(n)
    worst = []
    for b in range(n // m):
        rows = jnp.asarray(np.sort(order[b * m : (b + 1) * m]))
        sub = (fixed, images[rows], labels[rows])
        run = model_adaptive_steps(
            model, sub, norm=settings.worst_norm, normalize_logits=settings.normalize_logits
        )
        worst.append(
            adaptive_worst_sharpness(
                run,
                params,
                rho=settings.worst_rho,
                steps=settings.worst_steps,
                norm=settings.worst_norm,
            )["sharpness"]
        )
    out["adaptive_worst_sharpness"] = float(np.mean(worst))
    out["adaptive_worst_sharpness_se"] = (
        float(np.std(worst, ddof=1) / math.sqrt(len(worst))) if len(worst) > 1 else math.nan
    )
    out["worst_batches"] = float(len(worst))

    head = params["head"]
    relative = relative_flatness(
        linear_head_loss(embedding, labels, head.get("bias")),
        head["kernel"],
        samples=settings.relative_flatness_samples,
        seed=seeds[3],
        exact_max=settings.relative_flatness_exact_max,
    )
    out["relative_flatness"] = relative["relative_flatness"]
    out["relative_flatness_se"] = relative["std_error"]

    out.update(weight_norms(params))
    heldout = _features_in_batches(feature_fn, dict(variables), heldout_images)
    out["cdnv"] = cdnv(heldout, heldout_labels)
    out["effective_rank"] = effective_rank(heldout)
    out["effective_rank_centered"] = effective_rank(heldout, center=True)
    out["seconds"] = time.perf_counter() - start
    return out


def measure_split_backbone(
    model,
    variables: Mapping,
    train_split,
    heldout_split,
    *,
    examples: int = 512,
    heldout_examples: int = 512,
    training_rho: float | None = None,
    settings: SharpnessSettings | None = None,
) -> dict[str, float]:
    """:func:`measure_backbone` on seeded subsets of two ``sources.SplitData``.

    ``train_split`` is the split the backbone's head classifies (its domain's "train");
    ``heldout_split`` holds source classes it never trained on (the domain's "valid").
    Both subsets come from ``measure_flatness.training_batch`` with ``settings.seed``, so
    every backbone of a domain is scored on the same images, the same ones as the
    Hessian measures of ``measure_flatness.measure_entry`` when ``examples`` and the
    seed agree.
    """
    settings = settings or SharpnessSettings()
    num_classes = _head_of(variables)["kernel"].shape[-1]
    if num_classes != train_split.num_classes:
        raise ValueError(
            f"the head has {num_classes} classes but {train_split.source}/{train_split.split} "
            f"has {train_split.num_classes}: pass the training split the backbone was trained on"
        )
    images, labels, _ = zoo_flatness.training_batch(train_split, examples, settings.seed)
    held_images, held_labels, _ = zoo_flatness.training_batch(
        heldout_split, heldout_examples, settings.seed
    )
    result = measure_backbone(
        model,
        variables,
        images,
        labels,
        heldout_images=held_images,
        heldout_labels=held_labels,
        training_rho=training_rho,
        settings=settings,
    )
    result["heldout_examples"] = float(len(held_labels))
    return result
