"""Cost of one distillation (URL) student step against one ERM backbone step.

    .venv/bin/python bench/distill_step.py                 # the Glyphs :kd recipe
    .venv/bin/python bench/distill_step.py --repeats 10 --rho 0.005

Steps timed side by side, interleaved (ERM, KD, SAM-KD, ERM, ...) so drifting machine
load hits all alike, through the production paths: ``step.compile_train_step`` for the
ERM step of ``bench/step.py --models cpu18`` (ResNet-18 x0.25, 28x28x1, batch 64) and
``distill.compile_distill_step`` for the student of ``configs/glyphs.py:kd`` (five
domains, batches CJK 448 + 4 x 64, the five teachers' forward passes included).
Teachers and student are randomly initialised: the cost does not depend on the weights.
Reports median wall times, their ratios to the ERM step, and XLA's FLOP ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import glyphs as glyphs_config  # noqa: E402
from flatfsc_jax import models  # noqa: E402
from flatfsc_jax.fusion import distill  # noqa: E402
from flatfsc_jax.training import optim  # noqa: E402
from flatfsc_jax.training import step as step_lib  # noqa: E402

# Train classes of the five seen Glyphs scripts (the zoo's metadata).
CLASSES = {"cjk": 280, "latin": 36, "greek": 34, "cyrillic": 45, "kana": 101}


def _flops(compiled) -> float:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:
        return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rho", type=float, default=0.005, help="sam+kd: CJK's rho")
    args = parser.parse_args(argv)

    c = glyphs_config.get_config("kd")
    domains = tuple(c.domains)
    sizes = {d: int(c.fusion.distill.batch_size[d]) for d in domains}
    mesh = step_lib.make_mesh()
    rs = np.random.RandomState(0)
    sample = jnp.zeros((1, 28, 28, 1))

    def images(n):
        return rs.randint(0, 256, size=(n, 28, 28, 1)).astype(np.uint8)

    # ERM: exactly bench/step.py's cpu18 step (64 classes, batch 64).
    erm_model = models.build_model("resnet18", 64, width=0.25)
    erm_tx = optim.make_optimizer(learning_rate=0.03, restart_period=1000, num_steps=1000)
    erm_batch = step_lib.shard_batch(
        {"images": images(64), "labels": rs.randint(0, 64, 64).astype(np.int32)}, mesh
    )
    rng = step_lib.replicate(jax.random.key(1), mesh)
    erm_state = step_lib.replicate(
        step_lib.create_train_state(erm_model, erm_tx, jax.random.key(0), sample), mesh
    )
    erm_step = step_lib.compile_train_step(erm_model, erm_tx, mesh, use_sam=False)
    erm_compiled = erm_step.jitted.lower(erm_state, erm_batch, rng).compile()

    # The student of configs/glyphs.py:kd.
    student = models.build_model("resnet18", 0, width=0.25)
    teacher_models = {d: models.build_model("resnet18", CLASSES[d], width=0.25) for d in domains}
    teachers = step_lib.replicate(
        {d: teacher_models[d].init(jax.random.key(i), sample) for i, d in enumerate(domains)},
        mesh,
    )
    kd_batch = step_lib.shard_batch(
        {
            d: {
                "images": images(sizes[d]),
                "labels": rs.randint(0, CLASSES[d], sizes[d]).astype(np.int32),
            }
            for d in domains
        },
        mesh,
    )
    recipe = distill.Recipe.from_config(c)
    tx = distill.make_optimizer(c)
    params, bs = distill.init_params(student, CLASSES, jax.random.key(0), sample)
    init = step_lib.TrainState(jnp.zeros((), jnp.int32), params, bs, tx.init(params))
    runs = {"ERM cpu18": [erm_compiled, erm_state, (erm_batch, rng), [], _flops(erm_compiled)]}
    for name, rho in (("erm+kd", 0.0), ("sam+kd", args.rho)):
        fn = distill.compile_distill_step(student, teacher_models, recipe, tx, mesh, rho=rho)
        state = step_lib.replicate(init, mesh)
        compiled = fn.lower(state, kd_batch, teachers).compile()
        runs[name] = [compiled, state, (kd_batch, teachers), [], _flops(compiled)]
    for run in runs.values():  # warm-up
        run[1], m = run[0](run[1], *run[2])
        jax.block_until_ready((run[1], m))
    for _ in range(args.repeats):
        for run in runs.values():
            start = time.perf_counter()
            run[1], m = run[0](run[1], *run[2])
            jax.block_until_ready((run[1], m))
            run[3].append(time.perf_counter() - start)

    base = statistics.median(runs["ERM cpu18"][3])
    base_flops = runs["ERM cpu18"][4]
    print(
        f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"{args.repeats} interleaved repeats (median); KD batches {sizes}"
    )
    print(
        f"{'step':<12} {'images':>7} {'ms':>9} {'img/s':>8} {'x ERM time':>11} {'x ERM FLOPs':>12}"
    )
    for name, run in runs.items():
        t = statistics.median(run[3])
        n = 64 if name.startswith("ERM") else sum(sizes.values())
        print(
            f"{name:<12} {n:>7} {1e3 * t:>9.1f} {n / t:>8.0f} {t / base:>11.2f} "
            f"{run[4] / base_flops:>12.2f}"
        )


if __name__ == "__main__":
    main()
