"""The zoo: Orbax round trips, listing, broken entries, incompatible restores."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax import models
from flatfsc_jax import zoo as zoo_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 1)


def _entry(zoo, domain, method, arch="conv4", width=0.125, classes=4, seed=0):
    model = models.build_model(arch, classes, width=width)
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, *SHAPE)))
    entry = zoo.write(
        "glyphs",
        domain,
        method,
        variables=variables,
        model_config=dict(arch=arch, width=width, dtype="float32", num_classes=classes),
        image_shape=SHAPE,
        metadata=dict(rho=0.05, num_steps=10, best_validation=dict(accuracy=0.5)),
    )
    return model, variables, entry


def test_round_trip_restores_identical_variables(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path)
    model, variables, entry = _entry(zoo, "latin", "sam")
    loaded = zoo.load("glyphs", "latin", "sam")
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(loaded.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    x = jax.random.normal(jax.random.key(3), (2, *SHAPE))
    np.testing.assert_array_equal(loaded.embed(x), model.embed(variables, x))
    meta = entry.metadata
    assert meta["complete"] and meta["model"]["arch"] == "conv4"
    assert meta["num_params"] == models.count_params(variables["params"])
    assert "jax" in meta["versions"] and meta["date"]


def test_listing_skips_broken_entries_with_a_warning(tmp_path, caplog):
    zoo = zoo_lib.Zoo(tmp_path)
    _entry(zoo, "latin", "sam")
    _entry(zoo, "greek", "erm")
    _entry(zoo, "cjk", "sam")
    (zoo.entry_dir("glyphs", "greek", "erm") / "metadata.json").write_text("{not json")
    # An interrupted run: directory and checkpoints but no metadata.
    (zoo.entry_dir("glyphs", "kana", "sam") / "train").mkdir(parents=True)
    # Metadata present but the checkpoint deleted.
    import shutil

    shutil.rmtree(zoo.entry_dir("glyphs", "cjk", "sam") / "best")
    with caplog.at_level(logging.WARNING):
        keys = [e.key for e in zoo.list()]
    assert keys == ["glyphs/latin/sam"]
    text = caplog.text
    assert "greek/erm" in text and "unreadable metadata.json" in text
    assert "kana/sam" in text and "no metadata.json" in text
    assert "cjk/sam" in text and "best/ checkpoint is missing" in text
    with pytest.raises(FileNotFoundError, match="glyphs/greek/erm is missing or incomplete"):
        zoo.load("glyphs", "greek", "erm")


def test_incompatible_restore_names_both_architectures(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path)
    _entry(zoo, "latin", "sam", arch="resnet10", width=0.125)
    entry = zoo.get("glyphs", "latin", "sam")
    other = models.build_model("conv4", 4, width=0.125)
    with pytest.raises(zoo_lib.IncompatibleCheckpointError) as err:
        zoo_lib.restore_variables(
            entry.path / "best",
            other,
            jnp.zeros((1, *SHAPE)),
            stored=zoo_lib.describe_model(entry.metadata["model"]),
        )
    msg = str(err.value)
    assert "resnet10(width=0.125, num_classes=4)" in msg and "model is conv4" in msg
    # A width mismatch of the same architecture is caught by shape.
    wider = models.build_model("resnet10", 4, width=0.25)
    with pytest.raises(zoo_lib.IncompatibleCheckpointError, match="shape mismatch"):
        zoo_lib.restore_variables(entry.path / "best", wider, jnp.zeros((1, *SHAPE)))


def test_metadata_is_written_last_and_atomically(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path)
    _entry(zoo, "latin", "sam")
    d = zoo.entry_dir("glyphs", "latin", "sam")
    assert not (d / "metadata.json.tmp").exists()
    assert json.loads((d / "metadata.json").read_text())["complete"] is True
    zoo.invalidate("glyphs", "latin", "sam")
    assert not zoo.is_complete("glyphs", "latin", "sam")


def test_listing_command(tmp_path):
    zoo = zoo_lib.Zoo(tmp_path)
    _entry(zoo, "latin", "sam")
    proc = subprocess.run(
        [sys.executable, "-m", "flatfsc_jax.cli.zoo", f"--zoo={tmp_path}"],
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "glyphs/latin/sam" in out and "50.00%" in out and "conv4 x0.125" in out
