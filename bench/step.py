"""Throughput of the ERM and SAM training steps, and the SAM/ERM cost ratio.

    .venv/bin/python bench/step.py                       # the three default models
    .venv/bin/python bench/step.py --models paper --repeats 20
    .venv/bin/python bench/step.py --models resnet10:0.5:32:1:128

A SAM step is two forward-backward passes, so SAM/ERM >= 2.0; anything above is
overhead of the perturbation (gradient norm, w + e, the extra tree traffic). Both steps
run on the SAME model, weights and batch, through the production path
(``steps.compile_train_step``: jit over a mesh of all devices, donated state); timed
repeats are interleaved (ERM, SAM, ERM, SAM, ...) so drifting machine load hits both
alike. Throughput uses median wall times; three SAM/ERM ratios follow: of the median
wall times, of the fastest repeats ("min", the least disturbed by other processes on a
shared machine) and of the median process CPU times ("CPU"). XLA's FLOP estimate of each
compiled step separates arithmetic from overhead: "FLOPs" is the SAM/ERM FLOP ratio,
"GFLOP/s" the ERM step's achieved rate.

Model specs are ``arch:width:image_size:channels:batch`` or a preset name:
``paper`` (ResNet-18 at 84 px RGB, batch 16, design.md §2), ``cpu10`` (ResNet-10 width
0.25 at 28x28x1, batch 64) and ``cpu18`` (ResNet-18 width 0.25 at 28x28x1, batch 64).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from flatfsc_jax import models, optim, steps

PRESETS = {
    "paper": "resnet18:1:84:3:16",
    "cpu10": "resnet10:0.25:28:1:64",
    "cpu18": "resnet18:0.25:28:1:64",
}
NUM_CLASSES = 64


def parse_spec(spec: str) -> dict:
    spec = PRESETS.get(spec, spec)
    try:
        arch, width, size, channels, batch = spec.split(":")
        return {
            "arch": arch,
            "width": float(width),
            "size": int(size),
            "channels": int(channels),
            "batch": int(batch),
        }
    except ValueError as e:
        raise ValueError(
            f"--models entry {spec!r} is neither a preset {sorted(PRESETS)} nor "
            f"arch:width:image_size:channels:batch"
        ) from e


def _flops(compiled) -> float | None:
    """XLA's FLOP estimate of a compiled step (best effort: not every backend has one)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return flops or None


def bench_model(spec: dict, *, repeats: int, rho: float, dtype: str) -> dict:
    model = models.build_model(spec["arch"], NUM_CLASSES, width=spec["width"], dtype=dtype)
    tx = optim.make_optimizer(learning_rate=0.03, restart_period=1000, num_steps=1000)
    mesh = steps.make_mesh()
    rs = np.random.RandomState(0)
    shape = (spec["batch"], spec["size"], spec["size"], spec["channels"])
    images = rs.randint(0, 256, size=shape).astype(np.uint8)
    labels = rs.randint(0, NUM_CLASSES, size=spec["batch"]).astype(np.int32)
    batch = steps.shard_batch({"images": images, "labels": labels}, mesh)
    rng = steps.replicate(jax.random.key(1), mesh)
    init = steps.create_train_state(model, tx, jax.random.key(0), images[:2])

    runs = {}
    for name, r in (("erm", 0.0), ("sam", rho)):
        step = steps.compile_train_step(model, tx, mesh, rho=r, batch_size=spec["batch"])
        state = steps.replicate(init, mesh)  # a fresh copy: each run donates its own
        start = time.perf_counter()
        compiled = step.jitted.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch, rng)  # first run: allocations, warm caches
        jax.block_until_ready((state, metrics))
        runs[name] = {
            "step": compiled,
            "state": state,
            "compile_s": compile_s,
            "flops": _flops(compiled),
            "times": [],
            "cpu_times": [],
        }
    for _ in range(repeats):
        for run in runs.values():
            start, cpu_start = time.perf_counter(), time.process_time()
            run["state"], metrics = run["step"](run["state"], batch, rng)
            jax.block_until_ready((run["state"], metrics))
            run["times"].append(time.perf_counter() - start)
            run["cpu_times"].append(time.process_time() - cpu_start)
    erm, sam_run = runs["erm"], runs["sam"]
    flops_ratio = (
        sam_run["flops"] / erm["flops"] if erm["flops"] and sam_run["flops"] else float("nan")
    )
    return {
        "erm_ms": 1e3 * statistics.median(erm["times"]),
        "sam_ms": 1e3 * statistics.median(sam_run["times"]),
        "erm_ips": spec["batch"] / statistics.median(erm["times"]),
        "sam_ips": spec["batch"] / statistics.median(sam_run["times"]),
        "ratio": statistics.median(sam_run["times"]) / statistics.median(erm["times"]),
        "min_ratio": min(sam_run["times"]) / min(erm["times"]),
        "cpu_ratio": statistics.median(sam_run["cpu_times"]) / statistics.median(erm["cpu_times"]),
        "flops_ratio": flops_ratio,
        "erm_gflops": (erm["flops"] or float("nan")) / statistics.median(erm["times"]) / 1e9,
        "compile_s": (erm["compile_s"], sam_run["compile_s"]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="paper,cpu10,cpu18", help="comma-separated specs")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    specs = [parse_spec(s) for s in args.models.split(",") if s]

    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"dtype {args.dtype}, rho {args.rho}, {args.repeats} interleaved repeats (median)"
    )
    header = (
        f"{'model':<28} {'batch':>5} {'ERM ms':>8} {'SAM ms':>8} {'ERM img/s':>10} "
        f"{'SAM img/s':>10} {'SAM/ERM':>8} {'min':>6} {'CPU':>6} {'FLOPs':>6} {'GFLOP/s':>8} "
        f"{'compile s':>11}"
    )
    print(header)
    print("-" * len(header))
    for spec in specs:
        r = bench_model(spec, repeats=args.repeats, rho=args.rho, dtype=args.dtype)
        name = f"{spec['arch']} w{spec['width']:g} {spec['size']}x{spec['size']}x{spec['channels']}"
        print(
            f"{name:<28} {spec['batch']:>5} {r['erm_ms']:>8.1f} {r['sam_ms']:>8.1f} "
            f"{r['erm_ips']:>10.1f} {r['sam_ips']:>10.1f} {r['ratio']:>8.3f} "
            f"{r['min_ratio']:>6.3f} {r['cpu_ratio']:>6.3f} {r['flops_ratio']:>6.3f} "
            f"{r['erm_gflops']:>8.1f} "
            f"{r['compile_s'][0]:>5.1f}/{r['compile_s'][1]:<5.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
