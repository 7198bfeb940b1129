"""Chooses the Glyphs recipe on *validation* classes (never test): model, rho, steps.

Trains each candidate on the seen scripts' train classes and reports the best NCC
accuracy on their validation classes (the same 100 validation episodes per domain as
training uses). The table it prints is how configs/glyphs.py was chosen
(docs/results.md#choosing-the-glyphs-recipe).

  .venv/bin/python bench/tune_glyphs.py --domains=latin,kana --archs=resnet10:0.25,resnet18:0.25 \
      --rhos=0,0.02,0.05,0.1 --workdir=/tmp/tune
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import glyphs as glyphs_config  # noqa: E402
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.training import loop  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--domains", default="latin,kana")
    p.add_argument("--archs", default="resnet10:0.25,resnet18:0.25")
    p.add_argument("--rhos", default="0,0.02,0.05,0.1")
    p.add_argument("--steps", default="", help="override num_steps for every domain")
    p.add_argument("--workdir", default="/tmp/flatfsc_tune")
    args = p.parse_args()
    results = []
    for arch_spec in args.archs.split(","):
        arch, width = arch_spec.split(":")
        for rho in (float(r) for r in args.rhos.split(",")):
            for domain in args.domains.split(","):
                c = glyphs_config.get_config()
                c.data_dir = os.path.join(args.workdir, "data")
                c.model.arch, c.model.width = arch, float(width)
                row = c.per_domain[domain]
                if args.steps:
                    row.num_steps = row.restart_period = int(args.steps)
                row.rho = rho
                method = "erm" if rho == 0 else "sam"
                tag = f"{arch}_{width}_rho{rho}"
                zoo = zoo_lib.Zoo(os.path.join(args.workdir, tag))
                from flatfsc_jax.experiment import check_data, resolve_paths

                c = resolve_paths(c, args.workdir)
                check_data(c, ("train",))
                t0 = time.perf_counter()
                entry = (
                    zoo.get("glyphs", domain, method)
                    if zoo.is_complete("glyphs", domain, method)
                    else loop.train_and_evaluate(c, zoo, domain, method, progress=False)
                )
                best = entry.metadata["best_validation"]
                results.append(
                    dict(
                        arch=arch,
                        width=float(width),
                        rho=rho,
                        domain=domain,
                        steps=row.num_steps,
                        val=best["accuracy"],
                        ci=best["ci95"],
                        best_step=best["step"],
                        seconds=time.perf_counter() - t0,
                    )
                )
                print(json.dumps(results[-1]), flush=True)
    print(
        f"\n{'arch':10s} {'width':>5s} {'rho':>5s} {'domain':10s} {'steps':>5s} "
        f"{'val acc':>14s} {'best@':>5s} {'s':>5s}"
    )
    for r in results:
        print(
            f"{r['arch']:10s} {r['width']:5.2f} {r['rho']:5.2f} {r['domain']:10s} "
            f"{r['steps']:5d} {100 * r['val']:6.2f} ± {100 * r['ci']:4.2f} "
            f"{r['best_step']:5d} {r['seconds']:5.0f}"
        )


if __name__ == "__main__":
    main()
