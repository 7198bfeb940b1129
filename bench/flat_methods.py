"""Cost of each flat-minima method per training step, as a ratio to ERM in the same run.

    .venv/bin/python bench/flat_methods.py                      # cpu10, 3 repeats
    .venv/bin/python bench/flat_methods.py --models resnet10:0.25:28:1:32 --repeats 2

For every method of ``flat_methods`` (and EMA weight averaging on top of ERM) one
jitted step is built the way ``training.step.train_step`` is: the model's training-mode
cross-entropy as ``loss_fn``, ``flat_methods.make_flat_gradient`` for the gradient,
the project's optimiser (``optim.make_optimizer``), BatchNorm statistics from ``aux``;
jit over a mesh of all devices, donated state. ``training.step.train_step`` itself knows only
SAM, so it cannot time the others; the production ERM and SAM steps are timed first by
``bench/step.py``'s ``bench_model`` in the same process, for their img/s.

Methods that change with the step (SAM every k, LookSAM, SAM-late) are timed over a
window of ``--window`` consecutive steps, so a timed repeat holds a whole number of
their cycles; SAM-late switches to SAM for the last ``--late_fraction`` of the window.
They run as two programs (the two-pass and the one-pass branch), picked on the host by
``flat_methods.takes_sam_step``; one extra LookSAM row runs them as one program with
``lax.cond`` on the traced step, to show what that costs on the machine at hand.
Columns:

* ``grads/step``: forward-backward passes per step over the window, as the compiled step
  reports them (``FlatDiagnostics.gradient_evaluations``; checked against the host-side
  ``flat_methods.gradient_evaluations``);
* ``ms/step`` and ``x ERM``: median wall time per step over the interleaved repeats
  (ERM, SAM, ..., ERM, SAM, ...: drifting load hits all alike), and its ratio to this
  run's ERM row; ``min x``: the ratio of the fastest repeats (least disturbed on a
  shared machine); ``CPU x``: the ratio of median process CPU times (work done by all
  of XLA's threads, less sensitive than wall time to other processes' load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bench import step as bench_step  # noqa: E402
from flatfsc_jax import flat_methods as fm  # noqa: E402
from flatfsc_jax import flat_optimizers as fo  # noqa: E402
from flatfsc_jax import models  # noqa: E402
from flatfsc_jax.training import optim  # noqa: E402
from flatfsc_jax.training import step as step_lib  # noqa: E402


def method_rows(rho: float, window: int, late_fraction: float, k: int) -> list:
    """``(label, FlatMethod)`` for every row of the table; ERM first (the reference)."""
    start = window - max(1, round(late_fraction * window))
    return [
        ("erm", fm.FlatMethod(method="erm")),
        ("sam", fm.FlatMethod(method="sam", rho=rho)),
        (
            f"sam_late (last {window - start}/{window})",
            fm.FlatMethod(method="sam_late", rho=rho, start_step=start),
        ),
        (f"sam_every_k k={k}", fm.FlatMethod(method="sam_every_k", rho=rho, k=k)),
        (f"looksam k={k}", fm.FlatMethod(method="looksam", rho=rho, k=k)),
        ("msam", fm.FlatMethod(method="msam", rho=10 * rho)),
        (
            "msam, no clean BN pass",
            fm.FlatMethod(method="msam", rho=10 * rho, clean_statistics=False),
        ),
        ("rwp (noise only)", fm.FlatMethod(method="rwp", clean_mix=0.0)),
        ("m-rwp (clean_mix 0.5)", fm.FlatMethod(method="rwp", clean_mix=0.5)),
        ("gsam", fm.FlatMethod(method="gsam", rho=rho)),
        ("erm + ema", fm.FlatMethod(method="erm", average="ema")),
        (f"looksam k={k}, lax.cond", fm.FlatMethod(method="looksam", rho=rho, k=k)),
    ]


def _compile(model, tx, settings, mesh, sam_step=None):
    flat_gradient = fm.make_flat_gradient(settings)

    def step(carry, batch, t):
        params, batch_stats, opt_state, flat_state, average = carry

        def loss_fn(p, data):
            (logits, _), new_stats = model.apply(
                {"params": p, "batch_stats": batch_stats}, data["images"], train=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(
                logits.astype(jnp.float32), data["labels"]
            )
            return jnp.mean(loss), new_stats

        grads, new_stats, diag, flat_state = flat_gradient(
            loss_fn, params, batch, flat_state, t, sam_step=sam_step
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        average = fm.update_average(settings, average, params, t + 1)
        return (params, new_stats, opt_state, flat_state, average), diag

    whole, split = step_lib.replicated(mesh), step_lib.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(whole, split, whole),
        out_shardings=(whole, whole),
        donate_argnums=(0,),
    )


def _picker(programs, settings, host):
    """``fn(carry, batch, t_device, t_host)``: the program for this step's branch."""
    if not host:
        return lambda carry, batch, t, _: programs[None](carry, batch, t)
    return lambda carry, batch, t, step: programs[fm.takes_sam_step(settings, step)](
        carry, batch, t
    )


