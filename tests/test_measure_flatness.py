"""Tests for flatfsc_jax.measure_flatness: the Python-loop measures against flatness.py and
closed forms, and the command end to end on a zoo with a deliberately sharpened backbone.

The sharpened backbone is a reparametrisation of the other (Dinh et al. 2017): every conv
kernel times c < 1, and the running mean / variance of the BatchNorm after it times c / c^2.
In eval mode it computes the same function, so its training loss is the same, while the
Hessian block of the conv kernels grows by 1/c^2: every unnormalised measure must call it
sharper, and the filter-normalised landscape (Li et al. 2018) must not tell them apart.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatfsc_jax import flatness, models
from flatfsc_jax import measure_flatness as mf
from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, glyphs

DOMAIN = "latin"
SHARPEN = 0.25  # conv kernels x 0.25: their Hessian block x 16
EIGS = np.array([10.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])
TINY = [  # settings for a fast CLI run
    "--examples=64",
    "--sharpness_steps=2",
    "--power_iters=30",
    "--trace_samples=20",
    "--alphas=-1,1,5",
    "--grid_2d=3",
    "--compilation_cache=",
]


def _quadratic(a):
    a = jnp.asarray(a, jnp.float32)
    return lambda w: 0.5 * w["x"] @ a @ w["x"]


def _spd(eigs, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(eigs.size, eigs.size)))
    return (q * eigs) @ q.T


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
    paths = mf.main([f"--workdir={workdir}", f"--landscape_2d={DOMAIN}", *TINY])
    with open(paths["json"]) as f:
        return paths, json.load(f)


# ------------------------------------------------------------------- the loop measures


@pytest.mark.slow
def test_rho_sharpness_matches_flatness_on_a_model(split):
    model = models.build_model("conv4", split.num_classes, width=0.125)
    variables = model.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)))
    images, labels, _ = mf.training_batch(split, 16, 0)
    loss_fn = flatness.model_loss_fn(model, variables, images, labels)
    params = variables["params"]
    steps = mf.iteration_steps(loss_fn)
    ours = mf.rho_sharpness(steps, params, rho=0.05, num_steps=2)
    ref = flatness.rho_sharpness(loss_fn, params, rho=0.05, steps=2)
    for key in ("sharpness", "loss", "perturbed_loss", "perturbation_norm"):
        np.testing.assert_allclose(ours[key], float(ref[key]), rtol=1e-4, atol=1e-6)
    # No ascent step: SAM's one-step estimate L(w + rho g / ||g||) - L(w).
    one_step = mf.rho_sharpness(steps, params, rho=0.05, num_steps=0)

    @jax.jit
    def sam_one_step(params):
        loss, grad = jax.value_and_grad(loss_fn)(params)
        scale = 0.05 / optax.tree_utils.tree_norm(grad)
        return loss, loss_fn(jax.tree.map(lambda w, g: w + scale * g, params, grad))

    loss, perturbed = sam_one_step(params)
    np.testing.assert_allclose(one_step["loss"], float(loss), rtol=1e-6)
    np.testing.assert_allclose(one_step["perturbed_loss"], float(perturbed), rtol=1e-5)
    assert 0 < one_step["sharpness"] <= ours["sharpness"]


def test_rho_sharpness_at_a_critical_point_finds_the_top_curvature():
    # At w = 0 the gradient vanishes: the ascent starts from a seeded random direction
    # and converges to the top eigenvector, where the increase is rho^2 * lambda_1 / 2.
    loss_fn = _quadratic(_spd(EIGS))
    steps = mf.iteration_steps(loss_fn)
    params = {"x": jnp.zeros(EIGS.size)}
    out = mf.rho_sharpness(steps, params, rho=0.1, num_steps=60, seed=3)
    assert out["loss"] == 0.0
    np.testing.assert_allclose(out["perturbation_norm"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(out["sharpness"], 0.5 * 0.1**2 * EIGS[0], rtol=1e-3)
    assert out == mf.rho_sharpness(steps, params, rho=0.1, num_steps=60, seed=3)


def test_power_iteration_matches_eigvalsh_and_stops_at_tolerance():
    a = _spd(EIGS)
    steps = mf.iteration_steps(_quadratic(a))
    params = {"x": jnp.ones(EIGS.size)}
    full = mf.power_iteration(steps, params, iters=80, seed=0)
    np.testing.assert_allclose(full["eigenvalue"], np.linalg.eigvalsh(a)[-1], rtol=1e-5)
    assert full["iterations"] == len(full["estimates"]) == 80
    early = mf.power_iteration(steps, params, iters=80, tol=1e-3, seed=0)
    assert early["iterations"] < 80 and early["relative_change"] <= 1e-3
    assert early["estimates"] == full["estimates"][: early["iterations"]]
    np.testing.assert_allclose(early["eigenvalue"], EIGS[0], rtol=1e-2)
    # Largest magnitude with its sign, like flatness.top_hessian_eigenvalue.
    neg = mf.power_iteration(mf.iteration_steps(_quadratic(-a)), params, iters=80)
    np.testing.assert_allclose(neg["eigenvalue"], -EIGS[0], rtol=1e-5)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    diagonal = mf.hutchinson_trace(
        mf.iteration_steps(_quadratic(np.diag(EIGS))), {"x": jnp.ones(EIGS.size)}, samples=5
    )
    np.testing.assert_allclose(diagonal["trace"], EIGS.sum(), rtol=1e-6)
    assert diagonal["std_error"] < 1e-5
    a = _spd(EIGS)
    dense = mf.hutchinson_trace(
        mf.iteration_steps(_quadratic(a)), {"x": jnp.ones(EIGS.size)}, samples=400, seed=1
    )
    assert dense["std_error"] > 0
    assert abs(dense["trace"] - np.trace(a)) < 4 * dense["std_error"]


def test_bad_arguments_name_the_argument():
    steps = mf.iteration_steps(_quadratic(np.eye(2)))
    params = {"x": jnp.ones(2)}
    with pytest.raises(ValueError, match="rho"):
        mf.rho_sharpness(steps, params, rho=0.0)
    with pytest.raises(ValueError, match="samples"):
        mf.hutchinson_trace(steps, params, samples=1)
    with pytest.raises(ValueError, match="tol"):
        mf.power_iteration(steps, params, tol=-1.0)
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
    assert set(paths["landscapes"]) == set(paths["landscapes_2d"]) == {DOMAIN}
    for png in (paths["landscapes"][DOMAIN], paths["landscapes_2d"][DOMAIN]):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.dirname(paths["json"]).endswith("flatness")


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
    loss_fn = flatness.model_loss_fn(loaded.model, loaded.variables, images, labels)
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


def test_empty_or_missing_zoo_says_to_run_run_sh(tmp_path, capsys):
    with pytest.raises(mf.EmptyZooError, match=r"run ./run.sh first"):
        mf.measure_zoo(tmp_path / "missing", tmp_path / "data")
    # An interrupted entry (no metadata.json) does not count.
    (tmp_path / "zoo" / "glyphs" / DOMAIN / "erm" / "best").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"run ./run.sh first"):
        mf.main([f"--workdir={tmp_path}", "--compilation_cache="])
    assert not (tmp_path / "flatness").exists()


def test_command_rejects_bad_flags_before_any_work(workdir):
    with pytest.raises(SystemExit, match="rho"):
        mf.main([f"--workdir={workdir}", "--rho=-1", "--compilation_cache="])
    with pytest.raises(SystemExit, match="alphas"):
        mf.main([f"--workdir={workdir}", "--alphas=1,2", "--compilation_cache="])
    with pytest.raises(SystemExit, match="greek"):
        mf.main([f"--workdir={workdir}", "--landscape_2d=greek", "--compilation_cache="])


def test_measure_entry_rejects_a_split_of_another_domain(workdir, data_dir):
    glyphs.prepare(data_dir, ["greek"], verbose=False)
    other = benchmarks.load_split("glyphs", "greek", "train", data_dir)
    loaded = zoo_lib.Zoo(workdir / "zoo").load("glyphs", DOMAIN, "erm")
    with pytest.raises(ValueError, match="head over 36 classes"):
        mf.measure_entry(loaded, other, examples=8)
