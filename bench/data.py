"""Throughput of the training input pipeline, and of the training step it feeds.

The pipeline (flatfsc_jax/data/pipeline.py) must never be the bottleneck: on the 2-core
CPU machines it shares the cores with the training step. This prints images/s of the
augmented pipeline (batch 64, synthetic uint8 data, 28x28x1 and 84x84x3) in its three
modes - synchronous, one prefetch thread (the default), grain worker processes, uint8
batches whose augmentation the device applies (``device_augment``) - and,
where ``flatfsc_jax.training.step`` is importable, of the ERM training step alone (one fixed
batch) and fed by the pipeline.

    .venv/bin/python bench/data.py                 # everything, a few minutes
    .venv/bin/python bench/data.py --no-step       # pipeline only, about 30 s
    .venv/bin/python bench/data.py --arch conv4    # step of another backbone

What it measured: docs/benchmarks.md#input-pipeline.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from flatfsc_jax.data import pipeline
from flatfsc_jax.data.sources import SplitData

SHAPES = ((28, 28, 1), (84, 84, 3))
BATCH = 64


def synthetic_split(shape, num_examples=2048, num_classes=64, seed=0) -> SplitData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_examples)
    return SplitData(
        f"bench/{shape[0]}px", "train", images, labels, [str(c) for c in range(num_classes)]
    )


def images_per_second(next_batch, seconds: float) -> float:
    next_batch()  # warm-up: threads / worker processes started, caches filled
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next_batch()["label"])
    return count / (time.perf_counter() - start)


def bench_pipeline(shape, seconds: float) -> None:
    split = synthetic_split(shape)
    modes = [
        ("no augmentation, synchronous", dict(prefetch=0), False),
        ("synchronous", dict(prefetch=0), True),
        ("prefetch thread (default)", dict(prefetch=2), True),
        ("2 worker processes", dict(worker_count=2, prefetch=2), True),
        ("uint8 + parameters (device_augment)", dict(prefetch=2, device_augment=True), True),
    ]
    for name, kwargs, augment in modes:
        config = pipeline.AugmentConfig.for_image_size(shape[0], enabled=augment)
        with pipeline.make_train_iterator(
            split, global_batch_size=BATCH, seed=0, augment=config, **kwargs
        ) as iterator:
            rate = images_per_second(lambda it=iterator: next(it), seconds)
        print(f"pipeline {'x'.join(map(str, shape))} batch {BATCH}, {name}: {rate:10.0f} img/s")


def bench_step(shape, arch: str, width: float, num_steps: int) -> None:
    try:
        import jax

        from flatfsc_jax import models
        from flatfsc_jax.training import optim
        from flatfsc_jax.training import step as step_lib
    except ImportError as e:  # the step module is built separately from the pipeline
        print(f"train step: skipped ({e})")
        return
    split = synthetic_split(shape)
    model = models.build_model(arch, split.num_classes, width=width)
    tx = optim.make_optimizer(learning_rate=0.01, restart_period=1000, num_steps=1000)
    mesh = step_lib.make_mesh()
    step = step_lib.compile_train_step(model, tx, mesh, use_sam=False, batch_size=BATCH)
    state = step_lib.replicate(
        step_lib.create_train_state(model, tx, jax.random.key(0), split.images[:2]), mesh
    )
    rng = step_lib.replicate(jax.random.key(1), mesh)
    augment = pipeline.AugmentConfig.for_image_size(shape[0])
    with pipeline.make_train_iterator(
        split, global_batch_size=BATCH, seed=0, augment=augment
    ) as iterator:

        def feed():
            return pipeline.to_step_batch(
                step_lib.shard_batch(next(iterator), mesh), pad=augment.pad
            )

        fixed = feed()

        def run(feed) -> float:
            nonlocal state
            state, metrics = step(state, feed(), rng)  # compiles on the first call
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(num_steps):
                state, metrics = step(state, feed(), rng)
                jax.block_until_ready(metrics)
            return num_steps * BATCH / (time.perf_counter() - start)

        alone = run(lambda: fixed)
        fed = run(feed)
    label = f"train step {arch} x{width:g} ERM {'x'.join(map(str, shape))} batch {BATCH}"
    print(f"{label}, one fixed batch: {alone:10.1f} img/s")
    print(f"{label}, fed by the pipeline: {fed:10.1f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per pipeline mode")
    parser.add_argument("--no-step", action="store_true", help="skip the training step")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    args = parser.parse_args()
    for shape in SHAPES:
        bench_pipeline(shape, args.seconds)
    if not args.no_step:
        for shape in SHAPES:
            bench_step(shape, args.arch, args.width, args.steps)


if __name__ == "__main__":
    main()
