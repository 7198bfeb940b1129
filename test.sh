#!/usr/bin/env bash
# The test suite (what CI runs; CONTRIBUTING.md): sets up .venv on first
# use, checks lint and formatting (ruff), then runs pytest on 2 workers
# and lists the 15 slowest tests (the suite must stay short).
# Extra arguments go to pytest, e.g. ./test.sh -k sam
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${FLATFSC_VENV:-$ROOT/.venv}"
bash scripts/setup_env.sh dev,notebooks
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu
exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile -q --durations=15 "$@"
