"""The flat methods inside the jitted training step (training/step.py, flat_methods.py).

References: the plain SAM program (which tests/training/test_step.py checks against
hand-written SAM) and a hand-written EMA of the run's own iterates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax import flat_methods as fm
from flatfsc_jax import models
from flatfsc_jax.training import optim
from flatfsc_jax.training import step as S

RHO, DECAY, STEPS = 0.1, 0.5, 2


def _run(flat, switching=False):
    model = models.build_model("conv4", num_classes=5, width=0.125)
    tx = optim.make_direction(momentum=0.9, weight_decay=7e-4)
    mesh = S.make_mesh()
    state = S.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    state = state.replace(
        hparams=S.make_hparams(learning_rate=0.05, restart_period=4, rho=RHO, num_classes=5)
    )
    if flat is not None:
        state = state.replace(
            flat=fm.init_state(flat, state.params), average=fm.init_average(flat, state.params)
        )
    state = S.replicate(state, mesh)
    step = S.compile_train_step(model, tx, mesh, use_sam=True, flat=flat)
    rs = np.random.default_rng(0)
    trajectory, metrics = [], []
    for t in range(STEPS):
        batch = {
            "images": rs.uniform(-1, 1, (8, 28, 28, 1)).astype(np.float32),
            "labels": rs.integers(0, 5, 8).astype(np.int32),
        }
        kwargs = {"sam_step": fm.takes_sam_step(flat, t)} if switching else {}
        state, m = step(
            state, S.shard_batch(batch, mesh), S.replicate(jax.random.key(t), mesh), **kwargs
        )
        trajectory.append(jax.device_get(state.params))
        metrics.append(S.host_metrics(m))
    return state, trajectory, metrics


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def _initial_params():
    model = models.build_model("conv4", num_classes=5, width=0.125)
    tx = optim.make_direction(momentum=0.9, weight_decay=7e-4)
    state = S.create_train_state(model, tx, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    return jax.device_get(state.params)


def test_every_k_with_ema_picks_the_sam_program_then_the_erm_one_and_averages():
    _, sam_traj, sam_metrics = _run(None)  # the plain SAM program, the reference
    flat = fm.FlatMethod(method="sam_every_k", rho=RHO, k=2, average="ema", average_decay=DECAY)
    state, traj, metrics = _run(flat, switching=True)
    _close(traj[0], sam_traj[0], rtol=1e-5, atol=1e-6)  # step 0: a SAM step, averaging aside
    assert [m["gradient_evaluations"] for m in metrics] == [2.0, 1.0]
    assert metrics[0]["sharpness"] == pytest.approx(sam_metrics[0]["sharpness"], rel=1e-4)
    assert metrics[1]["sharpness"] == 0.0  # step 1: ERM, from the same weights as SAM's
    assert metrics[1]["loss"] == pytest.approx(sam_metrics[1]["loss"], rel=1e-5)
    expected = _initial_params()  # the EMA starts at w0, average_start 0
    for w in traj:
        expected = jax.tree.map(lambda a, b: DECAY * a + (1 - DECAY) * b, expected, w)
    _close(state.average["params"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass sam_step=flat_methods.takes_sam_step"):
        _run(flat, switching=False)
