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
# # Quickstart: the backbone zoo, an episode, ERM vs SAM
#
# This notebook looks at what `./run.sh` produced: the zoo of backbones (one ERM and one
# SAM backbone per seen domain), a few-shot episode, and the NCC accuracy of the ERM and
# SAM backbones of one domain on the *same* 100 test episodes, compared with a paired
# difference. Everything is computed by the library (`flatfsc_jax.zoo`, `.evaluate`,
# `.data.episodes`); the notebook only calls it and plots.
#
# Set `FLATFSC_WORKDIR` to the run's workdir (default `../work`, the default of
# `./run.sh` seen from this folder).

# %%
import os

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from flatfsc_jax import zoo as zoo_lib
from flatfsc_jax.data import benchmarks, episodes, sampling
from flatfsc_jax.evaluation import ncc

WORKDIR = os.environ.get("FLATFSC_WORKDIR", "../work")
DOMAIN = "latin"  # a seen domain: it has its own ERM and SAM backbones
EPISODES = 100

zoo = zoo_lib.Zoo(os.path.join(WORKDIR, "zoo"))
entries = zoo.list()
if not entries:
    raise FileNotFoundError(
        f"no backbones in {os.path.abspath(os.path.join(WORKDIR, 'zoo'))}: run ./run.sh first "
        "(from the repository root), or set FLATFSC_WORKDIR to a finished run's workdir"
    )
print(zoo_lib.format_listing(entries))

# %% [markdown]
# ## One test episode
#
# Test episodes use the domain's *test classes*, which no backbone saw in training.
# Episodes follow Meta-Dataset's variable-way variable-shot protocol: each row is a
# class, support images (blue frames) then query images (orange frames).

# %%
benchmark = entries[0].benchmark
data_dir = os.path.join(WORKDIR, "data")
test_split = benchmarks.load_split(benchmark, DOMAIN, "test", data_dir)
sampler = episodes.EpisodeSampler(test_split, sampling.EpisodeSpec(), seed=0)
episode = sampler.episode(0)
print(
    f"{benchmark}/{DOMAIN} test split: {len(test_split)} images of {test_split.num_classes} "
    f"classes; episode 0: {episode.ways} ways, shots {episode.shots.tolist()}, "
    f"{episode.query_per_class} queries per class"
)
episode_figure = episodes.show_episode(test_split, episode, max_per_class=6)

# %% [markdown]
# ## ERM vs SAM on the same episodes
#
# Each backbone embeds every test image once; the episodes are index sets into that
# table, so evaluating 100 episodes takes one vectorised call. Because both backbones
# see the same episodes, the per-episode differences remove most of the
# episode-to-episode variance: the paired interval is much tighter than the two
# separate ones.

# %%
batch = sampler.sample_batch(EPISODES)
accuracies = {}
for method in ("erm", "sam"):
    backbone = zoo.load(benchmark, DOMAIN, method)
    embeddings = ncc.embed_split(backbone.model, backbone.variables, test_split)
    accuracies[method] = ncc.episode_accuracies(embeddings, batch)
    summary = ncc.summarize(100 * accuracies[method])
    print(f"{method}: {summary['mean']:.2f} ± {summary['ci95']:.2f} % over {summary['n']} episodes")
difference = ncc.paired_difference(100 * accuracies["sam"], 100 * accuracies["erm"])
print(f"SAM - ERM (paired): {difference['mean']:+.2f} ± {difference['ci95']:.2f} points")

# %%
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
left.scatter(100 * accuracies["erm"], 100 * accuracies["sam"], s=12, alpha=0.7)
left.plot([0, 100], [0, 100], color="0.6", linewidth=0.8)
left.set(xlabel="ERM accuracy (%)", ylabel="SAM accuracy (%)", title="one point per episode")
right.hist(100 * (accuracies["sam"] - accuracies["erm"]), bins=20)
right.axvline(difference["mean"], color="k", linestyle="--", label="mean")
right.set(xlabel="SAM - ERM (points)", ylabel="episodes", title="paired differences")
right.legend()
fig.tight_layout()

# %% [markdown]
# ## The run's report
#
# `./run.sh` ends with `<workdir>/report/report.md`: every evaluation domain (seen with
# their own backbone, unseen with the backbone PARC picks), NCC and fine-tuning
# adaptation, paired differences.

# %%
report_path = os.path.join(WORKDIR, "report", "report.md")
if os.path.exists(report_path):
    with open(report_path) as f:
        display(Markdown(f.read()))
else:
    print(f"{report_path} does not exist yet: the run's evaluate stage writes it")
