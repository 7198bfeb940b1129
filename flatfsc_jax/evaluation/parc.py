"""PARC backbone selection (Bolya et al. 2021, as the paper's official code uses it).

For an unseen domain, the paper picks the backbone of the zoo whose support-set
embeddings best agree with the support labels (the paper):

    D_F = 1 - corrcoef(F)       F: [N, D] embeddings, correlation between SAMPLES (N x N)
    D_Y = 1 - corrcoef(Y)       Y: [N, K] one-hot labels
    score = spearman(upper(D_F), upper(D_Y))     strict upper triangles, average ranks

No feature standardisation, no PCA and no x100 (those are in PARC's own code, not in the
paper's). Highest score wins.

The scores are pure ``jnp`` and jittable (shapes static, no host round trips);
``parc_score_masked`` scores a padded support set, so ``jax.vmap`` scores every episode of
an ``EpisodeBatch`` in one call. ``parc_scores_padded`` is the same score for a batch of
episodes with the one sort it needs done by NumPy on the host, because XLA:CPU's sort is
far slower (the protocol uses it).

Choices where the reference (``numpy.corrcoef`` + ``scipy.stats.spearmanr``) is ill-defined:

* **Label distances are computed exactly.** For one-hot rows, corrcoef is 1 for two samples
  of the same class and ``-1/(K-1)`` for two different classes, so ``D_Y`` has exactly two
  values. ``numpy.corrcoef`` returns the second one with last-bit noise that differs from
  pair to pair, which makes ``spearmanr`` break the (mathematically exact) ties in an
  arbitrary order. We use the exact value ``1 + 1/(K-1)``; since Spearman only sees ranks
  this equals ranking "different class" above "same class", independent of ``K``.
* **Constant feature rows** (e.g. a dead-ReLU embedding) have undefined correlation (NaN in
  numpy); we define their correlation with every other sample as 0 (distance 1,
  "uncorrelated"), so the score stays finite.
* **Constant rank vectors** (one class only, or all distances equal) have undefined
  Spearman correlation (NaN in scipy); the score is then 0 ("no evidence either way").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import rankdata


def sample_correlation(features):
    """Pearson correlation between the rows of ``features`` [N, D]: [N, N].

    Rows with zero variance get correlation 0 with everything (numpy: NaN).
    """
    f = jnp.asarray(features, jnp.float32)
    centred = f - f.mean(axis=1, keepdims=True)
    norms = jnp.sqrt(jnp.sum(centred**2, axis=1))
    safe = jnp.where(norms > 0, norms, 1.0)
    unit = centred / safe[:, None]
    corr = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
    constant = norms <= 0
    corr = jnp.where(constant[:, None] | constant[None, :], 0.0, corr)
    return jnp.clip(corr, -1.0, 1.0)


def label_distances(labels, num_classes: int | None = None):
    """``1 - corrcoef(onehot(labels))`` [N, N], computed exactly (see module docstring).

    ``labels`` is int [N] or one-hot [N, K]. Same class -> 0; different classes ->
    ``1 + 1/(K-1)``. ``K`` is ``num_classes`` (int labels) or the one-hot width; for int
    labels without ``num_classes`` it is taken as 2, which leaves every rank unchanged.
    """
    labels = jnp.asarray(labels)
    if labels.ndim == 2:
        k = labels.shape[1]
        labels = jnp.argmax(labels, axis=1)
    elif labels.ndim == 1:
        k = 2 if num_classes is None else int(num_classes)
    else:
        raise ValueError(f"labels must be int [N] or one-hot [N, K], got shape {labels.shape}")
    # K = 1: every one-hot row is constant, corrcoef is undefined -> 0, distance 1.
    different = 1.0 + 1.0 / (k - 1) if k > 1 else 1.0
    same = 0.0 if k > 1 else 1.0
    return jnp.where(labels[:, None] == labels[None, :], same, different).astype(jnp.float32)


def average_ranks(x):
    """1-based ranks of a 1-D array with ties given their average rank (scipy 'average')."""
    return rankdata(jnp.asarray(x), method="average").astype(jnp.float32)


def spearman(x, y):
    """Spearman correlation of two 1-D arrays (average ranks for ties); 0 if one is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    # Average ranks always sum to m(m+1)/2, so the mean rank is exact: (m+1)/2.
    centre = (x.shape[0] + 1) / 2.0
    rx, ry = rx - centre, ry - centre
    sxx, syy = jnp.sum(rx * rx), jnp.sum(ry * ry)
    denom = jnp.sqrt(sxx) * jnp.sqrt(syy)
    return jnp.where(denom > 0, jnp.sum(rx * ry) / jnp.where(denom > 0, denom, 1.0), 0.0)


