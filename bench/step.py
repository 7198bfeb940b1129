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
shared machine) and of the median process CPU times ("CPU").

FLOPs separate arithmetic from overhead: "FLOPs" is the SAM/ERM FLOP ratio, "GFLOP/s"
the ERM step's achieved rate. They are counted analytically, from the step's jaxpr: two
FLOPs per multiply-add of every convolution and matrix product (forward and backward),
with the exact number of taps that meet real input (no padding, no dilation holes);
elementwise work (BatchNorm, ReLU, the optimiser) is left out, a few percent of a
ResNet. We do not use XLA's cost analysis of the compiled step: on GPU it does not count
the convolutions XLA hands to cuDNN (it reported 1.2 TFLOP/s for the bf16 ResNet-18 step
on an H200), while the jaxpr count is the same on every backend.

Model specs are ``arch:width:image_size:channels:batch`` or a preset name:
``paper`` (ResNet-18 at 84 px RGB, batch 16, the paper), ``cpu10`` (ResNet-10 width
0.25 at 28x28x1, batch 64) and ``cpu18`` (ResNet-18 width 0.25 at 28x28x1, batch 64).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import numpy as np
from jax.extend import core as jax_core

from flatfsc_jax import models
from flatfsc_jax.training import optim
from flatfsc_jax.training import step as step_lib

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


def _conv_taps(in_size, kernel, stride, pad_lo, lhs_dil, rhs_dil, out_size) -> int:
    """(output position, kernel tap) pairs of one spatial axis that read a real input."""
    pos = np.arange(out_size)[:, None] * stride + np.arange(kernel)[None, :] * rhs_dil - pad_lo
    real = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
    return int(real.sum())


def _eqn_flops(eqn) -> float:
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)
    if eqn.primitive.name == "conv_general_dilated":
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        ndim = len(lhs_spec) - 2
        lhs_dil = p["lhs_dilation"] or (1,) * ndim
        rhs_dil = p["rhs_dilation"] or (1,) * ndim
        taps = 1
        for i in range(ndim):
            taps *= _conv_taps(
                lhs[lhs_spec[2 + i]],
                rhs[rhs_spec[2 + i]],
                p["window_strides"][i],
                p["padding"][i][0],
                lhs_dil[i],
                rhs_dil[i],
                out[out_spec[2 + i]],
            )
        # each output (batch, feature) sums over the kernel's input features and taps
        return 2.0 * out[out_spec[0]] * out[out_spec[1]] * rhs[rhs_spec[1]] * taps
    return 0.0


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        subs = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
        if eqn.primitive.name == "cond":
            total += max(subs, default=0.0)  # one branch runs
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(subs)
        else:  # jit, custom_jvp/vjp, remat, ...; a while body is counted once
            total += sum(subs)
    return total


def _sub_jaxprs(params):
    for value in params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v


def matmul_flops(fn, *args) -> float:
    """FLOPs of every convolution and matrix product ``fn(*args)`` computes (2 per MAC)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def bench_model(spec: dict, *, repeats: int, rho: float, dtype: str) -> dict:
    model = models.build_model(spec["arch"], NUM_CLASSES, width=spec["width"], dtype=dtype)
    tx = optim.make_optimizer(learning_rate=0.03, restart_period=1000, num_steps=1000)
    mesh = step_lib.make_mesh()
    rs = np.random.RandomState(0)
    shape = (spec["batch"], spec["size"], spec["size"], spec["channels"])
    images = rs.randint(0, 256, size=shape).astype(np.uint8)
    labels = rs.randint(0, NUM_CLASSES, size=spec["batch"]).astype(np.int32)
    batch = step_lib.shard_batch({"images": images, "labels": labels}, mesh)
    rng = step_lib.replicate(jax.random.key(1), mesh)
    init = step_lib.create_train_state(model, tx, jax.random.key(0), images[:2])

    runs = {}
    for name, r in (("erm", 0.0), ("sam", rho)):
        step = step_lib.compile_train_step(
            model, tx, mesh, use_sam=r > 0, rho=r or None, batch_size=spec["batch"]
        )
        state = step_lib.replicate(init, mesh)  # a fresh copy: each run donates its own
        start = time.perf_counter()
        compiled = step.jitted.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - start
        flops = matmul_flops(step.jitted, state, batch, rng)
        state, metrics = compiled(state, batch, rng)  # first run: allocations, warm caches
        jax.block_until_ready((state, metrics))
        runs[name] = {
            "step": compiled,
            "state": state,
            "compile_s": compile_s,
            "flops": flops,
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
        f"dtype {args.dtype}, rho {args.rho}, {args.repeats} interleaved repeats (median); "
        "FLOPs: conv + matmul count of the step's jaxpr"
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
