"""The input pipeline on a prepared Meta-Dataset-format split: read rate by worker count,
and the fed training loop against the bare step.

    .venv/bin/python bench/data_md.py --data-dir /tmp/md_bench          # 100k images, 84 px
    .venv/bin/python bench/data_md.py --data-dir /tmp/md_bench --num-images 20000 \\
        --workers 0,1,2 --arch resnet10 --width 0.25 --batch 32 --steps 60
    .venv/bin/python bench/data_md.py --image-size 28 --channels 1      # Glyphs-sized, in memory

1. The split. At 84x84x3 it is a synthetic ``meta_dataset/ilsvrc_2012`` train split of
   ``--num-images`` images written by the project's own builder (``bench/md_split.py``:
   zlib-compressed tensors in array_record shards) into ``--data-dir`` once, then read
   lazily like a prepared ImageNet split. Other sizes (``--image-size 28 --channels 1``
   is Glyphs) use an in-memory split, as Glyphs is read.
2. Read rate by worker count (``--workers``): img/s of ``make_train_iterator`` (one
   batched read per batch, shuffled over the whole split) with the augmentation drawn on
   the host and applied on the device (``device``: uint8 + parameters, what an
   accelerator is fed) and applied on the host (``host``: float32, the numpy reference
   path). The split's files were just written or read, so they sit in the page cache:
   this measures decoding and the pipeline, not the disk.
3. Fed loop against the bare step, side by side in one process: the jitted training step
   of ``train.py`` (ERM and/or SAM, hyper-parameters as data) called back to back on one
   device-resident batch ("bare"), and in the loop ``next(iterator)`` ->
   ``step_lib.shard_batch`` -> ``pipeline.to_step_batch`` -> step ("fed"). Blocks of both
   alternate (``--rounds``) so that drifting load hits both; each block's first steps
   (the prefetch buffer that filled while the other block ran, plus two) are run but
   not timed. Prints img/s of each and fed / bare (1.0: the pipeline costs nothing).

``--json PATH`` writes every figure with the machine, the settings and the time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from flatfsc_jax import models  # noqa: E402
from flatfsc_jax.data import pipeline  # noqa: E402
from flatfsc_jax.data.sources import SplitData  # noqa: E402
from flatfsc_jax.training import optim  # noqa: E402
from flatfsc_jax.training import step as step_lib  # noqa: E402

SAM_RHO = 0.05


def make_split(args) -> SplitData:
    if (args.image_size, args.channels) == (84, 3):
        from bench.md_split import synthetic_md_split

        start = time.perf_counter()
        split = synthetic_md_split(args.data_dir, args.num_images, args.num_classes)
        print(
            f"split: {len(split)} images 84x84x3 in array_record under {args.data_dir} "
            f"(ready in {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        return split
    rng = np.random.default_rng(0)
    shape = (args.num_images, args.image_size, args.image_size, args.channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = np.arange(args.num_images) % args.num_classes
    print(f"split: {args.num_images} images {shape[1:]} in memory", flush=True)
    names = [str(c) for c in range(args.num_classes)]
    return SplitData("bench/memory", "train", images, labels, names)


def augment_config(split: SplitData) -> pipeline.AugmentConfig:
    return pipeline.AugmentConfig.for_image_size(split.image_shape[0])


def read_rate(split, *, batch, worker_count, prefetch, device_augment, seconds) -> float:
    """img/s of the iterator after its first batch (workers started, buffers filling)."""
    with pipeline.make_train_iterator(
        split,
        global_batch_size=batch,
        seed=0,
        augment=augment_config(split),
        worker_count=worker_count,
        prefetch=prefetch,
        device_augment=device_augment,
    ) as iterator:
        next(iterator)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            count += len(next(iterator)["label"])
        return count / (time.perf_counter() - start)


def read_sweep(split, args) -> list[dict]:
    rows = []
    print(f"\nread rate, batch {args.batch} (img/s):", flush=True)
    print(f"{'workers':>8} " + " ".join(f"{m:>10}" for m in args.sweep_modes), flush=True)
    for workers in args.workers:
        row = {"worker_count": workers}
        for mode in args.sweep_modes:
            row[mode] = read_rate(
                split,
                batch=args.batch,
                worker_count=workers,
                prefetch=args.prefetch,
                device_augment=mode == "device",
                seconds=args.seconds,
            )
        rows.append(row)
        print(f"{workers:>8} " + " ".join(f"{row[m]:10.0f}" for m in args.sweep_modes), flush=True)
    return rows


def build_step(split, *, arch, width, dtype, batch, rho):
    """The step ``training/loop.py`` compiles (direction-only optimiser, hparams as data)."""
    model = models.build_model(arch, split.num_classes, width=width, dtype=dtype)
    mesh = step_lib.make_mesh()
    tx = optim.make_direction(momentum=0.9, weight_decay=5e-4)
    step = step_lib.compile_train_step(model, tx, mesh, use_sam=rho > 0, batch_size=batch)
    sample = np.zeros((1, *split.image_shape), np.float32)
    state = step_lib.create_train_state(model, tx, jax.random.key(0), sample)
    hparams = step_lib.make_hparams(
        learning_rate=0.05, restart_period=10_000, rho=rho, num_classes=split.num_classes
    )
    return step, step_lib.replicate(state.replace(hparams=hparams), mesh), mesh


def fed_vs_bare(split, *, rho, args, worker_count) -> dict:
    step, state, mesh = build_step(
        split, arch=args.arch, width=args.width, dtype=args.dtype, batch=args.batch, rho=rho
    )
    rng = step_lib.replicate(jax.random.key(1), mesh)
    augment = augment_config(split)
    iterator = pipeline.make_train_iterator(
        split,
        global_batch_size=args.batch,
        seed=0,
        augment=augment,
        worker_count=worker_count,
        prefetch=args.prefetch,
        device_augment=args.device_augment,
    )

    def fed():
        return pipeline.to_step_batch(step_lib.shard_batch(next(iterator), mesh), pad=augment.pad)

    fixed = jax.block_until_ready(fed())  # augmented, device-resident

    def bare():
        return fixed

    per_block = max(1, args.steps // args.rounds)
    skip = min(per_block // 4, max(1, worker_count) * args.prefetch + 2)

    def block(feed, n) -> tuple[int, float]:
        nonlocal state
        start, metrics = time.perf_counter(), None
        for i in range(n):
            if i == skip:
                jax.block_until_ready(metrics)
                start = time.perf_counter()
            state, metrics = step(state, feed(), rng)
        jax.block_until_ready(metrics)
        return n - skip, time.perf_counter() - start

    with iterator:
        start = time.perf_counter()
        for feed in (bare, fed):  # compiles the step and the augmentation; warms the workers
            block(feed, skip + 1)
        warm_seconds = time.perf_counter() - start
        totals = {"bare": [0, 0.0], "fed": [0, 0.0]}
        for _ in range(args.rounds):
            for name, feed in (("bare", bare), ("fed", fed)):
                n, seconds = block(feed, per_block)
                totals[name][0] += n
                totals[name][1] += seconds
    bare_rate = totals["bare"][0] * args.batch / totals["bare"][1]
    fed_rate = totals["fed"][0] * args.batch / totals["fed"][1]
    return {
        "method": "sam" if rho > 0 else "erm",
        "batch": args.batch,
        "worker_count": worker_count,
        "timed_steps_each": totals["bare"][0],
        "bare_img_s": bare_rate,
        "fed_img_s": fed_rate,
        "fed_over_bare": fed_rate / bare_rate,
        "compile_and_warmup_s": warm_seconds,
    }


def machine() -> dict:
    device = jax.devices()[0]
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="/tmp/flatfsc_md_bench", help="split cache")
    parser.add_argument("--num-images", type=int, default=100_000)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=84, help="84: MD on disk; 28/32: Glyphs")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--workers", default="0,1,2,4", help="worker counts of the read sweep")
    parser.add_argument("--sweep-modes", default="device,host", help="device and/or host")
    parser.add_argument("--seconds", type=float, default=5.0, help="per sweep measurement")
    parser.add_argument("--prefetch", type=int, default=2, help="batches ahead (per worker)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--methods", default="erm", help="erm and/or sam, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of each of fed, bare")
    parser.add_argument("--rounds", type=int, default=3, help="alternating blocks of each")
    parser.add_argument(
        "--loop-workers",
        type=int,
        default=None,
        help="worker_count of the fed loop (default: the fastest of the sweep, or 0 without one)",
    )
    parser.add_argument(
        "--host-augment",
        dest="device_augment",
        action="store_false",
        help="feed float32 batches augmented on the host (default: uint8 + device augmentation)",
    )
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-loop", action="store_true")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",") if w != ""]
    args.sweep_modes = [m for m in args.sweep_modes.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    for name, values, allowed in (
        ("--sweep-modes", args.sweep_modes, {"device", "host"}),
        ("--methods", args.methods, {"erm", "sam"}),
    ):
        if not set(values) <= allowed:
            parser.error(f"{name} takes {sorted(allowed)}, got {values}")
    if any(w < 0 for w in args.workers):
        parser.error(f"--workers must be non-negative, got {args.workers}")
    if args.steps < args.rounds:
        parser.error("--steps must be at least --rounds")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"machine": machine(), "settings": {k: v for k, v in vars(args).items()}}
    print(json.dumps(report["machine"]), flush=True)
    split = make_split(args)
    if not args.no_sweep:
        report["read_sweep"] = read_sweep(split, args)
    if not args.no_loop:
        if args.loop_workers is not None:
            loop_workers = args.loop_workers
        elif report.get("read_sweep"):
            mode = "device" if args.device_augment else "host"
            sweep = [r for r in report["read_sweep"] if mode in r] or report["read_sweep"]
            loop_workers = max(sweep, key=lambda r: r.get(mode, 0.0))["worker_count"]
        else:
            loop_workers = 0
        label = f"{args.arch} x{args.width:g} {args.dtype} batch {args.batch}"
        print(f"\nfed loop vs bare step, {label}, worker_count {loop_workers}:", flush=True)
        report["loop"] = []
        for method in args.methods:
            row = fed_vs_bare(
                split, rho=SAM_RHO if method == "sam" else 0.0, args=args, worker_count=loop_workers
            )
            report["loop"].append(row)
            print(
                f"  {method.upper():>3}: bare {row['bare_img_s']:9.1f} img/s   fed "
                f"{row['fed_img_s']:9.1f} img/s   fed/bare {row['fed_over_bare']:.3f}",
                flush=True,
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
