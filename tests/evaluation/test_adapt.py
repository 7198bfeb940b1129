"""Tests for flatfsc_jax.evaluation.adapt: support-set fine-tuning (full and LoRA) then NCC."""

import importlib.util

import jax
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax.data import sources
from flatfsc_jax.evaluation import adapt, ncc

IMAGE = (16, 16, 1)


@pytest.fixture(scope="module")
def conv4():
    model = models.build_model("conv4", 0, width=0.125)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, *IMAGE), np.float32))
    return model, variables


@pytest.fixture(scope="module")
def support():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 3).astype(np.int32)
    # Class-specific bright squares plus noise: learnable, but not solved at init.
    images = rng.uniform(-1, 1, (12, *IMAGE)).astype(np.float32) * 0.5
    for i, c in enumerate(labels):
        images[i, 4 * c : 4 * c + 4, 4 * c : 4 * c + 4] += 1.0
    mask = np.ones(12, bool)
    mask[-1] = False  # one padded slot
    return images, labels, mask


def conv_kernels(params):
    return [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if path[-1].key == "kernel" and leaf.ndim == 4
    ]


# One fine-tuning run per mode, shared by the tests below (each run compiles its loop).
STEPS, LEARNING_RATE = {"full": 10, "lora": 10}, {"full": 1e-2, "lora": 3e-2}


@pytest.fixture(scope="module")
def tuned(conv4, support):
    model, variables = conv4
    images, labels, mask = support
    return {
        mode: adapt.adapt_backbone(
            model,
            variables,
            images,
            labels,
            mask,
            4,
            mode=mode,
            steps=STEPS[mode],
            learning_rate=LEARNING_RATE[mode],
        )
        for mode in adapt.MODES
    }


@pytest.mark.parametrize("mode", adapt.MODES)
def test_support_loss_decreases(tuned, mode):
    losses = np.asarray(tuned[mode][2])
    assert losses.shape == (STEPS[mode],)
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0]


def test_steps_zero_is_plain_ncc(conv4, support):
    model, variables = conv4
    images, labels, mask = support
    queries = images[:5] + 0.1
    for mode in adapt.MODES:
        got = adapt.finetune_and_classify(
            model, variables, images, labels, mask, queries, 6, mode=mode, steps=0
        )
        embed = jax.jit(model.embed)
        want = ncc.prototype_logits(
            embed(variables, images), labels, mask, embed(variables, queries), 6
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(want, -1))


@pytest.mark.parametrize(
    "arch, expected_convs", [("conv4", 4), ("resnet10", 1 + 4 * 2 + 3)], ids=["conv4", "resnet10"]
)  # fmt: skip
def test_lora_parameter_count_and_identity_at_init(arch, expected_convs):
    rank = 3
    model = models.build_model(arch, 0, width=0.125)
    sample = np.random.default_rng(1).uniform(-1, 1, (4, *IMAGE)).astype(np.float32)
    # Shapes are all the adapter count needs: no forward pass is compiled for them.
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), sample[:1])
    if arch == "conv4":
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), sample[:1])
    lora_model, lora_vars = adapt.with_lora(model, variables, sample, rank=rank)
    kernels = conv_kernels(variables["params"])
    assert len(kernels) == expected_convs
    expected = sum(rank * (k.shape[0] * k.shape[1] * k.shape[2] + k.shape[3]) for k in kernels)
    assert models.count_params(lora_vars["lora"]) == expected
    # Pre-trained weights are copied in unchanged and the adapters start as the identity.
    assert lora_vars["params"] is variables["params"]
    if arch == "conv4":  # compiling resnet10's forward pass too would cost ~10 s
        np.testing.assert_array_equal(
            np.asarray(jax.jit(lora_model.embed)(lora_vars, sample)),
            np.asarray(jax.jit(model.embed)(variables, sample)),
        )


def test_full_changes_params_and_lora_changes_only_adapters(conv4, support, tuned):
    model, variables = conv4
    images = support[0]
    full = tuned["full"][1]
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), full["params"], variables["params"])
    assert all(jax.tree.leaves(changed))
    lora_model, lora, _ = tuned["lora"]
    for collection in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, lora[collection], variables[collection])
    _, init_lora = adapt.with_lora(model, variables, images)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), lora["lora"], init_lora["lora"])
    assert all(moved[name]["b"] for name in moved)  # every zero-initialised B has moved
    # The adapted LoRA network computes something different from the base network.
    assert not np.allclose(
        jax.jit(lora_model.embed)(lora, images), jax.jit(model.embed)(variables, images)
    )


