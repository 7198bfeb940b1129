"""Tests for flatfsc_jax.evaluation.pa: URL's pre-classifier alignment on cached embeddings."""

import jax
import numpy as np
import pytest

from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.data import sampling
from flatfsc_jax.evaluation import ncc, pa


@pytest.fixture(scope="module")
def task():
    """Embeddings of 12 classes and 16 padded variable-way variable-shot episodes."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 10)
    centers = rng.normal(size=(12, 24))
    emb = (centers[labels] + 1.2 * rng.normal(size=(len(labels), 24))).astype(np.float32)
    spec = sampling.EpisodeSpec(mode="variable")
    eps = episodes_lib.EpisodeSampler(labels, spec, seed=3).sample(16)
    batch = episodes_lib.pad_episodes(eps, **episodes_lib.bucket_sizes(labels, spec))
    return emb, eps, batch


def test_steps_zero_is_exactly_ncc(task):
    emb, eps, batch = task
    want = ncc.episode_accuracies(emb, batch)
    for bucket in (True, False):
        got = pa.episode_accuracies(emb, batch, lr=0.1, steps=0, bucket=bucket)
        np.testing.assert_array_equal(got, want)
    # The logits themselves, not only the argmax: the identity map changes no bit.
    ep = eps[0]
    args = (emb[ep.support_idx], ep.support_labels, np.ones(len(ep.support_idx), bool))
    w, losses = pa.fit_map(*args, batch.max_ways, lr=1.0, steps=0)
    np.testing.assert_array_equal(np.asarray(w), np.eye(emb.shape[1]))
    assert losses.shape == (0,)
    got = pa.pa_logits(*args, emb[ep.query_idx], batch.max_ways, lr=1.0, steps=0)
    want = ncc.prototype_logits(*args, emb[ep.query_idx], batch.max_ways)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_vmapped_padded_episodes_equal_a_python_loop_over_unpadded_ones(task):
    emb, eps, batch = task
    one = jax.jit(pa.pa_logits, static_argnames=("max_ways", "steps"))
    want = []
    for ep in eps:  # each episode alone, unpadded, with its own number of ways
        ways = int(ep.support_labels.max()) + 1
        mask = np.ones(len(ep.support_idx), bool)
        logits = one(
            emb[ep.support_idx], ep.support_labels, mask, emb[ep.query_idx], ways, lr=0.5, steps=40
        )
        want.append(np.mean(np.argmax(np.asarray(logits), -1) == ep.query_labels))
    for bucket, chunk in ((True, 8), (False, 5)):  # 5: the last chunk is padded
        got = pa.episode_accuracies(emb, batch, lr=0.5, chunk=chunk, bucket=bucket)
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The learned map too: padding slots and absent classes do not change training.
    ep, e = eps[1], 1
    w_pad, _ = pa.fit_map(
        emb[batch.support_idx[e]],
        batch.support_labels[e],
        batch.support_mask[e],
        batch.max_ways,
        lr=0.5,
        steps=40,
    )
    w_one, _ = pa.fit_map(
        emb[ep.support_idx],
        ep.support_labels,
        np.ones(len(ep.support_idx), bool),
        int(ep.support_labels.max()) + 1,
        lr=0.5,
        steps=40,
    )
    assert not np.allclose(np.asarray(w_one), np.eye(emb.shape[1]), atol=1e-3)
    np.testing.assert_allclose(np.asarray(w_pad), np.asarray(w_one), atol=1e-5)


def test_pa_improves_support_accuracy_on_a_toy_task():
    # Four classes separated along 2 of 32 dimensions; the other 30 carry large
    # class-independent noise, so cosine NCC on the raw features is poor. PA can learn
    # to shrink the noise dimensions.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 25).astype(np.int32)
    signal = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], np.float32)[labels]
    x = np.concatenate([signal, 2.0 * rng.normal(size=(100, 30))], 1).astype(np.float32)
    mask = np.ones(100, bool)

    def support_accuracy(w):
        mapped = pa.apply_map(x, w)
        logits = ncc.prototype_logits(mapped, labels, mask, mapped, 4)
        return float(np.mean(np.argmax(np.asarray(logits), -1) == labels))

    w, losses = pa.fit_map(x, labels, mask, 4, lr=pa.learning_rate(seen=False), steps=40)
    losses = np.asarray(losses)
    assert losses.shape == (40,) and np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
    before, after = support_accuracy(np.eye(32, dtype=np.float32)), support_accuracy(w)
    assert before < 0.7  # 0.61 measured
    assert after > 0.95  # 1.0 measured


def test_learning_rates_follow_url_and_bad_options_raise(task):
    emb, _, batch = task
    assert pa.learning_rate(seen=True) == 0.1 and pa.learning_rate(seen=False) == 1.0
    with pytest.raises(ValueError, match="^lr must be a finite number > 0"):
        pa.episode_accuracies(emb, batch, lr=0.0)
    with pytest.raises(ValueError, match="^steps must be an integer >= 0"):
        pa.episode_accuracies(emb, batch, lr=0.1, steps=-1)
    with pytest.raises(ValueError, match="another split"):
        pa.episode_accuracies(emb[:5], batch, lr=0.1)


def test_support_buckets():
    assert pa.support_buckets(500) == (125, 250, 500)
    assert pa.support_buckets(3) == (1, 2, 3)
    assert pa.support_buckets(1) == (1,)


def test_an_episode_gets_the_same_accuracy_in_any_subset(task):
    """protocol.py adapts each (backbone, episode) once and reuses the number for every
    family that picks that backbone: which other episodes share the call must not matter."""
    emb, _, batch = task
    full = pa.episode_accuracies(emb, batch, lr=0.5, chunk=8)
    subset = np.asarray([1, 4, 5, 11, 15])
    sub = episodes_lib.EpisodeBatch(
        **{
            f: (
                getattr(batch, f)[subset]
                if isinstance(getattr(batch, f), np.ndarray)
                else getattr(batch, f)
            )
            for f in batch.__dataclass_fields__
        }
    )
    np.testing.assert_array_equal(pa.episode_accuracies(emb, sub, lr=0.5, chunk=8), full[subset])
