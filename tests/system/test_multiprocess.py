"""Multi-host data parallelism: 2 CPU processes on localhost train together and agree.

Each process holds one CPU device; ``jax.distributed.initialize`` joins them into one
2-device mesh (gloo collectives, docs/install.md#multi-device-and-multi-host). Both
processes feed their own half of every global batch (as
``pipeline.make_train_iterator(process_index=...)`` does) and must end with identical
parameters, equal to one process training on the whole batch.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    import jax
    import numpy as np
    num_processes, process_id = int(sys.argv[1]), int(sys.argv[2])
    port, out = sys.argv[3], sys.argv[4]
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{{port}}",
                                   num_processes=num_processes, process_id=process_id)
    from flatfsc_jax import models
    from flatfsc_jax.training import optim
    from flatfsc_jax.training import step as step_lib
    from flatfsc_jax.data import pipeline, sources

    rng = np.random.default_rng(0)
    split = sources.SplitData("synthetic/x", "train",
                              rng.integers(0, 256, (64, 16, 16, 1), dtype=np.uint8),
                              np.arange(64) % 4, ["a", "b", "c", "d"])
    mesh = step_lib.make_mesh()
    assert mesh.size == 2 or num_processes == 1, mesh
    model = models.build_model("conv4", 4, width=0.125)
    tx = optim.make_optimizer(learning_rate=0.05, restart_period=10, num_steps=10)
    state = step_lib.replicate(
        step_lib.create_train_state(model, tx, jax.random.key(0), np.zeros((1, 16, 16, 1))), mesh)
    step = step_lib.compile_train_step(model, tx, mesh, use_sam=True, rho=0.05, batch_size=8)
    it = pipeline.make_train_iterator(
        split, global_batch_size=8, seed=0, augment=pipeline.AugmentConfig(pad=2),
        process_index=jax.process_index(), process_count=jax.process_count())
    losses = []
    for i in range(3):
        b = next(it)
        batch = step_lib.shard_batch({{"images": b["image"], "labels": b["label"]}}, mesh)
        state, metrics = step(state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    np.savez(out, losses=np.array(losses), *leaves)
    print("OK", jax.process_index(), jax.process_count(), mesh.size)
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "2", str(i), port, str(tmp_path / f"p{i}.npz")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "OK" in out, err[-4000:]
    assert "OK 0 2 2" in outs[0][0] and "OK 1 2 2" in outs[1][0]

    # Reference: one process with 2 local devices on the same global batches.
    env1 = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    one = subprocess.run(
        [sys.executable, str(script), "1", "0", "0", str(tmp_path / "one.npz")],
        env=env1,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-4000:]

    p0, p1, ref = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "one.npz"))
    assert p0.files == p1.files == ref.files
    for k in p0.files:
        np.testing.assert_array_equal(p0[k], p1[k])  # the two hosts agree exactly
        np.testing.assert_allclose(p0[k], ref[k], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(p0["losses"]))
