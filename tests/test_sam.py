"""SAM gradient/update against independent references.

References: ``jax.grad`` (rho = 0), ``optax.contrib.sam`` (the textbook SAM step), closed
forms on a quadratic in float64 NumPy (SAM and ASAM), plain Python loops over chunks
(m-sharpness) and direct ``model.apply`` calls (BatchNorm statistics).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatfsc_jax import models, sam

RNG = np.random.default_rng(0)
# Jitted (eager dispatch compiles every op); rho stays a static Python number, as in the
# production step, so rho == 0 would take the ERM path.
_sam_gradient = jax.jit(
    sam.sam_gradient, static_argnames=("loss_fn", "rho", "eps", "adaptive", "m")
)


def _mlp_problem(batch_size=12, dim=6, hidden=5, classes=3):
    """A BatchNorm-free softmax-regression MLP, its params and a batch."""
    params = {
        "w1": jnp.asarray(RNG.normal(size=(dim, hidden)), jnp.float32),
        "b1": jnp.asarray(RNG.normal(size=(hidden,)), jnp.float32),
        "w2": jnp.asarray(RNG.normal(size=(hidden, classes)), jnp.float32),
    }
    batch = {
        "x": jnp.asarray(RNG.normal(size=(batch_size, dim)), jnp.float32),
        "y": jnp.asarray(RNG.integers(0, classes, size=batch_size), jnp.int32),
    }

    def loss_fn(p, b):
        logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]))
        return loss, {"mean_logit": jnp.mean(logits)}

    return loss_fn, params, batch


def _quadratic(dim=5):
    """L(w) = 0.5 w^T A w with a random SPD A; params as a single-leaf dict."""
    q = RNG.normal(size=(dim, dim))
    a = q @ q.T + dim * np.eye(dim)
    w = RNG.normal(size=dim)

    def loss_fn(p, _batch):
        return 0.5 * p["w"] @ jnp.asarray(a, jnp.float32) @ p["w"], ()

    return loss_fn, a, w


def _close(tree_a, tree_b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_rho_zero_is_exactly_the_erm_gradient():
    loss_fn, params, batch = _mlp_problem()
    (loss, aux), erm = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    got, got_aux, diag = sam.sam_gradient(loss_fn, params, batch, rho=0.0)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(erm), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(got_aux["mean_logit"]) == float(aux["mean_logit"])
    assert float(diag.loss) == float(diag.perturbed_loss) == float(loss)
    assert float(diag.sharpness) == 0.0


def test_traced_rho_zero_perturbs_nothing():
    """A traced 0 runs the two-pass math: e == 0 exactly, so only XLA's re-association
    of the same gradient computation separates it from ERM."""
    loss_fn, params, batch = _mlp_problem()
    erm = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(params)
    got, _, diag = jax.jit(lambda r: sam.sam_gradient(loss_fn, params, batch, rho=r))(
        jnp.float32(0.0)
    )
    _close(got, erm, rtol=1e-6, atol=1e-8)
    assert abs(float(diag.sharpness)) < 1e-6
    zero = sam.sam_perturbation(params, erm, rho=jnp.float32(0.0))
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(zero))


def test_quadratic_matches_closed_form():
    loss_fn, a, w = _quadratic()
    rho, lr = 0.3, 0.05
    g = a @ w
    e = rho * g / np.linalg.norm(g)
    w_pert = w + e
    expected_grad = a @ w_pert
    params = {"w": jnp.asarray(w, jnp.float32)}
    grads, _, diag = _sam_gradient(loss_fn, params, None, rho=rho)
    np.testing.assert_allclose(grads["w"], expected_grad, rtol=1e-5)
    np.testing.assert_allclose(diag.loss, 0.5 * w @ a @ w, rtol=1e-5)
    np.testing.assert_allclose(diag.perturbed_loss, 0.5 * w_pert @ a @ w_pert, rtol=1e-5)
    np.testing.assert_allclose(diag.grad_norm, np.linalg.norm(g), rtol=1e-5)
    tx = optax.sgd(lr)
    new_params, _, _, _ = sam.sam_update(loss_fn, params, tx.init(params), None, tx, rho=rho)
    np.testing.assert_allclose(new_params["w"], w - lr * expected_grad, rtol=1e-5)


def test_asam_matches_hand_computation():
    loss_fn, a, w = _quadratic()
    rho, eps = 0.5, 1e-12
    g = a @ w
    e = rho * w**2 * g / (np.linalg.norm(np.abs(w) * g) + eps)
    params = {"w": jnp.asarray(w, jnp.float32)}
    grads, _, diag = _sam_gradient(loss_fn, params, None, rho=rho, adaptive=True)
    np.testing.assert_allclose(grads["w"], a @ (w + e), rtol=1e-5)
    np.testing.assert_allclose(diag.perturbed_loss, 0.5 * (w + e) @ a @ (w + e), rtol=1e-5)
    # ASAM and SAM perturb differently unless |w| is constant: the test can tell them apart.
    plain, _, _ = _sam_gradient(loss_fn, params, None, rho=rho)
    assert not np.allclose(plain["w"], grads["w"], rtol=1e-3)


def test_update_matches_optax_contrib_sam():
    """Several steps of SGD + SAM against optax's opaque-mode SAM wrapper.

    ``optax.contrib.sam`` runs ``sync_period - 1`` adversarial steps per update, so one
    ascent step is ``sync_period=2`` (1 would be plain SGD). Its adversarial ``sgd(rho)``
    produces ``-rho * g / ||g||`` and the wrapper negates it: an *ascent* of length rho.
    """
    loss_fn, params, batch = _mlp_problem()
    lr, rho = 0.1, 0.2
    grad_fn = jax.grad(lambda p, _: loss_fn(p, batch)[0])
    oracle = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    ours = optax.sgd(lr)
    oracle_params, oracle_state = params, oracle.init(params)
    our_params, our_state = params, ours.init(params)
    step = jax.jit(functools.partial(sam.sam_update, loss_fn, tx=ours, rho=rho))
    for _ in range(3):
        updates, oracle_state = oracle.update(
            grad_fn(oracle_params, 0), oracle_state, oracle_params, grad_fn=grad_fn
        )
        oracle_params = optax.apply_updates(oracle_params, updates)
        our_params, our_state, _, _ = step(our_params, our_state, batch)
    _close(our_params, oracle_params)
    # The comparison has teeth: SAM moved the weights differently from plain SGD.
    sgd_params = params
    for _ in range(3):
        sgd_params = jax.tree.map(lambda p, g: p - lr * g, sgd_params, grad_fn(sgd_params, 0))
    assert not np.allclose(sgd_params["w1"], our_params["w1"], atol=1e-5)


def test_m_equal_to_batch_is_plain_sam():
    loss_fn, params, batch = _mlp_problem(batch_size=8)
    plain, plain_aux, plain_diag = _sam_gradient(loss_fn, params, batch, rho=0.1)
    chunked, chunked_aux, chunked_diag = _sam_gradient(loss_fn, params, batch, rho=0.1, m=8)
    _close(chunked, plain)
    _close(chunked_aux, plain_aux)
    _close(chunked_diag, plain_diag)


def test_m_sharpness_matches_python_loop_over_chunks():
    loss_fn, params, batch = _mlp_problem(batch_size=12)
    rho, m = 0.3, 4
    per_chunk = []
    for start in range(0, 12, m):
        chunk = jax.tree.map(lambda x, s=start: x[s : s + m], batch)
        per_chunk.append(_sam_gradient(loss_fn, params, chunk, rho=rho))
    expected = jax.tree.map(lambda *g: sum(g) / len(g), *[c[0] for c in per_chunk])
    got, aux, diag = _sam_gradient(loss_fn, params, batch, rho=rho, m=m)
    _close(got, expected)
    np.testing.assert_allclose(
        aux["mean_logit"], np.mean([c[1]["mean_logit"] for c in per_chunk]), rtol=1e-5
    )
    np.testing.assert_allclose(diag.loss, np.mean([c[2].loss for c in per_chunk]), rtol=1e-5)
    np.testing.assert_allclose(
        diag.perturbed_loss, np.mean([c[2].perturbed_loss for c in per_chunk]), rtol=1e-5
    )
    # The clean gradient of a mean loss is the mean of the chunk gradients: its norm is
    # the full-batch one, comparable with m=None.
    full = jax.grad(lambda p: loss_fn(p, batch)[0])(params)
    np.testing.assert_allclose(diag.grad_norm, sam.global_norm(full), rtol=1e-5)
    # Per-chunk perturbations differ from one whole-batch perturbation.
    whole, _, _ = _sam_gradient(loss_fn, params, batch, rho=rho)
    assert not np.allclose(whole["w1"], got["w1"], atol=1e-4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_finite_numbers(adaptive):
    loss_fn, _, w = _quadratic()
    params = {"w": jnp.zeros_like(jnp.asarray(w, jnp.float32))}  # the minimum: g == 0
    grads, _, diag = _sam_gradient(loss_fn, params, None, rho=0.1, adaptive=adaptive)
    np.testing.assert_array_equal(grads["w"], 0.0)
    assert all(np.isfinite(np.asarray(x)) for x in diag)


def test_batchnorm_statistics_come_from_the_clean_pass():
    model = models.build_model("conv4", 5, width=0.125)
    images = jnp.asarray(RNG.uniform(-1, 1, size=(8, 8, 8, 1)), jnp.float32)
    labels = jnp.asarray(RNG.integers(0, 5, size=8), jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    batch_stats = variables["batch_stats"]

    def loss_fn(params, b):
        (logits, _), new_stats = model.apply(
            {"params": params, "batch_stats": batch_stats}, b["images"], train=True
        )
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]))
        return loss, new_stats

    batch = {"images": images, "labels": labels}
    rho = 0.5
    # Everything jitted: eager flax dispatch costs tens of seconds.
    loss_fn = jax.jit(loss_fn)
    grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]))
    grads, stats, _ = _sam_gradient(loss_fn, variables["params"], batch, rho=rho)
    _, clean_stats = loss_fn(variables["params"], batch)
    _close(stats, clean_stats, rtol=1e-6, atol=1e-7)
    clean_grads = grad_fn(variables["params"], batch)
    perturbed = jax.jit(lambda p, g: jax.tree.map(jnp.add, p, sam.sam_perturbation(p, g, rho=rho)))(
        variables["params"], clean_grads
    )
    _, perturbed_stats = loss_fn(perturbed, batch)
    diffs = jax.tree.map(lambda a, b: np.max(np.abs(np.subtract(a, b))), stats, perturbed_stats)
    assert max(jax.tree.leaves(diffs)) > 1e-4, "perturbed and clean statistics coincide"
    # ... while the gradient is the one at the perturbed point.
    _close(grads, grad_fn(perturbed, batch), rtol=1e-4, atol=1e-6)

    # m-sharpness: ghost batches, each chunk's statistics, averaged.
    _, ghost_stats, _ = _sam_gradient(loss_fn, variables["params"], batch, rho=rho, m=4)
    chunk_stats = [
        loss_fn(variables["params"], jax.tree.map(lambda x, s=s: x[s : s + 4], batch))[1]
        for s in (0, 4)
    ]
    _close(ghost_stats, jax.tree.map(lambda a, b: (a + b) / 2, *chunk_stats), rtol=1e-5)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0"):
        sam.check_sam_arguments(-0.1)
    with pytest.raises(ValueError, match=r"^rho must be"):
        sam.check_sam_arguments(float("nan"))
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0"):
        sam.check_sam_arguments(0.05, eps=0.0)
    with pytest.raises(ValueError, match=r"^m must be None \(one perturbation"):
        sam.check_sam_arguments(0.05, m=0)
    with pytest.raises(ValueError, match=r"^m=5 must divide batch_size=16"):
        sam.check_batch_split(16, m=5)
    with pytest.raises(ValueError, match=r"^batch_size=12 is not divisible by the 8"):
        sam.check_batch_split(12, num_devices=8)
    sam.check_sam_arguments(0.05, m=4)  # valid: no error
    sam.check_batch_split(16, m=4, num_devices=8)
    sam.check_sam_arguments(jnp.float32(0.05))  # an array radius (data) is not checked
    # No config needed: the functions name their own arguments.
    loss_fn, params, batch = _mlp_problem(batch_size=12)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0 .*got -1$"):
        sam.sam_gradient(loss_fn, params, batch, rho=-1)
    with pytest.raises(ValueError, match=r"^m=5 must divide batch_size=12"):
        sam.sam_gradient(loss_fn, params, batch, rho=0.1, m=5)