def bench_methods(
    spec: dict, *, repeats: int, rho: float, window: int, late_fraction: float, k: int
):
    model = models.build_model(spec["arch"], bench_step.NUM_CLASSES, width=spec["width"])
    tx = optim.make_optimizer(learning_rate=0.03, restart_period=1000, num_steps=1000)
    mesh = step_lib.make_mesh()
    rs = np.random.RandomState(0)
    shape = (spec["batch"], spec["size"], spec["size"], spec["channels"])
    images = rs.uniform(-1, 1, size=shape).astype(np.float32)
    labels = rs.randint(0, bench_step.NUM_CLASSES, size=spec["batch"]).astype(np.int32)
    batch = step_lib.shard_batch({"images": images, "labels": labels}, mesh)
    variables = jax.jit(model.init)(jax.random.key(0), images[:2])
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    steps_t = [step_lib.replicate(jnp.int32(t), mesh) for t in range(window)]

    runs = []
    for label, settings in method_rows(rho, window, late_fraction, k):
        carry = (
            params,
            batch_stats,
            tx.init(params),
            fm.init_state(settings, params),
            fm.init_average(settings, params),
        )
        carry = step_lib.replicate(carry, mesh)
        # Switching methods: one program per branch, picked on the host (the module's
        # advice for XLA:CPU), except the row that times the lax.cond alternative.
        host = settings.method in fo.SWITCHING_METHODS and "lax.cond" not in label
        start = time.perf_counter()
        programs = {
            branch: _compile(model, tx, settings, mesh, branch)
            .lower(carry, batch, steps_t[0])
            .compile()
            for branch in ((True, False) if host else (None,))
        }
        compile_s = time.perf_counter() - start
        fn = _picker(programs, settings, host)
        evaluations = []
        for t in range(window):  # first window: warm-up, and the gradient count
            carry, diag = fn(carry, batch, steps_t[t], t)
            evaluations.append(float(diag.gradient_evaluations))
        expected = fm.gradient_evaluations(settings, np.arange(window))
        if not np.array_equal(evaluations, expected):
            raise AssertionError(f"{label}: compiled step counted {evaluations}, host {expected}")
        runs.append(
            {
                "label": label,
                "fn": fn,
                "carry": carry,
                "times": [],
                "cpu_times": [],
                "compile_s": compile_s,
                "grads": np.mean(evaluations),
            }
        )
    for _ in range(repeats):
        for run in runs:
            start, cpu_start = time.perf_counter(), time.process_time()
            for t in range(window):
                run["carry"], diag = run["fn"](run["carry"], batch, steps_t[t], t)
            jax.block_until_ready((run["carry"], diag))
            run["times"].append((time.perf_counter() - start) / window)
            run["cpu_times"].append((time.process_time() - cpu_start) / window)
    erm = runs[0]
    for run in runs:
        run["ms"] = 1e3 * statistics.median(run["times"])
        run["ratio"] = statistics.median(run["times"]) / statistics.median(erm["times"])
        run["min_ratio"] = min(run["times"]) / min(erm["times"])
        run["cpu_ratio"] = statistics.median(run["cpu_times"]) / statistics.median(erm["cpu_times"])
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cpu10", help="comma-separated specs (bench/step.py)")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows of each method")
    parser.add_argument("--window", type=int, default=20, help="consecutive steps per timing")
    parser.add_argument("--late_fraction", type=float, default=0.15, help="SAM-late's SAM share")
    parser.add_argument("--k", type=int, default=5, help="period of SAM every k and LookSAM")
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.window < 1 or not 0 < args.late_fraction <= 1:
        parser.error("--repeats and --window must be >= 1, --late_fraction in (0, 1]")
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"rho {args.rho}, window {args.window} steps, {args.repeats} interleaved repeats (median)"
    )
    for spec_text in filter(None, args.models.split(",")):
        spec = bench_step.parse_spec(spec_text)
        size = f"{spec['size']}x{spec['size']}x{spec['channels']}"
        name = f"{spec['arch']} w{spec['width']:g} {size} batch {spec['batch']}"
        base = bench_step.bench_model(
            spec, repeats=max(args.repeats, 3), rho=args.rho, dtype="float32"
        )
        print(
            f"\n{name}\nbench/step.py (production step): ERM {base['erm_ips']:.1f} img/s, "
            f"SAM {base['sam_ips']:.1f} img/s, SAM/ERM {base['ratio']:.3f} "
            f"(min {base['min_ratio']:.3f})"
        )
        runs = bench_methods(
            spec,
            repeats=args.repeats,
            rho=args.rho,
            window=args.window,
            late_fraction=args.late_fraction,
            k=args.k,
        )
        header = (
            f"{'method':<30} {'grads/step':>10} {'ms/step':>8} {'x ERM':>6} {'min x':>6} "
            f"{'CPU x':>6} {'compile s':>9}"
        )
        print(header)
        print("-" * len(header))
        for run in runs:
            print(
                f"{run['label']:<30} {run['grads']:>10.2f} {run['ms']:>8.1f} {run['ratio']:>6.2f} "
                f"{run['min_ratio']:>6.2f} {run['cpu_ratio']:>6.2f} {run['compile_s']:>9.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
