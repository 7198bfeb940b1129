"""Tests for flatfsc_jax.evaluation.tsa and the TSA adapters of models.py."""

import jax
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax.data import sources
from flatfsc_jax.evaluation import ncc, tsa

IMAGE = (16, 16, 1)


def adapters(variables):
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["tsa"])
    }


@pytest.mark.parametrize(
    "arch, expected", [("resnet18", 16), ("resnet10", 8), ("conv4", 4)]
)  # fmt: skip
def test_one_identity_adapter_beside_every_stage_3x3_convolution(arch, expected):
    model = models.build_model(arch, 0, width=0.25)
    sample = np.zeros((1, *IMAGE), np.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)
    tsa_model, tsa_vars = tsa.with_tsa(model, variables, sample)
    assert tsa_model.tsa and not model.tsa
    found = adapters(tsa_vars)
    assert len(found) == expected
    kernels = {
        "/".join(str(k.key) for k in path[:-1]): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel" and leaf.ndim == 4
    }
    for name, alpha in found.items():
        conv = name.rsplit("/", 1)[0]  # .../Conv_i/alpha sits beside .../Conv_i/kernel
        k = kernels[conv]
        assert k.shape[:2] == (3, 3), f"adapter beside a {k.shape[:2]} convolution"
        assert alpha.shape == (k.shape[2], k.shape[3])
        # 1e-4 * eye(C_out, C_in), transposed to our [C_in, C_out] layout.
        np.testing.assert_array_equal(
            alpha, np.float32(1e-4) * np.eye(k.shape[2], k.shape[3], dtype=np.float32)
        )
    if arch != "conv4":  # the stem (5x5) and the 1x1 downsample convolutions get none
        n_3x3 = sum(k.shape[:2] == (3, 3) for k in kernels.values())
        assert n_3x3 == expected and len(kernels) > expected
    # Rectangular identities where the width changes (first conv of stages 2-4; conv4's
    # first conv reads the single grey channel).
    assert any(a.shape[0] != a.shape[1] for a in found.values())


def test_adapted_resnet_starts_within_1e3_of_the_frozen_backbone():
    model = models.build_model("resnet10", 0, width=0.125)
    images = np.random.default_rng(0).uniform(-1, 1, (6, *IMAGE)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
    tsa_model, tsa_vars = tsa.with_tsa(model, variables, images)
    frozen = np.asarray(jax.jit(model.embed)(variables, images))
    adapted = np.asarray(jax.jit(tsa_model.embed)(tsa_vars, images))
    rel = np.linalg.norm(adapted - frozen) / np.linalg.norm(frozen)
    assert 0 < rel < 1e-3  # the adapters are there (alpha = 1e-4 I, not 0) but tiny
    # Zero adapters give the frozen backbone (up to float32 rounding of the sum).
    zero = {**tsa_vars, "tsa": jax.tree.map(np.zeros_like, tsa_vars["tsa"])}
    np.testing.assert_allclose(
        np.asarray(jax.jit(tsa_model.embed)(zero, images)), frozen, rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def toy():
    """A random conv4 and a 4-way support set it does not separate well."""
    model = models.build_model("conv4", 0, width=0.25)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6).astype(np.int32)
    images = rng.uniform(-1, 1, (24, *IMAGE)).astype(np.float32)
    for i, c in enumerate(labels):  # a faint class-specific square in the noise
        images[i, 4 * c : 4 * c + 4, 4 * c : 4 * c + 4] += 0.5
    mask = np.ones(24, bool)
    mask[-1] = False  # one padded slot
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])
    return model, variables, images, labels, mask


