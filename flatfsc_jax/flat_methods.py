"""Flat methods by name: settings, dispatcher, step accounting and weight averaging.

:class:`FlatMethod` holds one method's settings (``config.flat.*``), and
:func:`make_flat_gradient` turns them into one pure, jit-able gradient function over
the per-method functions of :mod:`flatfsc_jax.flat_optimizers` (whose docstring lists
the methods, their costs and how BatchNorm is handled). :func:`init_state`,
:func:`gradient_evaluations` and :func:`takes_sam_step` are the host-side companions a
training loop needs; :func:`init_average` / :func:`update_average` are EMA/SWA of the
weights after the optimiser step. docs/flat_methods.md has the table and the numbers.

**The one-line swap.** A ``sam_update`` user replaces that call by :func:`flat_update`
(and creates the method's state once)::

    flat = flat_methods.FlatMethod(method="msam", rho=0.5)
    flat_gradient = flat_methods.make_flat_gradient(flat)
    flat_state = flat_methods.init_state(flat, params)
    ...
    # was: params, opt_state, aux, diag = sam.sam_update(
    #          loss_fn, params, opt_state, batch, tx, rho=rho)
    params, opt_state, flat_state, aux, diag = flat_methods.flat_update(
        flat_gradient, loss_fn, params, opt_state, flat_state, batch, tx, step
    )

A ``sam_gradient`` user replaces the gradient call; the optimiser, the loss and the
rest of the step stay as they are::

    flat = flat_methods.FlatMethod(method="looksam", rho=0.05, k=5)
    flat_gradient = flat_methods.make_flat_gradient(flat)
    flat_state = flat_methods.init_state(flat, params)        # once, before training
    ...
    # was: grads, aux, diag = sam.sam_gradient(loss_fn, params, batch, rho=0.05)
    grads, aux, diag, flat_state = flat_gradient(loss_fn, params, batch, flat_state, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

``step`` is the index of the step being taken (0 for the first), a Python int or a
traced int32; ``flat_gradient`` is pure and jit-able (bind nothing: ``settings`` is
closed over, so it is static). The per-method functions (``looksam_gradient``, ...) are
the same algorithms with plain keyword arguments, for users who want no settings object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree_utils as otu

from flatfsc_jax import sam
from flatfsc_jax.checks import check_int, check_number, is_real
from flatfsc_jax.flat_optimizers import (
    AVERAGES,
    HPARAM_KEYS,
    METHODS,
    FlatDiagnostics,
    LossFn,
    _check_step,
    _erm,
    every_k_gradient,
    gsam_gradient,
    looksam_gradient,
    looksam_init,
    momentum_sam_gradient,
    momentum_sam_init,
    rwp_gradient,
    sam_late_gradient,
)
from flatfsc_jax.flat_optimizers import (
    SWITCHING_METHODS as SWITCHING_METHODS,  # re-exported: the loop picks programs by it
)


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
