"""Tests for flatfsc_jax.flatness.landscape: filter norms, closed forms and Python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatfsc_jax.flatness import landscape

EIGS = np.array([10.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1])


def _quadratic(a):
    a = jnp.asarray(a, jnp.float32)
    return lambda w: 0.5 * w @ a @ w


@pytest.fixture(scope="module")
def spd():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(EIGS.size, EIGS.size)))
    return (q * EIGS) @ q.T, q[:, 0]


# ------------------------------------------------------- filter-normalised directions


def _toy_params():
    rng = np.random.default_rng(0)
    return {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(5, 3)) * np.array([0.1, 1.0, 10.0])),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        },
        "bn": {"scale": jnp.ones(4) * 2.0},
    }


def test_random_direction_matches_filter_norms_and_zeroes_1d_params():
    params = _toy_params()
    d = landscape.random_direction(params, jax.random.key(0))
    assert jax.tree.structure(d) == jax.tree.structure(params)
    for name in ("conv", "dense"):
        w, dk = np.asarray(params[name]["kernel"]), np.asarray(d[name]["kernel"])
        np.testing.assert_allclose(
            np.linalg.norm(dk.reshape(-1, dk.shape[-1]), axis=0),
            np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0),
            rtol=1e-5,
        )
        # A direction, not a copy of the weights.
        cos = np.sum(w * dk) / (np.linalg.norm(w) * np.linalg.norm(dk))
        assert abs(cos) < 0.9
    np.testing.assert_array_equal(d["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(d["bn"]["scale"], 0.0)

    other = landscape.random_direction(params, jax.random.key(1))
    assert not np.allclose(other["conv"]["kernel"], d["conv"]["kernel"])


def test_random_direction_with_1d_params_scales_them_to_the_weight_norm():
    params = _toy_params()
    d = landscape.random_direction(params, jax.random.key(0), ignore_1d=False)
    for w, dv in (
        (params["dense"]["bias"], d["dense"]["bias"]),
        (params["bn"]["scale"], d["bn"]["scale"]),
    ):
        assert float(jnp.linalg.norm(dv)) == pytest.approx(float(jnp.linalg.norm(w)), rel=1e-5)
        assert not np.allclose(dv, w)


def test_random_direction_zero_weight_filter_gives_zero_direction():
    kernel = jnp.ones((4, 3)).at[:, 1].set(0.0)
    d = landscape.random_direction({"kernel": kernel}, jax.random.key(0))["kernel"]
    np.testing.assert_array_equal(d[:, 1], 0.0)
    assert np.all(np.isfinite(d))


# ----------------------------------------------------------------------------- landscapes


def test_loss_landscape_1d_matches_closed_form_on_a_quadratic(spd):
    a, _ = spd
    w = np.linspace(-1.0, 1.0, EIGS.size)
    d = np.cos(np.arange(EIGS.size))
    alphas = np.linspace(-1.0, 1.0, 11)
    losses = landscape.loss_landscape_1d(
        _quadratic(a), jnp.asarray(w, jnp.float32), jnp.asarray(d, jnp.float32), alphas
    )
    assert isinstance(losses, np.ndarray) and losses.shape == (11,)
    expected = [0.5 * (w + t * d) @ a @ (w + t * d) for t in alphas]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert losses[5] == pytest.approx(float(_quadratic(a)(jnp.asarray(w, jnp.float32))))


def test_loss_landscape_2d_matches_a_python_double_loop():
    def loss_fn(p):
        return jnp.sum(jnp.tanh(p["a"]) ** 2) + jnp.prod(p["b"]) + jnp.sum(p["a"]) * p["b"][0]

    params = {"a": jnp.array([[0.2, -0.4], [1.0, 0.1]]), "b": jnp.array([0.5, -1.5, 2.0])}
    dx = landscape.random_direction(params, jax.random.key(0), ignore_1d=False)
    dy = landscape.random_direction(params, jax.random.key(1), ignore_1d=False)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 4)
    grid = landscape.loss_landscape_2d(loss_fn, params, dx, dy, alphas, betas)
    assert grid.shape == (5, 4)
    loop = np.zeros((5, 4))
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            point = jax.tree.map(lambda p, x, y, a=a, b=b: p + a * x + b * y, params, dx, dy)
            loop[i, j] = float(loss_fn(point))
    np.testing.assert_allclose(grid, loop, rtol=1e-5, atol=1e-6)
    assert grid[2, :].tolist() != grid[:, 2].tolist()  # alphas index rows, betas columns


def test_landscape_rejects_bad_grids_and_mismatched_directions():
    params = {"w": jnp.ones(3)}
    loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    with pytest.raises(ValueError, match="alphas"):
        landscape.loss_landscape_1d(loss_fn, params, params, np.ones((2, 2)))
    with pytest.raises(ValueError, match="direction"):
        landscape.loss_landscape_1d(loss_fn, params, {"w": jnp.ones(4)}, [0.0, 1.0])
    with pytest.raises(ValueError, match="dir_y"):
        landscape.loss_landscape_2d(loss_fn, params, params, {"v": jnp.ones(3)}, [0.0], [0.0])
    with pytest.raises(ValueError, match="scalar"):
        landscape.loss_landscape_1d(lambda p: p["w"], params, params, [0.0, 1.0])


def test_plots_write_png_files(tmp_path):
    alphas = np.linspace(-1, 1, 9)
    path_1d = landscape.plot_landscape_1d(
        {"ERM": (alphas, 3 * alphas**2), "SAM": (alphas, alphas**2)}, tmp_path / "one.png"
    )
    grid = np.add.outer(alphas**2, 2 * alphas[:5] ** 2)
    path_2d = landscape.plot_landscape_2d(
        {"ERM": (alphas, alphas[:5], 3 * grid), "SAM": (alphas, alphas[:5], grid)},
        tmp_path / "two.png",
        title="toy",
    )
    for path in (path_1d, path_2d):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="losses have shape"):
        landscape.plot_landscape_1d({"x": (alphas, alphas[:3])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"len\(alphas\), len\(betas\)"):
        landscape.plot_landscape_2d({"x": (alphas, alphas, grid)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="curves"):
        landscape.plot_landscape_1d({}, tmp_path / "bad.png")