def test_adapt_episodes_with_zero_steps_equals_cached_embedding_ncc(conv4, split_and_episodes):
    model, variables = conv4
    split, episodes = split_and_episodes
    got = adapt.adapt_episodes(model, variables, split, episodes, steps=0)
    embeddings = ncc.embed_split(model, variables, split)
    want = ncc.episode_accuracies(embeddings, episodes)
    np.testing.assert_allclose(got, want)


def test_adapt_episodes_padding_does_not_change_training(conv4, split_and_episodes):
    # BN runs in eval mode and padded slots are masked out of the loss, so the bucketed
    # (little padding) and full-width (much padding) runs train the same network.
    model, variables = conv4
    split, episodes = split_and_episodes
    kwargs = dict(mode="full", steps=3, learning_rate=1e-2)
    bucketed = adapt.adapt_episodes(model, variables, split, episodes, bucket=True, **kwargs)
    full_width = adapt.adapt_episodes(model, variables, split, episodes, bucket=False, **kwargs)
    np.testing.assert_allclose(bucketed, full_width)


@pytest.mark.skipif(
    importlib.util.find_spec("flatfsc_jax.sam") is None, reason="flatfsc_jax.sam not present"
)
def test_sam_fine_tuning_runs_and_differs_from_plain(conv4, support, tuned):
    model, variables = conv4
    images, labels, mask = support
    _, plain, plain_losses = tuned["full"]
    _, sam, sam_losses = adapt.adapt_backbone(
        model,
        variables,
        images,
        labels,
        mask,
        4,
        mode="full",
        steps=STEPS["full"],
        learning_rate=LEARNING_RATE["full"],
        sam_rho=0.5,
    )
    # The clean loss before the first step is the same; SAM's steps then differ.
    assert float(sam_losses[0]) == pytest.approx(float(plain_losses[0]), rel=1e-6)
    assert np.isfinite(np.asarray(sam_losses)).all()
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), sam["params"], plain["params"])
    assert max(jax.tree.leaves(diffs)) > 1e-4


def test_bad_options_raise_value_errors(conv4, support):
    model, variables = conv4
    images, labels, mask = support
    call = lambda **kw: adapt.finetune_and_classify(  # noqa: E731
        model, variables, images, labels, mask, images, 4, **kw
    )
    with pytest.raises(ValueError, match="mode='partial'"):
        call(mode="partial")
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        call(optimizer="lbfgs")
    with pytest.raises(ValueError, match="steps"):
        call(steps=-1)
    with pytest.raises(ValueError, match="learning_rate"):
        call(learning_rate=0.0)
    with pytest.raises(ValueError, match="lora_rank"):
        call(mode="lora", lora_rank=0)
    with pytest.raises(ValueError, match="metric"):
        call(metric="dot")


def test_learning_rates_share_one_compilation(conv4, support):
    """The learning rate is data: a second rate reuses the first one's compiled step."""
    model, variables = conv4
    images, labels, mask = support
    options = adapt.AdaptOptions(mode="full", steps=1, optimizer="sgd", metric="euclidean")
    adapt.adapt_backbone(model, variables, images, labels, mask, 4, options=options)
    compiled = adapt._adapt_step._cache_size()
    _, tuned, _ = adapt.adapt_backbone(
        model, variables, images, labels, mask, 4, options=options, learning_rate=0.5
    )
    assert adapt._adapt_step._cache_size() == compiled
    _, default, _ = adapt.adapt_backbone(model, variables, images, labels, mask, 4, options=options)
    # ... and the rate still reaches the step.
    diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), tuned, default)
    assert max(jax.tree.leaves(diffs)) > 0


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_adapt_episodes_equals_a_loop_of_one_episode_fine_tunings(conv4, split_and_episodes, mode):
    # The reference: finetune_and_classify on each episode's padded arrays, one by one.
    model, variables = conv4
    split, episodes = split_and_episodes
    kwargs = dict(mode=mode, steps=3, learning_rate=LEARNING_RATE[mode])
    got = adapt.adapt_episodes(model, variables, split, episodes, **kwargs)
    arrays = [np.asarray(a) for a in episodes.index_arrays()]
    want = []
    for e in range(len(got)):
        s_idx, s_lab, s_mask, q_idx, q_lab, q_mask = (a[e] for a in arrays)
        logits = adapt.finetune_and_classify(
            model,
            variables,
            sources.preprocess(split.get_images(s_idx)),
            s_lab,
            s_mask.astype(bool),
            sources.preprocess(split.get_images(q_idx)),
            5,
            **kwargs,
        )
        hit = np.argmax(np.asarray(logits), -1) == q_lab
        want.append(hit[q_mask.astype(bool)].mean())
    np.testing.assert_allclose(got, want)
    assert len(set(want)) > 1  # the episodes differ, so a mix-up would show