def pair_distances_masked(features, mask):
    """``upper(1 - corrcoef(features))`` [S(S-1)/2] of a padded support set, pairs with a
    padded slot (``mask`` False) set to +inf: every real pair ranks before them."""
    features = jnp.asarray(features)
    rows, cols = np.triu_indices(features.shape[0], k=1)
    mask = jnp.asarray(mask, bool)
    d_f = (1.0 - sample_correlation(jnp.where(mask[:, None], features, 0.0)))[rows, cols]
    return jnp.where(mask[rows] & mask[cols], d_f, jnp.inf)


def score_from_ranks(feature_ranks, labels, mask):
    """PARC of a padded support set from the average ranks of its pair distances.

    ``feature_ranks`` [S(S-1)/2]: :func:`average_ranks` of :func:`pair_distances_masked`
    (only the real pairs' ranks are read); ``labels`` int [S]; ``mask`` bool [S].

    The label side needs no sort: ``D_Y`` has two values (same class < different class),
    so with ``n_s`` same-class and ``n_d`` different-class real pairs their average ranks
    are ``(n_s + 1) / 2`` and ``n_s + (n_d + 1) / 2``, exactly what ``average_ranks`` of
    ``label_distances`` gives (small integers and halves, exact in float32).
    """
    labels, mask = jnp.asarray(labels), jnp.asarray(mask, bool)
    rows, cols = np.triu_indices(labels.shape[0], k=1)
    valid = mask[rows] & mask[cols]
    same = valid & (labels[rows] == labels[cols])
    n_same = jnp.sum(same).astype(jnp.float32)
    n_different = jnp.sum(valid & ~same).astype(jnp.float32)
    r_y = jnp.where(same, (n_same + 1.0) / 2.0, n_same + (n_different + 1.0) / 2.0)
    num_valid = jnp.sum(valid)
    centre = (num_valid + 1) / 2.0  # exact mean of tie-averaged ranks 1..num_valid
    r_f = jnp.where(valid, feature_ranks - centre, 0.0)
    r_y = jnp.where(valid, r_y - centre, 0.0)
    denom = jnp.sqrt(jnp.sum(r_f * r_f)) * jnp.sqrt(jnp.sum(r_y * r_y))
    return jnp.where(denom > 0, jnp.sum(r_f * r_y) / jnp.where(denom > 0, denom, 1.0), 0.0)


def parc_score_masked(features, labels, mask):
    """PARC of a padded support set: ``features`` [S, D], int ``labels`` [S], bool ``mask``.

    Equals ``parc_score(features[mask], labels[mask])`` with fixed shapes, so it can be
    vmapped over an ``EpisodeBatch``'s support sets. Pairs that involve a padded slot are
    given +inf distance, which ranks them after every real pair and leaves the real pairs'
    (tie-averaged) ranks exactly as without padding; they are then left out of the
    correlation. Sorting the feature pairs dominates the cost; :func:`parc_scores_padded`
    does that sort on the host.
    """
    ranks = average_ranks(pair_distances_masked(features, mask))
    return score_from_ranks(ranks, labels, mask)


