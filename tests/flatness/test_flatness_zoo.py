"""Tests for flatfsc_jax.flatness.zoo (the zoo driver), the flatness report and the
command ``python -m flatfsc_jax.cli.flatness`` end to end on a zoo with a deliberately
sharpened backbone (the measures themselves: test_measures.py).

The sharpened backbone is a reparametrisation of the other (Dinh et al. 2017): every conv
kernel times c < 1, and the running mean / variance of the BatchNorm after it times c / c^2.
In eval mode it computes the same function, so its training loss is the same, while the
Hessian block of the conv kernels grows by 1/c^2: every unnormalised measure must call it
sharper, and the filter-normalised landscape (Li et al. 2018) must not tell them apart.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, glyphs
from flatfsc_jax.flatness import measures as measures_lib
from flatfsc_jax.flatness import zoo as mf

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
DOMAIN = "latin"
SHARPEN = 0.25  # conv kernels x 0.25: their Hessian block x 16
TINY = [  # settings for a fast CLI run
    "--examples=64",
    "--sharpness_steps=2",
    "--power_iters=30",
    "--trace_samples=20",
    "--alphas=-1,1,5",
    "--grid_2d=3",
    "--compilation_cache=",
]


def _run_cli(*args):
    """``python -m flatfsc_jax.cli.flatness`` in a subprocess (absl flags are global)."""
    return subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.cli.flatness", *args, "--compilation_cache="],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def _sharpened(variables, c):
    """The same eval-mode function with conv kernels x c (conv4: Conv_i feeds BatchNorm_i)."""
    params = dict(variables["params"])
    stats = dict(variables["batch_stats"])
    for i in range(4):
        params[f"Conv_{i}"] = {"kernel": params[f"Conv_{i}"]["kernel"] * c}
        old = stats[f"BatchNorm_{i}"]
        stats[f"BatchNorm_{i}"] = {"mean": old["mean"] * c, "var": old["var"] * c * c}
    return {"params": params, "batch_stats": stats}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    glyphs.prepare(directory, [DOMAIN], verbose=False)
    return directory


@pytest.fixture(scope="module")
def split(data_dir):
    return benchmarks.load_split("glyphs", DOMAIN, "train", data_dir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir, split):
    """A zoo with erm, its sharpened copy as 'sam', and an erm+ft copy (fused entry)."""
    root = tmp_path_factory.mktemp("work")
    os.symlink(data_dir, root / "data")
    model_config = dict(arch="conv4", width=0.125, dtype="float32", num_classes=split.num_classes)
    model = zoo_lib.build_model_from_metadata(model_config)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    zoo = zoo_lib.Zoo(root / "zoo")
    for method, v in (
        ("erm", variables),
        ("sam", _sharpened(variables, SHARPEN)),
        ("erm+ft", variables),
    ):
        zoo.write(
            "glyphs",
            DOMAIN,
            method,
            variables=v,
            model_config=model_config,
            image_shape=(28, 28, 1),
            metadata={"rho": 0.05 if method == "sam" else 0.0},
        )
    return root


@pytest.fixture(scope="module")
def command_run(workdir):
    run = _run_cli(f"--workdir={workdir}", f"--landscape_2d={DOMAIN}", *TINY)
    assert run.returncode == 0, run.stderr
    out = workdir / "flatness"
    paths = {
        "json": out / "flatness.json",
        "markdown": out / "flatness.md",
        "csv": out / "flatness.csv",
        "landscapes": {DOMAIN: out / f"landscape_{DOMAIN}.png"},
        "landscapes_2d": {DOMAIN: out / f"landscape2d_{DOMAIN}.png"},
    }
    assert str(paths["markdown"]) in run.stdout  # the command lists what it wrote
    with open(paths["json"]) as f:
        return paths, json.load(f)


# ------------------------------------------------------------------------ the driver


def test_settings_name_the_bad_setting():
    for bad in (
        dict(examples=1),
        dict(rho=float("nan")),
        dict(trace_samples=1),
        dict(alphas=()),
        dict(power_tol=0.0),
        dict(seed=-1),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            mf.FlatnessSettings(**bad)


def test_training_batch_is_seeded_sorted_and_capped(split):
    images, labels, idx = mf.training_batch(split, 50, seed=7)
    again = mf.training_batch(split, 50, seed=7)[2]
    np.testing.assert_array_equal(idx, again)
    assert not np.array_equal(idx, mf.training_batch(split, 50, seed=8)[2])
    assert np.all(np.diff(idx) > 0) and images.shape == (50, 28, 28, 1)
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1
    np.testing.assert_array_equal(labels, split.labels[idx])
    assert len(mf.training_batch(split, 10**6, seed=0)[2]) == len(split)


# ---------------------------------------------------------------------- the command


@pytest.mark.slow  # the module's command run: compiles the backbone's steps (~10 s)
def test_command_writes_every_file(command_run):
    paths, _ = command_run
    for key in ("json", "markdown", "csv"):
        assert os.path.getsize(paths[key]) > 0
    for png in (paths["landscapes"][DOMAIN], paths["landscapes_2d"][DOMAIN]):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sharpened_copy_is_sharper_by_every_measure_but_not_by_landscape(command_run):
    _, results = command_run
    by_method = {r["method"]: r for r in results["entries"]}
    assert set(by_method) == {"erm", "sam"}  # erm+ft only with --fused
    erm, sharp = by_method["erm"], by_method["sam"]
    assert erm["examples"] == sharp["examples"] == 64
    # Same function: same loss and accuracy on the same seeded images.
    np.testing.assert_allclose(sharp["train_loss"], erm["train_loss"], rtol=1e-4)
    assert sharp["train_accuracy"] == erm["train_accuracy"]
    assert sharp["sharpness"] > 2 * erm["sharpness"] > 0
    assert sharp["top_eigenvalue"] > 4 * erm["top_eigenvalue"] > 0
    assert sharp["hessian_trace"] > 4 * erm["hessian_trace"] > 0
    # Filter normalisation undoes the rescaling (up to BatchNorm's epsilon).
    np.testing.assert_allclose(
        sharp["landscape_1d"]["losses"], erm["landscape_1d"]["losses"], rtol=1e-3
    )
    np.testing.assert_allclose(
        sharp["landscape_2d"]["losses"], erm["landscape_2d"]["losses"], rtol=1e-3
    )
    # The landscape passes through the training loss at alpha = 0.
    alphas = np.asarray(erm["landscape_1d"]["alphas"])
    np.testing.assert_allclose(alphas, np.linspace(-1, 1, 5), atol=1e-7)
    np.testing.assert_allclose(
        erm["landscape_1d"]["losses"][int(np.argmin(np.abs(alphas)))],
        erm["train_loss"],
        rtol=1e-5,
    )
    assert np.asarray(erm["landscape_2d"]["losses"]).shape == (3, 3)


@pytest.mark.slow
def test_training_loss_is_flatness_loss_on_the_seeded_subset(command_run, workdir, split):
    _, results = command_run
    erm = next(r for r in results["entries"] if r["method"] == "erm")
    loaded = zoo_lib.Zoo(workdir / "zoo").load("glyphs", DOMAIN, "erm")
    images, labels, _ = mf.training_batch(split, 64, seed=0)
    loss_fn = measures_lib.model_loss_fn(loaded.model, loaded.variables, images, labels)
    np.testing.assert_allclose(
        erm["train_loss"], float(jax.jit(loss_fn)(loaded.variables["params"])), rtol=1e-5
    )


@pytest.mark.slow
def test_table_and_csv_hold_the_entries(command_run):
    paths, results = command_run
    with open(paths["markdown"]) as f:
        table = f.read()
    header = next(line for line in table.splitlines() if line.startswith("| domain"))
    for column in (
        "train loss erm",
        "rho-sharpness sam",
        "top eigenvalue erm",
        "Hessian trace sam",
    ):
        assert column in header
    row = next(line for line in table.splitlines() if line.startswith(f"| {DOMAIN} |"))
    erm = next(r for r in results["entries"] if r["method"] == "erm")
    assert f"{erm['sharpness']:.4g}" in row
    assert "sam is flatter than erm (smaller value) on 0/1 by rho-sharpness" in table
    with open(paths["csv"]) as f:
        lines = f.read().splitlines()
    assert len(lines) == 3 and lines[0].startswith("domain,method,key")
    assert lines[1].startswith(f"{DOMAIN},erm,") and lines[2].startswith(f"{DOMAIN},sam,")


def test_fused_entries_only_on_request(workdir):
    zoo = zoo_lib.Zoo(workdir / "zoo")
    assert [e.method for e in mf.select_entries(zoo)] == ["erm", "sam"]
    assert [e.method for e in mf.select_entries(zoo, fused=True)] == ["erm", "sam", "erm+ft"]
    with pytest.raises(ValueError, match="greek"):
        mf.select_entries(zoo, domains=["greek"])


def test_empty_or_missing_zoo_says_to_run_run_sh(tmp_path):
    with pytest.raises(mf.EmptyZooError, match=r"run ./run.sh first"):
        mf.measure_zoo(tmp_path / "missing", tmp_path / "data")
    # An interrupted entry (no metadata.json) does not count.
    (tmp_path / "zoo" / "glyphs" / DOMAIN / "erm" / "best").mkdir(parents=True)
    run = _run_cli(f"--workdir={tmp_path}")
    assert run.returncode != 0 and "run ./run.sh first" in run.stderr
    assert not (tmp_path / "flatness").exists()


def test_command_rejects_bad_flags_before_any_work(tmp_path, workdir):
    out = tmp_path / "out"
    for flag, message in (
        ("--rho=-1", "rho"),
        ("--alphas=1,2", "alphas"),
        ("--landscape_2d=greek", "greek"),
    ):
        run = _run_cli(f"--workdir={workdir}", f"--out={out}", flag)
        assert run.returncode != 0 and message in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    assert not out.exists()


def test_measure_entry_rejects_a_split_of_another_domain(workdir, data_dir):
    glyphs.prepare(data_dir, ["greek"], verbose=False)
    other = benchmarks.load_split("glyphs", "greek", "train", data_dir)
    loaded = zoo_lib.Zoo(workdir / "zoo").load("glyphs", DOMAIN, "erm")
    with pytest.raises(ValueError, match="head over 36 classes"):
        mf.measure_entry(loaded, other, mf.FlatnessSettings(examples=8))
