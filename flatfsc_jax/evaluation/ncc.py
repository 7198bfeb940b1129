"""Few-shot evaluation on cached embeddings: embed once, evaluate thousands of episodes.

A frozen backbone maps each image to the same embedding in every episode, so the URL-style
loop that re-embeds support and query images per episode repeats work: here every image the
episodes use is embedded once (:func:`used_rows`, :func:`embed_split`) and episodes are index
arrays into that table (:func:`episode_accuracies`). All episodes of an ``EpisodeBatch``
share fixed padded shapes with masks, so one ``jax.vmap`` inside one ``jax.jit`` evaluates
them all and nothing recompiles between episodes (docs/evaluation.md#evaluator).

Classifier: nearest centroid (NCC). Prototypes are the masked mean support embedding of each
class; logits are ``scale * cos(query, prototype)`` (``scale=10`` as SUR/URL/TSA and the
paper) or the negative squared Euclidean distance (Prototypical Networks).

Episodes: an ``EpisodeBatch`` (:mod:`flatfsc_jax.data.episodes`; numpy, fixed shapes): ``support_*``
[E, S], ``query_*`` [E, Q] and the int ``max_ways`` (padded number of classes). Labels are
``0..ways-1``; padded slots are masked out (their indices only have to be valid array
indices).

Units: accuracies are fractions in [0, 1] everywhere in this module (multiply by 100 for
tables); :func:`summarize` and :func:`paired_difference` keep the units of their input.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flatfsc_jax.data import sources
from flatfsc_jax.data.episodes import EpisodeBatch

METRICS = ("cosine", "euclidean")

# Logit of a class that is absent from an episode (index >= ways). Finite, so softmax /
# cross-entropy never produce NaN, and far below any cosine (|.| <= scale) or negative
# squared distance of real embeddings, so an absent class never wins.
ABSENT_LOGIT = -1e30

# Episodes per jitted call: their gathered embeddings (chunk x (S + Q) x D x 4 bytes) should
# stay in a CPU's last-level cache (docs/performance.md#evaluation-cost).
DEFAULT_CHUNK = 8


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is unknown; choose one of {METRICS}")


# ----------------------------------------------------------------------------------------
# Embedding a split once.
# ----------------------------------------------------------------------------------------


def local_mesh() -> jax.sharding.Mesh:
    """This process's devices on one axis. Evaluation shards its batches of images and of
    episodes over them: every task is independent, and each process evaluates alone."""
    return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shard_rows(array, mesh: jax.sharding.Mesh):
    """``array`` split over ``mesh`` along its first axis (as it is on one device)."""
    if mesh.size == 1:
        return array
    return jax.device_put(
        array, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    )


def replicate(tree, mesh: jax.sharding.Mesh):
    if mesh.size == 1:
        return tree
    return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@functools.partial(jax.jit, static_argnums=0)
def _embed_uint8(model, variables, images_uint8):
    # Preprocessing on the device: uint8 crosses the host boundary (4x fewer bytes).
    return model.embed(variables, sources.preprocess(images_uint8))


def embed_split(model, variables: dict, split_data, *, batch_size: int = 256) -> np.ndarray:
    """Eval-mode embeddings of every image of ``split_data``: float32 [N, D].

    Batches have one fixed shape (the last one is padded by repeating its first image and
    the padding is dropped), so the embedding function compiles once per split size. With
    several local devices each batch is split over them (:func:`local_mesh`). A thread
    reads the next batch from the host while the device embeds this one. Pass a
    :class:`SplitRows` to embed only the rows episodes use (:func:`used_rows`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    n = len(split_data)
    if n == 0:
        raise ValueError(f"split {split_data.source}/{split_data.split} has no images")
    mesh = local_mesh()
    # A small split compiles for its own size, not a padded 256; a batch splits evenly
    # over the devices.
    batch = _round_up(min(batch_size, n), mesh.size)
    variables = replicate(variables, mesh)
    out = np.empty((n, model.embedding_dim), np.float32)

    def read(start):
        images = split_data.get_images(np.arange(start, min(start + batch, n)))
        if len(images) < batch:
            pad = np.repeat(images[:1], batch - len(images), axis=0)
            images = np.concatenate([images, pad])
        return images

    starts = list(range(0, n, batch))
    # One read ahead: host memory holds at most two batches of images, whatever n is.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, starts[0])
        for k, start in enumerate(starts):
            images = pending.result()
            if k + 1 < len(starts):
                pending = reader.submit(read, starts[k + 1])
            emb = _embed_uint8(model, variables, shard_rows(images, mesh))
            stop = min(start + batch, n)
            out[start:stop] = np.asarray(emb)[: stop - start]
    return out


class SplitRows:
    """The rows ``rows`` of a split, as a split: row ``i`` is the parent's ``rows[i]``.

    Evaluation embeds and adapts on this view, so it reads and embeds only the images
    its episodes use (:func:`used_rows`) instead of the whole split: MD's QuickDraw test
    split has 7.7M images, 600 episodes use at most ~600k (docs/scale.md).
    """

    def __init__(self, split_data, rows):
        self.parent = split_data
        self.rows = np.asarray(rows, np.int64)
        self.source, self.split = split_data.source, split_data.split
        self.labels = np.asarray(split_data.labels)[self.rows]
        # The split's own facts, for the report (the rows do not change them).
        self.class_names = split_data.class_names
        self.provenance = getattr(split_data, "provenance", None)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.parent.get_images(self.rows[:1]).shape[1:])

    def get_images(self, indices) -> np.ndarray:
        return self.parent.get_images(self.rows[np.asarray(indices, np.int64)])


