"""The training loop against its bare jitted step: how close is ``training/loop.py`` to the step?

    .venv/bin/python bench/loop.py                 # latin, 1000 steps of ERM and of SAM
    .venv/bin/python bench/loop.py --domain=cjk --steps=500

For ERM and SAM on one Glyphs script with the default config's model (the shared,
padded head included), in one process:

* bare: the compiled step that the loop uses, called back to back on one
  device-resident batch (no input pipeline, no logging), timed after its compilation;
* loop: ``training.loop.train_and_evaluate`` itself for the same number of steps (input pipeline,
  augmentation, metrics, progress bar; one validation and one checkpoint at the end),
  whose steps are timed by the job profile (``train/steps``: compilation, validation
  and checkpointing excluded; profiling.py).

The bare step is timed before and after the loop and averaged, so drifting machine
load hits both. Prints img/s of each and the ratio loop / bare (1.0 = no loop overhead).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import glyphs as glyphs_config  # noqa: E402
from flatfsc_jax import config_lib, models  # noqa: E402
from flatfsc_jax import zoo as zoo_lib  # noqa: E402
from flatfsc_jax.data import benchmarks, glyphs  # noqa: E402
from flatfsc_jax.profiling import PROFILE  # noqa: E402
from flatfsc_jax.training import loop as loop_lib  # noqa: E402
from flatfsc_jax.training import step as step_lib  # noqa: E402


def bare_seconds_per_step(cfg, model, mesh, batch, n: int) -> float:
    step = loop_lib._compiled_step(model, cfg, mesh, train_lora=False)
    tx = loop_lib.optim.make_direction(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state = step_lib.create_train_state(model, tx, jax.random.key(0), batch["images"][:1])
    state = step_lib.replicate(
        state.replace(
            hparams=step_lib.make_hparams(
                learning_rate=cfg.lr,
                restart_period=cfg.restart_period,
                rho=cfg.sam.rho,
                num_classes=int(np.max(batch["labels"])) + 1,
            )
        ),
        mesh,
    )
    sharded = step_lib.shard_batch(batch, mesh)
    rng = step_lib.replicate(jax.random.key(1), mesh)
    state, metrics = step(state, sharded, rng)  # compiles (or reuses the loop's program)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n):
        state, metrics = step(state, sharded, rng)
    jax.block_until_ready((state, metrics))
    return (time.perf_counter() - start) / n


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="latin")
    # 1000: at 300 steps the input pipeline's start-up still shows on a fast machine
    # (ERM loop / bare 0.71-0.86 at 300 steps, 1.00 at 1000, same machine and hour).
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="flatfsc_loop_")
    config = glyphs_config.get_config()
    config.data_dir = os.path.join(work, "data")
    glyphs.prepare(config.data_dir, domains=[args.domain])
    row = config.per_domain[args.domain]
    row.num_steps = row.restart_period = args.steps
    config.validation.every = config.checkpoint_every = args.steps
    config.log_every = 50
    mesh = step_lib.make_mesh()
    split = benchmarks.load_split(config.benchmark, args.domain, "train", config.data_dir)
    images = split.get_images(np.arange(row.batch_size) % len(split))
    labels = np.arange(row.batch_size, dtype=np.int32) % split.num_classes
    batch = {"images": images, "labels": labels.astype(np.int32)}
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"glyphs/{args.domain}, batch {row.batch_size}, {args.steps} steps per run"
    )
    print(f"{'method':6s} {'bare img/s':>11s} {'loop img/s':>11s} {'loop / bare':>12s}")
    for method in ("erm", "sam"):
        cfg = config_lib.domain_config(config, args.domain, method)
        model = models.build_model_from_config(
            cfg.model, loop_lib.head_width(cfg, split.num_classes), lora_rank=0
        )
        before = bare_seconds_per_step(cfg, model, mesh, batch, args.steps // 2)
        PROFILE.reset()
        zoo = zoo_lib.Zoo(os.path.join(work, "zoo"))
        loop_lib.train_and_evaluate(config, zoo, args.domain, method, progress=False)
        loop = PROFILE.seconds["train/steps"] / (args.steps - 1)  # first step: compile
        after = bare_seconds_per_step(cfg, model, mesh, batch, args.steps // 2)
        bare = 0.5 * (before + after)
        b = row.batch_size
        print(f"{method:6s} {b / bare:11.1f} {b / loop:11.1f} {bare / loop:12.3f}", flush=True)


if __name__ == "__main__":
    main()
