#!/usr/bin/env bash
# Fetches, here (pip and the internet needed), the wheels of the project's packages that
# the accelerator machine's image lacks, into build/wheels (git-ignored), for its
# Python 3.12 on x86-64 Linux, at requirements.lock's versions. bench/accelerator_check.sh
# installs them there when the folder travels (carry build/wheels). Pure-Python
# packages published only as source are built into wheels here.
#   bench/accelerator_wheels.sh            # about 20 MB
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DEST="$ROOT/build/wheels"
# The image holds jax, flax, optax, orbax, etils, absl, numpy, scipy, protobuf, pyarrow,
# psutil, requests, tqdm, wrapt, attrs, six, PyYAML, typing-extensions, cloudpickle
# (the accelerator image's package list); these are the rest of setup.cfg's needs and theirs.
PACKAGES=(
  tensorflow-datasets array_record grain ml_collections importlib_resources tensorboardX
  dm-tree immutabledict promise simple-parsing docstring_parser tensorflow-metadata
  termcolor toml googleapis-common-protos portpicker
)
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
  pin="$(grep -i -E "^${name//[-_]/[-_]}==" "$ROOT/requirements.lock" | head -1 | cut -d' ' -f1)"
  if [[ -z "$pin" ]]; then
    echo "no pin for $name in requirements.lock" >&2
    exit 1
  fi
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$DEST" "$pin" 2> /dev/null; then
    echo "$pin: no wheel published; building one (pure Python)" >&2
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pin"
  fi
done
ls -la "$DEST"
du -sh "$DEST"
