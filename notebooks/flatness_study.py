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
# # Does flatness predict transfer? The study's figures
#
# This notebook only *reads* what the study wrote: it loads
# `<workdir>/study/results.json` from
# `python -m flatfsc_jax.cli.flatness_study --config=configs/flatness_study.py --workdir=study`
# and redraws its figures with the functions of `flatfsc_jax.flatness.study` (every
# statistic was computed by the study itself). Design, measures and statistics:
# `docs/flatness-transfer.md`.
#
# Set `FLATFSC_STUDY_WORKDIR` to the study's workdir (default `../study`).

# %%
import json
import os

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from flatfsc_jax.flatness import study
from flatfsc_jax.reporting import correlation

WORKDIR = os.environ.get("FLATFSC_STUDY_WORKDIR", "../study")
path = os.path.join(WORKDIR, "study", "results.json")
if not os.path.exists(path):
    raise FileNotFoundError(
        f"no {os.path.abspath(path)}: run python -m flatfsc_jax.cli.flatness_study first "
        "(from the repository root), or set FLATFSC_STUDY_WORKDIR to its workdir"
    )
with open(path) as f:
    results = json.load(f)
print(study.format_summary(results))

# %% [markdown]
# ## The primary measure against the primary outcome
#
# One point per backbone, coloured by optimiser. The shaded bands are the seed noise of
# the anchor configurations (mean +- 1.96 sd over their seeds): differences inside them
# are what retraining with another seed already gives.

# %%
fig, ax = plt.subplots(figsize=(6, 4.5))
study.plot_scatter(results, ax=ax)
plt.show()

# %% [markdown]
# ## Every measure against every outcome
#
# tau_b with its 95% BCa interval per measure, for the primary outcome (flatness
# measures and baselines side by side), then the whole table.

# %%
fig, ax = plt.subplots(figsize=(6, 4.5))
study.plot_taus(results, ax=ax)
plt.show()
display(Markdown(correlation.to_markdown(results["rows"])))
