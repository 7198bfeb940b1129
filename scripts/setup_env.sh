#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with the pinned
# packages of setup.cfg. Idempotent: re-installs only when setup.cfg changed.
# Usage: source scripts/setup_env.sh [extras]   (default extras: dev,notebooks)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLATFSC_VENV:-$ROOT/.venv}"
EXTRAS="${1:-dev,notebooks}"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "flatfsc_jax needs Python >= 3.11 (found $("$PY" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
STAMP_WANT="$(cat "$ROOT/setup.cfg" | sha256sum | cut -c1-16)-$EXTRAS"
STAMP_FILE="$VENV/.flatfsc_stamp"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP_FILE" 2>/dev/null)" != "$STAMP_WANT" ]]; then
  echo "[setup] installing flatfsc_jax[$EXTRAS] with pinned versions (about 1 minute)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$EXTRAS]" >&2
  echo "$STAMP_WANT" > "$STAMP_FILE"
fi
