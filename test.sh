#!/usr/bin/env bash
# The test suite (the README's second command). Sets up .venv on first use.
# Extra arguments go to pytest, e.g. ./test.sh -k sam
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh dev,notebooks
export TF_CPP_MIN_LOG_LEVEL=3 JAX_PLATFORMS=cpu
exec "$ROOT/.venv/bin/python" -m pytest -n 2 --dist loadfile -q "$@"
