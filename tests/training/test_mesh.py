"""make_mesh: jax.make_mesh, and a batch never has to divide by the device count."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from flatfsc_jax.training import step

    assert jax.device_count() == 16
    full = step.make_mesh()
    assert full.size == 16 and list(full.devices.flat) == jax.devices()
    # batch 8 (the paper's aircraft, birds, ...) on 16 devices: 8 of them, not an error.
    sizes = {b: step.make_mesh(batch_size=b).size for b in (8, 12, 64, 7)}
    assert sizes == {8: 8, 12: 4, 64: 16, 7: 1}, sizes
    mesh = step.make_mesh(batch_size=8)
    assert list(mesh.devices.flat) == jax.devices()[:8]
    # A batch of 8 shards over that mesh, one example per device.
    x = step.shard_batch({"images": np.arange(8.0)}, mesh)["images"]
    assert len(x.addressable_shards) == 8 and np.array_equal(np.asarray(x), np.arange(8.0))
    print("ok")
    """
)


def test_make_mesh_takes_the_devices_that_divide_the_batch():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
