"""Tests for flatfsc_jax.flatness.sharpness against independent references.

* adaptive average-case sharpness of a quadratic: ``0.5 rho^2 sum_i H_ii w_i^2``;
* adaptive worst-case sharpness of 2-D quadratics: brute force over a grid of the ball;
* relative flatness: an explicit NumPy Hessian of a linear-softmax head;
* reparametrisation invariance on a ReLU network, where plain measures must move;
* CDNV, effective rank and weight norms: plain-Python loops.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax.data import sources
from flatfsc_jax.flatness import sharpness as sh

# ------------------------------------------------------------------------------ quadratics


def _quadratic(h, b):
    def loss_fn(params):
        x = jnp.concatenate([jnp.ravel(p) for p in jax.tree.leaves(params)])
        return 0.5 * x @ h @ x + b @ x

    return loss_fn


def _tree_quadratic(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "a": rng.normal(size=3).astype(np.float32),
        "b": rng.normal(size=(2, 2)).astype(np.float32),
    }
    q = rng.normal(size=(7, 7))
    h = (q @ q.T / 7 + np.diag(rng.uniform(0.5, 2.0, 7))).astype(np.float32)
    b = rng.normal(size=7).astype(np.float32)
    flat = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)])
    return params, h, b, flat


@pytest.mark.parametrize("antithetic", [True, False])
def test_average_case_matches_the_quadratic_closed_form(antithetic):
    params, h, b, w = _tree_quadratic()
    loss_fn = _quadratic(jnp.asarray(h), jnp.asarray(b))
    rho = 0.1
    expected = 0.5 * rho**2 * float(np.sum(np.diag(h) * w**2))
    got = sh.adaptive_average_sharpness(
        loss_fn, params, rho=rho, samples=400, antithetic=antithetic, seed=3
    )
    assert got["loss"] == pytest.approx(float(0.5 * w @ h @ w + b @ w), rel=1e-5)
    assert abs(got["sharpness"] - expected) < 4 * got["std_error"]
    # The pairs cancel the gradient term, so their error bar is far tighter.
    if antithetic:
        assert got["std_error"] < 0.15 * expected


def test_antithetic_pairs_cancel_the_linear_term_exactly():
    """A purely linear loss has zero average sharpness draw by draw with pairs."""
    params = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    got = sh.adaptive_average_sharpness(
        lambda p: jnp.sum(jnp.array([3.0, 1.0, -2.0]) * p["w"]), params, rho=0.3, samples=5
    )
    assert got["sharpness"] == pytest.approx(0.0, abs=1e-6)


def _brute_force_max(loss2d, w, rho, norm, n=401):
    g = np.linspace(-rho, rho, n)
    gx, gy = np.meshgrid(g, g, indexing="ij")
    if norm == "l2":  # the disc: a polar grid reaches its boundary exactly
        r, t = np.meshgrid(np.linspace(0, rho, n), np.linspace(0, 2 * np.pi, 4 * n))
        gx, gy = r * np.cos(t), r * np.sin(t)
    vx, vy = w[0] + abs(w[0]) * gx, w[1] + abs(w[1]) * gy
    return float(np.max(loss2d(vx, vy)) - loss2d(w[0], w[1]))


@pytest.mark.parametrize(
    "a, norm",
    [
        (np.array([[2.0, 0.5], [0.5, 1.0]]), "linf"),  # convex: the max is a vertex
        (np.array([[1.0, 0.0], [0.0, -6.0]]), "linf"),  # concave in y: inside an edge
        (np.array([[2.0, 0.5], [0.5, 1.0]]), "l2"),
        (np.array([[1.0, 0.0], [0.0, -6.0]]), "l2"),
    ],
)
def test_worst_case_matches_brute_force_over_the_ball(a, norm):
    w = np.array([1.0, -2.0], np.float32)
    b = np.array([0.3, -0.4])

    def loss2d(x, y):
        return 0.5 * (a[0, 0] * x * x + 2 * a[0, 1] * x * y + a[1, 1] * y * y) + b[0] * x + b[1] * y

    rho = 0.4
    got = sh.adaptive_worst_sharpness(lambda p: loss2d(p[0], p[1]), w, rho=rho, steps=40, norm=norm)
    expected = _brute_force_max(loss2d, w, rho, norm)
    assert expected > 0.1
    assert got["sharpness"] == pytest.approx(expected, rel=1e-2)
    assert got["sharpness"] <= expected + 1e-4  # never leaves the ball


def test_worst_case_is_monotone_in_steps_and_rejects_bad_arguments():
    params, h, b, _ = _tree_quadratic(1)
    steps = sh.adaptive_steps(_quadratic(jnp.asarray(h), jnp.asarray(b)))
    few = sh.adaptive_worst_sharpness(steps, params, rho=0.05, steps=2)["sharpness"]
    many = sh.adaptive_worst_sharpness(steps, params, rho=0.05, steps=10)["sharpness"]
    assert 0 < few <= many + 1e-7
    with pytest.raises(ValueError, match="norm"):
        sh.adaptive_worst_sharpness(steps, params, rho=0.05, norm="l2")  # built for linf
    with pytest.raises(ValueError, match="norm"):
        sh.adaptive_steps(lambda p: 0.0, norm="l1")
    # The average case only evaluates losses: steps built for either ball serve it.
    l2_steps = sh.adaptive_steps(_quadratic(jnp.asarray(h), jnp.asarray(b)), norm="l2")
    assert sh.adaptive_average_sharpness(l2_steps, params, rho=0.05)["sharpness"] > 0
    with pytest.raises(ValueError, match="rho"):
        sh.adaptive_average_sharpness(steps, params, rho=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        sh.adaptive_worst_sharpness(steps, params, rho=0.1, momentum=1.5)


def test_apgd_checkpoints_follow_the_schedule():
    marks = sh.apgd_checkpoints(100)
    assert marks[0] == 22 and marks[-1] >= 100 and np.all(np.diff(marks) > 0)
    gaps = np.diff(marks)
    assert gaps[0] == 19 and min(gaps) >= 6  # 0.22 -> 0.41, shrinking by 3% to >= 6%


# ------------------------------------------------------------------------ relative flatness


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _numpy_relative_flatness(x, y, kernel, bias):
    """Petzka's sum over (s, s') of <w_s, w_s'> Tr(H_{s,s'}) from the explicit Hessian.

    Mean cross-entropy of softmax(x W + b): H[(i,s),(j,t)] = mean_n x_ni x_nj A_n[s,t],
    A_n = diag(p_n) - p_n p_n^T.
    """
    n, d = x.shape
    c = kernel.shape[1]
    p = _softmax(x @ kernel + bias)
    hessian = np.zeros((d, c, d, c))
    for k in range(n):
        a = np.diag(p[k]) - np.outer(p[k], p[k])
        hessian += np.einsum("i,j,st->isjt", x[k], x[k], a) / n
    total = 0.0
    for s, t in itertools.product(range(c), range(c)):
        block_trace = sum(hessian[i, s, i, t] for i in range(d))
        total += float(kernel[:, s] @ kernel[:, t]) * block_trace
    return total, hessian


def _head_problem(seed=0, n=12, d=3, c=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, c, n)
    kernel = rng.normal(size=(d, c))
    bias = rng.normal(size=c)
    return x, y, kernel, bias


def test_relative_flatness_matches_the_explicit_hessian():
    x, y, kernel, bias = _head_problem()
    expected, hessian = _numpy_relative_flatness(x, y, kernel, bias)
    loss_fn = sh.linear_head_loss(x, y, jnp.asarray(bias, jnp.float32))
    np.testing.assert_allclose(
        jax.hessian(loss_fn)(jnp.asarray(kernel, jnp.float32)), hessian, rtol=1e-4, atol=1e-6
    )
    exact = sh.relative_flatness(loss_fn, kernel.astype(np.float32))
    assert exact["std_error"] == 0.0
    assert exact["relative_flatness"] == pytest.approx(expected, rel=1e-4)
    probes = sh.relative_flatness(loss_fn, kernel.astype(np.float32), exact_max=0, samples=2000)
    assert 0 < probes["std_error"] < 0.1 * expected
    assert abs(probes["relative_flatness"] - expected) < 4 * probes["std_error"]
    with pytest.raises(ValueError, match="kernel"):
        sh.relative_flatness(loss_fn, np.zeros(3))


def test_adaptive_and_relative_measures_ignore_a_layer_rescaling_plain_ones_do_not():
    """relu(x V + c) W + b equals relu(x V/a + c/a) (a W) + b: same function, other weights."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.integers(0, 3, 16)
    v, c0 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    kernel, bias = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    a = 3.7

    def loss_fn(p):
        feats = jax.nn.relu(x @ p["v"] + p["c"])
        return sh.linear_head_loss(feats, y, p["b"])(p["k"])

    original = {"v": v, "c": c0, "k": kernel, "b": bias}
    rescaled = {"v": v / a, "c": c0 / a, "k": kernel * a, "b": bias}
    assert float(loss_fn(original)) == pytest.approx(float(loss_fn(rescaled)), rel=1e-5)

    def head_measures(p):
        feats = jax.nn.relu(x @ p["v"] + p["c"])
        head_loss = sh.linear_head_loss(feats, y, p["b"])
        trace = float(jnp.trace(jax.hessian(head_loss)(p["k"]).reshape(12, 12)))
        return sh.relative_flatness(head_loss, p["k"])["relative_flatness"], trace

    kappa, trace = head_measures(original)
    kappa_r, trace_r = head_measures(rescaled)
    assert kappa_r == pytest.approx(kappa, rel=1e-4)
    assert trace_r == pytest.approx(trace / a**2, rel=1e-4)  # the plain Hessian moves

    for measure in (
        lambda p: sh.adaptive_average_sharpness(loss_fn, p, rho=0.1, samples=4, seed=1),
        lambda p: sh.adaptive_worst_sharpness(loss_fn, p, rho=0.05, steps=5),
    ):
        assert measure(rescaled)["sharpness"] == pytest.approx(
            measure(original)["sharpness"], rel=1e-3
        )
    gap = sh.sam_gap(loss_fn, original, rho=0.05)["sharpness"]
    assert sh.sam_gap(loss_fn, rescaled, rho=0.05)["sharpness"] != pytest.approx(gap, rel=0.05)


