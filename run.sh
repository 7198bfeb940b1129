#!/usr/bin/env bash
# The main job. Sets up .venv (pinned packages) on first use, then forwards every flag to
# `python -m flatfsc_jax.main`. Without --config it runs the embedded Glyphs default.
#   ./run.sh                                        # Glyphs, ~12 min on 2 CPU cores
#   ./run.sh --config=configs/sam_resnet18.py:omniglot --workdir=/tmp/w --config.sam.rho=0.1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FLATFSC_VENV:-$ROOT/.venv}"
bash scripts/setup_env.sh "${FLATFSC_EXTRAS:-dev,notebooks}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec "$VENV/bin/python" -m flatfsc_jax.main "$@"
