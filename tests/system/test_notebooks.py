"""The notebooks: each .ipynb is its jupytext source without outputs, and each one runs.

The notebooks that read a zoo run against a tiny finished run, made once per session by
``python -m flatfsc_jax.main --config=configs/glyphs.py:tiny`` (1-3 min on 2 CPU cores).
Set ``FLATFSC_TEST_WORKDIR`` to the workdir of a finished run to reuse it instead. The
study notebook reads a tiny finished flatness study (``python -m
flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py:tiny``), or the one in
``FLATFSC_TEST_STUDY_WORKDIR``.
"""

import os
import pathlib
import subprocess
import sys

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart", "loss_landscape", "sam_on_your_model", "flatness_study")
NEEDS_ZOO = {"quickstart", "loss_landscape"}
NEEDS_STUDY = {"flatness_study"}
# What each notebook must print when it ran through (its conclusion, not just no error).
EXPECTED_OUTPUT = {
    "quickstart": "SAM - ERM (paired):",
    "loss_landscape": "| domain | train loss erm | train loss sam |",
    "sam_on_your_model": "rho-sharpness",
    "flatness_study": "Primary (named before the run)",
}


def _read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    # kernel "python3" with argv "python": jupyter_client starts it with sys.executable,
    # i.e. this virtual environment's interpreter; it inherits os.environ.
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    return client.execute()


def _text_outputs(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            for mime in ("text/plain", "text/markdown"):
                parts.append(output.get("data", {}).get(mime, ""))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
    reuse = os.environ.get("FLATFSC_TEST_WORKDIR")
    if reuse:
        return pathlib.Path(reuse)
    workdir = tmp_path_factory.mktemp("tiny_run")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flatfsc_jax.main",
            "--config=configs/glyphs.py:tiny",
            f"--workdir={workdir}",
            "--compilation_cache=",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_study_workdir(tmp_path_factory):
    reuse = os.environ.get("FLATFSC_TEST_STUDY_WORKDIR")
    if reuse:
        return pathlib.Path(reuse)
    workdir = tmp_path_factory.mktemp("tiny_study")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flatfsc_jax.cli.flatness_study",
            "--config=configs/flatness_study.py:tiny",
            f"--workdir={workdir}",
            "--compilation_cache=",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir


# ---------------------------------------------------------------- sources and notebooks


def test_every_source_has_its_notebook():
    assert {p.stem for p in NOTEBOOKS.glob("*.py")} == set(NAMES)
    assert {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_its_source_without_outputs(name):
    source = jupytext.read(NOTEBOOKS / f"{name}.py")
    notebook = _read(name)
    nbformat.validate(notebook)
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in source.cells
    ], f"notebooks/{name}.ipynb is out of date: run scripts/sync_notebooks.sh"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"notebooks/{name}.ipynb holds outputs: run scripts/sync_notebooks.sh"
            )
    assert notebook.metadata.kernelspec.name == "python3"


# ----------------------------------------------------------------------- execution


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, request, monkeypatch):
    if name in NEEDS_ZOO:
        monkeypatch.setenv("FLATFSC_WORKDIR", str(request.getfixturevalue("tiny_workdir")))
    if name in NEEDS_STUDY:
        workdir = request.getfixturevalue("tiny_study_workdir")
        monkeypatch.setenv("FLATFSC_STUDY_WORKDIR", str(workdir))
    executed = _execute(_read(name))
    assert EXPECTED_OUTPUT[name] in _text_outputs(executed)
    images = [
        output
        for cell in executed.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{name} drew no figure"


@pytest.mark.slow
def test_quickstart_without_a_zoo_says_to_run_run_sh(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATFSC_WORKDIR", str(tmp_path))
    with pytest.raises(CellExecutionError, match=r"run \./run\.sh first"):
        _execute(_read("quickstart"))