def test_forty_steps_improve_support_accuracy_and_leave_the_backbone_frozen(toy):
    model, variables, images, labels, mask = toy
    tsa_model, tsa_vars = tsa.with_tsa(model, variables, images)

    def support_accuracy(v, beta):
        logits = tsa.classify(
            v, beta, images, labels, mask, images, model=tsa_model, max_ways=4
        )  # fmt: skip
        pred = np.argmax(np.asarray(logits), -1)
        return float(np.mean(pred[mask] == labels[mask]))

    lr_alpha, lr_beta = tsa.learning_rates(seen=False)
    adapted, beta, losses = tsa.adapt_task(
        tsa_model, tsa_vars, images, labels, mask, 4, lr_alpha=lr_alpha, lr_beta=lr_beta
    )
    losses = np.asarray(losses)
    assert losses.shape == (tsa.DEFAULT_STEPS,) and np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0]
    before = support_accuracy(tsa_vars, np.eye(model.embedding_dim, dtype=np.float32))
    after = support_accuracy(adapted, beta)
    assert after > before + 0.1 and after > 0.9, (before, after)
    # Only the adapters (and the PA map) moved: weights and BN statistics are the same
    # objects, and every adapter left its initial value.
    assert adapted["params"] is tsa_vars["params"]
    assert adapted["batch_stats"] is tsa_vars["batch_stats"]
    for name, alpha in adapters(adapted).items():
        assert not np.allclose(alpha, adapters(tsa_vars)[name]), name
    assert not np.allclose(np.asarray(beta), np.eye(model.embedding_dim), atol=1e-3)


def test_zero_steps_is_ncc_of_the_initial_adapted_backbone(toy):
    model, variables, images, labels, mask = toy
    tsa_model, tsa_vars = tsa.with_tsa(model, variables, images)
    adapted, beta, losses = tsa.adapt_task(
        tsa_model, tsa_vars, images, labels, mask, 4, lr_alpha=0.5, lr_beta=1.0, steps=0
    )
    assert losses.shape == (0,)
    got = tsa.classify(adapted, beta, images, labels, mask, images[:5], model=tsa_model, max_ways=4)
    embed = jax.jit(tsa_model.embed)
    want = ncc.prototype_logits(
        embed(tsa_vars, images), labels, mask, embed(tsa_vars, images[:5]), 4
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_learning_rates_and_bad_input(toy):
    model, variables, images, labels, mask = toy
    assert tsa.learning_rates(seen=True) == (0.05, 0.1)
    assert tsa.learning_rates(seen=False) == (0.5, 1.0)
    with pytest.raises(ValueError, match="with_tsa"):
        tsa.adapt_task(model, variables, images, labels, mask, 4, lr_alpha=0.1, lr_beta=0.1)
    with pytest.raises(ValueError, match="lr_alpha"):
        tsa.episode_accuracies(model, variables, None, None, lr_alpha=0.0, lr_beta=0.1)
    with pytest.raises(ValueError, match="^steps must be an integer >= 0"):
        tsa.episode_accuracies(model, variables, None, None, lr_alpha=0.1, lr_beta=0.1, steps=-2)
    other = models.build_model("conv4", 0, width=0.5)
    with pytest.raises(ValueError, match="parameter tree"):
        tsa.with_tsa(other, variables, images)


def test_episode_accuracies_equal_a_loop_of_one_task_adaptations(split_and_episodes):
    # The reference: adapt_task + classify on each episode's padded arrays, one by one.
    model = models.build_model("conv4", 0, width=0.25)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), np.zeros((1, *IMAGE), np.float32))
    split, episodes = split_and_episodes
    got = tsa.episode_accuracies(
        model, variables, split, episodes, lr_alpha=0.5, lr_beta=1.0, steps=3
    )
    tsa_model, tsa_vars = tsa.with_tsa(model, variables, np.zeros((1, *IMAGE), np.float32))
    want = []
    for e in range(len(got)):
        s_idx, s_lab, s_mask, q_idx, q_lab, q_mask = (
            np.asarray(a[e]) for a in episodes.index_arrays()
        )
        support = sources.preprocess(split.get_images(s_idx))
        adapted, beta, _ = tsa.adapt_task(
            tsa_model,
            tsa_vars,
            support,
            s_lab,
            s_mask.astype(bool),
            5,
            lr_alpha=0.5,
            lr_beta=1.0,
            steps=3,
        )
        query = sources.preprocess(split.get_images(q_idx))
        logits = tsa.classify(
            adapted, beta, support, s_lab, s_mask.astype(bool), query, model=tsa_model, max_ways=5
        )
        hit = np.argmax(np.asarray(logits), -1) == q_lab
        want.append(hit[q_mask.astype(bool)].mean())
    np.testing.assert_allclose(got, want)
    assert len(set(want)) > 1  # the episodes differ, so a mix-up would show
