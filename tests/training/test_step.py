"""Optimiser, schedule and the jitted training step against independent references.

References: PyTorch's ``CosineAnnealingWarmRestarts`` and ``SGD`` update rules written
out in plain Python/NumPy, a hand-written ERM/SAM step on ``model.apply``, and the same
training run on a 1-device and an 8-device mesh (subprocess with 8 host CPU devices).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatfsc_jax import models
from flatfsc_jax.data.sources import preprocess
from flatfsc_jax.training import optim
from flatfsc_jax.training import step as step_lib

RNG = np.random.default_rng(0)


def _pytorch_warm_restart_lrs(base_lr, t0, num_steps):
    """CosineAnnealingWarmRestarts(T_0=t0, T_mult=1, eta_min=0), one .step() per update."""
    lrs, t_cur = [], 0
    for _ in range(num_steps):
        lrs.append(base_lr * (1 + math.cos(math.pi * t_cur / t0)) / 2)
        t_cur += 1
        if t_cur >= t0:
            t_cur -= t0
    return lrs


def test_schedule_matches_pytorch_warm_restarts():
    schedule = optim.make_schedule(learning_rate=0.03, restart_period=7)
    expected = _pytorch_warm_restart_lrs(0.03, 7, 3 * 7 + 3)
    got = [float(schedule(t)) for t in range(len(expected))]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got[0] == pytest.approx(0.03) and got[7] == pytest.approx(0.03)  # restarts


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_matches_pytorch_sgd_with_coupled_decay(nesterov):
    lr, mu, wd, t0 = 0.05, 0.9, 7e-4 * 100, 4  # large decay so its coupling matters
    tx = optim.make_optimizer(
        learning_rate=lr,
        momentum=mu,
        weight_decay=wd,
        restart_period=t0,
        num_steps=10,
        nesterov=nesterov,
    )
    w = RNG.normal(size=(3, 4))
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = tx.init(params)
    lrs = _pytorch_warm_restart_lrs(lr, t0, 6)
    buf = np.zeros_like(w)
    for t in range(6):
        g = RNG.normal(size=w.shape)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        # torch.optim.SGD(momentum=mu, weight_decay=wd, dampening=0, nesterov=...).
        d = g + wd * w
        buf = mu * buf + d
        w = w - lrs[t] * (d + mu * buf if nesterov else buf)
    np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"learning_rate": float("nan")}, "learning_rate must be"),
        ({"learning_rate": float("inf")}, "learning_rate must be"),
        ({"learning_rate": 0.0}, "learning_rate must be"),
        ({"learning_rate": -0.1}, "learning_rate must be"),
        ({"restart_period": 0}, "restart_period must be"),
        ({"restart_period": 2.5}, "restart_period must be"),
        ({"num_steps": 0}, "num_steps must be"),
        ({"momentum": 1.0}, "momentum must be"),
        ({"weight_decay": -1e-4}, "weight_decay must be"),
    ],
)
def test_optimizer_errors_name_the_argument(kwargs, key):
    args = {"learning_rate": 0.03, "restart_period": 10, "num_steps": 100} | kwargs
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        optim.make_optimizer(**args)


def _tiny_setup(batch_size=8, lora_rank=0, size=8):
    model = models.build_model("conv4", 5, width=0.125, lora_rank=lora_rank)
    images = RNG.integers(0, 256, size=(batch_size, size, size, 1), dtype=np.uint8)
    labels = np.arange(batch_size, dtype=np.int32) % 5
    tx = optim.make_optimizer(learning_rate=0.1, restart_period=5, num_steps=5)
    return model, tx, images, labels


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_train_step_matches_hand_written_step(rho):
    """ERM (rho=0) and SAM steps against the recipe written out on model.apply.

    The step gets uint8 images and must preprocess them on the device exactly like the
    host-side ``preprocess`` the reference uses.
    """
    model, tx, images, labels = _tiny_setup()
    state = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2])
    step = jax.jit(
        lambda s, b: step_lib.train_step(
            s, b, jax.random.key(1), model=model, tx=tx, use_sam=rho > 0, rho=rho or None
        )
    )
    new_state, metrics = step(state, {"images": images, "labels": labels})

    x = preprocess(images)

    def loss(params):
        (logits, _), stats = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True
        )
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)
        return jnp.mean(nll), (stats, logits)

    @jax.jit
    def reference(params, opt_state):
        (clean_loss, (stats, logits)), g = jax.value_and_grad(loss, has_aux=True)(params)
        if rho:
            norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
            params_adv = jax.tree.map(lambda p, v: p + rho * v / norm, params, g)
            (adv_loss, _), g = jax.value_and_grad(loss, has_aux=True)(params_adv)
        else:
            adv_loss = clean_loss
        updates, opt_state = tx.update(g, opt_state, params)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return optax.apply_updates(params, updates), opt_state, stats, clean_loss, adv_loss, acc

    params, _, stats, clean_loss, adv_loss, acc = reference(state.params, state.opt_state)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # noqa: E731
    jax.tree.map(close, new_state.params, params)
    jax.tree.map(close, new_state.batch_stats, stats)
    close(metrics["loss"], clean_loss)
    close(metrics["perturbed_loss"], adv_loss)
    close(metrics["accuracy"], acc)
    assert int(new_state.step) == 1
    if rho:
        assert float(metrics["sharpness"]) > 0  # ascent direction: the loss went up
    else:
        assert float(metrics["sharpness"]) == 0.0


def test_lora_step_trains_only_adapters_and_head():
    model, tx, images, labels = _tiny_setup(lora_rank=2)
    with pytest.raises(ValueError, match=r"lora_rank > 0"):
        step_lib.create_train_state(
            _tiny_setup()[0], tx, jax.random.key(0), images[:2], train_lora=True
        )
    state = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2], train_lora=True)
    step = jax.jit(
        lambda s, b: step_lib.train_step(
            s, b, jax.random.key(1), model=model, tx=tx, use_sam=True, rho=0.1, train_lora=True
        )
    )
    new_state, _ = step(state, {"images": images, "labels": labels})
    changed = lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b)))  # noqa: E731
    trunk = {k: v for k, v in state.params.items() if k != "head"}
    new_trunk = {k: v for k, v in new_state.params.items() if k != "head"}
    assert not any(jax.tree.leaves(jax.tree.map(changed, trunk, new_trunk)))
    assert all(
        jax.tree.leaves(jax.tree.map(changed, state.params["head"], new_state.params["head"]))
    )
    lora_b = [v["b"] for v in new_state.lora.values()]  # B starts at 0: it must move
    assert lora_b and all(np.any(np.asarray(b) != 0) for b in lora_b)
    assert any(jax.tree.leaves(jax.tree.map(changed, state.batch_stats, new_state.batch_stats)))


def test_compile_train_step_errors_name_the_argument():
    model, tx, images, labels = _tiny_setup()
    mesh = step_lib.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match=r"^rho must be"):
        step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=-0.05)
    with pytest.raises(ValueError, match=r"^m=3 must divide"):
        step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=0.05, m=3, batch_size=8)
    with pytest.raises(ValueError, match=r"^label_smoothing must be"):
        step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=0.05, label_smoothing=1.0)
    # Without batch_size the batch is checked at the call, before tracing.
    step = step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=0.05, m=3)
    state = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2])
    with pytest.raises(ValueError, match=r"m=3 must divide batch_size=8"):
        step(state, {"images": images, "labels": labels}, jax.random.key(0))


_MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from flatfsc_jax import models
    from flatfsc_jax.training import optim
    from flatfsc_jax.training import step as step_lib

    assert jax.device_count() == 8, jax.devices()
    model = models.build_model("conv4", 5, width=0.125)
    tx = optim.make_optimizer(learning_rate=0.05, restart_period=10, num_steps=10)
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, size=(3, 16, 8, 8, 1)).astype(np.uint8)
    labels = rs.randint(0, 5, size=(3, 16)).astype(np.int32)

    def run(devices, m):
        mesh = step_lib.make_mesh(devices)
        state = step_lib.create_train_state(model, tx, jax.random.key(0), images[0, :2])
        state = step_lib.replicate(state, mesh)
        step = step_lib.compile_train_step(
            model, tx, mesh, use_sam=True, rho=0.05, m=m, batch_size=16
        )
        losses = []
        for i in range(3):
            batch = step_lib.shard_batch({"images": images[i], "labels": labels[i]}, mesh)
            assert len(batch["images"].sharding.device_set) == len(devices)
            assert batch["images"].addressable_shards[0].data.shape[0] == 16 // len(devices)
            state, metrics = step(state, batch, step_lib.replicate(jax.random.key(1), mesh))
            losses.append([float(metrics[k]) for k in ("loss", "perturbed_loss")])
        leaves = jax.tree.leaves((state.params, state.batch_stats))
        return losses, [np.asarray(x).tolist() for x in leaves]

    results = {}
    for m in (None, 4):
        results[str(m)] = {"8": run(jax.devices(), m), "1": run(jax.devices()[:1], m)}
    errors = []
    mesh = step_lib.make_mesh()
    for attempt in (
        lambda: step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=0.05, batch_size=12),
        lambda: step_lib.shard_batch({"labels": labels[0, :12]}, mesh),
    ):
        try:
            attempt()
        except ValueError as e:
            errors.append(str(e))
    json.dump({"results": results, "errors": errors}, sys.stdout)
    """
)