def used_rows(episodes: EpisodeBatch) -> tuple[np.ndarray, EpisodeBatch]:
    """``(rows, compact)``: the sorted distinct split rows any slot of ``episodes``
    indexes (padded slots too: they must stay valid indices) and the same episodes
    indexing into ``rows`` (``compact.support_idx = position in rows``)."""
    support, query = np.asarray(episodes.support_idx), np.asarray(episodes.query_idx)
    rows, inverse = np.unique(np.concatenate([support.ravel(), query.ravel()]), return_inverse=True)
    inverse = inverse.astype(np.int32)
    compact = dataclasses.replace(
        episodes,
        support_idx=inverse[: support.size].reshape(support.shape),
        query_idx=inverse[support.size :].reshape(query.shape),
    )
    return rows, compact


# ----------------------------------------------------------------------------------------
# Nearest-centroid classifier (one episode; vmap for many).
# ----------------------------------------------------------------------------------------


def class_prototypes(support_emb, support_labels, support_mask, max_ways: int):
    """Masked class means [max_ways, D] and per-class support counts [max_ways]."""
    # segment_sum, not a one-hot matmul: S * D additions instead of S * D * max_ways MACs.
    weights = support_mask.astype(support_emb.dtype)
    sums = jax.ops.segment_sum(support_emb * weights[:, None], support_labels, max_ways)
    counts = jax.ops.segment_sum(weights, support_labels, max_ways)
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def prototype_logits(
    support_emb,
    support_labels,
    support_mask,
    query_emb,
    max_ways: int,
    *,
    metric: str = "cosine",
    scale: float = 10.0,
):
    """NCC logits [Q, max_ways] of ``query_emb`` [Q, D] against support prototypes.

    Args:
      support_emb: [S, D] support embeddings.
      support_labels: int [S] in ``0..ways-1`` (padded slots: any valid class index).
      support_mask: bool [S]; False marks padding.
      query_emb: [Q, D].
      max_ways: padded number of classes (static).
      metric: ``"cosine"`` -> ``scale * cos(query, prototype)``; ``"euclidean"`` ->
        ``-||query - prototype||^2`` (``scale`` is not used).

    Classes without any unmasked support example (``>= ways``) get :data:`ABSENT_LOGIT`.
    """
    check_metric(metric)
    prototypes, counts = class_prototypes(support_emb, support_labels, support_mask, max_ways)
    hi = jax.lax.Precision.HIGHEST
    if metric == "cosine":
        # eps inside the norm: an all-zero embedding (dead ReLUs) gives cos = 0, not NaN.
        q = query_emb * jax.lax.rsqrt(jnp.sum(query_emb**2, -1, keepdims=True) + 1e-12)
        p = prototypes * jax.lax.rsqrt(jnp.sum(prototypes**2, -1, keepdims=True) + 1e-12)
        logits = scale * jnp.matmul(q, p.T, precision=hi)
    else:
        sq_q = jnp.sum(query_emb**2, -1, keepdims=True)
        sq_p = jnp.sum(prototypes**2, -1)
        logits = -(sq_q - 2.0 * jnp.matmul(query_emb, prototypes.T, precision=hi) + sq_p)
    return jnp.where(counts > 0, logits, jnp.asarray(ABSENT_LOGIT, logits.dtype))


def masked_accuracy(logits, labels, mask):
    """Fraction of unmasked rows whose argmax equals the label (0 if nothing is unmasked)."""
    correct = (jnp.argmax(logits, -1) == labels) & mask
    return correct.sum() / jnp.maximum(mask.sum(), 1)


