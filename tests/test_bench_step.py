"""bench/step.py's analytic FLOP count: exact on single layers, backend-independent.

References: a brute-force loop over output positions and kernel taps (convolutions), the
closed form 2*m*n*k (matrix products), and XLA:CPU's own cost analysis of the compiled
training step, which counts convolutions on CPU (not on GPU, hence the analytic count).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import step as bench_step


def _brute_force_conv_macs(in_hw, kernel_hw, stride, padding, out_channels, in_channels):
    """Multiply-adds of a 2-D convolution that touch a real (non-padding) input pixel."""
    (h, w), (kh, kw) = in_hw, kernel_hw
    (plo_h, phi_h), (plo_w, phi_w) = padding
    out_h = (h + plo_h + phi_h - kh) // stride + 1
    out_w = (w + plo_w + phi_w - kw) // stride + 1
    taps = 0
    for oy, ox, ky, kx in itertools.product(range(out_h), range(out_w), range(kh), range(kw)):
        y, x = oy * stride + ky - plo_h, ox * stride + kx - plo_w
        taps += 0 <= y < h and 0 <= x < w
    return taps * out_channels * in_channels


@pytest.mark.parametrize(
    "stride,padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 0), (0, 0)))]
)
def test_conv_flops_match_a_brute_force_count(stride, padding):
    x = jnp.ones((3, 9, 7, 5))  # NHWC
    k = jnp.ones((3, 3, 5, 4))  # HWIO

    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    expected = 2 * 3 * _brute_force_conv_macs((9, 7), (3, 3), stride, padding, 4, 5)
    assert bench_step.matmul_flops(conv, x, k) == expected

    # Backward: the input and the kernel gradient each redo every forward multiply-add
    # (as transposed / dilated convolutions whose holes and padding are not counted).
    def loss(x, k):
        return jnp.sum(conv(x, k) ** 2)

    assert bench_step.matmul_flops(jax.grad(loss, argnums=(0, 1)), x, k) == 3 * expected


def test_dot_flops_and_nested_jaxprs():
    a, b = jnp.ones((6, 4, 5)), jnp.ones((6, 5, 3))

    @jax.jit
    def inner(a, b):
        return jnp.einsum("bik,bkj->bij", a, b)

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c + inner(a, b), None), jnp.zeros((6, 4, 3)), None, 7)

    assert bench_step.matmul_flops(inner, a, b) == 2 * 6 * 4 * 3 * 5
    assert bench_step.matmul_flops(scanned, a, b) == 7 * 2 * 6 * 4 * 3 * 5


def test_training_step_count_agrees_with_xla_cpu_and_sam_is_two_passes():
    from flatfsc_jax import models
    from flatfsc_jax.training import optim
    from flatfsc_jax.training import step as step_lib

    model = models.build_model("resnet18", 10, width=0.25)
    tx = optim.make_optimizer(learning_rate=0.1, restart_period=10, num_steps=10)
    mesh = step_lib.make_mesh()
    rs = np.random.RandomState(0)
    images = rs.randint(0, 256, size=(8, 28, 28, 1)).astype(np.uint8)
    labels = rs.randint(0, 10, size=8).astype(np.int32)
    batch = step_lib.shard_batch({"images": images, "labels": labels}, mesh)
    state = step_lib.replicate(
        step_lib.create_train_state(model, tx, jax.random.key(0), images), mesh
    )
    rng = step_lib.replicate(jax.random.key(1), mesh)
    counts = {}
    for name, rho in (("erm", 0.0), ("sam", 0.05)):
        jitted = step_lib.compile_train_step(
            model, tx, mesh, use_sam=rho > 0, rho=rho or None
        ).jitted
        counts[name] = bench_step.matmul_flops(jitted, state, batch, rng)
        if name == "erm":
            cost = jitted.lower(state, batch, rng).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost
            xla = float(cost["flops"])
    # XLA also counts elementwise work (BN, ReLU, optimiser): a little more, never less.
    assert 0.85 * xla <= counts["erm"] <= xla, (counts["erm"], xla)
    assert counts["sam"] / counts["erm"] == pytest.approx(2.0, abs=0.01)
