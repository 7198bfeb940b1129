"""Tests for flatfsc_jax.flatness.measures against closed forms, dense Hessians and Python loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from flatfsc_jax.flatness import landscape
from flatfsc_jax.flatness import measures as measures_lib
from flatfsc_jax.models import build_model

# A quadratic with a clear spectral gap (lambda_2 / lambda_1 = 0.5) in a random basis.
EIGS = np.array([10.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])


def _rotation(n, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def _quadratic(a):
    a = jnp.asarray(a, jnp.float32)
    return lambda w: 0.5 * w @ a @ w


@pytest.fixture(scope="module")
def spd():
    q = _rotation(EIGS.size)
    return (q * EIGS) @ q.T, q[:, 0]


# ------------------------------------------------------------------------- Hessian tools


def test_top_eigenvalue_of_quadratic_matches_eigvalsh(spd):
    a, top_vector = spd
    out = measures_lib.top_hessian_eigenvalue(_quadratic(a), jnp.ones(EIGS.size), iters=40, seed=1)
    expected = np.linalg.eigvalsh(a).max()
    assert abs(float(out["eigenvalue"]) - expected) / expected < 1e-3
    assert abs(float(jnp.dot(out["vector"], top_vector))) > 0.999
    assert float(jnp.linalg.norm(out["vector"])) == pytest.approx(1.0, abs=1e-5)
    assert int(out["iterations"]) == 40


def test_top_eigenvalue_tol_stops_early_and_stays_accurate(spd):
    a, _ = spd
    out = measures_lib.top_hessian_eigenvalue(
        _quadratic(a), jnp.zeros(EIGS.size), iters=500, seed=2, tol=1e-6
    )
    assert 2 < int(out["iterations"]) < 500
    assert float(out["eigenvalue"]) == pytest.approx(EIGS.max(), rel=1e-3)


def test_power_iteration_records_its_estimates_and_keeps_the_sign(spd):
    a, _ = spd
    params = jnp.ones(EIGS.size)
    steps = measures_lib.iteration_steps(_quadratic(a))  # built once, shared by both calls
    full = measures_lib.top_hessian_eigenvalue(steps, params, iters=80, seed=0)
    assert full["eigenvalue"] == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-5)
    assert full["iterations"] == len(full["estimates"]) == 80
    early = measures_lib.top_hessian_eigenvalue(steps, params, iters=80, tol=1e-3, seed=0)
    assert early["iterations"] < 80 and early["relative_change"] <= 1e-3
    assert early["estimates"] == full["estimates"][: early["iterations"]]
    assert early["eigenvalue"] == pytest.approx(EIGS[0], rel=1e-2)
    # Largest magnitude with its sign.
    neg = measures_lib.top_hessian_eigenvalue(_quadratic(-a), jnp.ones(EIGS.size), iters=80)
    assert neg["eigenvalue"] == pytest.approx(-EIGS[0], rel=1e-5)


def test_hessian_tools_on_a_nonquadratic_pytree_match_the_dense_hessian(spd):
    a, _ = spd
    a = jnp.asarray(a, jnp.float32)
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.array([0.3, -0.7])}
    flat0, unravel = ravel_pytree(params)

    def loss_fn(p):
        w, _ = ravel_pytree(p)
        return 0.5 * w @ a @ w + 0.3 * jnp.sum(jnp.cos(w)) + 0.1 * jnp.sum(w**3)

    dense = np.asarray(jax.jit(jax.hessian(lambda w: loss_fn(unravel(w))))(flat0))
    vector = unravel(jnp.arange(8.0) - 3.0)
    hvp, _ = ravel_pytree(measures_lib.hessian_vector_product(loss_fn, params, vector))
    np.testing.assert_allclose(hvp, dense @ (np.arange(8.0) - 3.0), rtol=1e-5, atol=1e-4)

    eig = measures_lib.top_hessian_eigenvalue(loss_fn, params, iters=60, seed=0)
    assert jax.tree.structure(eig["vector"]) == jax.tree.structure(params)
    assert float(eig["eigenvalue"]) == pytest.approx(np.linalg.eigvalsh(dense).max(), rel=1e-3)

    tr = measures_lib.hessian_trace(loss_fn, params, samples=300, seed=0)
    assert abs(float(tr["trace"]) - np.trace(dense)) < 4 * float(tr["std_error"])


def test_hutchinson_trace_within_standard_errors_and_error_is_calibrated(spd):
    a, _ = spd
    samples = 400
    out = measures_lib.hessian_trace(_quadratic(a), jnp.zeros(EIGS.size), samples=samples, seed=3)
    se = float(out["std_error"])
    assert se > 0
    assert abs(float(out["trace"]) - np.trace(a)) < 4 * se
    # Var(z^T A z) for Rademacher z is 2 * sum_{i != j} A_ij^2.
    off_diagonal = a - np.diag(np.diag(a))
    expected_se = np.sqrt(2 * np.sum(off_diagonal**2) / samples)
    assert se == pytest.approx(expected_se, rel=0.2)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    diag = jnp.array([3.0, 0.5, 7.0, 1e-2, 2.0])
    out = measures_lib.hessian_trace(
        lambda w: 0.5 * jnp.sum(diag * w**2), jnp.ones(5), samples=5, seed=0
    )
    assert float(out["trace"]) == pytest.approx(float(diag.sum()), rel=1e-6)
    assert float(out["std_error"]) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ sharpness


def test_rho_sharpness_at_a_quadratic_minimum_is_half_rho_squared_lambda_max(spd):
    a, _ = spd
    rho = 0.05
    out = measures_lib.rho_sharpness(_quadratic(a), jnp.zeros(EIGS.size), rho=rho, steps=30)
    assert float(out["loss"]) == 0.0
    assert float(out["sharpness"]) == pytest.approx(0.5 * rho**2 * EIGS.max(), rel=1e-3)
    assert float(out["perturbation_norm"]) == pytest.approx(rho, rel=1e-5)


def test_rho_sharpness_with_zero_steps_is_the_sam_point(spd):
    a, _ = spd
    w = np.linspace(-1.0, 2.0, EIGS.size)
    rho = 0.1
    loss_fn = _quadratic(a)
    out = measures_lib.rho_sharpness(loss_fn, jnp.asarray(w, jnp.float32), rho=rho, steps=0)
    g = a @ w
    w_sam = w + rho * g / np.linalg.norm(g)
    assert float(out["perturbed_loss"]) == pytest.approx(0.5 * w_sam @ a @ w_sam, rel=1e-5)
    assert float(out["loss"]) == pytest.approx(0.5 * w @ a @ w, rel=1e-5)
    assert float(out["perturbation_norm"]) == pytest.approx(rho, rel=1e-5)


def test_rho_sharpness_at_a_critical_point_finds_the_top_curvature(spd):
    # At w = 0 the gradient vanishes: the ascent starts from a seeded random direction
    # and converges to the top eigenvector, where the increase is rho^2 * lambda_1 / 2.
    a, _ = spd
    loss_fn = _quadratic(a)
    out = measures_lib.rho_sharpness(loss_fn, jnp.zeros(EIGS.size), rho=0.1, steps=60, seed=3)
    assert out["loss"] == 0.0
    assert out["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)
    assert out["sharpness"] == pytest.approx(0.5 * 0.1**2 * EIGS[0], rel=1e-3)
    # Seeded, and the same with prebuilt (shareable) iteration steps.
    steps = measures_lib.iteration_steps(loss_fn)
    assert out == measures_lib.rho_sharpness(steps, jnp.zeros(EIGS.size), rho=0.1, steps=60, seed=3)


def test_rho_sharpness_ascent_improves_on_sam_and_stays_in_the_ball():
    # Non-convex and anisotropic: one SAM step is not the worst case.
    def loss_fn(p):
        return jnp.sum(jnp.sin(3.0 * p["x"]) * p["y"]) + 2.0 * jnp.sum(p["x"] ** 2 * p["y"] ** 2)

    params = {"x": jnp.array([0.3, -0.2, 0.1]), "y": jnp.array([[0.5], [-0.1], [0.2]])}
    rho = 0.5
    one_step = measures_lib.rho_sharpness(loss_fn, params, rho=rho, steps=0)
    ascent = measures_lib.rho_sharpness(loss_fn, params, rho=rho, steps=20, step_size=0.1)
    assert float(ascent["sharpness"]) > float(one_step["sharpness"]) + 1e-3
    assert float(ascent["perturbation_norm"]) <= rho * (1 + 1e-5)
    assert float(ascent["perturbed_loss"]) == pytest.approx(
        float(ascent["loss"] + ascent["sharpness"]), rel=1e-6
    )


def test_rho_sharpness_is_never_negative():
    # At a maximum every perturbation lowers the loss.
    out = measures_lib.rho_sharpness(lambda w: -0.5 * jnp.sum(w**2), jnp.zeros(3), rho=0.1)
    assert float(out["sharpness"]) == 0.0
    assert float(out["perturbed_loss"]) < float(out["loss"])


# ------------------------------------------------------------------ flat vs sharp minimum


FLAT_CENTRE, SHARP_CENTRE = np.array([-3.0, 0.0]), np.array([3.0, 1.0])
FLAT_CURVATURE, SHARP_CURVATURE = np.array([1.0, 0.4]), np.array([20.0, 8.0])


def _two_wells(w):
    flat = 0.5 * jnp.sum(FLAT_CURVATURE * (w - FLAT_CENTRE) ** 2)
    sharp = 0.5 * jnp.sum(SHARP_CURVATURE * (w - SHARP_CENTRE) ** 2)
    return jnp.minimum(flat, sharp)


@pytest.mark.parametrize(
    "measure, expected",
    [
        (
            lambda w: measures_lib.rho_sharpness(_two_wells, w, rho=0.2, steps=30)["sharpness"],
            lambda k: 0.5 * 0.2**2 * k.max(),
        ),
        (
            lambda w: measures_lib.top_hessian_eigenvalue(_two_wells, w, iters=30, seed=0)[
                "eigenvalue"
            ],
            lambda k: k.max(),
        ),
        (
            lambda w: measures_lib.hessian_trace(_two_wells, w, samples=4, seed=0)["trace"],
            lambda k: k.sum(),
        ),
    ],
    ids=["rho_sharpness", "top_eigenvalue", "hessian_trace"],
)
def test_every_measure_ranks_the_sharp_minimum_above_the_flat_one(measure, expected):
    flat = float(measure(jnp.asarray(FLAT_CENTRE, jnp.float32)))
    sharp = float(measure(jnp.asarray(SHARP_CENTRE, jnp.float32)))
    assert sharp > 5 * flat
    assert flat == pytest.approx(expected(FLAT_CURVATURE), rel=1e-3)
    assert sharp == pytest.approx(expected(SHARP_CURVATURE), rel=1e-3)


# ----------------------------------------------------------------------- argument checks


def test_measures_reject_bad_arguments_before_tracing():
    def loss_fn(w):
        raise AssertionError("loss_fn must not be called for invalid arguments")

    with pytest.raises(ValueError, match="rho"):
        measures_lib.rho_sharpness(loss_fn, jnp.ones(2), rho=0.0)
    with pytest.raises(ValueError, match="steps"):
        measures_lib.rho_sharpness(loss_fn, jnp.ones(2), rho=0.1, steps=-1)
    with pytest.raises(ValueError, match="step_size"):
        measures_lib.rho_sharpness(loss_fn, jnp.ones(2), rho=0.1, step_size=-1.0)
    with pytest.raises(ValueError, match="iters"):
        measures_lib.top_hessian_eigenvalue(loss_fn, jnp.ones(2), iters=0, seed=0)
    with pytest.raises(ValueError, match="tol"):
        measures_lib.top_hessian_eigenvalue(loss_fn, jnp.ones(2), tol=-1.0)
    with pytest.raises(ValueError, match="samples"):
        measures_lib.hessian_trace(loss_fn, jnp.ones(2), samples=1, seed=0)


# ------------------------------------------------------------------------- a flax model


@pytest.fixture(scope="module")
def tiny_model():
    model = build_model("conv4", 3, width=0.125)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(-1, 1, size=(6, 16, 16, 1)), jnp.float32)
    labels = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images)
    # Non-trivial running statistics, so eval-mode BN differs from batch statistics.
    _, batch_stats = jax.jit(functools.partial(model.apply, train=True))(variables, images)
    variables = {**variables, "batch_stats": batch_stats}
    return model, variables, images, labels


def test_model_loss_fn_is_eval_mode_cross_entropy(tiny_model):
    model, variables, images, labels = tiny_model
    loss_fn = measures_lib.model_loss_fn(model, variables, images, labels)
    (logits, _), _ = model.apply(variables, images, train=False)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert float(loss_fn(variables["params"])) == pytest.approx(float(expected), rel=1e-6)
    # Eval-mode BN: an example's loss does not depend on the rest of the batch, so the
    # mean over the batch is the mean of the two halves' losses.
    halves = [
        float(
            measures_lib.model_loss_fn(model, variables, images[s], labels[s])(variables["params"])
        )
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert float(loss_fn(variables["params"])) == pytest.approx(np.mean(halves), rel=1e-5)
    # ... which train-mode BN (batch statistics) would violate.
    (train_logits, _), _ = model.apply(variables, images[:3], train=True)
    train_loss = optax.softmax_cross_entropy_with_integer_labels(train_logits, labels[:3]).mean()
    assert abs(float(train_loss) - halves[0]) > 1e-3


def test_model_loss_fn_rejects_headless_models_and_bad_labels(tiny_model):
    _, _, images, labels = tiny_model
    trunk = build_model("conv4", 0, width=0.125)
    trunk_vars = jax.eval_shape(trunk.init, jax.random.key(0), images)
    with pytest.raises(ValueError, match="num_classes=0"):
        measures_lib.model_loss_fn(trunk, trunk_vars, images, labels)
    model, variables, _, _ = tiny_model
    with pytest.raises(ValueError, match="labels"):
        measures_lib.model_loss_fn(model, variables, images, labels[:3])
    with pytest.raises(ValueError, match="labels"):
        measures_lib.model_loss_fn(model, variables, images, labels.astype(jnp.float32))


def test_rho_sharpness_on_a_flax_model(tiny_model):
    model, variables, images, labels = tiny_model
    params = variables["params"]
    loss_fn = measures_lib.model_loss_fn(model, variables, images, labels)
    out = measures_lib.rho_sharpness(loss_fn, params, rho=0.05, steps=3)
    assert float(out["loss"]) == pytest.approx(float(loss_fn(params)), rel=1e-6)
    assert float(out["sharpness"]) > 0
    assert float(out["perturbation_norm"]) == pytest.approx(0.05, rel=1e-4)


def test_rho_sharpness_zero_steps_is_sams_one_step_estimate_on_a_flax_model(tiny_model):
    model, variables, images, labels = tiny_model
    params = variables["params"]
    loss_fn = measures_lib.model_loss_fn(model, variables, images, labels)
    steps = measures_lib.iteration_steps(loss_fn)
    one_step = measures_lib.rho_sharpness(steps, params, rho=0.05, steps=0)

    @jax.jit
    def sam_one_step(params):  # L(w + rho g / ||g||) - L(w)
        loss, grad = jax.value_and_grad(loss_fn)(params)
        scale = 0.05 / optax.tree_utils.tree_norm(grad)
        return loss, loss_fn(jax.tree.map(lambda w, g: w + scale * g, params, grad))

    loss, perturbed = sam_one_step(params)
    assert one_step["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert one_step["perturbed_loss"] == pytest.approx(float(perturbed), rel=1e-5)
    ascent = measures_lib.rho_sharpness(steps, params, rho=0.05, steps=2)
    assert 0 < one_step["sharpness"] <= ascent["sharpness"]


def test_hessian_measures_on_a_flax_model(tiny_model):
    model, variables, images, labels = tiny_model
    params = variables["params"]
    loss_fn = measures_lib.model_loss_fn(model, variables, images, labels)
    eig = measures_lib.top_hessian_eigenvalue(loss_fn, params, iters=10, seed=0)
    assert jax.tree.structure(eig["vector"]) == jax.tree.structure(params)
    norm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(eig["vector"])))
    assert norm == pytest.approx(1.0, abs=1e-5)
    assert float(eig["eigenvalue"]) > 0 and int(eig["iterations"]) == 10
    trace = measures_lib.hessian_trace(loss_fn, params, samples=4, seed=0)
    assert np.isfinite(float(trace["trace"])) and float(trace["std_error"]) > 0


def test_directions_and_landscapes_on_a_flax_model(tiny_model):
    model, variables, images, labels = tiny_model
    params = variables["params"]
    loss_fn = measures_lib.model_loss_fn(model, variables, images, labels)
    dx = landscape.random_direction(params, jax.random.key(1))
    assert jax.tree.structure(dx) == jax.tree.structure(params)
    for w, d in zip(jax.tree.leaves(params), jax.tree.leaves(dx), strict=True):
        if w.ndim == 1:  # BatchNorm scale/bias, head bias
            np.testing.assert_array_equal(d, 0.0)
        else:  # conv kernels (HWIO) and the head kernel (in, out)
            np.testing.assert_allclose(
                np.linalg.norm(np.reshape(d, (-1, d.shape[-1])), axis=0),
                np.linalg.norm(np.reshape(w, (-1, w.shape[-1])), axis=0),
                rtol=1e-5,
            )
    dy = landscape.random_direction(params, jax.random.key(2))
    curve = landscape.loss_landscape_1d(loss_fn, params, dx, np.linspace(-1, 1, 5))
    assert curve[2] == pytest.approx(float(loss_fn(params)), rel=1e-5)
    surface = landscape.loss_landscape_2d(
        loss_fn, params, dx, dy, np.linspace(-1, 1, 3), np.linspace(-1, 1, 4)
    )
    assert surface.shape == (3, 4)
    # surface[1, 0] is alpha = 0, beta = -1.
    minus_dy = jax.tree.map(lambda p, y: p - y, params, dy)
    assert surface[1, 0] == pytest.approx(float(loss_fn(minus_dy)), rel=1e-5)
