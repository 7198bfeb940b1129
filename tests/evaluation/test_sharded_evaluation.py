"""Evaluation on several devices: embedding batches and episode chunks are split over all
local devices (``ncc.local_mesh``), the backbone adaptations (fine-tuning, LoRA, TSA) run
one episode per device (``episode_devices``), and the results equal the one-device ones.

The 8-device run is a subprocess with ``--xla_force_host_platform_device_count=8`` (the
device count is fixed when jax starts); the reference runs in this process on one device.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from flatfsc_jax import models
from flatfsc_jax.data import benchmarks
from flatfsc_jax.data.episodes import EpisodeBatch
from flatfsc_jax.evaluation import adapt, ncc, pa, tsa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from flatfsc_jax import models
    from flatfsc_jax.data import benchmarks
    from flatfsc_jax.data.episodes import EpisodeBatch
    from flatfsc_jax.evaluation import adapt, episode_devices, ncc, pa, tsa
    from tests.evaluation.test_sharded_evaluation import adaptations

    split = benchmarks.load_split("glyphs", "latin", "test", sys.argv[1])
    model = models.build_model("conv4", 0, width=0.25)
    v = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    # Record how many devices each jitted call's inputs span.
    spans = {"embed": set(), "ncc": set(), "pa": set(), "adapt": set()}
    def spy(name, fn, arg):
        def wrapped(*a, **k):
            if isinstance(arg, int):
                x = a[arg]
            else:
                x = a[1][0] if arg is None else k[arg]["support_images"]
            spans[name].add(len(x.sharding.device_set))
            return fn(*a, **k)
        return wrapped
    ncc._embed_uint8 = spy("embed", ncc._embed_uint8, 2)
    ncc._chunk_accuracies = spy("ncc", ncc._chunk_accuracies, None)
    pa._chunk_accuracies = spy("pa", pa._chunk_accuracies, None)
    episode_devices._round = spy("adapt", episode_devices._round, "episode")
    emb = ncc.embed_split(model, v, split, batch_size=60)
    batch = EpisodeBatch.sample(split, 21, seed=3)
    np.savez(sys.argv[2], emb=emb, ncc=ncc.episode_accuracies(emb, batch, chunk=5),
             pa=pa.episode_accuracies(emb, batch, lr=0.1, steps=3, chunk=5),
             **adaptations(model, v, split, batch))
    assert spans == {"embed": {8}, "ncc": {8}, "pa": {8}, "adapt": {8}}, spans
    """
)


def adaptations(model, variables, split, batch) -> dict:
    """Fine-tuning (power-of-two buckets: several shapes, rounds filled by repetition),
    LoRA and TSA (full width: one shape) on a few of the batch's episodes, 2 steps each."""
    few = batch.take(np.arange(11))
    lr = dict(lr_alpha=0.5, lr_beta=1.0)
    return {
        "finetune": adapt.adapt_episodes(model, variables, split, few, mode="full", steps=2),
        "lora": adapt.adapt_episodes(
            model, variables, split, few, mode="lora", steps=2, bucket=False
        ),
        "tsa": tsa.episode_accuracies(model, variables, split, few, steps=2, bucket=False, **lr),
    }


def test_eight_devices_give_the_one_device_embeddings_and_accuracies(tmp_path):
    data = str(tmp_path / "data")
    split = benchmarks.load_split("glyphs", "latin", "test", data)
    model = models.build_model("conv4", 0, width=0.25)
    v = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    assert ncc.local_mesh().size == 1
    emb = ncc.embed_split(model, v, split, batch_size=60)
    batch = EpisodeBatch.sample(split, 21, seed=3)  # 21: the last chunk is padded
    want = {
        "emb": emb,
        "ncc": ncc.episode_accuracies(emb, batch, chunk=5),
        "pa": pa.episode_accuracies(emb, batch, lr=0.1, steps=3, chunk=5),
        **adaptations(model, v, split, batch),
    }
    script = tmp_path / "eight.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["PYTHONPATH"] = ROOT
    out = tmp_path / "eight.npz"
    result = subprocess.run(
        [sys.executable, str(script), data, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(out)
    np.testing.assert_allclose(got["emb"], want["emb"], rtol=1e-5, atol=1e-6)
    for name in ("ncc", "pa", "finetune", "lora", "tsa"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, err_msg=name)
