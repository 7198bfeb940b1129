#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment with the exact versions of
# requirements.lock (setup.cfg only states compatible ranges). Idempotent: re-installs
# only when setup.cfg, requirements.lock or the extras changed.
# Usage: scripts/setup_env.sh [extras]       (default: $FLATFSC_EXTRAS, else dev,notebooks)
#   FLATFSC_EXTRAS=dev,prepare  the extras when none is given (as run.sh reads it)
#   FLATFSC_DRY_RUN=1  print the pip command that would run, and change nothing
#   FLATFSC_VENV=DIR   the environment's directory (default .venv)
#   PYTHON=python3.12  the interpreter for a new environment (default: the first of
#                      python3, python3.12, python3.11 that is 3.11 or 3.12)
# Python 3.11 gets jax 0.10.2 and 3.12 gets jax 0.11.2 (requirements.lock); these are the
# versions we ran, so other Pythons are refused with a message saying what to install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FLATFSC_VENV:-$ROOT/.venv}"
EXTRAS="${1:-${FLATFSC_EXTRAS:-dev,notebooks}}"
SUPPORTED="3.11 3.12"

# Every extra must be one setup.cfg declares: pip only warns about unknown ones, and the
# missing package (TensorFlow, say) would surface much later.
IFS=',' read -ra EXTRA_LIST <<< "$EXTRAS"
for extra in "${EXTRA_LIST[@]}"; do
  if ! grep -qE "^${extra} =\$" "$ROOT/setup.cfg"; then
    echo "[setup] unknown extra '$extra' in '$EXTRAS'; setup.cfg declares:" \
      "$(sed -n '/^\[options.extras_require\]/,/^\[/p' "$ROOT/setup.cfg" |
        grep -oE '^[a-z0-9_]+ =' | tr -d ' =' | tr '\n' ' ')" >&2
    exit 1
  fi
done
PIP_INSTALL=(-m pip install --quiet -c "$ROOT/requirements.lock" -e "$ROOT[$EXTRAS]")
if [[ -n "${FLATFSC_DRY_RUN:-}" ]]; then
  echo "[setup] dry run: $VENV/bin/python ${PIP_INSTALL[*]}"
  exit 0
fi

py_version() {  # prints major.minor of interpreter $1, or nothing if it does not run
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}
is_supported() { [[ -n "$1" && " $SUPPORTED " == *" $1 "* ]]; }

if [[ -x "$VENV/bin/python" ]]; then
  PY_VERSION="$(py_version "$VENV/bin/python")"
  if ! is_supported "$PY_VERSION"; then
    echo "[setup] $VENV has Python ${PY_VERSION:-?}; flatfsc_jax is tested on Python" \
      "3.11 (jax 0.10.2) and 3.12 (jax 0.11.2). Remove $VENV and re-run" \
      "(PYTHON=python3.12 to choose the interpreter)." >&2
    exit 1
  fi
else
  if [[ -n "${PYTHON:-}" ]]; then
    CANDIDATES=("$PYTHON")
  else
    CANDIDATES=(python3 python3.12 python3.11)
  fi
  PY=""
  for c in "${CANDIDATES[@]}"; do
    if is_supported "$(py_version "$c")"; then PY="$c"; break; fi
  done
  if [[ -z "$PY" ]]; then
    echo "[setup] flatfsc_jax needs Python 3.11 (jax 0.10.2) or 3.12 (jax 0.11.2);" \
      "tried ${CANDIDATES[*]}: $(for c in "${CANDIDATES[@]}"; do
        printf '%s=%s ' "$c" "$(py_version "$c")"; done)" >&2
    echo "[setup] install one (e.g. apt-get install python3.12-venv) or set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "[setup] creating virtual environment $VENV ($("$PY" --version 2>&1))" >&2
  "$PY" -m venv "$VENV"
fi

STAMP_WANT="$(cat "$ROOT/setup.cfg" "$ROOT/requirements.lock" | sha256sum | cut -c1-16)-$EXTRAS"
STAMP_FILE="$VENV/.flatfsc_stamp"
if [[ "$(cat "$STAMP_FILE" 2>/dev/null)" != "$STAMP_WANT" ]]; then
  echo "[setup] installing flatfsc_jax[$EXTRAS] with the versions of requirements.lock (about 1 minute)" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  # setuptools reports every editable install of a flat layout with an information-only
  # "Editable installation" notice (nothing to act on); package data is declared in
  # setup.cfg, so no other build warning is expected here.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" "${PIP_INSTALL[@]}" >&2
  echo "$STAMP_WANT" > "$STAMP_FILE"
fi
