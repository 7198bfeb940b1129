"""Rank statistics for "does a measure predict transfer?" over a population of backbones.

The statistics the flatness-vs-generalisation literature uses, as pure NumPy/SciPy
functions of per-backbone arrays (one entry per backbone, all in the same order):

- :func:`kendall_tau`: Kendall tau_b with a bootstrap CI over backbones and a permutation
  p-value (Jiang et al., ICLR 2020, use tau as the headline statistic).
- :func:`granulated_tau`: Jiang et al.'s granulated tau, per factor axis and its mean Psi.
- :func:`partial_tau`: Kendall's partial tau given a covariate (source accuracy), with a
  bootstrap CI and a permutation p-value that keeps the covariate's relation to x.
- :func:`group_taus`: tau within each group (optimiser) and across group means, to show
  when the group label alone carries the correlation (Simpson's paradox).
- :func:`sign_error`: Dziugaite et al.'s (NeurIPS 2020) sign-error over one-factor pairs
  and its worst case over factor axes.
- :func:`correlation_table` (Holm and the detectable tau: ``significance.py``), which puts
  them together as plain rows for markdown or CSV.

Why one module: every statistic here is built on the same tau_b kernel, input checks
and resampling helpers, and the study driver needs them together for one table.

Conventions: NaN means "undefined for these data" (a cell or group where one side is
constant); bad input (wrong length, NaN, a constant vector where a correlation is asked
for) raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from flatfsc_jax.reporting.significance import holm

# Largest (resamples x pairs) block evaluated at once, to bound memory for large n.
_MAX_BLOCK = 4_000_000


def _vector(name: str, a, n: int | None = None, *, constant_ok: bool = False) -> np.ndarray:
    """``a`` as a finite 1-D float64 array of length ``n``, or a ValueError naming it."""
    v = np.asarray(a, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per backbone); got shape {v.shape}")
    if n is not None and len(v) != n:
        raise ValueError(
            f"{name} has {len(v)} entries but the other inputs have {n}: "
            "give one value per backbone, in the same order"
        )
    bad = np.flatnonzero(~np.isfinite(v))
    if len(bad):
        raise ValueError(
            f"{name} has {len(bad)} non-finite entries (backbones {bad[:10].tolist()}): "
            "drop those backbones from every input, or fill them, before correlating"
        )
    if not constant_ok and len(v) and np.all(v == v[0]):
        raise ValueError(f"{name} is constant: a rank correlation with it is undefined")
    return v


def _labels(name: str, a, n: int) -> np.ndarray:
    """A length-``n`` 1-D array of hashable labels (factor levels, group names)."""
    v = np.asarray(a)
    if v.ndim != 1 or len(v) != n:
        raise ValueError(f"{name} must hold one label per backbone ({n}); got shape {v.shape}")
    return v


def _axes(axes, fac: Mapping) -> list[str]:
    """The factor axes to report: all by default; the rest only define cells or pairs."""
    if axes is None:
        return list(fac)
    unknown = [a for a in axes if a not in fac]
    if unknown or not axes:
        raise ValueError(f"axes must name keys of factors {list(fac)}; got {list(axes)}")
    return list(axes)


def _factors(factors: Mapping[str, Sequence], n: int) -> dict[str, np.ndarray]:
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError(
            "factors must be a non-empty dict {axis name: level of each backbone}, "
            "e.g. {'optimiser': [...], 'lr': [...]}"
        )
    return {k: _labels(f"factors[{k!r}]", v, n) for k, v in factors.items()}


def tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall tau_b along the last axis (broadcasting over leading axes), ties included.

    Counted from all pairs: tau_b = sum sgn(dx) sgn(dy) / sqrt(#pairs untied in x *
    #pairs untied in y), the same quantity as ``scipy.stats.kendalltau``; NaN where x or y
    is constant. O(n^2) per row, but one vectorised pass over thousands of resamples,
    which scipy's one-call-per-resample would not be.
    """
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    n = x.shape[-1]
    i, j = np.triu_indices(n, 1)
    lead = x.shape[:-1]
    x2, y2 = x.reshape(-1, n), y.reshape(-1, n)
    rows = max(1, _MAX_BLOCK // max(1, len(i)))
    out = np.empty(x2.shape[0])
    for s in range(0, x2.shape[0], rows):
        sx = np.sign(x2[s : s + rows, j] - x2[s : s + rows, i])
        sy = np.sign(y2[s : s + rows, j] - y2[s : s + rows, i])
        den = np.sqrt(np.abs(sx).sum(-1) * np.abs(sy).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s : s + rows] = np.where(den > 0, (sx * sy).sum(-1) / den, np.nan)
    return out.reshape(lead)


def _bootstrap_ci(data, statistic, n_boot, confidence_level, method, rng):
    """Paired bootstrap CI over backbones (scipy), NaN bounds when undefined."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        # A resample where one input is constant (tiny n) has no tau, and a statistic equal
        # on every jackknife sample has no BCa acceleration: NaN bounds say so.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        ci = stats.bootstrap(
            data,
            statistic,
            n_resamples=n_boot,
            paired=True,
            vectorized=True,
            confidence_level=confidence_level,
            method=method,
            rng=rng,
        ).confidence_interval
    return float(ci.low), float(ci.high)


def kendall_tau(
    x,
    y,
    *,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    confidence_level: float = 0.95,
    ci_method: str = "BCa",
) -> dict:
    """Kendall tau_b of ``x`` and ``y`` with a bootstrap CI and a permutation p-value.

    - CI: backbones are resampled in (x, y) pairs ``n_boot`` times (``scipy.stats.
      bootstrap``, paired). The default is BCa, because tau's sampling distribution is
      bounded by +-1 and skewed when |tau| is large, and the percentile interval corrects
      neither the median bias nor that skew (BCa is second-order accurate; it costs n
      jackknife evaluations more). ``ci_method="percentile"`` is there for comparison.
      NaN bounds when some resample has no tau (x or y constant in it: tiny n).
    - p: two-sided permutation test of independence (``scipy.stats.permutation_test``
      permuting x against y); exact enumeration of all n! orderings when n! <=
      ``n_perm`` (n <= 6 at the default), else ``n_perm`` random ones with the observed
      ordering counted, (b + 1) / (n_perm + 1). ``p_asymptotic`` is scipy's normal
      approximation (tie-corrected variance), kept as a cross-check.

    The same ``seed`` gives the same resampled backbones for every call, so intervals of
    different measures on one population are drawn from common resamples.
    """
    x = _vector("x", x)
    y = _vector("y", y, len(x))
    n = len(x)
    if n < 3:
        raise ValueError(f"x and y need at least 3 backbones for a tau with a CI; got {n}")
    tau = float(tau_b(x, y))
    rng = np.random.default_rng(seed)

    def stat(a, b, axis=-1):
        return tau_b(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1))

    low, high = _bootstrap_ci((x, y), stat, n_boot, confidence_level, ci_method, rng)
    perm = stats.permutation_test(
        (x,),
        lambda a, axis=-1: tau_b(np.moveaxis(a, axis, -1), y),
        permutation_type="pairings",
        vectorized=True,
        n_resamples=n_perm,
        alternative="two-sided",
        rng=rng,
    )
    return {
        "tau": tau,
        "ci_low": low,
        "ci_high": high,
        "p": float(perm.pvalue),
        "p_exact": math.factorial(n) <= n_perm,
        "p_asymptotic": float(stats.kendalltau(x, y).pvalue),
        "n": n,
    }


def granulated_tau(
    measure, outcome, factors: Mapping[str, Sequence], *, axes: Sequence[str] | None = None
) -> dict:
    """Jiang et al.'s granulated Kendall tau: per axis psi_a and their mean Psi.

    For each factor axis a, backbones are grouped into cells sharing every *other*
    factor's level; psi_a is the mean over cells of tau_b(measure, outcome) within the
    cell, where only a varies. A cell counts only if it holds >= 2 distinct levels of a
    (a single backbone, or seed replicates of one configuration, carry no information
    about a) and tau is defined there (neither side constant); the others are counted as
    skipped. Seed replicates inside a cell are all kept (their within-level pairs add the
    seed noise to the cell's tau); average them beforehand for one point per
    configuration, or give the seed as a factor and leave it out of ``axes`` to compare
    only backbones of the same seed.

    ``axes`` (default: every factor) are the axes reported; Psi is the mean of psi_a over
    those with at least one usable cell (NaN if none).
    """
    m = _vector("measure", measure)
    o = _vector("outcome", outcome, len(m))
    fac = _factors(factors, len(m))
    per_axis = {}
    for axis in _axes(axes, fac):
        levels = fac[axis]
        others = [fac[k] for k in fac if k != axis]
        keys = list(zip(*others, strict=True)) if others else [()] * len(m)
        cells: dict = {}
        for idx, key in enumerate(keys):
            cells.setdefault(key, []).append(idx)
        taus, skipped = [], 0
        for members in cells.values():
            members = np.asarray(members)
            t = tau_b(m[members], o[members]) if len(members) >= 2 else np.nan
            if len(set(levels[members].tolist())) < 2 or np.isnan(t):
                skipped += 1
            else:
                taus.append(float(t))
        per_axis[axis] = {
            "psi": float(np.mean(taus)) if taus else math.nan,
            "cells_used": len(taus),
            "cells_skipped": skipped,
        }
    usable = [a["psi"] for a in per_axis.values() if a["cells_used"]]
    return {"psi": float(np.mean(usable)) if usable else math.nan, "axes": per_axis}


def _stratified_orders(strata: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """``n_perm`` random orderings of range(n), each permuting indices only within strata."""
    n = len(strata)
    orders = np.tile(np.arange(n), (n_perm, 1))
    for level in np.unique(strata):
        members = np.flatnonzero(strata == level)
        if len(members) > 1:
            orders[:, members] = rng.permuted(np.tile(members, (n_perm, 1)), axis=1)
    return orders


def _partial(t_xy, t_xz, t_yz):
    den = np.sqrt((1.0 - t_xz**2) * (1.0 - t_yz**2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (t_xy - t_xz * t_yz) / den, np.nan)


def partial_tau(
    x,
    y,
    z,
    *,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
    strata=None,
    block_size: int = 2,
    confidence_level: float = 0.95,
) -> dict:
    """Kendall's partial tau of x and y given z, with a bootstrap CI and a conditional
    permutation p-value.

    tau_xy.z = (t_xy - t_xz t_yz) / sqrt((1 - t_xz^2)(1 - t_yz^2)), each t a tau_b.
    NaN when |t_xz| or |t_yz| is 1 (x or y is a monotone function of z: nothing is left).

    CI: BCa over backbones resampled as (x, y, z) triples, as in :func:`kendall_tau`; NaN
    bounds when some resample makes x or y a monotone function of z, which happens once
    |t_xz| or |t_yz| is close to 1 (then the partial tau itself is unstable).

    p: the null is "x and y are unrelated once z is known", so the permutations must keep
    x's relation to z (a free permutation would break it too and test plain
    independence). x is permuted only within strata of z: the given ``strata`` labels
    (the levels of a discrete covariate, where the test is exact), or else consecutive
    blocks of ``block_size`` backbones in the order of z, for a continuous covariate such
    as source accuracy. The default 2 swaps only backbones adjacent in z: larger blocks
    leave more permutations but scramble more of the x-z relation, which makes the test
    liberal when x closely follows z. p is two-sided on |tau_xy.z|, (b + 1) / (n_perm + 1).
    """
    x = _vector("x", x)
    y = _vector("y", y, len(x))
    z = _vector("z (covariate)", z, len(x))
    n = len(x)
    if n < 3:
        raise ValueError(f"x, y and z need at least 3 backbones; got {n}")
    if strata is None:
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2 to permute anything; got {block_size}")
        strata = np.empty(n, dtype=np.int64)
        strata[np.argsort(z, kind="stable")] = np.arange(n) // block_size
    else:
        strata = _labels("strata", strata, n)
    t_xy, t_xz, t_yz = (float(tau_b(a, b)) for a, b in ((x, y), (x, z), (y, z)))
    value = float(_partial(t_xy, t_xz, t_yz))
    rng = np.random.default_rng(seed)
    low = high = p = math.nan
    if not math.isnan(value):

        def stat(a, b, c, axis=-1):
            a, b, c = (np.moveaxis(v, axis, -1) for v in (a, b, c))
            return _partial(tau_b(a, b), tau_b(a, c), tau_b(b, c))

        low, high = _bootstrap_ci((x, y, z), stat, n_boot, confidence_level, "BCa", rng)
        xp = x[_stratified_orders(strata, n_perm, rng)]
        null = _partial(tau_b(xp, y), tau_b(xp, z), t_yz)
        hits = np.sum(np.abs(null) >= abs(value) * (1 - 1e-12))  # ties of float noise count
        p = float((hits + 1) / (n_perm + 1))
    return {
        "tau_partial": value,
        "ci_low": low,
        "ci_high": high,
        "p": p,
        "tau_xy": t_xy,
        "tau_xz": t_xz,
        "tau_yz": t_yz,
        "n": n,
    }


def group_taus(x, y, groups, *, n_perm: int = 2000, seed: int = 0) -> dict:
    """tau within each group, pooled within groups, and across group means.

    - ``within``: {group: {"tau", "n"}} (tau NaN when x or y is constant in the group).
    - ``pooled_within``: tau_b from within-group pairs only (sum over groups of
      sgn dx sgn dy, over sqrt of the untied-pair counts), so pairs of backbones from
      different groups never vote; its p permutes x within groups, keeping every group's
      values. A strong overall tau with a null ``pooled_within`` says the group label,
      not the measure, carries the correlation.
    - ``across``: tau_b of the group means of x and y (one point per group; with a handful
      of groups it is descriptive only, hence no p).
    """
    x = _vector("x", x)
    y = _vector("y", y, len(x))
    g = _labels("groups", groups, len(x))
    levels = list(dict.fromkeys(g.tolist()))
    within = {}
    for level in levels:
        k = g == level
        t = tau_b(x[k], y[k]) if k.sum() >= 2 else np.nan
        within[level] = {"tau": float(t), "n": int(k.sum())}
    i, j = np.triu_indices(len(x), 1)
    same = g[i] == g[j]
    i, j = i[same], j[same]

    def pooled(xs):
        sx = np.sign(xs[..., j] - xs[..., i])
        sy = np.sign(y[j] - y[i])
        den = np.sqrt(np.abs(sx).sum(-1) * np.abs(sy).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (sx * sy).sum(-1) / den, np.nan)

    t_pool = float(pooled(x))
    p = math.nan
    if not math.isnan(t_pool):
        orders = _stratified_orders(g, n_perm, np.random.default_rng(seed))
        null = pooled(x[orders])
        p = float((np.sum(np.abs(null) >= abs(t_pool) * (1 - 1e-12)) + 1) / (n_perm + 1))
    mx = np.array([x[g == level].mean() for level in levels])
    my = np.array([y[g == level].mean() for level in levels])
    return {
        "within": within,
        "pooled_within": {"tau": t_pool, "p": p, "pairs": int(len(i))},
        "across": {"tau": float(tau_b(mx, my)) if len(levels) >= 2 else math.nan},
        "group_means": {lv: (float(a), float(b)) for lv, a, b in zip(levels, mx, my, strict=True)},
    }


def sign_error(
    measure,
    outcome,
    factors: Mapping[str, Sequence],
    *,
    direction: int,
    axes: Sequence[str] | None = None,
    outcome_se=None,
    episode_outcomes=None,
    z: float = float(stats.norm.ppf(0.975)),
    min_pairs: int = 3,
) -> dict:
    """Dziugaite et al.'s sign-error over pairs of backbones that differ in one factor.

    A pair (i, j) counts for axis a when their levels differ on a and agree on every other
    factor. Its error is (1 - sgn(direction * dm) * sgn(do)) / 2: 0 when the measure
    orders the pair as the outcome does, 1 when it reverses it, 1/2 on a tie in the
    measure. ``direction`` is +1 if a larger measure should mean a larger outcome, -1 if a
    smaller one should (sharpness against accuracy); it is required because the
    answer flips with it.

    Pairs whose outcome difference is within its 95% CI, |do| <= z * se(do), are dropped
    as noise. se(do) comes from either
    - ``episode_outcomes`` (backbones x episodes, the same episodes for every backbone):
      the paired standard error std(a_i - a_j) / sqrt(episodes), which removes the
      episode difficulty both backbones share; ``outcome`` must be its row mean; or
    - ``outcome_se`` (one standard error per backbone): sqrt(se_i^2 + se_j^2), which
      treats the two estimates as independent and so is conservative (drops more pairs)
      when they were measured on shared episodes.

    ``axes`` (default: every factor) are the axes reported; a factor left out (the seed)
    still has to agree within a pair, which couples the two backbones as Dziugaite et
    al. do. Returns the mean error over all kept pairs, per axis, and ``robust`` = the worst
    (max) axis among axes with at least ``min_pairs`` kept pairs (Dziugaite's robust
    summary over environments; NaN if no axis has that many).
    """
    m = _vector("measure", measure)
    o = _vector("outcome", outcome, len(m))
    fac = _factors(factors, len(m))
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1; got {direction!r}")
    if (outcome_se is None) == (episode_outcomes is None):
        raise ValueError("give exactly one of outcome_se (per backbone) or episode_outcomes")
    if episode_outcomes is not None:
        ep = np.asarray(episode_outcomes, np.float64)
        if ep.ndim != 2 or ep.shape[0] != len(m) or ep.shape[1] < 2:
            raise ValueError(
                f"episode_outcomes must be (backbones={len(m)}, episodes>=2); got {ep.shape}"
            )
        if not np.all(np.isfinite(ep)):
            raise ValueError("episode_outcomes has non-finite entries")
        if not np.allclose(ep.mean(1), o, rtol=1e-6, atol=1e-9):
            raise ValueError("outcome must be the row mean of episode_outcomes (same units)")

        def pair_se(i, j):
            return float(np.std(ep[i] - ep[j], ddof=1) / math.sqrt(ep.shape[1]))
    else:
        se = _vector("outcome_se", outcome_se, len(m), constant_ok=True)
        if np.any(se < 0):
            raise ValueError("outcome_se must be >= 0 (standard errors)")

        def pair_se(i, j):
            return float(math.hypot(se[i], se[j]))

    per_axis = {a: {"errors": [], "pairs": 0, "dropped": 0} for a in _axes(axes, fac)}
    for i, j in itertools.combinations(range(len(m)), 2):
        differ = [a for a in fac if fac[a][i] != fac[a][j]]
        if len(differ) != 1 or differ[0] not in per_axis:
            continue
        rec = per_axis[differ[0]]
        rec["pairs"] += 1
        do = o[j] - o[i]
        if abs(do) <= z * pair_se(i, j):
            rec["dropped"] += 1
            continue
        rec["errors"].append((1.0 - np.sign(direction * (m[j] - m[i])) * np.sign(do)) / 2.0)
    axes = {}
    for a, rec in per_axis.items():
        kept = len(rec["errors"])
        axes[a] = {
            "error": float(np.mean(rec["errors"])) if kept else math.nan,
            "pairs": rec["pairs"],
            "kept": kept,
            "dropped": rec["dropped"],
        }
    every = [e for rec in per_axis.values() for e in rec["errors"]]
    meaningful = [v["error"] for v in axes.values() if v["kept"] >= min_pairs]
    return {
        "error": float(np.mean(every)) if every else math.nan,
        "robust": float(max(meaningful)) if meaningful else math.nan,
        "kept": len(every),
        "axes": axes,
    }


def correlation_table(
    measures: Mapping[str, Sequence],
    outcomes: Mapping[str, Sequence],
    *,
    factors: Mapping[str, Sequence] | None = None,
    axes: Sequence[str] | None = None,
    covariate=None,
    groups=None,
    outcome_se: Mapping[str, Sequence] | None = None,
    episode_outcomes: Mapping[str, Sequence] | None = None,
    directions: Mapping[str, int] | None = None,
    n_boot: int = 2000,
    n_perm: int = 2000,
    seed: int = 0,
) -> list[dict]:
    """One row per (measure, outcome) of plain floats and strings, for markdown or CSV.

    ``measures`` / ``outcomes``: {name: value per backbone}. Every row has tau_b with its
    CI and permutation p (:func:`kendall_tau`) and ``p_holm``, Holm over the whole family
    of measures x outcomes. Optional columns (NaN in every row without their inputs):
    - ``covariate``: partial tau given it, its CI and p (:func:`partial_tau`);
    - ``groups`` (optimiser of each backbone): pooled within-group tau and its p, and the
      tau across group means (:func:`group_taus`);
    - ``factors``: granulated ``psi`` (:func:`granulated_tau`), and with ``directions``
      {measure: +1/-1} and either ``episode_outcomes`` {outcome: backbones x episodes}
      (preferred: paired SEs) or ``outcome_se`` {outcome: SE per backbone}, the
      sign-error and its worst axis (:func:`sign_error`); ``axes`` as there.
    Every row uses the same ``seed``, so the bootstrap resamples the same backbones for
    every measure.
    """
    if not measures or not outcomes:
        raise ValueError("measures and outcomes must be non-empty dicts {name: per-backbone}")
    n = len(next(iter(measures.values())))
    ms = {k: _vector(f"measures[{k!r}]", v, n) for k, v in measures.items()}
    os_ = {k: _vector(f"outcomes[{k!r}]", v, n) for k, v in outcomes.items()}
    z = None if covariate is None else _vector("covariate", covariate, n)
    g = None if groups is None else _labels("groups", groups, n)
    fac = None if factors is None else _factors(factors, n)
    noise = episode_outcomes if episode_outcomes is not None else outcome_se
    if outcome_se is not None and episode_outcomes is not None:
        raise ValueError("give at most one of outcome_se or episode_outcomes")
    if noise is not None:
        if fac is None or directions is None:
            raise ValueError("sign-error needs factors and directions as well as outcome noise")
        missing = [k for k in ms if k not in directions] + [k for k in os_ if k not in noise]
        if missing:
            raise ValueError(f"directions / outcome_se / episode_outcomes lack {missing}")
    rows = []
    for (mname, m), (oname, o) in itertools.product(ms.items(), os_.items()):
        t = kendall_tau(m, o, n_boot=n_boot, n_perm=n_perm, seed=seed)
        row = {"measure": mname, "outcome": oname, "n": t["n"]}
        row.update({k: t[k] for k in ("tau", "ci_low", "ci_high", "p")})
        row["p_holm"] = math.nan
        row.update(dict.fromkeys(_OPTIONAL_COLUMNS, math.nan))
        if z is not None:
            pt = partial_tau(m, o, z, n_boot=n_boot, n_perm=n_perm, seed=seed)
            row["tau_partial"], row["p_partial"] = pt["tau_partial"], pt["p"]
            row["partial_ci_low"], row["partial_ci_high"] = pt["ci_low"], pt["ci_high"]
        if g is not None:
            gt = group_taus(m, o, g, n_perm=n_perm, seed=seed)
            row["tau_within"], row["p_within"] = (gt["pooled_within"][k] for k in ("tau", "p"))
            row["tau_across"] = gt["across"]["tau"]
        if fac is not None:
            row["psi"] = granulated_tau(m, o, fac, axes=axes)["psi"]
        if noise is not None:
            key = "episode_outcomes" if episode_outcomes is not None else "outcome_se"
            se = sign_error(
                m, o, fac, direction=directions[mname], axes=axes, **{key: noise[oname]}
            )
            row["sign_error"], row["sign_error_robust"] = se["error"], se["robust"]
        rows.append(row)
    for row, adj in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = float(adj)
    return rows


# Columns of correlation_table that need optional inputs; NaN without them.
_OPTIONAL_COLUMNS = (
    "tau_partial partial_ci_low partial_ci_high p_partial tau_within p_within tau_across psi "
    "sign_error sign_error_robust"
).split()


def to_markdown(rows: Sequence[Mapping], digits: int = 2) -> str:
    """A markdown table of :func:`correlation_table` rows ('-' for NaN)."""
    cols = [
        ("measure", "measure"),
        ("outcome", "outcome"),
        ("tau", "tau_b"),
        (("ci_low", "ci_high"), "95% CI"),
        ("p", "p"),
        ("p_holm", "p (Holm)"),
        ("tau_partial", "partial tau"),
        (("partial_ci_low", "partial_ci_high"), "95% CI"),
        ("p_partial", "p (partial)"),
        ("tau_within", "tau within groups"),
        ("tau_across", "tau across groups"),
        ("psi", "Psi"),
        ("sign_error", "sign-error"),
        ("sign_error_robust", "sign-error (worst axis)"),
    ]

    def fmt(row, key):
        if isinstance(key, tuple):
            lo, hi = row[key[0]], row[key[1]]
            return "-" if math.isnan(lo) else f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"
        v = row[key]
        if isinstance(v, str):
            return v
        if math.isnan(v):
            return "-"
        return f"{v:.3f}" if key.startswith("p_") or key == "p" else f"{v:+.{digits}f}"

    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|---|---|" + "---:|" * (len(cols) - 2)]
    lines += ["| " + " | ".join(fmt(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"