@pytest.mark.slow
def test_eight_devices_match_one_device():
    """Same SAM run on a 1- and an 8-device mesh: BN and the gradient norm are global."""
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"
    )
    out = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    for m, by_devices in report["results"].items():
        (losses8, leaves8), (losses1, leaves1) = by_devices["8"], by_devices["1"]
        np.testing.assert_allclose(losses8, losses1, rtol=1e-4, err_msg=f"m={m}")
        for a, b in zip(leaves8, leaves1, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"m={m}")
    # m-sharpness changes the step (the comparison above is not vacuous for m).
    assert report["results"]["None"]["8"][0][0][1] != report["results"]["4"]["8"][0][0][1]
    assert len(report["errors"]) == 2
    errors = report["errors"]
    assert errors[0].startswith("batch_size=12 is not divisible by the 8 devices"), errors
    assert errors[1].startswith("batch: this process's batch of (12,) examples"), errors


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_hparams_in_state_and_padded_head_match_the_classic_step_exactly(rho):
    """A head padded to 16 classes with 10 real ones, and lr / restart period / rho as
    traced state, must train exactly like the unpadded model with a baked schedule."""
    mesh = step_lib.make_mesh()
    # A ResNet, as trained (exactness is a property of the compiled programs: with conv4
    # the padded and unpadded losses differed in the last bit).
    small = models.build_model("resnet10", 10, width=0.125)
    padded = models.build_model("resnet10", 16, width=0.125)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 28, 28, 1), dtype=np.uint8)
    y = rng.integers(0, 10, 8).astype(np.int32)
    batch = step_lib.shard_batch({"images": x, "labels": y}, mesh)
    tx = optim.make_optimizer(learning_rate=0.1, restart_period=3, num_steps=6)
    a = step_lib.create_train_state(small, tx, jax.random.key(0), x[:1])
    direction = optim.make_direction()
    b = step_lib.create_train_state(padded, direction, jax.random.key(1), x[:1])
    params = {k: v for k, v in a.params.items() if k != "head"}
    params["head"] = {  # the real classes' columns equal; the padding is anything
        "kernel": b.params["head"]["kernel"].at[:, :10].set(a.params["head"]["kernel"]),
        "bias": b.params["head"]["bias"].at[:10].set(a.params["head"]["bias"]),
    }
    b = b.replace(
        params=jax.tree.map(jnp.copy, params),
        hparams=step_lib.make_hparams(learning_rate=0.1, restart_period=3, rho=rho, num_classes=10),
    )
    step_a = step_lib.compile_train_step(small, tx, mesh, use_sam=rho > 0, rho=rho or None)
    # use_sam selects the program; the radius comes from the state's hparams.
    step_b = step_lib.compile_train_step(padded, direction, mesh, use_sam=rho > 0)
    for i in range(5):
        a, ma = step_a(a, batch, jax.random.key(i))
        b, mb = step_b(b, batch, jax.random.key(i))
        assert float(ma["loss"]) == float(mb["loss"])
        np.testing.assert_allclose(
            float(mb["learning_rate"]), 0.1 * 0.5 * (1 + np.cos(np.pi * (i % 3) / 3)), rtol=1e-6
        )
    for u, v in zip(
        jax.tree.leaves(models.trunk_params(a.params)),
        jax.tree.leaves(models.trunk_params(b.params)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_array_equal(
        np.asarray(a.params["head"]["kernel"]), np.asarray(b.params["head"]["kernel"][:, :10])
    )


def test_use_sam_picks_the_program_and_rho_is_only_the_radius():
    model, tx, images, labels = _tiny_setup()
    state = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2])
    batch = {"images": images, "labels": labels}
    call = lambda s, **kw: step_lib.train_step(  # noqa: E731
        s, batch, jax.random.key(1), model=model, tx=tx, **kw
    )
    with pytest.raises(ValueError, match=r"use_sam=False: ERM has no radius"):
        call(state, use_sam=False, rho=0.05)
    with pytest.raises(ValueError, match=r"use_sam=True needs a radius"):
        call(state, use_sam=True)
    with_hp = state.replace(
        hparams=step_lib.make_hparams(learning_rate=0.1, restart_period=3, rho=0.05, num_classes=10)
    )
    with pytest.raises(ValueError, match=r"hparams carry rho: pass rho=None"):
        call(with_hp, use_sam=True, rho=0.05)
    # ERM is one pass: the perturbed loss is the clean loss.
    _, metrics = call(state, use_sam=False)
    assert float(metrics["perturbed_loss"]) == float(metrics["loss"])
    _, metrics = call(state, use_sam=True, rho=0.05)
    assert float(metrics["perturbed_loss"]) > float(metrics["loss"])
