"""Evaluation reads and embeds only the images its episodes use (bounded host memory)."""

import jax
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax.data import sources
from flatfsc_jax.data.episodes import EpisodeBatch
from flatfsc_jax.evaluation import ncc as ncc_lib


class LazyImages:
    """``n`` images made on access (a pure function of the index), as an array_record
    source reads them; fails the test once more than ``budget`` images have been read."""

    def __init__(self, n, budget, shape=(16, 16, 1)):
        self.n, self.budget, self.shape, self.read = n, budget, shape, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read += 1
        if self.read > self.budget:
            raise AssertionError(f"read {self.read} images, more than the {self.budget} budget")
        pixels = np.arange(np.prod(self.shape), dtype=np.int64)
        return ((i * 7919 + pixels * (i % 97 + 1)) % 256).astype(np.uint8).reshape(self.shape)


def lazy_split(n, num_classes, budget):
    labels = np.arange(n, dtype=np.int32) % num_classes
    names = [str(c) for c in range(num_classes)]
    return sources.SplitData("lazy/x", "test", LazyImages(n, budget), labels, names)


@pytest.fixture(scope="module")
def backbone():
    model = models.build_model("conv4", 0, width=0.125)
    return model, model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32))


def test_evaluator_on_millions_of_images_reads_only_the_episodes_rows(backbone):
    model, variables = backbone
    split = lazy_split(4_000_000, num_classes=400, budget=0)
    episodes = EpisodeBatch.sample(split, 2, seed=0)
    rows, _ = ncc_lib.used_rows(episodes)
    # Every image read is one the episodes use, once: 4M images would be ~1 GB of uint8
    # and 8 GB of float32 embeddings; this reads len(rows) (a few thousand).
    split.images.budget = len(rows)
    result = ncc_lib.FewShotEvaluator(split, episodes, batch_size=256).run(model, variables)
    assert split.images.read == len(rows) < 4000
    split.images.budget += len(rows)
    # The same numbers as embedding exactly those rows and evaluating the original
    # episodes on a sparse full-size index (an independent reference).
    direct = np.asarray(model.embed(variables, sources.preprocess(split.get_images(rows))))
    lookup = {int(r): k for k, r in enumerate(rows)}
    ref = []
    for e in range(len(episodes)):
        s = [lookup[int(i)] for i in episodes.support_idx[e][episodes.support_mask[e]]]
        q = [lookup[int(i)] for i in episodes.query_idx[e][episodes.query_mask[e]]]
        sl = episodes.support_labels[e][episodes.support_mask[e]]
        ql = episodes.query_labels[e][episodes.query_mask[e]]
        protos = np.stack([direct[s][sl == c].mean(0) for c in range(episodes.ways[e])])
        qn = direct[q] / np.linalg.norm(direct[q], axis=1, keepdims=True)
        pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
        ref.append(np.mean(np.argmax(qn @ pn.T, 1) == ql))
    np.testing.assert_allclose(result["accuracies"], ref, atol=1e-6)


def test_compact_evaluation_equals_the_full_table_on_a_small_split(backbone):
    model, variables = backbone
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(20), 12)
    images = rng.integers(0, 256, (len(labels), 16, 16, 1), dtype=np.uint8)
    split = sources.SplitData("fake/x", "test", images, labels, [str(c) for c in range(20)])
    episodes = EpisodeBatch.sample(split, 5, seed=3)
    full = ncc_lib.embed_split(model, variables, split, batch_size=64)
    for metric in ncc_lib.METRICS:
        expected = ncc_lib.episode_accuracies(full, episodes, metric=metric)
        got = ncc_lib.FewShotEvaluator(split, episodes, metric=metric, batch_size=64).run(
            model, variables
        )
        np.testing.assert_allclose(got["accuracies"], expected, atol=1e-6)
    rows, compact = ncc_lib.used_rows(episodes)
    assert len(rows) < len(split)
    np.testing.assert_array_equal(rows[compact.support_idx], episodes.support_idx)
    np.testing.assert_array_equal(rows[compact.query_idx], episodes.query_idx)