# ---------------------------------------------------------------------------- baselines


def test_cdnv_matches_plain_loops():
    rng = np.random.default_rng(0)
    labels = np.repeat([3, 7, 9, 11], [5, 6, 4, 7])
    feats = rng.normal(size=(labels.size, 6)) + labels[:, None] * 0.3
    classes = sorted(set(labels.tolist()))
    mean, var = {}, {}
    for c in classes:
        rows = [f for f, lab in zip(feats, labels, strict=True) if lab == c]
        mean[c] = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
        var[c] = sum(
            sum((a - b) ** 2 for a, b in zip(r, mean[c], strict=True)) for r in rows
        ) / len(rows)
    pairs = []
    for i, j in itertools.combinations(classes, 2):
        dist = sum((a - b) ** 2 for a, b in zip(mean[i], mean[j], strict=True))
        pairs.append((var[i] + var[j]) / (2 * dist))
    assert sh.cdnv(feats, labels) == pytest.approx(sum(pairs) / len(pairs), rel=1e-10)
    with pytest.raises(ValueError, match="2 classes"):
        sh.cdnv(feats, np.zeros(labels.size))
    with pytest.raises(ValueError, match="labels"):
        sh.cdnv(feats, labels[:-1])


def test_effective_rank_matches_a_plain_entropy():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(20, 6)) @ np.diag([5, 3, 1, 0.5, 0.1, 0.0])
    s = np.linalg.svd(feats, compute_uv=False)
    total = sum(s)
    entropy = -sum(v / total * math.log(v / total) for v in s if v > 0)
    assert sh.effective_rank(feats) == pytest.approx(math.exp(entropy), rel=1e-10)
    assert sh.effective_rank(np.eye(4)) == pytest.approx(4.0)
    assert sh.effective_rank(np.outer(np.arange(1, 6), np.ones(3))) == pytest.approx(1.0)
    # A shared offset is one extra direction unless centred away.
    offset = np.eye(4)[:, :3] * 0.1 + 10.0
    assert sh.effective_rank(offset, center=True) > sh.effective_rank(offset) + 0.5
    with pytest.raises(ValueError, match="all-zero"):
        sh.effective_rank(np.zeros((3, 2)))


