#!/usr/bin/env bash
# The default job for more training seeds, then the seed table (flatfsc_jax/cli/seeds.py).
# Seed 0 is what ./run.sh leaves in work/; this runs seeds 1 and 2 (SEEDS="1 2 3" for
# more) into work/seed<N> (the time of ./run.sh each, docs/performance.md#where-the-time-goes) and writes work/seeds/seeds.md.
# Extra flags go to every run, e.g. scripts/run_seeds.sh --config=configs/glyphs.py:long
# Every seed is evaluated on the same test episodes (config.evaluation.seed is fixed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SEEDS="${SEEDS:-1 2}"
dirs=(work)
for s in $SEEDS; do
  ./run.sh --config.seed="$s" --workdir="work/seed$s" "$@"
  dirs+=("work/seed$s")
done
"$ROOT/.venv/bin/python" -m flatfsc_jax.cli.seeds "${dirs[@]}" --out=work/seeds
