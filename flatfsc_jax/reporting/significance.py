"""Significance helpers of the flatness study: Holm's correction and tau's null spread.

``min_detectable_tau(n)`` is what a study of ``n`` backbones can detect at all, so a
null result can be stated as "not detectable above |tau| = x".
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, same shape and order as ``pvalues``.

    Sorted ascending, p_(k) is multiplied by (m - k + 1), made non-decreasing by a running
    maximum and clipped at 1; reject where adjusted <= alpha controls the family-wise
    error at alpha under any dependence. NaN entries (undefined tests) stay NaN and are
    not counted in the family size m.
    """
    p = np.asarray(pvalues, np.float64)
    flat = p.ravel()
    ok = np.flatnonzero(~np.isnan(flat))
    if np.any((flat[ok] < 0) | (flat[ok] > 1)):
        raise ValueError("pvalues must lie in [0, 1]")
    out = np.full(flat.shape, np.nan)
    order = ok[np.argsort(flat[ok], kind="stable")]
    m = len(order)
    adj = np.maximum.accumulate(flat[order] * np.arange(m, 0, -1))
    out[order] = np.minimum(adj, 1.0)
    return out.reshape(p.shape)


def tau_null_sd(n: int) -> float:
    """Standard deviation of Kendall's tau under independence, no ties:
    sqrt(2(2n + 5) / (9n(n - 1)))."""
    if n < 2:
        raise ValueError(f"n must be >= 2 backbones; got {n}")
    return math.sqrt(2.0 * (2 * n + 5) / (9.0 * n * (n - 1)))


def min_detectable_tau(n: int, alpha: float = 0.05) -> float:
    """Smallest |tau| significant at two-sided level ``alpha`` with n backbones (normal
    approximation to tau's null distribution): z_{1-alpha/2} * tau_null_sd(n). A
    population of n cannot tell an effect smaller than this from none."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    return float(stats.norm.ppf(1 - alpha / 2) * tau_null_sd(n))