def test_weight_norms_count_kernels_apart():
    params = {"conv": {"kernel": np.full((2, 2, 1, 3), 2.0)}, "bn": {"scale": np.ones(3)}}
    got = sh.weight_norms(params)
    assert got["weight_norm"] == pytest.approx(math.sqrt(12 * 4 + 3))
    assert got["kernel_norm"] == pytest.approx(math.sqrt(12 * 4))


# ------------------------------------------------------------------------ one backbone


def _sharpened(variables, c):
    """Conv kernels x c and the BN statistics after them x c / c^2: the same eval function."""
    params, stats = dict(variables["params"]), dict(variables["batch_stats"])
    for i in range(4):
        params[f"Conv_{i}"] = {"kernel": params[f"Conv_{i}"]["kernel"] * c}
        old = stats[f"BatchNorm_{i}"]
        stats[f"BatchNorm_{i}"] = {"mean": old["mean"] * c, "var": old["var"] * c * c}
    return {"params": params, "batch_stats": stats}


def test_measure_backbone_scores_a_conv4_and_sees_through_a_bn_rescaling():
    model = models.build_model("conv4", 5, width=0.125)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(56, 16, 16, 1), dtype=np.uint8)
    train = sources.SplitData("toy/a", "train", pixels[:32], np.arange(32) % 5, list("abcde"))
    held = sources.SplitData("toy/a", "valid", pixels[32:], np.arange(24) % 4, list("fghi"))
    images = sources.preprocess(pixels[:32])
    variables = model.init(jax.random.key(0), jnp.asarray(images[:1]))
    variables = {
        "params": variables["params"],
        # Running statistics unlike a fresh init's (0, 1), as after training.
        "batch_stats": {
            name: {
                "mean": jnp.asarray(rng.normal(0, 0.1, s["mean"].shape), jnp.float32),
                "var": jnp.asarray(rng.uniform(0.5, 1.5, s["var"].shape), jnp.float32),
            }
            for name, s in variables["batch_stats"].items()
        },
    }
    settings = sh.SharpnessSettings(
        average_samples=3, worst_steps=3, worst_batch=16, trace_samples=0
    )
    out = sh.measure_backbone(
        model,
        variables,
        images,
        train.labels,
        heldout_images=sources.preprocess(pixels[32:]),
        heldout_labels=held.labels,
        training_rho=0.1,
        settings=settings,
    )
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert out["worst_batches"] == 2 and out["relative_flatness_se"] == 0.0
    assert out["adaptive_worst_sharpness"] > 0 and out["sam_gap_training_rho"] > 0
    assert "hessian_trace" not in out  # trace_samples=0 skips the Hessian measures
    # The same images through the split helper, on the BN-rescaled copy.
    sharp = sh.measure_split_backbone(
        model, _sharpened(variables, 0.25), train, held, examples=32, settings=settings
    )
    assert sharp["loss"] == pytest.approx(out["loss"], rel=1e-3)  # BN eps
    for key in (
        "adaptive_average_sharpness",
        "adaptive_worst_sharpness",
        "relative_flatness",
        "cdnv",
        "effective_rank",
    ):
        assert sharp[key] == pytest.approx(out[key], rel=2e-2), key
    assert sharp["sam_gap_common_rho"] > 2 * out["sam_gap_common_rho"]  # the plain ball moves
    assert sharp["heldout_examples"] == 24
    with pytest.raises(ValueError, match="worst_batch"):
        sh.measure_backbone(
            model,
            variables,
            images[:8],
            train.labels[:8],
            heldout_images=images,
            heldout_labels=train.labels,
            settings=settings,
        )
    with pytest.raises(ValueError, match="head"):
        sh.measure_split_backbone(model, {"params": {}}, train, held)
    wrong = sources.SplitData("toy/b", "train", pixels[:32], np.arange(32) % 4, list("abcd"))
    with pytest.raises(ValueError, match="4"):
        sh.measure_split_backbone(model, variables, wrong, held)
    with pytest.raises(ValueError, match="average_samples"):
        sh.SharpnessSettings(average_samples=1)
