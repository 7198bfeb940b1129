#!/usr/bin/env bash
# Regenerates notebooks/*.ipynb from their jupytext "percent" sources notebooks/*.py.
# The .py files are what we edit and review; the .ipynb files are committed without
# outputs for readers who open them in Jupyter. tests/system/test_notebooks.py checks that the
# two agree, so run this after editing a notebook source.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
for source in "$ROOT"/notebooks/*.py; do
  notebook="${source%.py}.ipynb"
  # --update keeps the cell ids of an existing notebook (fresh random ids otherwise,
  # which would rewrite every cell in the diff); it also keeps outputs, stripped below.
  update=()
  [[ -f "$notebook" ]] && update=(--update)
  "$PYTHON" -m jupytext --quiet --to ipynb "${update[@]}" --output "$notebook" "$source"
  "$PYTHON" - "$notebook" <<'PY'
import sys

import nbformat

path = sys.argv[1]
notebook = nbformat.read(path, as_version=4)
for cell in notebook.cells:
    if cell.cell_type == "code":
        cell.outputs, cell.execution_count = [], None
nbformat.write(notebook, path)
PY
done
