#!/usr/bin/env bash
# The main job. Sets up .venv (pinned packages) on first use, then forwards every flag to
# `python -m flatfsc_jax.main`. Without --config it runs the embedded Glyphs default.
#   ./run.sh                                        # Glyphs (time: docs/performance.md#scaling-with-the-machine)
#   ./run.sh --config=configs/sam_resnet18.py:omniglot --workdir=/tmp/w --config.per_domain.omniglot.rho=0.1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FLATFSC_VENV:-$ROOT/.venv}"
SETUP_START=$EPOCHREALTIME
bash scripts/setup_env.sh "${FLATFSC_EXTRAS:-dev,notebooks}"
# The job's time split (profiling.py) counts this set-up too.
FLATFSC_SETUP_SECONDS=$(awk "BEGIN {print $EPOCHREALTIME - $SETUP_START}")
export FLATFSC_SETUP_SECONDS
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec "$VENV/bin/python" -m flatfsc_jax.main "$@"
