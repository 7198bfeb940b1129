#!/usr/bin/env bash
# Checks the jax versions that setup.cfg's range claims (jax >= 0.10.2, < 0.12): for each
# given Python it makes a throw-away venv, installs flatfsc_jax from a *wheel* (not
# editable: this also checks that the shipped data is packaged) with requirements.lock,
# which gives Python 3.11 jax 0.10.2 and Python 3.12 jax 0.11.2, and runs the tiny Glyphs
# config (every stage) on the CPU from outside the source tree.
#   bench/jax_versions.sh                      # python3.11 and python3.12
#   bench/jax_versions.sh python3.12           # one interpreter (name or path)
# Time: docs/install.md#checking-both-ends-of-the-version-range.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONS=("$@")
[[ ${#PYTHONS[@]} -gt 0 ]] || PYTHONS=(python3.11 python3.12)
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
for py in "${PYTHONS[@]}"; do
  version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
  if [[ -z "$version" ]]; then
    echo "[$py] not found or does not run: install it, or pass the path of a Python 3.11/3.12" >&2
    status=1
    continue
  fi
  venv="$TMP/venv-$version"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -c "$ROOT/requirements.lock" "$ROOT"
  jax="$("$venv/bin/python" -c 'import jax; print(jax.__version__)')"
  echo "[python $version, jax $jax] tiny Glyphs run" >&2
  start=$SECONDS
  if (cd "$TMP" && JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3 "$venv/bin/python" -m flatfsc_jax.main \
      --config="$ROOT/configs/glyphs.py:tiny" --workdir="$TMP/work-$version" \
      --compilation_cache= > "$TMP/run-$version.log" 2>&1) \
    && grep -q "^| latin |" "$TMP/work-$version/report/report.md" 2>/dev/null \
    && ls "$TMP/work-$version"/zoo/glyphs/latin/sam/events.out.tfevents.* > /dev/null; then
    echo "[python $version, jax $jax] OK in $((SECONDS - start)) s (report and TensorBoard events written)"
  else
    echo "[python $version, jax $jax] FAILED; the run's last lines:" >&2
    tail -20 "$TMP/run-$version.log" >&2
    status=1
  fi
done
exit $status
