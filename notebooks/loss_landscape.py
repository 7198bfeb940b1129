# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss landscapes: is the SAM backbone flatter than the ERM one?
#
# The paper's argument is that SAM backbones sit in flatter minima of their training
# loss and that this flatness is what transfers to unseen few-shot domains. This
# notebook measures it for the ERM and SAM backbones of one domain of the zoo, with
# `flatfsc_jax.flatness.zoo` (the library behind
# `python -m flatfsc_jax.cli.flatness`, which does the same for the whole zoo):
#
# * **rho-sharpness**: the largest loss increase within L2 distance rho of the weights
#   (the quantity SAM minimises);
# * the **top Hessian eigenvalue** (power iteration) and the **Hessian trace**
#   (Hutchinson);
# * the loss along **filter-normalised random directions** (Li et al. 2018), in 1-D
#   and 2-D.
#
# All on the same seeded subset of the domain's training images, with BatchNorm in
# eval mode. A caveat worth keeping in mind: the first three measures change when a
# network is rescaled without changing its function (Dinh et al. 2017; the tests of
# `flatfsc_jax.flatness.zoo` build such a rescaled copy), filter-normalised landscapes do not.
#
# Set `FLATFSC_WORKDIR` to the run's workdir (default `../work`).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.flatness import report as flatness_report
from flatfsc_jax.flatness import zoo as flatness_zoo

WORKDIR = os.environ.get("FLATFSC_WORKDIR", "../work")
DOMAIN = "latin"  # a seen domain with ERM and SAM backbones
SETTINGS = flatness_zoo.FlatnessSettings(examples=256, rho=0.05, grid_2d=9, seed=0)

zoo_root = os.path.join(WORKDIR, "zoo")
if not zoo_lib.Zoo(zoo_root).list():
    raise FileNotFoundError(
        f"no backbones in {os.path.abspath(zoo_root)}: run ./run.sh first (from the "
        "repository root), or set FLATFSC_WORKDIR to a finished run's workdir"
    )

# %% [markdown]
# ## Measuring both backbones
#
# Each backbone gets the same images and the same random probes; its landscape
# direction comes from the same Gaussian draw, scaled to its own filters.

# %%
results = flatness_zoo.measure_zoo(
    zoo_root,
    os.path.join(WORKDIR, "data"),
    domains=[DOMAIN],
    landscape_2d_domain=DOMAIN,
    settings=SETTINGS,
    progress=print,
)
by_method = {r["method"]: r for r in results["entries"]}
display(Markdown(flatness_report.flatness_markdown(results)))

# %% [markdown]
# ## 1-D landscape
#
# The training loss at `w + alpha * d` for a filter-normalised random direction `d`:
# at `|alpha| = 1` every filter has moved by its own norm. A flatter minimum has a wider,
# lower bowl around `alpha = 0`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for method, r in by_method.items():
    alphas = np.asarray(r["landscape_1d"]["alphas"])
    losses = np.asarray(r["landscape_1d"]["losses"])
    for ax in axes:
        ax.plot(alphas, losses, label=method, linewidth=1.8)
axes[0].set_title(f"{DOMAIN}: loss along a random direction")
axes[1].set_title("the same, log scale")
axes[1].set_yscale("log")
for ax in axes:
    ax.set_xlabel(r"$\alpha$")
    ax.set_ylabel("training loss")
    ax.axvline(0, color="0.6", linewidth=0.8, linestyle=":")
    ax.legend()
fig.tight_layout()

# %% [markdown]
# ## 2-D landscape
#
# Two independent filter-normalised directions, the same contour levels in both panels:
# tighter rings mean a sharper basin.

# %%
surfaces = {m: np.asarray(r["landscape_2d"]["losses"]) for m, r in by_method.items()}
levels = np.linspace(
    min(s.min() for s in surfaces.values()), max(s.max() for s in surfaces.values()), 20
)
fig, axes = plt.subplots(1, len(surfaces), figsize=(5 * len(surfaces), 4.2))
for ax, (method, losses) in zip(np.atleast_1d(axes), surfaces.items(), strict=True):
    grid = np.asarray(by_method[method]["landscape_2d"]["alphas"])
    filled = ax.contourf(grid, grid, losses.T, levels=levels, cmap="viridis")
    ax.contour(grid, grid, losses.T, levels=levels, colors="k", linewidths=0.3)
    ax.plot(0, 0, marker="*", color="w", markersize=10)
    ax.set(title=method, xlabel=r"$\alpha$", ylabel=r"$\beta$", aspect="equal")
fig.colorbar(filled, ax=axes, label="training loss")

# %% [markdown]
# ## Did the power iteration converge?
#
# The Rayleigh quotient of each iterate; the iteration stops once two consecutive
# estimates agree to the relative tolerance `power_tol`.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for method, r in by_method.items():
    estimates = r["eigenvalue_estimates"]
    ax.plot(range(1, len(estimates) + 1), estimates, marker="o", markersize=3, label=method)
ax.set(xlabel="power iteration", ylabel="Rayleigh quotient", title="top Hessian eigenvalue")
ax.legend()
fig.tight_layout()
