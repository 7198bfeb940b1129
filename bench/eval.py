"""Few-shot evaluation speed: cached embeddings + vmapped episodes vs URL-style re-embedding.

Two numbers per scale:

(a) the time to evaluate 600 variable-way variable-shot episodes (Meta-Dataset sampler,
    padded to 50 ways / 500 support / 500 query) on cached embeddings, after compilation;
(b) the speed-up over the URL-style loop that re-embeds each episode's support and query
    images. Its per-image embedding time is MEASURED on a few real-sized episodes; the
    600-episode totals are EXTRAPOLATED from it (running them would take an hour at 84 px).
    "End to end" charges the cached pipeline with embedding the whole split once.

Scales: Meta-Dataset (ResNet-18, 84x84x3, 512-d, a 20k-image split of 200 classes) and
Glyphs (resnet10 width 0.25, 28x28x1, 128-d, a 4k-image split of 100 classes).
Images and embeddings are synthetic: only shapes matter for timing.

    .venv/bin/python bench/eval.py                      # both scales, a few minutes
    .venv/bin/python bench/eval.py --scale glyphs       # ~1 minute
    .venv/bin/python bench/eval.py --timed-episodes 1   # quicker (a) + (b) estimate

"End to end" is bounded by the ratio of images in all episodes to images in the split.
What it measured: docs/benchmarks.md#evaluation.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from flatfsc_jax import models
from flatfsc_jax.data import episodes as episodes_lib
from flatfsc_jax.data import sampling, sources
from flatfsc_jax.evaluation import ncc

SCALES = {
    # name: (arch, width, image shape, classes, images per class)
    "meta_dataset": ("resnet18", 1.0, (84, 84, 3), 200, 100),
    "glyphs": ("resnet10", 0.25, (28, 28, 1), 100, 40),
}
NUM_EPISODES = 600
EMBED_BATCH = 128


def sample_batch(labels: np.ndarray, num_episodes: int, seed: int = 0):
    spec = sampling.EpisodeSpec()  # Meta-Dataset defaults: up to 50 ways, 500 support
    sampler = episodes_lib.EpisodeSampler(labels, spec, seed)
    return episodes_lib.pad_episodes(sampler.sample(num_episodes), spec=spec)


def time_cached(embeddings: np.ndarray, batch, repeats: int = 3) -> float:
    ncc.episode_accuracies(embeddings, batch)  # compile
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        ncc.episode_accuracies(embeddings, batch)
        best = min(best, time.perf_counter() - start)
    return best


def seconds_per_image(model, variables, image_shape, batch, num_images: int) -> float:
    """Eval-mode embedding time per image (fixed batch shape, compiled beforehand)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8)
    split = sources.SplitData("bench/x", "test", images, np.zeros(batch, np.int32), ["0"])
    ncc.embed_split(model, variables, split, batch_size=batch)  # compile
    rounds = max(1, -(-num_images // batch))
    start = time.perf_counter()
    for _ in range(rounds):
        ncc.embed_split(model, variables, split, batch_size=batch)
    return (time.perf_counter() - start) / (rounds * batch)


def run_scale(name: str, timed_episodes: int) -> None:
    arch, width, image_shape, num_classes, per_class = SCALES[name]
    n = num_classes * per_class
    model = models.build_model(arch, 0, width=width)
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(num_classes, model.embedding_dim))
    embeddings = (centres[labels] + 2.0 * rng.normal(size=(n, model.embedding_dim))).astype(
        np.float32
    )
    start = time.perf_counter()
    batch = sample_batch(labels, NUM_EPISODES)
    sample_time = time.perf_counter() - start
    cached = time_cached(embeddings, batch)
    images_per_episode = batch.support_mask.sum(1) + batch.query_mask.sum(1)
    print(f"\n== {name}: {arch} width {width}, {image_shape} images, {n} in the split ==")
    print(
        f"episodes: {NUM_EPISODES} variable-way variable-shot, ways {batch.ways.min()}-"
        f"{batch.ways.max()}, support {batch.support_mask.sum(1).min()}-"
        f"{batch.support_mask.sum(1).max()}, query {batch.query_mask.sum(1).min()}-"
        f"{batch.query_mask.sum(1).max()} (padded to {batch.max_ways}/"
        f"{batch.support_idx.shape[1]}/{batch.query_idx.shape[1]}); sampling took "
        f"{sample_time:.2f} s"
    )
    print(
        f"(a) cached embeddings [{n}, {model.embedding_dim}], {NUM_EPISODES} episodes after "
        f"compilation: {cached:.3f} s ({1e3 * cached / NUM_EPISODES:.2f} ms/episode)"
    )

    variables = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, *image_shape)))
    timed_images = int(images_per_episode[:timed_episodes].sum())
    per_image = seconds_per_image(model, variables, image_shape, EMBED_BATCH, timed_images)
    per_episode = per_image * images_per_episode[:timed_episodes].mean()
    url_total = per_image * images_per_episode.sum()
    embed_once = per_image * n
    print(
        f"(b) embedding: {1e3 * per_image:.2f} ms/image measured on {timed_images} images "
        f"({timed_episodes} episodes, batches of {EMBED_BATCH}) = {per_episode:.2f} s per "
        f"timed episode"
    )
    print(
        f"    URL-style re-embedding of all {NUM_EPISODES} episodes "
        f"({images_per_episode.sum()} images): {url_total:.0f} s  [EXTRAPOLATED]"
    )
    print(
        f"    speed-up, episode evaluation on cached embeddings: "
        f"{url_total / cached:.0f}x  [EXTRAPOLATED]"
    )
    print(
        f"    speed-up, end to end (embed the {n}-image split once = {embed_once:.3g} s "
        f"[EXTRAPOLATED] + (a)): {url_total / (embed_once + cached):.1f}x; it is bounded by "
        f"(images in all episodes) / (images in the split) = "
        f"{images_per_episode.sum() / n:.1f}, so it is larger on smaller test splits"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=[*SCALES, "all"], default="all")
    parser.add_argument(
        "--timed-episodes", type=int, default=3, help="episodes whose embedding is timed"
    )
    args = parser.parse_args()
    if args.timed_episodes < 1:
        parser.error("--timed-episodes must be >= 1")
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    for name in SCALES if args.scale == "all" else [args.scale]:
        run_scale(name, args.timed_episodes)


if __name__ == "__main__":
    main()
