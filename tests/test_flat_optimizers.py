"""Flat-minima methods against independent transcriptions of their papers' algorithms.

The references run in float64 NumPy on a flattened weight vector, with the problem's
gradient written out by hand (a least-squares layer plus a quartic weight penalty, so
the Hessian changes with the weights and every perturbation matters):

* SAM every k, LookSAM (Liu et al. 2022, Algorithm 1), Momentum-SAM (the reference
  code's update order), RWP's mix, GSAM (big_vision's ``gsam_gradient`` formula, with
  its learning-rate-tied radius): plain loops over steps;
* EMA / SWA: a plain loop over weight snapshots;
* degenerate settings reduce to ``jax.grad`` (ERM) or ``sam.sam_gradient`` (SAM);
* BatchNorm statistics are compared with direct ``model.apply`` calls.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flatfsc_jax import flat_methods as fm
from flatfsc_jax import flat_optimizers as fo
from flatfsc_jax import sam

RNG = np.random.default_rng(0)
DIM_IN, DIM_OUT, BATCH, QUARTIC = 4, 3, 8, 0.5
SHAPES = {"W": (DIM_IN, DIM_OUT), "b": (DIM_OUT,)}  # sorted-key order = flattening order


def _loss_fn(p, b):
    pred = b["x"] @ p["W"] + p["b"]
    loss = 0.5 * jnp.mean(jnp.sum((pred - b["y"]) ** 2, -1)) + 0.25 * QUARTIC * jnp.sum(p["W"] ** 4)
    return loss, {"pred_mean": jnp.mean(pred)}


def _np_grad(w, b):
    """Hand-written float64 gradient of ``_loss_fn`` at the flat vector ``w``."""
    W = w[: DIM_IN * DIM_OUT].reshape(DIM_IN, DIM_OUT)
    bias = w[DIM_IN * DIM_OUT :]
    x, y = np.asarray(b["x"], np.float64), np.asarray(b["y"], np.float64)
    r = (x @ W + bias - y) / len(x)
    return np.concatenate([(x.T @ r + QUARTIC * W**3).ravel(), r.sum(0)])


def _flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(SHAPES)])


def _tree(w):
    out, i = {}, 0
    for k in sorted(SHAPES):
        n = int(np.prod(SHAPES[k]))
        out[k] = jnp.asarray(w[i : i + n].reshape(SHAPES[k]), jnp.float32)
        i += n
    return out


def _problem(steps=1):
    params = {
        "W": jnp.asarray(RNG.normal(size=SHAPES["W"]), jnp.float32),
        "b": jnp.asarray(RNG.normal(size=SHAPES["b"]), jnp.float32),
    }
    batches = [
        {
            "x": jnp.asarray(RNG.normal(size=(BATCH, DIM_IN)), jnp.float32),
            "y": jnp.asarray(RNG.normal(size=(BATCH, DIM_OUT)), jnp.float32),
        }
        for _ in range(steps)
    ]
    return params, batches


def _np_sam(w, b, rho):
    g = _np_grad(w, b)
    return g, _np_grad(w + rho * g / np.linalg.norm(g), b)


def _close(a, b, rtol=1e-4, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _erm_grad(params, batch):
    return jax.grad(lambda p: _loss_fn(p, batch)[0])(params)


# ------------------------------------------------------------------ SAM-late, every k


def test_sam_late_switches_from_erm_to_sam_at_start_step():
    params, (batch,) = _problem()
    sam_grads, _, _ = sam.sam_gradient(_loss_fn, params, batch, rho=0.1)
    erm = _erm_grad(params, batch)
    # start 0: SAM on every step; a start past the end: ERM throughout.
    for step in (0, 7):
        got, aux, diag = fo.sam_late_gradient(_loss_fn, params, batch, step, start_step=0, rho=0.1)
        _close(got, sam_grads, rtol=1e-6)
        assert float(diag.gradient_evaluations) == 2.0
        got, _, diag = fo.sam_late_gradient(_loss_fn, params, batch, step, start_step=8, rho=0.1)
        _close(got, erm, rtol=1e-6)
        assert float(diag.gradient_evaluations) == 1.0 and float(diag.sharpness) == 0.0
    # Traced step and start: lax.cond picks the same branches.
    late = jax.jit(
        lambda p, b, t, s: fo.sam_late_gradient(_loss_fn, p, b, t, start_step=s, rho=0.1)
    )
    for step, expected in ((4, erm), (5, sam_grads), (6, sam_grads)):
        got, aux, diag = late(params, batch, jnp.int32(step), jnp.int32(5))
        _close(got, expected, rtol=1e-5)
        assert float(diag.gradient_evaluations) == (1.0 if step < 5 else 2.0)
        assert float(aux["pred_mean"]) == pytest.approx(
            float(_loss_fn(params, batch)[1]["pred_mean"])
        )


def test_final_cycle_start_is_the_last_restart():
    from flatfsc_jax.training import optim

    cases = ((1000, 250), (1100, 250), (250, 250), (7, 10))
    periods = np.asarray([period for _, period in cases])[:, None]
    rates = np.asarray(optim.cosine_restart_rate(np.arange(1100)[None], 1.0, periods))
    for (num_steps, period), row in zip(cases, rates, strict=True):
        restarts = np.flatnonzero(row[:num_steps] == 1.0)  # the peak rate: a restart
        assert fo.final_cycle_start(num_steps, period) == restarts[-1]


@pytest.mark.parametrize("k", [1, 3])
def test_every_k_matches_a_plain_loop_with_momentum_sgd(k):
    steps, rho, lr, mu = 7, 0.2, 0.05, 0.9
    params, batches = _problem(steps)
    tx = optax.sgd(lr, momentum=mu)
    opt_state = tx.init(params)
    w, v = _flat(params), np.zeros(_flat(params).size)
    for t, batch in enumerate(batches):
        grads, _, diag = fo.every_k_gradient(_loss_fn, params, batch, t, k=k, rho=rho)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        g = _np_sam(w, batch, rho)[1] if t % k == 0 else _np_grad(w, batch)
        v = mu * v + g
        w = w - lr * v
        np.testing.assert_allclose(_flat(params), w, rtol=1e-4, atol=1e-5)
        assert float(diag.gradient_evaluations) == fm.gradient_evaluations(
            fm.FlatMethod(method="sam_every_k", k=k), t
        )


# ------------------------------------------------------------------ LookSAM


def _np_looksam(w, batches, *, k, alpha, rho, lr):
    """Liu et al. 2022, Algorithm 1, with plain SGD."""
    g_v = None
    for t, batch in enumerate(batches):
        if t % k == 0:
            g, g_s = _np_sam(w, batch, rho)
            cos = g @ g_s / (np.linalg.norm(g) * np.linalg.norm(g_s))
            g_v = g_s - np.linalg.norm(g_s) * cos * g / np.linalg.norm(g)
            update = g_s
        else:
            g = _np_grad(w, batch)
            update = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
        w = w - lr * update
    return w


@pytest.mark.parametrize("k", [1, 3])
def test_looksam_matches_the_papers_algorithm(k):
    steps, rho, lr, alpha = 7, 0.2, 0.05, 0.7
    params, batches = _problem(steps)
    w0 = _flat(params)
    state = fo.looksam_init(params)
    for t, batch in enumerate(batches):
        if k == 1:  # k = 1 is SAM on every step
            expected = sam.sam_gradient(_loss_fn, params, batch, rho=rho)[0]
        grads, _, diag, state = fo.looksam_gradient(
            _loss_fn, params, batch, state, t, k=k, alpha=alpha, rho=rho
        )
        if k == 1:
            _close(grads, expected, rtol=1e-6)
        assert float(diag.gradient_evaluations) == (2.0 if t % k == 0 else 1.0)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    expected_w = _np_looksam(w0, batches, k=k, alpha=alpha, rho=rho, lr=lr)
    np.testing.assert_allclose(_flat(params), expected_w, rtol=1e-4, atol=1e-5)


# One jitted, sharded program per method (traced step, rho as data), compiled once and
# shared by the tests below: compilation is most of this file's time.
DISPATCH_RHO = 0.1


def _settings(method):
    return fm.FlatMethod(method=method, k=2, start_step=1, looksam_alpha=0.5, rho=DISPATCH_RHO)


@functools.cache
def _dispatch_program(method):
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    whole, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    flat_gradient = fm.make_flat_gradient(_settings(method))
    return jax.jit(
        lambda p, b, s, t: flat_gradient(_loss_fn, p, b, s, t, {"rho": jnp.float32(DISPATCH_RHO)}),
        in_shardings=(whole, split, whole, whole),
    )


def test_looksam_under_jit_runs_one_branch_per_step_and_threads_its_state():
    params, batches = _problem(4)
    step = _dispatch_program("looksam")
    state, eager_state = fo.looksam_init(params), fo.looksam_init(params)
    for t, batch in enumerate(batches):
        grads, _, diag, state = step(params, batch, state, jnp.int32(t))
        want, _, _, eager_state = fo.looksam_gradient(
            _loss_fn, params, batch, eager_state, t, k=2, alpha=0.5, rho=DISPATCH_RHO
        )
        _close(grads, want, rtol=1e-5)
        _close(state, eager_state, rtol=1e-5)
        assert float(diag.gradient_evaluations) == (2.0 if t % 2 == 0 else 1.0)


@pytest.mark.parametrize("method", fo.SWITCHING_METHODS)
def test_host_decided_branch_matches_the_traced_switch(method):
    """Two programs picked on the host (``sam_step``) == one program with ``lax.cond``."""
    settings = _settings(method)
    params, batches = _problem(4)
    flat_gradient = fm.make_flat_gradient(settings)
    traced = _dispatch_program(method)
    host = jax.jit(
        lambda p, b, s, t, sam_step: flat_gradient(
            _loss_fn, p, b, s, t, {"rho": jnp.float32(DISPATCH_RHO)}, sam_step=sam_step
        ),
        static_argnames="sam_step",
    )
    state_traced = state_host = fm.init_state(settings, params)
    for t, batch in enumerate(batches):
        sam_step = fm.takes_sam_step(settings, t)
        assert sam_step == (fm.gradient_evaluations(settings, t) == 2)
        want, _, want_diag, state_traced = traced(params, batch, state_traced, jnp.int32(t))
        got, _, diag, state_host = host(params, batch, state_host, jnp.int32(t), sam_step)
        _close(got, want, rtol=1e-5)
        _close(state_host, state_traced, rtol=1e-5)
        assert float(diag.gradient_evaluations) == float(want_diag.gradient_evaluations)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, got)
    with pytest.raises(ValueError, match=r"^sam_step must be None .* or a Python bool"):
        flat_gradient(_loss_fn, params, batches[0], state_host, 0, sam_step=jnp.bool_(True))


# ------------------------------------------------------------------ Momentum-SAM


def test_msam_matches_the_reference_update_order():
    """w~ = w - rho v/||v||; g = grad L(w~); v = mu v + g + wd w; w = w - lr v."""
    steps, rho, lr, mu, wd = 6, 0.3, 0.05, 0.9, 1e-2
    params, batches = _problem(steps)
    tx = optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=mu), optax.scale(-lr))
    opt_state, state = tx.init(params), fo.momentum_sam_init(params)
    w, v = _flat(params), np.zeros(_flat(params).size)
    for t, batch in enumerate(batches):
        grads, aux, diag, state = fo.momentum_sam_gradient(
            _loss_fn, params, batch, state, rho=rho, momentum=mu, weight_decay=wd
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        clean_aux = _loss_fn(params, batch)[1]
        params = optax.apply_updates(params, updates)
        perturbed = w - rho * v / np.linalg.norm(v) if t else w  # v = 0: no perturbation
        v = mu * v + _np_grad(perturbed, batch) + wd * w
        w = w - lr * v
        np.testing.assert_allclose(_flat(params), w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_flat(state["momentum"]), v, rtol=1e-4, atol=1e-5)
        assert float(aux["pred_mean"]) == float(clean_aux["pred_mean"])
        assert float(diag.gradient_evaluations) == 1.0
    # The buffer is the optimiser's own momentum trace.
    _close(state["momentum"], opt_state[1].trace, rtol=1e-6)


def test_flat_update_is_the_gradient_then_the_optimiser():
    settings = fm.FlatMethod(method="msam", rho=0.3)
    params, batches = _problem(3)
    tx = optax.sgd(0.05, momentum=0.9)
    flat_gradient = fm.make_flat_gradient(settings)
    p1, o1, s1 = params, tx.init(params), fm.init_state(settings, params)
    p2, o2, s2 = p1, o1, s1
    for t, batch in enumerate(batches):
        p1, o1, s1, _, _ = fm.flat_update(flat_gradient, _loss_fn, p1, o1, s1, batch, tx, t)
        grads, _, _, s2 = fo.momentum_sam_gradient(_loss_fn, p2, batch, s2, rho=0.3)
        updates, o2 = tx.update(grads, o2, p2)
        p2 = optax.apply_updates(p2, updates)
        _close(p1, p2, rtol=1e-6)
        _close(s1, s2, rtol=1e-6)


def test_msam_rho_zero_is_erm():
    params, (batch,) = _problem()
    state = {"momentum": jax.tree.map(lambda p: jnp.ones_like(p), params)}
    grads, _, diag, _ = fo.momentum_sam_gradient(_loss_fn, params, batch, state, rho=0.0)
    _close(grads, _erm_grad(params, batch), rtol=1e-7, atol=0)
    assert float(diag.sharpness) == 0.0


# ------------------------------------------------------------------ RWP


def test_rwp_noise_is_filter_wise_and_scaled_by_the_filter_norm():
    scales = np.array([0.1, 1.0, 10.0], np.float32)
    kernel = RNG.normal(size=(2000, 3)).astype(np.float32) * scales
    params = {
        "kernel": jnp.asarray(kernel),
        "bias": jnp.asarray(RNG.normal(size=4000), jnp.float32),
    }
    key = jax.random.key(3)
    noise = fo.rwp_noise(params, key, noise_std=0.02)
    filter_norms = np.linalg.norm(kernel, axis=0)
    std = np.asarray(noise["kernel"]).std(axis=0)
    np.testing.assert_allclose(std, 0.02 * filter_norms, rtol=0.05)
    np.testing.assert_allclose(
        np.asarray(noise["bias"]).std(), 0.02 * np.linalg.norm(params["bias"]), rtol=0.05
    )
    # Rescaling one filter rescales its noise by the same factor (same draw).
    rescaled = dict(params, kernel=params["kernel"] * jnp.asarray([1.0, 4.0, 1.0]))
    again = fo.rwp_noise(rescaled, key, noise_std=0.02)
    np.testing.assert_allclose(
        np.asarray(again["kernel"]), np.asarray(noise["kernel"]) * [1.0, 4.0, 1.0], rtol=1e-5
    )


@pytest.mark.parametrize("clean_mix", [0.0, 0.5])
def test_rwp_mixes_noisy_and_clean_gradients(clean_mix):
    params, (batch,) = _problem()
    key = jax.random.key(1)
    grads, aux, diag = fo.rwp_gradient(
        _loss_fn, params, batch, key, noise_std=0.05, clean_mix=clean_mix
    )
    w = _flat(params)
    z = _flat(fo.rwp_noise(params, key, noise_std=0.05))
    assert np.linalg.norm(z) > 0
    expected = (1 - clean_mix) * _np_grad(w + z, batch) + clean_mix * _np_grad(w, batch)
    np.testing.assert_allclose(_flat(grads), expected, rtol=1e-4, atol=1e-6)
    assert float(diag.gradient_evaluations) == (1.0 if clean_mix == 0 else 2.0)
    clean_loss, clean_aux = _loss_fn(params, batch)
    assert float(diag.loss) == pytest.approx(float(clean_loss))
    assert float(aux["pred_mean"]) == pytest.approx(float(clean_aux["pred_mean"]))


def test_rwp_without_noise_is_erm():
    params, (batch,) = _problem()
    erm = _erm_grad(params, batch)
    grads, _, diag = fo.rwp_gradient(_loss_fn, params, batch, jax.random.key(0), noise_std=0.0)
    _close(grads, erm, rtol=0, atol=0)
    assert float(diag.gradient_evaluations) == 1.0
    traced = jax.jit(
        lambda s: fo.rwp_gradient(_loss_fn, params, batch, jax.random.key(0), noise_std=s)[0]
    )(jnp.float32(0.0))
    _close(traced, erm, rtol=1e-6)


# ------------------------------------------------------------------ GSAM


def _np_big_vision_gsam(w, batch, *, rho_max, rho_min, alpha, lr, lr_max, lr_min):
    """big_vision ``gsam_gradient`` (minimize_fp=True, SAM ball), on flat vectors."""
    g = _np_grad(w, batch)
    rho = (
        rho_max
        if lr_max == lr_min
        else rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    )
    g_robust = _np_grad(w + rho * g / np.linalg.norm(g), batch)
    u = g_robust / np.linalg.norm(g_robust)
    return g_robust - alpha * (g - (u @ g) * u)


@pytest.mark.parametrize("lr", [0.1, 0.04])
def test_gsam_matches_big_vision_formula(lr):
    params, (batch,) = _problem()
    grads, _, diag = fo.gsam_gradient(
        _loss_fn,
        params,
        batch,
        rho=0.2,
        alpha=0.3,
        rho_min=0.05,
        current_learning_rate=lr,
        peak_learning_rate=0.1,
    )
    expected = _np_big_vision_gsam(
        _flat(params), batch, rho_max=0.2, rho_min=0.05, alpha=0.3, lr=lr, lr_max=0.1, lr_min=0.0
    )
    np.testing.assert_allclose(_flat(grads), expected, rtol=1e-4, atol=1e-6)
    assert float(diag.gradient_evaluations) == 2.0
    # The dispatcher reads the radius and both rates from hparams (traced per-run values).
    settings = fm.FlatMethod(method="gsam", rho=1.0, gsam_alpha=0.3, gsam_rho_min=0.05)
    hparams = {"rho": 0.2, "current_learning_rate": lr, "peak_learning_rate": 0.1}
    dispatched = fm.make_flat_gradient(settings)(_loss_fn, params, batch, {}, 0, hparams)[0]
    np.testing.assert_allclose(_flat(dispatched), expected, rtol=1e-4, atol=1e-6)
    # The update is g_s minus a vector perpendicular to g_s.
    g_s = _np_big_vision_gsam(
        _flat(params), batch, rho_max=0.2, rho_min=0.05, alpha=0.0, lr=lr, lr_max=0.1, lr_min=0.0
    )
    assert abs((_flat(grads) - g_s) @ g_s) < 1e-4 * np.linalg.norm(g_s) ** 2


def test_gsam_alpha_zero_is_sam():
    params, (batch,) = _problem()
    grads, _, _ = fo.gsam_gradient(_loss_fn, params, batch, rho=0.1, alpha=0.0)
    _close(grads, sam.sam_gradient(_loss_fn, params, batch, rho=0.1)[0], rtol=1e-6)


# ------------------------------------------------------------------ averaging


@pytest.mark.parametrize(
    "settings",
    [
        fm.FlatMethod(average="ema", average_decay=0.8, average_start=2),
        fm.FlatMethod(average="swa", average_start=1, average_period=2),
    ],
)
def test_weight_averages_match_a_plain_loop(settings):
    snapshots = [_problem()[0] for _ in range(7)]
    average = fm.init_average(settings, snapshots[0])
    update = jax.jit(lambda a, p, t: fm.update_average(settings, a, p, t))
    ref, taken = _flat(snapshots[0]), []
    for t, params in enumerate(snapshots[1:], start=1):
        average = update(average, params, jnp.int32(t))
        w = _flat(params)
        if settings.average == "ema":
            ref = w if t < settings.average_start else 0.8 * ref + 0.2 * w
        elif t >= settings.average_start and (t - settings.average_start) % 2 == 0:
            taken.append(w)
            ref = np.mean(taken, axis=0)
        np.testing.assert_allclose(_flat(average["params"]), ref, rtol=1e-5, atol=1e-6)
    if settings.average == "swa":
        assert int(average["count"]) == len(taken) == 3


# ------------------------------------------------------------------ BatchNorm, jit, sharding


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


def _bn_problem():
    net = _BNNet()
    x = jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32)
    y = jnp.asarray(RNG.integers(0, 3, size=8), jnp.int32)
    # Jitted: eager flax initialisation dispatches op by op and is slow.
    variables = jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), x)
    stats = variables["batch_stats"]

    def loss_fn(params, b):
        logits, new = net.apply(
            {"params": params, "batch_stats": stats}, b["x"], train=True, mutable=["batch_stats"]
        )
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]))
        return loss, new["batch_stats"]

    return loss_fn, variables["params"], {"x": x, "y": y}


# One two-pass method and the one-pass MSAM; the other methods build their passes from
# the same pieces (SAM's clean-and-perturbed pair; the forward-only clean pass of
# noise-only RWP is MSAM's), and the dispatcher test checks every method's aux.
BN_METHODS = [
    fm.FlatMethod(method="msam", rho=2.0),
    fm.FlatMethod(method="gsam", rho=0.5, gsam_alpha=0.3),
]


def test_batchnorm_statistics_come_from_the_clean_pass_under_jit():
    loss_fn, params, batch = _bn_problem()
    clean_stats = jax.jit(loss_fn)(params, batch)[1]
    for settings in BN_METHODS:
        flat_gradient = jax.jit(fm.make_flat_gradient(settings), static_argnums=0)
        state = fm.init_state(settings, params)
        if settings.method == "msam":  # a non-zero buffer, so the pass is really perturbed
            state = {"momentum": jax.tree.map(jnp.ones_like, params)}
        _, stats, diag, state = flat_gradient(loss_fn, params, batch, state, jnp.int32(0))
        _close(stats, clean_stats, rtol=1e-6, atol=1e-7)
        assert abs(float(diag.sharpness)) > 0  # the other pass really was perturbed
    # Without the extra forward pass, MSAM's statistics are the perturbed pass's.
    settings = fm.FlatMethod(method="msam", rho=2.0, clean_statistics=False)
    state = {"momentum": jax.tree.map(jnp.ones_like, params)}
    _, stats, _, _ = jax.jit(fm.make_flat_gradient(settings), static_argnums=0)(
        loss_fn, params, batch, state, 0
    )
    scale = 2.0 / float(sam.global_norm(state["momentum"]))
    perturbed = jax.tree.map(lambda p, v: p - scale * v, params, state["momentum"])
    _close(stats, jax.jit(loss_fn)(perturbed, batch)[1], rtol=1e-5, atol=1e-6)
    diffs = jax.tree.map(lambda a, b: np.max(np.abs(np.subtract(a, b))), stats, clean_stats)
    assert max(jax.tree.leaves(diffs)) > 1e-4


@pytest.mark.parametrize("method", fo.METHODS)
def test_dispatcher_under_jit_with_sharding_counts_its_gradients(method):
    settings = _settings(method)
    params, batches = _problem(3)
    step_fn = _dispatch_program(method)
    state = fm.init_state(settings, params)
    for t, batch in enumerate(batches):
        grads, aux, diag, state = step_fn(params, batch, state, jnp.int32(t))
        assert float(diag.gradient_evaluations) == fm.gradient_evaluations(settings, t)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
        assert float(aux["pred_mean"]) == pytest.approx(
            float(_loss_fn(params, batch)[1]["pred_mean"]), rel=1e-5
        )
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert jax.tree.structure(state) == jax.tree.structure(fm.init_state(settings, params))
    counts = fm.gradient_evaluations(settings, np.arange(3))
    assert counts.shape == (3,) and counts.sum() == sum(
        fm.gradient_evaluations(settings, t) for t in range(3)
    )


# ------------------------------------------------------------------ errors


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"^method must be one of"):
        fm.FlatMethod(method="asam")
    with pytest.raises(ValueError, match=r"^config\.flat\.k must be a positive integer"):
        fm.FlatMethod.from_config({"method": "looksam", "k": 0}, prefix="config.flat.")
    with pytest.raises(KeyError, match=r"config\.flat\.kk is not a flat-method setting"):
        fm.FlatMethod.from_config({"kk": 2}, prefix="config.flat.", error=KeyError)
    assert fm.FlatMethod.from_config({"method": "msam", "rho": 0.5}) == fm.FlatMethod(
        method="msam", rho=0.5
    )
    with pytest.raises(ValueError, match=r"^clean_mix must be in \[0, 1\]"):
        fm.FlatMethod(method="rwp", clean_mix=1.5)
    with pytest.raises(ValueError, match=r"^gsam_rho_min=0.5 must be <= rho=0.05"):
        fm.FlatMethod(method="gsam", gsam_rho_min=0.5)
    with pytest.raises(ValueError, match=r"^m \(m-sharpness\) is supported by method 'sam' only"):
        fm.FlatMethod(method="looksam", m=4)
    with pytest.raises(ValueError, match=r"^average must be one of"):
        fm.FlatMethod(average="polyak")
    params, (batch,) = _problem()
    with pytest.raises(ValueError, match=r"^hparams keys must be among .*'lr'"):
        fm.make_flat_gradient(fm.FlatMethod())(_loss_fn, params, batch, {}, 0, {"lr": 0.1})
    with pytest.raises(ValueError, match=r"needs current_learning_rate .* and peak_learning_rate"):
        fm.make_flat_gradient(fm.FlatMethod(method="gsam", gsam_rho_min=0.01))(
            _loss_fn, params, batch, {}, 0
        )
    with pytest.raises(ValueError, match=r"^state must be looksam_init"):
        fo.looksam_gradient(_loss_fn, params, batch, {}, 0, k=2, alpha=0.5, rho=0.1)
    with pytest.raises(ValueError, match=r"^start_step must be an integer >= 0"):
        fo.sam_late_gradient(_loss_fn, params, batch, 0, start_step=-1, rho=0.1)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0"):
        fo.every_k_gradient(_loss_fn, params, batch, 0, k=2, rho=-0.1)
