"""flatfsc_jax.reporting.correlation against independent references: scipy.stats, plain-
Python pair counts and loops, hand-computed values on a tiny factorial design, and
statsmodels' Holm formula transcribed."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from flatfsc_jax.reporting import correlation as corr
from flatfsc_jax.reporting import significance


def brute_tau_b(x, y):
    """tau_b by counting pairs, as in Kendall (1945)."""
    conc = disc = tie_x_only = tie_y_only = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = x[j] - x[i], y[j] - y[i]
        if dx == 0 and dy == 0:
            continue
        if dx == 0:
            tie_x_only += 1
        elif dy == 0:
            tie_y_only += 1
        elif (dx > 0) == (dy > 0):
            conc += 1
        else:
            disc += 1
    return (conc - disc) / math.sqrt((conc + disc + tie_y_only) * (conc + disc + tie_x_only))


def correlated(n, rho, seed, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = rho * x + math.sqrt(1 - rho**2) * rng.normal(size=n)
    if ties:
        x, y = np.round(x * 2) / 2, np.round(y * 2) / 2
    return x, y


@pytest.mark.parametrize("ties", [False, True])
def test_tau_b_matches_scipy_and_pair_count(ties):
    for seed in range(5):
        x, y = correlated(17, 0.5, seed, ties=ties)
        want = stats.kendalltau(x, y).statistic
        assert corr.tau_b(x, y) == pytest.approx(want, abs=1e-12)
        assert corr.tau_b(x, y) == pytest.approx(brute_tau_b(x, y), abs=1e-12)
    # batched over leading axes: each row is its own tau
    xs = np.stack([correlated(9, 0.3, s, ties=True)[0] for s in range(4)])
    ys = np.stack([correlated(9, 0.3, s, ties=True)[1] for s in range(4)])
    np.testing.assert_allclose(
        corr.tau_b(xs, ys), [brute_tau_b(a, b) for a, b in zip(xs, ys, strict=True)], atol=1e-12
    )
    assert np.isnan(corr.tau_b([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_kendall_tau_permutation_p_agrees_with_scipy_and_ci_holds_tau():
    x, y = correlated(30, 0.3, seed=1, ties=True)
    r = corr.kendall_tau(x, y, n_boot=1000, n_perm=4000, seed=0)
    ref = stats.kendalltau(x, y)
    assert r["tau"] == pytest.approx(ref.statistic, abs=1e-12)
    assert r["p_asymptotic"] == pytest.approx(ref.pvalue)
    # Monte Carlo SE of p at 4000 permutations is < 0.01; the asymptotic p differs a little.
    assert 0.01 < ref.pvalue < 0.5
    assert r["p"] == pytest.approx(ref.pvalue, abs=0.03)
    assert not r["p_exact"]
    for method in ("BCa", "percentile"):
        ci = corr.kendall_tau(x, y, n_boot=1000, n_perm=100, ci_method=method)
        assert -1 <= ci["ci_low"] < r["tau"] < ci["ci_high"] <= 1
    # seeded: the same call gives the same numbers
    assert corr.kendall_tau(x, y, n_boot=1000, n_perm=4000, seed=0) == r


def test_kendall_tau_exact_permutation_for_tiny_n():
    x, y = np.array([1.0, 2, 3, 4, 5]), np.array([2.0, 1, 4, 3, 5])
    r = corr.kendall_tau(x, y, n_boot=200, n_perm=2000)
    assert r["p_exact"]
    # enumerate all 5! orderings of x by hand
    obs = abs(brute_tau_b(x, y))
    perms = list(itertools.permutations(x))
    hits = sum(abs(brute_tau_b(np.array(p), y)) >= obs - 1e-12 for p in perms)
    # scipy doubles the smaller one-sided p; tau's null here is symmetric, so they agree
    assert r["p"] == pytest.approx(hits / len(perms))
    assert r["p"] == pytest.approx(stats.kendalltau(x, y, method="exact").pvalue)


def test_permutation_p_is_uniform_under_the_null():
    ps = []
    for seed in range(150):
        x, y = correlated(12, 0.0, seed)
        ps.append(corr.kendall_tau(x, y, n_boot=10, n_perm=199, seed=seed)["p"])
    ps = np.array(ps)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert np.mean(ps <= 0.05) <= 0.1


def test_granulated_tau_by_hand():
    # axes a (0..3) and b (0, 1); backbone 6 is the only one at a=3.
    a = [0, 1, 2, 0, 1, 2, 3]
    b = [0, 0, 0, 1, 1, 1, 0]
    m = [1, 2, 3, 4, 6, 5, 0]
    o = [1, 3, 2, 4, 5, 4.5, 7]
    r = corr.granulated_tau(m, o, {"a": a, "b": b})
    # axis a, cell b=0 = backbones {0,1,2,6}: m (1,2,3,0), o (1,3,2,7): pairs 01 C, 02 C,
    # 06 D, 12 D, 16 D, 26 D -> (2-4)/6 = -1/3. Cell b=1 = {3,4,5}: m (4,6,5), o (4,5,4.5):
    # 34 C, 35 C, 45 C -> 1. psi_a = (-1/3 + 1)/2 = 1/3.
    assert r["axes"]["a"] == {"psi": pytest.approx(1 / 3), "cells_used": 2, "cells_skipped": 0}
    # axis b, cells a=0,1,2 are pairs (0,3), (1,4), (2,5), all concordant -> 1; a=3 has
    # one backbone and is skipped.
    assert r["axes"]["b"] == {"psi": pytest.approx(1.0), "cells_used": 3, "cells_skipped": 1}
    assert r["psi"] == pytest.approx((1 / 3 + 1) / 2)


def test_granulated_tau_skips_cells_without_the_axis_varying():
    # two seed replicates of one config form a cell where the axis does not vary
    r = corr.granulated_tau([1, 2, 3, 4], [1, 2, 4, 3], {"lr": [0, 0, 0, 1], "bs": [0, 0, 1, 1]})
    assert r["axes"]["lr"]["cells_used"] == 1 and r["axes"]["lr"]["cells_skipped"] == 1
    assert r["axes"]["lr"]["psi"] == pytest.approx(-1.0)  # cell bs=1: (3,4) vs (4,3)
    assert r["axes"]["bs"]["cells_used"] == 1  # cell lr=0: backbones 0,1,2
    assert r["axes"]["bs"]["psi"] == pytest.approx(1.0)


def test_seed_as_a_coupling_factor():
    # lr x seed: leaving "seed" out of axes compares only backbones of the same seed.
    lr = [0.1, 0.2, 0.1, 0.2]
    seed = [0, 0, 1, 1]
    m, o = [1.0, 2.0, 5.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    r = corr.granulated_tau(m, o, {"lr": lr, "seed": seed}, axes=["lr"])
    # cells seed=0: (1,2) vs (1,2) -> +1; seed=1: (5,3) vs (3,4) -> -1
    assert list(r["axes"]) == ["lr"] and r["psi"] == 0.0
    se = corr.sign_error(
        m, o, {"lr": lr, "seed": seed}, direction=1, axes=["lr"], outcome_se=[0.0] * 4
    )
    # pairs (0,1) and (2,3) only; (0,3) and (1,2) differ in seed as well
    assert se["axes"] == {"lr": {"error": 0.5, "pairs": 2, "kept": 2, "dropped": 0}}
    with pytest.raises(ValueError, match="axes"):
        corr.granulated_tau(m, o, {"lr": lr}, axes=["bs"])


def brute_partial(x, y, z):
    txy, txz, tyz = brute_tau_b(x, y), brute_tau_b(x, z), brute_tau_b(y, z)
    return (txy - txz * tyz) / math.sqrt((1 - txz**2) * (1 - tyz**2))


def test_partial_tau_formula_and_reduction():
    x, y = correlated(20, 0.6, seed=3)
    z = x + np.random.default_rng(4).normal(size=20)
    r = corr.partial_tau(x, y, z, n_boot=500, n_perm=200)
    assert r["tau_partial"] == pytest.approx(brute_partial(x, y, z), abs=1e-12)
    assert r["ci_low"] < r["tau_partial"] < r["ci_high"]
    assert r["tau_xz"] == pytest.approx(stats.kendalltau(x, z).statistic, abs=1e-12)
    # a covariate with tau 0 to both x and y leaves tau_xy unchanged; x = y = 0..7 and
    # z chosen by search (seeded) among orderings with t_xz = 0.
    xs = np.arange(8.0)
    rng = np.random.default_rng(0)
    while True:
        zs = rng.permutation(8).astype(float)
        if brute_tau_b(xs, zs) == 0:
            break
    ys = xs + 0.0
    r0 = corr.partial_tau(xs, ys, zs, n_boot=50, n_perm=50)
    assert r0["tau_xz"] == 0 and r0["tau_yz"] == 0
    assert r0["tau_partial"] == pytest.approx(1.0)
    # x monotone in z: nothing left to explain, NaN rather than a division by zero
    assert math.isnan(corr.partial_tau(x, y, 2 * x + 1, n_boot=10, n_perm=10)["tau_partial"])


def test_partial_tau_confounded_null_and_strata():
    # x and y both follow z and are otherwise independent: raw tau is large, the partial
    # tau's conditional permutation p is not small.
    ps, raw = [], []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        z = np.repeat(np.arange(6.0), 5)
        x, y = z + rng.normal(size=30), z + rng.normal(size=30)
        raw.append(stats.kendalltau(x, y).pvalue)
        ps.append(corr.partial_tau(x, y, z, strata=z, n_boot=10, n_perm=199, seed=seed)["p"])
    assert np.median(raw) < 0.01
    assert np.mean(np.array(ps) <= 0.05) <= 0.15 and np.median(ps) > 0.2
    # permuting x within levels of a discrete z leaves tau(x, z) unchanged exactly
    rng = np.random.default_rng(0)
    orders = corr._stratified_orders(z, 50, rng)
    for order in orders:
        assert sorted(z[order]) == sorted(z) and np.all(z[order] == z)
        assert brute_tau_b(x[order], z) == pytest.approx(brute_tau_b(x, z), abs=1e-12)
    # real conditional association is detected
    rng = np.random.default_rng(7)
    x = z + rng.normal(size=30)
    y = z + x + 0.3 * rng.normal(size=30)
    assert corr.partial_tau(x, y, z, strata=z, n_boot=10, n_perm=199)["p"] <= 0.01


def test_partial_tau_default_strata_swap_neighbours_in_z(monkeypatch):
    # a continuous covariate: x may only trade places with its neighbour in the order of z
    rng = np.random.default_rng(0)
    z = rng.normal(size=9)
    seen = {}

    def spy(strata, n_perm, rng):
        seen["strata"] = strata
        return orders_fn(strata, n_perm, rng)

    orders_fn = corr._stratified_orders
    monkeypatch.setattr(corr, "_stratified_orders", spy)
    corr.partial_tau(rng.normal(size=9), rng.normal(size=9), z, n_boot=10, n_perm=20)
    rank = np.argsort(np.argsort(z))
    np.testing.assert_array_equal(seen["strata"], rank // 2)


def test_group_taus_expose_simpsons_paradox():
    # within each optimiser the measure anti-correlates; the optimisers' means line up.
    g = np.repeat(["erm", "sam", "asam"], 4)
    offsets = np.repeat([0.0, 10.0, 20.0], 4)
    x = offsets + np.tile([0.0, 1, 2, 3], 3)
    y = offsets + np.tile([3.0, 2, 1, 0], 3)
    r = corr.group_taus(x, y, g, n_perm=199)
    overall = stats.kendalltau(x, y)
    assert overall.statistic > 0.4 and overall.pvalue < 0.05
    for name in ("erm", "sam", "asam"):
        k = g == name
        assert r["within"][name] == {"tau": stats.kendalltau(x[k], y[k]).statistic, "n": 4}
    assert r["within"]["erm"]["tau"] == -1.0
    assert r["across"]["tau"] == 1.0
    # pooled within: only the 3 * 6 within-group pairs vote, all discordant
    assert r["pooled_within"]["pairs"] == 18
    assert r["pooled_within"]["tau"] == -1.0
    assert r["pooled_within"]["p"] == pytest.approx(1 / 200, abs=0.02)


def loop_sign_error(m, o, fac, se, direction, z=1.959963984540054):
    per = {a: [] for a in fac}
    for i in range(len(m)):
        for j in range(i + 1, len(m)):
            diff = [a for a in fac if fac[a][i] != fac[a][j]]
            if len(diff) != 1:
                continue
            do = o[j] - o[i]
            if abs(do) <= z * math.sqrt(se[i] ** 2 + se[j] ** 2):
                continue
            dm = direction * (m[j] - m[i])
            if dm == 0:
                per[diff[0]].append(0.5)
            else:
                per[diff[0]].append(0.0 if (dm > 0) == (do > 0) else 1.0)
    return per


def test_sign_error_matches_plain_loop():
    rng = np.random.default_rng(5)
    grid = list(itertools.product([0, 1, 2], [0.1, 0.05], [32, 64], [0, 1]))
    fac = {k: [g[i] for g in grid] for i, k in enumerate(["opt", "lr", "bs", "seed"])}
    n = len(grid)
    o = rng.normal(size=n)
    m = -o + rng.normal(size=n)
    m[3] = m[1]  # a tie in the measure
    se = rng.uniform(0.05, 0.4, size=n)
    want = loop_sign_error(m, o, fac, se, direction=-1)
    r = corr.sign_error(m, o, fac, direction=-1, outcome_se=se, min_pairs=3)
    for a, errors in want.items():
        assert r["axes"][a]["kept"] == len(errors)
        assert r["axes"][a]["error"] == pytest.approx(np.mean(errors))
    every = [e for v in want.values() for e in v]
    assert r["error"] == pytest.approx(np.mean(every))
    assert r["robust"] == pytest.approx(max(np.mean(v) for v in want.values() if len(v) >= 3))
    # the worst case only over axes with enough kept pairs
    counts = sorted({len(v) for v in want.values()})
    assert len(counts) > 1
    strict = corr.sign_error(m, o, fac, direction=-1, outcome_se=se, min_pairs=counts[-1])
    assert strict["robust"] == pytest.approx(
        max(np.mean(v) for v in want.values() if len(v) >= counts[-1])
    )
    assert math.isnan(
        corr.sign_error(m, o, fac, direction=-1, outcome_se=se, min_pairs=counts[-1] + 1)["robust"]
    )
    # each one-factor pair is either kept or dropped
    assert all(v["pairs"] == v["kept"] + v["dropped"] for v in r["axes"].values())
    # the direction flips the answer
    flipped = corr.sign_error(m, o, fac, direction=1, outcome_se=se)
    assert flipped["error"] == pytest.approx(1 - r["error"])


def test_sign_error_paired_episodes():
    # two backbones on shared episodes: the shared difficulty cancels in the paired SE, so
    # the pair is kept; treated as independent it would be dropped.
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.0, 1.0, size=200)
    ep = np.stack([difficulty, difficulty + 0.1 + 0.05 * rng.normal(size=200)])
    o = ep.mean(1)
    fac = {"opt": ["erm", "sam"]}
    paired = corr.sign_error([2.0, 1.0], o, fac, direction=-1, episode_outcomes=ep)
    assert paired["kept"] == 1 and paired["error"] == 0.0
    se = ep.std(1, ddof=1) / math.sqrt(200)
    indep = corr.sign_error([2.0, 1.0], o, fac, direction=-1, outcome_se=se)
    assert indep["kept"] == 0 and indep["axes"]["opt"]["dropped"] == 1
    assert math.isnan(indep["error"]) and math.isnan(indep["robust"])


def statsmodels_holm(pvals):
    """statsmodels.stats.multitest.multipletests(method='holm'), transcribed."""
    pvals = np.asarray(pvals)
    sortind = np.argsort(pvals)
    pvals_sorted = np.take(pvals, sortind)
    ntests = len(pvals)
    pvals_corrected_raw = pvals_sorted * np.arange(ntests, 0, -1)
    pvals_corrected = np.maximum.accumulate(pvals_corrected_raw)
    pvals_corrected[pvals_corrected > 1] = 1
    out = np.empty_like(pvals_corrected)
    out[sortind] = pvals_corrected
    return out


def test_holm():
    # by hand: sorted 0.01, 0.02, 0.03, 0.04 times 4, 3, 2, 1 = 0.04, 0.06, 0.06, 0.04 ->
    # running max 0.04, 0.06, 0.06, 0.06
    np.testing.assert_allclose(
        significance.holm([0.03, 0.01, 0.04, 0.02]), [0.06, 0.04, 0.06, 0.06]
    )
    p = np.random.default_rng(0).uniform(0, 0.3, size=25)
    np.testing.assert_allclose(significance.holm(p), statsmodels_holm(p))
    out = significance.holm([0.01, np.nan, 0.04])  # NaN is not in the family: m = 2
    np.testing.assert_allclose(out, [0.02, np.nan, 0.04])
    with pytest.raises(ValueError, match="pvalues"):
        significance.holm([0.5, 1.5])


def test_min_detectable_tau_matches_the_issue_and_simulation():
    assert significance.min_detectable_tau(36) == pytest.approx(0.23, abs=0.005)
    assert significance.min_detectable_tau(20) == pytest.approx(0.32, abs=0.005)
    # the null SD formula against tau's spread under independence
    rng = np.random.default_rng(0)
    x = np.arange(20.0)
    null = corr.tau_b(x, np.argsort(rng.random((4000, 20)), axis=1).astype(float))
    assert null.std() == pytest.approx(significance.tau_null_sd(20), rel=0.05)


def test_table_rows_and_markdown():
    rng = np.random.default_rng(0)
    grid = list(itertools.product(["erm", "sam"], [0.1, 0.05], [0, 1, 2]))
    n = len(grid)
    factors = {
        "opt": [g[0] for g in grid],
        "lr": [g[1] for g in grid],
        "seed": [g[2] for g in grid],
    }
    axes = ["opt", "lr"]
    val_acc = rng.normal(size=n)
    outcomes = {"target_a": val_acc + 0.5 * rng.normal(size=n), "target_b": rng.normal(size=n)}
    measures = {"trace": -val_acc + rng.normal(size=n), "val_acc": val_acc}
    episodes = {k: v[:, None] + 0.3 * rng.normal(size=(n, 50)) for k, v in outcomes.items()}
    outcomes = {k: v.mean(1) for k, v in episodes.items()}
    groups = factors["opt"]
    rows = corr.correlation_table(
        measures,
        outcomes,
        factors=factors,
        axes=axes,
        covariate=val_acc,
        groups=groups,
        episode_outcomes=episodes,
        directions={"trace": -1, "val_acc": 1},
        n_boot=200,
        n_perm=200,
    )
    assert [(r["measure"], r["outcome"]) for r in rows] == list(
        itertools.product(measures, outcomes)
    )
    np.testing.assert_allclose(
        [r["p_holm"] for r in rows], statsmodels_holm([r["p"] for r in rows])
    )
    for r in rows:
        m, o = measures[r["measure"]], outcomes[r["outcome"]]
        assert r["tau"] == pytest.approx(stats.kendalltau(m, o).statistic)
        assert r["psi"] == pytest.approx(corr.granulated_tau(m, o, factors, axes=axes)["psi"])
        se = corr.sign_error(
            m,
            o,
            factors,
            direction=-1 if r["measure"] == "trace" else 1,
            axes=axes,
            episode_outcomes=episodes[r["outcome"]],
        )
        assert r["sign_error"] == se["error"] and r["sign_error_robust"] == se["robust"]
        assert not math.isnan(r["psi"]) and not math.isnan(r["sign_error"])
        gt = corr.group_taus(m, o, groups, n_perm=200)
        assert r["tau_within"] == gt["pooled_within"]["tau"]
        assert r["tau_across"] == gt["across"]["tau"]
        if r["measure"] == "trace":
            pt = corr.partial_tau(m, o, val_acc, n_boot=200, n_perm=200)
            assert (r["tau_partial"], r["p_partial"]) == (pt["tau_partial"], pt["p"])
    assert all(math.isnan(r["tau_partial"]) for r in rows if r["measure"] == "val_acc")
    text = corr.to_markdown(rows)
    assert text.count("\n") == len(rows) + 2 and "| trace | target_a |" in text


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="y has 3 entries"):
        corr.kendall_tau([1, 2, 3, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="x has 1 non-finite"):
        corr.kendall_tau([1, np.nan, 3, 4], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="y is constant"):
        corr.kendall_tau([1, 2, 3, 4], [2, 2, 2, 2])
    with pytest.raises(ValueError, match="covariate"):
        corr.partial_tau([1, 2, 3, 4], [1, 3, 2, 4], [5, 5, 5, 5])
    with pytest.raises(ValueError, match=r"factors\['lr'\]"):
        corr.granulated_tau([1, 2, 3], [1, 3, 2], {"lr": [1, 2]})
    with pytest.raises(ValueError, match="direction"):
        corr.sign_error([1, 2], [1, 2], {"a": [0, 1]}, direction=0, outcome_se=[0.1, 0.1])
    with pytest.raises(ValueError, match="exactly one"):
        corr.sign_error([1, 2], [1, 2], {"a": [0, 1]}, direction=1)
    with pytest.raises(ValueError, match=r"outcomes\['o'\] has 3 entries"):
        corr.correlation_table({"m": [1, 2]}, {"o": [1, 2, 3]})