@functools.partial(jax.jit, static_argnames=("max_ways", "metric", "scale"))
def _chunk_accuracies(embeddings, episode_arrays, *, max_ways, metric, scale):
    def one(s_idx, s_lab, s_mask, q_idx, q_lab, q_mask):
        logits = prototype_logits(
            embeddings[s_idx],
            s_lab,
            s_mask,
            embeddings[q_idx],
            max_ways,
            metric=metric,
            scale=scale,
        )
        return masked_accuracy(logits, q_lab, q_mask)

    return jax.vmap(one)(*episode_arrays)


def check_episodes(episodes: EpisodeBatch, num_items: int) -> tuple[np.ndarray, ...]:
    """The six episode arrays (``EpisodeBatch.index_arrays()``), validated against a
    table of ``num_items`` rows."""
    if not isinstance(episodes, EpisodeBatch):
        raise TypeError(
            f"episodes must be an EpisodeBatch (EpisodeBatch.sample, pad_episodes), got "
            f"{type(episodes).__name__}"
        )
    arrays = tuple(np.asarray(a) for a in episodes.index_arrays())
    s_idx, s_lab, s_mask, q_idx, q_lab, q_mask = arrays
    max_ways = int(episodes.max_ways)
    for name, idx, mask in (("support_idx", s_idx, s_mask), ("query_idx", q_idx, q_mask)):
        used = idx[mask.astype(bool)]
        if used.size and (used.min() < 0 or used.max() >= num_items):
            raise ValueError(
                f"episodes.{name} holds indices in [{used.min()}, {used.max()}] but the split "
                f"has {num_items} items; episodes were sampled from another split"
            )
    for name, lab, mask in (("support_labels", s_lab, s_mask), ("query_labels", q_lab, q_mask)):
        used = lab[mask.astype(bool)]
        if used.size and (used.min() < 0 or used.max() >= max_ways):
            raise ValueError(
                f"episodes.{name} must lie in 0..max_ways-1={max_ways - 1}, "
                f"got [{used.min()}, {used.max()}]"
            )
    return arrays


