"""The seed table of several runs: ``python -m flatfsc_jax.cli.seeds WORKDIR... --out=DIR``.

  ./run.sh --config.seed=1 --workdir=work/seed1   # and seed 2 (scripts/run_seeds.sh)
  python -m flatfsc_jax.cli.seeds work work/seed1 work/seed2 --out=work/seeds

Reads each workdir's ``report/results.json`` (runs that differ only in ``config.seed``),
prints the table of ``seeds.seed_table`` and writes it to ``<out>/seeds.md`` and
``<out>/seeds.json``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from flatfsc_jax import errors
from flatfsc_jax.reporting import seeds

_OUT = flags.DEFINE_string("out", "work/seeds", "Directory for seeds.md and seeds.json.")
_ALLOW = flags.DEFINE_bool(
    "allow_config_differences",
    False,
    "Pool runs whose configs differ in more than the seed (with a warning listing the keys).",
)


def main(argv) -> None:
    workdirs = argv[1:]
    if not workdirs:
        raise app.UsageError("give the workdirs of runs with distinct seeds (work work/seed1 ...)")
    out = _OUT.value
    try:
        runs = seeds.load_runs(workdirs, allow_config_differences=_ALLOW.value)
    except errors.FlatfscError as e:
        raise SystemExit(f"error: {e}") from e
    table = seeds.seed_table(runs)
    os.makedirs(out, exist_ok=True)
    md = seeds.to_markdown(table)
    with open(os.path.join(out, "seeds.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "seeds.json"), "w") as f:
        json.dump(table, f, indent=2)
    print(md)
    print(f"written: {out}/seeds.md, {out}/seeds.json")


if __name__ == "__main__":
    app.run(main)