def average_ranks_rows(x: np.ndarray) -> np.ndarray:
    """NumPy :func:`average_ranks` of every row of ``x`` [R, M]: float32 [R, M].

    Equals ``scipy.stats.rankdata(x, axis=1)`` (ties get their average rank; +inf ties
    too), vectorised over rows: one ``argsort`` and a few linear passes. Written out
    because scipy's ``rankdata`` is slower on these rows
    (docs/performance.md#evaluation-cost), and exact because ranks
    are integers or halves (exact in float32 below 2**24).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be [rows, M], got shape {x.shape}")
    num_rows, m = x.shape
    order = np.argsort(x, axis=1)
    ordered = np.take_along_axis(x, order, axis=1)
    # A tie group starts where the sorted value changes or a row starts; groups are then
    # numbered over the flattened array, so no group spans two rows.
    starts = np.ones((num_rows, m), bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = starts.ravel()
    first = np.flatnonzero(starts)  # flat position of each group's first element
    last = np.append(first[1:], starts.size) - 1
    # Rank of a sorted position: its group's mean flat position, made 1-based in its row.
    group_mean = (first + last) * 0.5
    row_start = (np.arange(num_rows) * m)[:, None]
    mean_rank = group_mean[np.cumsum(starts) - 1].reshape(num_rows, m) - (row_start - 1)
    out = np.empty(num_rows * m, np.float32)
    out[(order + row_start).ravel()] = mean_rank.ravel()
    return out.reshape(num_rows, m)


@jax.jit
def _batch_distances(embeddings, support_idx, support_mask):
    return jax.vmap(pair_distances_masked)(embeddings[support_idx], support_mask)


_batch_scores = jax.jit(jax.vmap(score_from_ranks))


def parc_scores_padded(embeddings, support_idx, support_labels, support_mask, *, chunk=64):
    """PARC score of every padded support set: float32 [E].

    ``embeddings`` [N, D] of one split; ``support_idx`` / ``support_labels`` int [E, S]
    and ``support_mask`` bool [E, S] index into it. Equals ``jax.vmap(parc_score_masked)``
    (same ranks, same score formula) but sorts on the host, where NumPy sorts these rows
    far faster than XLA:CPU (docs/performance.md#evaluation-cost). Distances and the
    score stay jitted, ``chunk`` episodes per call (the last chunk padded: one
    compilation per support width).
    """
    embeddings = jnp.asarray(embeddings, jnp.float32)  # to the device once
    n = len(support_idx)
    out = []
    for start in range(0, n, chunk):
        idx = np.arange(start, start + chunk) % n  # pad the last chunk: one compilation
        dist = np.asarray(_batch_distances(embeddings, support_idx[idx], support_mask[idx]))
        scores = _batch_scores(average_ranks_rows(dist), support_labels[idx], support_mask[idx])
        out.append(np.asarray(scores)[: min(chunk, n - start)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def parc_score(features, labels, num_classes: int | None = None):
    """PARC score (scalar float32) of embeddings ``features`` [N, D] for ``labels``.

    ``labels``: int [N] or one-hot [N, K]. ``num_classes`` only matters for int labels and
    does not change the score (ranks); it is accepted for symmetry with one-hot input.
    """
    features = jnp.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    n = features.shape[0]
    if n < 3:
        raise ValueError(f"PARC needs at least 3 support samples (N*(N-1)/2 >= 3 pairs), got {n}")
    if jnp.shape(labels)[0] != n:
        raise ValueError(f"features has {n} rows but labels has {jnp.shape(labels)[0]}")
    rows, cols = np.triu_indices(n, k=1)  # static: depends on the shape only
    d_f = 1.0 - sample_correlation(features)
    d_y = label_distances(labels, num_classes)
    return spearman(d_f[rows, cols], d_y[rows, cols])


_parc_score_jit = jax.jit(parc_score, static_argnames="num_classes")


def parc_scores_for_episode(embeddings_by_backbone: dict, labels) -> dict[str, float]:
    """PARC score of every backbone's support embeddings: ``{name: score}``.

    Embeddings of one episode have the same N for every backbone; backbones with the
    same embedding dimension share one compilation.
    """
    if not embeddings_by_backbone:
        raise ValueError("embeddings_by_backbone is empty; pass {backbone_name: [N, D]}")
    labels = np.asarray(labels)
    return {
        name: float(_parc_score_jit(jnp.asarray(emb, jnp.float32), labels))
        for name, emb in embeddings_by_backbone.items()
    }


def select_backbone(scores: dict[str, float]) -> str:
    """The name with the highest PARC score (first in insertion order on exact ties)."""
    if not scores:
        raise ValueError("scores is empty; compute them with parc_scores_for_episode")
    bad = [name for name, s in scores.items() if not math.isfinite(float(s))]
    if bad:
        raise ValueError(f"PARC scores of {bad} are not finite; check those embeddings")
    return max(scores, key=lambda name: float(scores[name]))