def episode_accuracies(
    embeddings,
    episodes: EpisodeBatch,
    *,
    metric: str = "cosine",
    scale: float = 10.0,
    chunk: int = DEFAULT_CHUNK,
) -> np.ndarray:
    """NCC query accuracy of every episode on cached ``embeddings`` [N, D]: float [E].

    Episodes are evaluated ``chunk`` at a time by one vmapped, jitted function; the last
    chunk is padded (by repeating its first episode, results dropped) so every call has
    the same shapes and compiles once.
    """
    check_metric(metric)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    embeddings = jnp.asarray(embeddings, jnp.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {embeddings.shape}")
    arrays = check_episodes(episodes, embeddings.shape[0])
    arrays = (
        arrays[0].astype(np.int32),
        arrays[1].astype(np.int32),
        arrays[2].astype(bool),
        arrays[3].astype(np.int32),
        arrays[4].astype(np.int32),
        arrays[5].astype(bool),
    )
    return map_episode_chunks(
        lambda part: _chunk_accuracies(
            embeddings, part, max_ways=int(episodes.max_ways), metric=metric, scale=float(scale)
        ),
        arrays,
        chunk,
    )


def map_episode_chunks(fn, arrays, chunk: int) -> np.ndarray:
    """``fn`` over ``chunk`` episodes at a time: one compiled shape for every call.

    With several local devices each chunk is split over them by episode (``chunk`` rounded
    up to a multiple of the device count), and ``fn``'s jitted program follows that
    sharding. ``arrays`` are per-episode arrays (episodes first); the last chunk is padded by
    repeating its first episode and the padded results are dropped. ``fn(part)`` takes the
    tuple of chunked arrays and returns one value per episode.
    """
    num_episodes = arrays[0].shape[0]
    mesh = local_mesh()
    chunk = _round_up(min(chunk, num_episodes), mesh.size)  # whole episodes per device
    out = []
    for start in range(0, num_episodes, chunk):
        part = [a[start : start + chunk] for a in arrays]
        n = part[0].shape[0]
        if n < chunk:
            part = [np.concatenate([a, np.repeat(a[:1], chunk - n, axis=0)]) for a in part]
        out.append(np.asarray(fn(tuple(shard_rows(a, mesh) for a in part)))[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def tasks_on_one_table(
    embeddings: dict, episodes: EpisodeBatch, tasks
) -> tuple[np.ndarray, EpisodeBatch]:
    """Episodes to evaluate with different backbones, as one batch over one table.

    ``embeddings``: backbone key -> [N, D] embeddings of one split; ``tasks``: a sequence
    of ``(backbone key, episode position in episodes)``. Returns ``(table, task_batch)``:
    ``table`` [U, D] holds the rows the tasks use, each from its own backbone's
    embeddings (then zero rows up to a power of two), and ``task_batch`` has one entry per
    task (the same padded shapes) indexing into it. An evaluator on embeddings (NCC, PA)
    then runs all the tasks of a domain in one batched call, which compiles once (per
    table size) instead of once per backbone and task count; each task still sees exactly
    its own backbone's embeddings.
    """
    if not tasks:
        raise ValueError("tasks is empty; pass [(backbone key, episode position), ...]")
    keys = list(dict.fromkeys(key for key, _ in tasks))
    dims = {key: np.shape(embeddings[key])[1:] for key in keys}
    if len(set(dims.values())) != 1:
        raise ValueError(f"tasks mix backbones with different embedding shapes: {dims}")
    rows = max(len(embeddings[key]) for key in keys)
    position = {key: k for k, key in enumerate(keys)}
    which = np.asarray([position[key] for key, _ in tasks], np.int64)[:, None]
    sub = episodes.take(np.asarray([e for _, e in tasks], np.int64))
    # Global row of every slot (a padded slot keeps its valid, masked-out index into its
    # own backbone's rows), then the table of the distinct rows in use.
    support = which * rows + sub.support_idx
    query = which * rows + sub.query_idx
    used, inverse = np.unique(np.concatenate([support.ravel(), query.ravel()]), return_inverse=True)
    table = np.concatenate(
        [np.asarray(embeddings[key])[used[used // rows == k] % rows] for k, key in enumerate(keys)]
    )
    # Zero rows up to a power of two: the evaluators compile per table shape, and the
    # domains of a benchmark (same padded episode shapes) then share their programs.
    padded = 1 << max(int(len(table)) - 1, 0).bit_length()
    table = np.concatenate([table, np.zeros((padded - len(table), *table.shape[1:]), table.dtype)])
    inverse = inverse.astype(np.int32)
    task_batch = dataclasses.replace(
        sub,
        support_idx=inverse[: support.size].reshape(support.shape),
        query_idx=inverse[support.size :].reshape(query.shape),
    )
    return table, task_batch


# ----------------------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------------------


def summarize(accs) -> dict[str, Any]:
    """``dict(mean, ci95, n)``: mean and 95% half-interval ``1.96 * std / sqrt(n)``.

    ``std`` is the population standard deviation (``ddof=0``), as in the SUR/URL/TSA
    evaluation code whose numbers the paper compares against. Units are those of ``accs``.
    """
    accs = np.asarray(accs, np.float64).reshape(-1)
    n = accs.size
    if n == 0:
        raise ValueError("summarize needs at least one accuracy")
    return dict(mean=float(accs.mean()), ci95=float(1.96 * accs.std() / np.sqrt(n)), n=int(n))


def paired_difference(acc_a, acc_b) -> dict[str, Any]:
    """:func:`summarize` of ``acc_a - acc_b`` evaluated on the SAME episodes.

    Per-episode difficulty varies far more than the gap between two methods; pairing
    removes it, so this interval is much tighter than comparing two ``summarize`` results.
    """
    acc_a, acc_b = np.asarray(acc_a, np.float64), np.asarray(acc_b, np.float64)
    if acc_a.shape != acc_b.shape:
        raise ValueError(
            f"paired_difference needs accuracies of the same episodes; got shapes "
            f"{acc_a.shape} and {acc_b.shape}"
        )
    return summarize(acc_a - acc_b)


# ----------------------------------------------------------------------------------------
# Evaluator (validation during training and final test use the same object).
# ----------------------------------------------------------------------------------------


class FewShotEvaluator:
    """NCC evaluation of a backbone on a fixed set of episodes of one split.

    Construct once (the episodes are fixed, so validation curves compare like with like);
    ``run(model, variables)`` embeds each image the episodes use once (not the whole
    split) and evaluates all episodes on the cached embeddings.
    """

    def __init__(
        self,
        split_data,
        episodes: EpisodeBatch,
        *,
        metric: str = "cosine",
        batch_size: int = 256,
        chunk: int = DEFAULT_CHUNK,
    ):
        check_metric(metric)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        check_episodes(episodes, len(split_data))
        # Only the images the episodes use are embedded at each run (bounded memory on
        # multi-million-image splits); the episodes index that compact table.
        rows, self.episodes = used_rows(episodes)
        self.split_data = SplitRows(split_data, rows)
        self.metric = metric
        self.batch_size = batch_size
        self.chunk = chunk

    def run(self, model, variables: dict) -> dict[str, Any]:
        """``dict(accuracies=[E] fractions, mean, ci95)`` of the backbone on the episodes."""
        embeddings = embed_split(model, variables, self.split_data, batch_size=self.batch_size)
        accs = episode_accuracies(embeddings, self.episodes, metric=self.metric, chunk=self.chunk)
        del embeddings  # freed before training resumes
        summary = summarize(accs)
        return dict(accuracies=accs, mean=summary["mean"], ci95=summary["ci95"])
