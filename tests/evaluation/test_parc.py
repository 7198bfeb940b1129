"""Tests for flatfsc_jax.evaluation.parc against numpy.corrcoef + scipy.stats.spearmanr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flatfsc_jax.evaluation import parc

# Jitted once per module: eager op-by-op dispatch of the ranking code is slow on CPU.
parc_score = jax.jit(parc.parc_score, static_argnames="num_classes")
average_ranks = jax.jit(parc.average_ranks)


def reference_parc(features, labels, num_classes):
    """The paper's recipe in numpy/scipy (float64).

    ``1 - corrcoef(onehot)`` is rounded to 10 decimals: numpy returns the single exact value
    ``1 + 1/(K-1)`` with last-bit noise that would otherwise break exact ties at random.
    """
    n = len(labels)
    rows, cols = np.triu_indices(n, k=1)
    d_f = 1.0 - np.corrcoef(np.asarray(features, np.float64))
    d_y = np.round(1.0 - np.corrcoef(np.eye(num_classes)[labels]), 10)
    return stats.spearmanr(d_f[rows, cols], d_y[rows, cols]).statistic


def test_average_ranks_match_scipy_with_heavy_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, 500).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(average_ranks(x)), stats.rankdata(x))
    y = rng.normal(size=300).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(average_ranks(y)), stats.rankdata(y))


def test_spearman_matches_scipy_on_tied_vectors():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 5, 400).astype(np.float32)
        y = (x + rng.integers(0, 4, 400)).astype(np.float32)
        want = stats.spearmanr(x, y).statistic
        got = float(jax.jit(parc.spearman)(x, y))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_sample_correlation_matches_numpy_and_zeroes_constant_rows():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(9, 6)).astype(np.float32)
    f[3] = 2.5  # a constant row: numpy's correlation is NaN
    with np.errstate(invalid="ignore"):
        want = np.corrcoef(f.astype(np.float64))
    got = np.asarray(jax.jit(parc.sample_correlation)(f))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-6)
    assert (~finite).sum() == 2 * 9 - 1  # row and column 3
    assert (got[3] == 0).all() and (got[:, 3] == 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parc_matches_scipy_on_continuous_features_with_repeated_labels(seed):
    rng = np.random.default_rng(seed)
    n, d, k = 45, 12, 6
    labels = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d))
    features = (centres[labels] + 1.5 * rng.normal(size=(n, d))).astype(np.float32)
    want = reference_parc(features, labels, k)
    for lab in (labels, np.eye(k)[labels]):  # int labels and one-hot give the same score
        np.testing.assert_allclose(float(parc_score(features, lab)), want, atol=1e-5)
    assert want > 0.05  # informative features: the test compares a non-trivial score


def test_parc_matches_scipy_with_integer_features():
    # Integer features make many sample correlations tie exactly; float32 rounding may split
    # a few such ties differently from float64, which moves the score by ~1e-5.
    rng = np.random.default_rng(3)
    n, k = 40, 5
    labels = rng.integers(0, k, n)
    features = (rng.integers(0, 4, (n, 16)) + 2 * (labels[:, None] == np.arange(16) % k)).astype(
        np.float32
    )
    want = reference_parc(features, labels, k)
    got = float(parc_score(features, labels))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert want > 0.05


def test_constant_rows_and_single_class_edge_cases():
    rng = np.random.default_rng(4)
    n, k = 30, 4
    labels = rng.integers(0, k, n)
    features = rng.normal(size=(n, 8)).astype(np.float32)
    features[[2, 7]] = 0.0  # dead-ReLU embeddings: correlation undefined -> treated as 0
    rows, cols = np.triu_indices(n, k=1)
    with np.errstate(invalid="ignore"):
        d_f = 1.0 - np.nan_to_num(np.corrcoef(features.astype(np.float64)), nan=0.0)
    d_y = np.round(1.0 - np.corrcoef(np.eye(k)[labels]), 10)
    want = stats.spearmanr(d_f[rows, cols], d_y[rows, cols]).statistic
    got = float(parc_score(features, labels))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # One class only: scipy says NaN (constant input); PARC defines the score as 0.
    assert float(parc_score(features, np.zeros(n, np.int32))) == 0.0


def test_select_backbone_and_scores_for_episode():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(5), 6)
    centres = rng.normal(size=(5, 10))
    good = centres[labels] + 0.3 * rng.normal(size=(30, 10))
    noise = rng.normal(size=(30, 10))
    scores = parc.parc_scores_for_episode({"noise": noise, "good": good}, labels)
    assert set(scores) == {"noise", "good"}
    assert scores["good"] > scores["noise"]
    assert parc.select_backbone(scores) == "good"
    assert parc.select_backbone({"a": 0.2, "b": 0.2}) == "a"
    with pytest.raises(ValueError, match="not finite"):
        parc.select_backbone({"a": float("nan"), "b": 0.1})
    with pytest.raises(ValueError, match="empty"):
        parc.select_backbone({})
    with pytest.raises(ValueError, match="at least 3"):
        parc.parc_score(noise[:2], labels[:2])
    with pytest.raises(ValueError, match="labels has"):
        parc.parc_score(noise, labels[:-1])


def test_masked_parc_equals_unpadded_parc_under_vmap():
    rng = np.random.default_rng(6)
    width, d, k = 40, 12, 6
    feats = rng.normal(size=(3, width, d)).astype(np.float32)
    labels = rng.integers(0, k, (3, width)).astype(np.int32)
    feats += 1.5 * np.eye(d, dtype=np.float32)[labels]
    mask = np.zeros((3, width), bool)
    for e, n in enumerate((7, 23, 40)):  # scattered padding, and one unpadded episode
        mask[e, rng.choice(width, n, replace=False)] = True
    feats[~mask] = 123.0  # padded slots hold junk
    got = np.asarray(jax.jit(jax.vmap(parc.parc_score_masked))(feats, labels, mask))
    for e in range(3):
        f, y = feats[e][mask[e]], labels[e][mask[e]]
        np.testing.assert_allclose(got[e], float(parc_score(f, y)), atol=1e-6)
        np.testing.assert_allclose(got[e], reference_parc(f, y, k), atol=1e-5)


def _masked_parc_sorting_labels(features, labels, mask):
    """The masked score with the label side ranked by a sort (``parc_score_masked``
    computes those ranks in closed form): the two must agree bit for bit."""
    n = features.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    valid = mask[rows] & mask[cols]
    d_f = (1.0 - parc.sample_correlation(jnp.where(mask[:, None], features, 0.0)))[rows, cols]
    d_y = parc.label_distances(labels)[rows, cols]
    r_f = parc.average_ranks(jnp.where(valid, d_f, jnp.inf))
    r_y = parc.average_ranks(jnp.where(valid, d_y, jnp.inf))
    centre = (jnp.sum(valid) + 1) / 2.0
    r_f = jnp.where(valid, r_f - centre, 0.0)
    r_y = jnp.where(valid, r_y - centre, 0.0)
    denom = jnp.sqrt(jnp.sum(r_f * r_f)) * jnp.sqrt(jnp.sum(r_y * r_y))
    return jnp.where(denom > 0, jnp.sum(r_f * r_y) / jnp.where(denom > 0, denom, 1.0), 0.0)


def test_masked_parc_closed_form_label_ranks_equal_sorted_ranks_exactly():
    rng = np.random.default_rng(7)
    width, d = 60, 16
    feats = rng.normal(size=(5, width, d)).astype(np.float32)
    labels = rng.integers(0, 5, (5, width)).astype(np.int32)
    labels[3] = 2  # one class only: constant label ranks, score 0
    feats[4, :, :] = np.round(feats[4], 0)  # heavy ties on the feature side too
    mask = rng.random((5, width)) < 0.7
    mask[0] = True
    closed = jax.jit(jax.vmap(parc.parc_score_masked))(feats, labels, mask)
    sorted_ = jax.jit(jax.vmap(_masked_parc_sorting_labels))(feats, labels, mask)
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(sorted_))
    assert float(closed[3]) == 0.0


def test_host_ranks_of_rows_equal_scipy_with_ties_and_padding():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 6, (9, 50)).astype(np.float32)  # heavy ties in every row
    x[2] = rng.normal(size=50)  # no ties
    x[4, 30:] = np.inf  # padded pairs: tied +inf after every real pair
    x[5] = 1.0  # one constant row
    got = parc.average_ranks_rows(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, stats.rankdata(x, axis=1))
    with pytest.raises(ValueError, match=r"\[rows, M\]"):
        parc.average_ranks_rows(x[0])


def test_batched_scores_with_host_ranks_equal_the_jitted_masked_score_exactly():
    """parc_scores_padded (ranks on the host) is the same computation as
    vmap(parc_score_masked): equal bit for bit, including ties and padding."""
    rng = np.random.default_rng(9)
    n, width, d = 200, 30, 12
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb[7] = 2.0  # a constant embedding: correlation 0, tied distances
    emb[8:20] = np.round(emb[8:20])  # ties between pairs
    idx = np.stack([rng.choice(n, width, replace=False) for _ in range(11)]).astype(np.int32)
    idx[0, :3] = (7, 8, 9)
    labels = rng.integers(0, 4, (11, width)).astype(np.int32)
    mask = rng.random((11, width)) < 0.8
    mask[1] = True
    want = jax.jit(jax.vmap(parc.parc_score_masked))(emb[idx], labels, mask)
    got = parc.parc_scores_padded(emb, idx, labels, mask, chunk=4)  # a padded last chunk
    assert got.shape == (11,)
    np.testing.assert_array_equal(got, np.asarray(want))
