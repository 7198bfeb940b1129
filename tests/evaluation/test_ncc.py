"""Tests for flatfsc_jax.evaluation.ncc: cached-embedding episode evaluation and summaries."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax.data import sources
from flatfsc_jax.data.episodes import EpisodeBatch
from flatfsc_jax.evaluation import ncc as ncc_lib


def make_episodes(rng, num_items, labels_of_item, num_episodes, max_ways, width_s, width_q):
    """Variable-way, variable-shot padded episodes; padding is scattered (not only at the end)."""
    classes = np.unique(labels_of_item)
    f = {
        "support_idx": np.zeros((num_episodes, width_s), np.int32),
        "support_labels": np.zeros((num_episodes, width_s), np.int32),
        "support_mask": np.zeros((num_episodes, width_s), bool),
        "query_idx": np.zeros((num_episodes, width_q), np.int32),
        "query_labels": np.zeros((num_episodes, width_q), np.int32),
        "query_mask": np.zeros((num_episodes, width_q), bool),
        "ways": np.zeros(num_episodes, np.int32),
    }
    for e in range(num_episodes):
        ways = int(rng.integers(2, max_ways + 1))
        chosen = rng.choice(classes, ways, replace=False)
        s_items, s_labs, q_items, q_labs = [], [], [], []
        for j, c in enumerate(chosen):
            items = rng.permutation(np.flatnonzero(labels_of_item == c))
            shots = int(rng.integers(1, 4))
            s_items += list(items[:shots])
            s_labs += [j] * shots
            q_items += list(items[shots : shots + 2])
            q_labs += [j] * 2
        for name, items, labs, width in (
            ("support", s_items, s_labs, width_s),
            ("query", q_items, q_labs, width_q),
        ):
            slots = np.sort(rng.choice(width, len(items), replace=False))
            f[f"{name}_idx"][e, :] = rng.integers(0, num_items, width)  # junk in padding
            f[f"{name}_labels"][e, :] = rng.integers(0, max_ways, width)
            f[f"{name}_idx"][e, slots] = items
            f[f"{name}_labels"][e, slots] = labs
            f[f"{name}_mask"][e, slots] = True
        f["ways"][e] = ways
    classes = np.full((num_episodes, max_ways), -1, np.int32)  # not used by evaluate
    return EpisodeBatch(**f, classes=classes, max_ways=max_ways)


def reference_accuracies(embeddings, episodes, metric):
    """Plain numpy, one episode at a time, using only the unmasked entries."""
    out = []
    for e in range(len(episodes.ways)):
        sm, qm = episodes.support_mask[e], episodes.query_mask[e]
        s_emb = embeddings[episodes.support_idx[e][sm]].astype(np.float64)
        s_lab = episodes.support_labels[e][sm]
        q_emb = embeddings[episodes.query_idx[e][qm]].astype(np.float64)
        q_lab = episodes.query_labels[e][qm]
        ways = int(episodes.ways[e])
        protos = np.stack([s_emb[s_lab == c].mean(0) for c in range(ways)])
        if metric == "cosine":
            qn = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
            pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
            scores = qn @ pn.T
        else:
            scores = -(((q_emb[:, None, :] - protos[None]) ** 2).sum(-1))
        out.append(np.mean(scores.argmax(1) == q_lab))
    return np.asarray(out)


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 8)
    # Class-dependent means plus noise: accuracies spread over (0, 1), not all 0 or 1.
    centres = rng.normal(size=(12, 16))
    emb = (centres[labels] + 1.2 * rng.normal(size=(len(labels), 16))).astype(np.float32)
    return rng, emb, labels


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk", [4, 64])
def test_vmapped_accuracies_match_numpy_loop(table, metric, chunk):
    rng, emb, labels = table
    episodes = make_episodes(rng, len(emb), labels, 23, 6, 20, 14)
    got = ncc_lib.episode_accuracies(emb, episodes, metric=metric, chunk=chunk)
    want = reference_accuracies(emb, episodes, metric)
    assert got.shape == (23,)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert 0.0 < want.mean() < 1.0  # the data is neither trivial nor hopeless


def test_absent_classes_never_win():
    rng = np.random.default_rng(1)
    s_emb = rng.normal(size=(6, 8)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2], np.int32)
    mask = np.ones(6, bool)
    # Queries far away from everything: the worst possible real logit.
    queries = 1e3 * rng.normal(size=(50, 8)).astype(np.float32)
    for metric in ncc_lib.METRICS:
        logits = np.asarray(
            ncc_lib.prototype_logits(s_emb, labels, mask, queries, 10, metric=metric)
        )
        assert np.isfinite(logits).all()
        assert logits.argmax(1).max() <= 2
        assert (logits[:, 3:] == ncc_lib.ABSENT_LOGIT).all()
        # A class whose only support example is masked out is absent too.
        masked = mask.copy()
        masked[4:] = False
        logits = np.asarray(
            ncc_lib.prototype_logits(s_emb, labels, masked, queries, 10, metric=metric)
        )
        assert logits.argmax(1).max() <= 1


def test_cosine_logits_are_scaled_cosines():
    rng = np.random.default_rng(2)
    s_emb = rng.normal(size=(4, 5)).astype(np.float32)
    q = rng.normal(size=(3, 5)).astype(np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    logits = np.asarray(ncc_lib.prototype_logits(s_emb, labels, np.ones(4, bool), q, 2, scale=10.0))
    protos = np.stack([s_emb[[0, 3]].mean(0), s_emb[[1, 2]].mean(0)])
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        protos / np.linalg.norm(protos, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(logits, 10 * cos, rtol=1e-5, atol=1e-6)


def test_summarize_and_paired_difference_match_numpy():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.4, 0.9, 600)
    b = np.clip(a - 0.02 + 0.01 * rng.normal(size=600), 0, 1)
    s = ncc_lib.summarize(a)
    assert s["n"] == 600
    np.testing.assert_allclose(s["mean"], np.mean(a))
    np.testing.assert_allclose(s["ci95"], 1.96 * np.std(a) / np.sqrt(600))
    d = ncc_lib.paired_difference(a, b)
    np.testing.assert_allclose(d["mean"], np.mean(a - b))
    np.testing.assert_allclose(d["ci95"], 1.96 * np.std(a - b) / np.sqrt(600))
    # Pairing removes per-episode difficulty: far tighter than either interval alone.
    assert d["ci95"] < 0.2 * s["ci95"]
    with pytest.raises(ValueError, match="same episodes"):
        ncc_lib.paired_difference(a, b[:-1])
    with pytest.raises(ValueError, match="at least one"):
        ncc_lib.summarize([])


def test_bad_arguments_raise_before_compiling(table):
    rng, emb, labels = table
    episodes = make_episodes(rng, len(emb), labels, 3, 4, 10, 8)
    with pytest.raises(ValueError, match="metric='manhattan'"):
        ncc_lib.episode_accuracies(emb, episodes, metric="manhattan")
    with pytest.raises(ValueError, match="another split"):
        ncc_lib.episode_accuracies(emb[:5], episodes)
    with pytest.raises(TypeError, match="EpisodeBatch"):
        ncc_lib.episode_accuracies(emb, types.SimpleNamespace(**vars(episodes)))
    bad = dataclasses.replace(episodes, max_ways=1)
    with pytest.raises(ValueError, match="max_ways"):
        ncc_lib.episode_accuracies(emb, bad)


def test_embed_split_and_evaluator_match_direct_embedding():
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(6), 5)
    images = rng.integers(0, 256, (len(labels), 16, 16, 1), dtype=np.uint8)
    split = sources.SplitData("fake/x", "test", images, labels, [str(c) for c in range(6)])
    model = models.build_model("conv4", 0, width=0.125)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 1), np.float32))
    # batch_size 7 does not divide 30: exercises the padded last batch.
    emb = ncc_lib.embed_split(model, variables, split, batch_size=7)
    direct = np.asarray(model.embed(variables, sources.preprocess(images)))
    assert emb.shape == (30, model.embedding_dim)
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)

    episodes = make_episodes(rng, len(labels), labels, 5, 4, 12, 10)
    result = ncc_lib.FewShotEvaluator(split, episodes, batch_size=7).run(model, variables)
    np.testing.assert_allclose(
        result["accuracies"], reference_accuracies(direct, episodes, "cosine")
    )
    assert result["mean"] == pytest.approx(np.mean(result["accuracies"]))
    with pytest.raises(ValueError, match="metric="):
        ncc_lib.FewShotEvaluator(split, episodes, metric="dot")


def test_tasks_on_one_table_evaluates_each_task_with_its_own_backbone(table):
    """Tasks of several backbones in one call give each task's per-backbone accuracy, and
    the table holds only the rows the tasks use (one per distinct backbone and image)."""
    rng, emb, labels = table
    episodes = make_episodes(rng, len(emb), labels, 9, 6, 20, 14)
    other = (emb[:, ::-1] + 0.5 * rng.normal(size=emb.shape)).astype(np.float32)
    embeddings = {"a": emb, "b": other, "unused": np.zeros((len(emb), 3), np.float32)}
    tasks = [("a", 0), ("b", 0), ("b", 4), ("a", 7), ("b", 8), ("a", 2)]
    tab, task_batch = ncc_lib.tasks_on_one_table(embeddings, episodes, tasks)
    got = ncc_lib.episode_accuracies(tab, task_batch)
    for (key, e), acc in zip(tasks, got, strict=True):
        want = reference_accuracies(embeddings[key], episodes.take([e]), "cosine")[0]
        assert acc == pytest.approx(want, abs=1e-6), (key, e)
    used = {
        (key, int(i))
        for key, e in tasks
        for i in np.concatenate([episodes.support_idx[e], episodes.query_idx[e]])
    }
    # The rows in use (padded slots too: valid rows of their own backbone), then zeros up
    # to a power of two.
    assert len(tab) == 1 << (len(used) - 1).bit_length()
    np.testing.assert_array_equal(tab[len(used) :], 0.0)
    assert task_batch.support_idx.max() < len(used) and task_batch.query_idx.max() < len(used)
    assert task_batch.support_idx.shape == (len(tasks), episodes.support_idx.shape[1])
    np.testing.assert_array_equal(
        task_batch.support_mask, episodes.support_mask[[0, 0, 4, 7, 8, 2]]
    )
    with pytest.raises(ValueError, match="different embedding shapes"):
        ncc_lib.tasks_on_one_table(embeddings, episodes, [("a", 0), ("unused", 1)])
    with pytest.raises(ValueError, match="tasks is empty"):
        ncc_lib.tasks_on_one_table(embeddings, episodes, [])
